"""Listing an image folder's class folders: every real folder and file once, under its own class.

Links are followed, but a folder or file reached twice (a link loop, two class folders linking to each
other, a link into another class's folder) is listed once, under the class whose folder holds it; what
was left out is returned with a reason, as are entries that are not regular files (FIFOs, devices,
sockets, a folder named like an image) and entries that cannot be read.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from extract.registry.images import is_image_file

_SPECIAL = ((stat.S_ISFIFO, "a FIFO, not an image file"), (stat.S_ISCHR, "a character device, not an image file"),
            (stat.S_ISBLK, "a block device, not an image file"), (stat.S_ISSOCK, "a socket, not an image file"))


def readable(name: str) -> str:
    """A file name as text for labels and messages: bytes that are not UTF-8 are shown as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def subdirs(folder: str) -> list[str]:
    """Names of the visible folders (or links to folders) in `folder`, sorted."""
    def is_dir(e) -> bool:
        try:
            return e.is_dir()
        except OSError:   # a looping link
            return False

    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not hidden(e.name) and is_dir(e))


@dataclass
class Listing:
    """Image paths per class of one split folder, and what was left out: [(path, reason)]."""

    classes: dict[str, list[str]] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walk:
    """One split folder's walk: which real folders belong to which class, and what was listed."""

    def __init__(self, folder: str):
        self.folder = folder
        self.owners: dict[str, str] = {}   # real class folder -> class folder name
        self.seen: set[str] = set()        # real folders listed
        self.files: set[str] = set()       # real image files listed
        self.out = Listing()

    def leave(self, path: str, reason: str) -> None:
        self.out.left_out.append((path, reason))

    def run(self) -> Listing:
        for c in subdirs(self.folder):
            real = os.path.realpath(os.path.join(self.folder, c))
            if real in self.owners:
                self.leave(os.path.join(self.folder, c), f"the same folder as class {readable(self.owners[real])}")
            else:
                self.owners[real] = c
        self.seen.update(self.owners)
        for real, c in sorted(self.owners.items(), key=lambda item: item[1]):
            found = self.images(os.path.join(self.folder, c), real, c)
            if found:
                self.out.classes[readable(c)] = sorted(found)   # the paths keep the names as they are
        return self.out

    def owner(self, real: str) -> str | None:
        """The class whose folder holds this real path (the innermost when class folders nest)."""
        holders = [r for r in self.owners if _inside(real, r)]
        return self.owners[max(holders, key=len)] if holders else None

    def images(self, top: str, top_real: str, cls: str) -> list[str]:
        found, stack = [], [(top, top_real)]
        while stack:
            d, here = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.leave(d, f"cannot list it: {e.strerror or e}")
                continue
            for e in entries:
                if hidden(e.name):
                    continue
                entry = self.entry(e, here, cls)
                if isinstance(entry, tuple):
                    stack.append(entry)
                elif entry:
                    found.append(entry)
        return found

    def entry(self, e: os.DirEntry, here: str, cls: str):
        """A (folder, its real path) to walk, an image path to list, or None (left out or not an image)."""
        try:
            st = os.stat(e.path)
        except OSError as err:
            if e.is_symlink():
                self.leave(e.path, "a link loop" if err.errno == errno.ELOOP else "a link to nothing")
            else:
                self.leave(e.path, f"cannot read it: {err.strerror or err}")
            return None
        link = e.is_symlink()
        real = os.path.realpath(e.path) if link else os.path.join(here, e.name)
        if stat.S_ISDIR(st.st_mode):
            if is_image_file(e.name):
                self.leave(e.path, "a folder named like an image file")
            elif _inside(here, real):
                self.leave(e.path, f"a link back to {real}, which contains it")
            elif real in self.seen:
                other, what = self.owners.get(real), "a link to " if link else ""
                self.leave(e.path, f"{what}the folder of class {readable(other)}" if other else
                           f"{what}{real}, listed already")
            elif self.owner(real) not in (None, cls):
                self.leave(e.path, f"a link into the folder of class {readable(self.owner(real))}")
            else:
                self.seen.add(real)
                return e.path, real
            return None
        if not stat.S_ISREG(st.st_mode):
            reason = next((r for test, r in _SPECIAL if test(st.st_mode)), "not a regular file")
            self.leave(e.path, reason)
            return None
        if not is_image_file(e.name):
            return None
        if link and self.owner(real) not in (None, cls):
            self.leave(e.path, f"a link to an image of class {readable(self.owner(real))}")
        elif real in self.files:
            self.leave(e.path, f"the same file as {real}, listed already")
        else:
            self.files.add(real)
            return e.path
        return None


def list_classes(folder: str) -> Listing:
    """Class name -> sorted image paths (recursive) for every class folder of `folder` holding images."""
    return _Walk(folder).run()
