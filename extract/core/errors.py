"""The one exception type that reaches the user as a plain message, and the CLI edge that prints it."""

import logging
import sys
from typing import Callable


class UserError(ValueError):
    """Bad input or a missing file: the command line prints the message and exits non-zero."""


class _PlainLines(logging.Handler):
    """Each log record as one plain line on stderr, where progress goes; stdout keeps the results
    (the stream is looked up per record, so redirected or captured streams are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING and not text.startswith(("warning:", "error:")):
                text = f"warning: {text}"
            print(text, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_HANDLER = _PlainLines(logging.INFO)


def show_log_lines(loggers) -> None:
    """Show the named loggers' records (INFO and up) as plain lines; idempotent."""
    for name in loggers:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)


def guarded(body: Callable[[], int | None], loggers=(), *, speaks: bool = True) -> int:
    """Run a CLI body: UserError -> 'error: ...' and exit 2; Ctrl-C -> exit 130; never a traceback for those.

    A KeyboardInterrupt raised with a message (what was saved, how to resume) prints that message.
    `loggers`: the names whose INFO records are shown as plain lines. `speaks` False (a torchrun rank
    other than 0) exits with the same codes and prints nothing, so a message appears once.
    """
    show_log_lines(loggers)
    say = (lambda text: print(text, file=sys.stderr)) if speaks else (lambda text: None)
    try:
        return body() or 0
    except UserError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        say(f"interrupted: {e}" if str(e) else "interrupted")
        return 130
