"""Open any image file as an RGB PIL image, or fail with a short, human reason.

Handles every PIL mode (1, L, LA, P with transparency, RGBA, CMYK, I, I;16, F,
YCbCr, ...), EXIF orientation, multi-frame files (first frame) and oversized
images. Transparent pixels are composited onto white, the way viewers show them.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
BACKGROUND = (255, 255, 255)


class ImageError(Exception):
    """An image file that cannot be read; `reason` is short enough for a summary table."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with a known image extension (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def open_rgb(path) -> Image.Image:
    """Decode `path` fully and return an EXIF-oriented RGB image; raise ImageError if unreadable."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "empty file")
    except OSError as e:
        raise ImageError(path, _os_reason(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)
                im.load()
                im = _oriented(im)
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(path, "image too large (over the decompression-bomb pixel limit)") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise ImageError(path, _os_reason(e)) from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageError(path, _decode_reason(e)) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image (alpha composited on white, high bit depths scaled to 8 bits)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I;16"):
        a = np.rint(np.asarray(im).astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;"):
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8.

    Integers: kept if they fit 0..255, divided by 257 if they fit 16 bits, else min-max scaled.
    Floats: [0, 1] is scaled by 255, [0, 255] kept, anything else min-max scaled.
    """
    is_float = np.issubdtype(a.dtype, np.floating)
    a = a.astype(np.float64)
    a[~np.isfinite(a)] = np.nan
    if a.size == 0 or not np.isfinite(a).any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if is_float and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) / (hi - lo or 1.0) * 255.0
    return np.nan_to_num(np.rint(a), nan=0.0).clip(0, 255).astype(np.uint8)


def _oriented(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not make a decodable image unreadable
        return im


def _os_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return e.strerror or str(e)


def _decode_reason(e: Exception) -> str:
    msg = str(e).strip()
    low = msg.lower()
    if "truncated" in low or isinstance(e, EOFError) or "broken data stream" in low:
        return "truncated image data"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return _os_reason(e)
    first = msg.splitlines()[0][:120] if msg else type(e).__name__
    return f"corrupt image data ({first})"
