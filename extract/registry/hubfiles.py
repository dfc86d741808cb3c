"""Published checkpoint files in torch.hub's cache: where they are, their hashes, fetching them once.

Finding and hashing a file imports no torch (a cache hit needs neither); downloading one uses torch.hub.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from extract.core.errors import UserError
from extract.core.filehash import sha256_file

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
log = logging.getLogger("extract.registry.checkpoints")


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache, also used by torchvision)."""
    if "torch" in sys.modules:   # it may have been moved with torch.hub.set_dir
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints"
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def check_file_hash(path: Path, sha256: str | None = None) -> str:
    """Return the file's sha256; raise UserError if it contradicts `sha256` or the hash prefix in its name."""
    digest = sha256_file(path)
    expected = sha256 or _hash_prefix(path.name)
    if expected and not digest.startswith(expected.lower()):
        raise UserError(f"checkpoint {path} is corrupt or not the published file: sha256 {digest[:16]}... "
                        f"does not match {expected[:16]}...; delete it and fetch it again")
    return digest


def _offline() -> bool:
    return os.environ.get("FEATPROBE_OFFLINE", "").lower() in ("1", "true", "yes")


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the URL's host (or its proxy) opens, else the reason it did not."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{parts.hostname} unreachable: {e.strerror or e}"


def hub_file(url: str, filename: str | None = None, *, download: bool = True, sha256: str | None = None) -> Path:
    """Path of a published checkpoint in the torch.hub cache, downloading it once if allowed.

    Offline (no network, ``download=False`` or ``FEATPROBE_OFFLINE=1``) a missing file
    raises UserError naming the file and the folder it belongs in.
    """
    folder = hub_checkpoint_dir()
    filename = filename or os.path.basename(urllib.parse.urlsplit(url).path)
    path = folder / filename
    if path.is_file():
        return path

    def missing(reason: str) -> UserError:
        return UserError(f"weights file {filename} not found in {folder}/ and {reason}; "
                         f"download {url} and place it in that folder")

    if not download or _offline():
        raise missing("downloading is turned off")
    reason = _reachable(url)
    if reason:
        raise missing(f"there is no network ({reason})")
    folder.mkdir(parents=True, exist_ok=True)
    log.info(f"downloading {url} to {path}")
    expected = sha256 or _hash_prefix(filename)
    import torch

    try:
        # torch.hub writes to a temporary file, checks the sha256 prefix, then moves it into place.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=sys.stderr.isatty())
    except RuntimeError as e:  # hash mismatch
        path.unlink(missing_ok=True)
        raise UserError(f"downloaded {filename} is not the published file ({e}); try again") from None
    except (urllib.error.URLError, OSError, ConnectionError) as e:
        path.unlink(missing_ok=True)
        raise missing(f"the download failed ({getattr(e, 'reason', None) or e})") from None
    return path


def _hash_prefix(filename: str) -> str | None:
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else None
