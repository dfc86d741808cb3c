"""Content hashes of large files, computed once per (path, size, mtime): remembered in this process and
on disk ($FEATPROBE_HOME or ~/.cache/featprobe/sha256.json)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def featprobe_home() -> Path:
    """Where featprobe remembers things across processes: $FEATPROBE_HOME or ~/.cache/featprobe."""
    return Path(os.environ.get("FEATPROBE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featprobe"))


def sha_cache_file() -> Path:
    """Where file hashes are remembered across processes."""
    return featprobe_home() / "sha256.json"


def _read_sha_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _remember_sha(key: str, digest: str) -> None:
    """Best effort: a cache that cannot be written only costs a re-hash next time."""
    path = sha_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = _read_sha_cache(path)
        known[key] = digest
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, computed once per (path, size, mtime): remembered in this process and on disk."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    digest = _read_sha_cache(sha_cache_file()).get(disk_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        _remember_sha(disk_key, digest)
    _SHA_CACHE[key] = digest
    return digest


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record a digest already known for the file as it is now (e.g. computed before a rename)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    _SHA_CACHE[key] = digest
    _remember_sha(f"{key[0]}|{key[1]}|{key[2]}", digest)
