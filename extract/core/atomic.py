"""Write a file whole or not at all: into a temporary file beside it, then rename it over the target."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from extract.core.errors import UserError


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path in path's folder; on success it replaces path, on any failure it is removed.

    The caller creates the file (any writer that takes a file name); the target never holds half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ends in .tmp so that globs for the real suffix (*.json) never pick up a file being written
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> Path:
    """Path.write_text (UTF-8), atomically; returns path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextmanager
def write_errors(path) -> Iterator[None]:
    """Turn an OSError (disk full, no permission) while writing path into a one-line UserError."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; "
                        "results written before it are intact") from None
