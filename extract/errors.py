"""The one exception type that reaches the user as a plain message, and the CLI edge that prints it."""

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or a missing file: the command line prints the message and exits non-zero."""


def guarded(body: Callable[[], int | None]) -> int:
    """Run a CLI body: UserError -> 'error: ...' and exit 2; Ctrl-C -> exit 130; never a traceback for those.

    A KeyboardInterrupt raised with a message (what was saved, how to resume) prints that message.
    """
    try:
        return body() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
