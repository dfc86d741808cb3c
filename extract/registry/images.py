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


# --- JPEG files straight to a uint8 tensor (libjpeg-turbo through torchvision, TorchCodec or PIL) -------

JPEG_MAGIC = b"\xff\xd8\xff"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # frame headers (not DHT, JPG, DAC)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, bits per sample) from a JPEG's frame header; None if not found."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 10 > n or length < 8:
                return None
            bits, height = data[i + 4], int.from_bytes(data[i + 5:i + 7], "big")
            width, components = int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
            return width, height, components, bits
        i += 2 + length
    return None


def read_bytes(path) -> bytes | None:
    """A file's bytes; None when it cannot be read (open_rgb then names the reason)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def plain_jpeg(data: bytes) -> bool:
    """True for an 8-bit greyscale or colour JPEG within PIL's decompression-bomb limit (by its frame
    header); False for anything else (not a JPEG, CMYK/YCCK, 12-bit, too large, no frame header)."""
    if not data.startswith(JPEG_MAGIC):
        return False
    frame = jpeg_frame(data)
    if frame is None:
        return False
    width, height, components, bits = frame
    if components not in (1, 3) or bits != 8 or not width or not height:
        return False
    return not (Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS)


def exif_rotated(data: bytes) -> bool:
    """True when a JPEG's EXIF orientation asks for a rotation or flip (a tag other than 1); unreadable
    EXIF counts as rotated, so that the CPU decoders (which handle it) get the file."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(0x0112, 1) != 1
    except Exception:  # noqa: BLE001 - any doubt: the CPU path
        return True


def decode_jpeg_file(path, data: bytes | None = None):
    """An 8-bit greyscale or colour JPEG file -> EXIF-oriented RGB uint8 tensor (3, H, W), decoded by
    torchvision; None for anything else (not a JPEG, CMYK/YCCK, 12-bit, over PIL's decompression-bomb
    limit, unreadable, truncated or corrupt), which `open_rgb` then decodes or names the reason for.
    `data`: the file's bytes when already read."""
    data = read_bytes(path) if data is None else data
    if data is None or not plain_jpeg(data):
        return None
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # torchvision 0.29+: "use TorchCodec"
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        return None


def tensor_decoder_available() -> bool:
    """True when torchvision can decode JPEGs to tensors (its image codecs are deprecated since 0.29)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def decode_jpeg_torchcodec(path, data: bytes | None = None):
    """As `decode_jpeg_file`, decoded by TorchCodec (torchcodec.decoders.decode_jpeg, libjpeg-turbo; it
    applies the EXIF orientation itself); None for anything but an 8-bit greyscale or colour JPEG that
    it decodes."""
    data = read_bytes(path) if data is None else data
    if data is None or not plain_jpeg(data):
        return None
    from torchcodec.decoders import decode_jpeg

    try:
        return decode_jpeg(data, mode="RGB")
    except (RuntimeError, ValueError):
        return None


def torchcodec_available() -> bool:
    """True when TorchCodec's JPEG decoder imports (torchcodec 0.16 and later)."""
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or its native library failing to load (OSError, RuntimeError)
        return False
    return True


def draft_scale(size: tuple[int, int], min_side: int) -> int:
    """The DCT scale denominator (8, 4, 2 or 1) a JPEG of `size` (width, height) is decoded at so that both
    sides keep at least `min_side` pixels: the largest that does (PIL's `Image.draft` rule)."""
    scale = min(size[0] // min_side, size[1] // min_side) if min_side > 0 else 1
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def open_jpeg_draft(path, data: bytes | None = None, *, min_side: int) -> Image.Image | None:
    """An 8-bit greyscale or colour JPEG file -> EXIF-oriented RGB PIL image, decoded by PIL (libjpeg-turbo)
    at the largest DCT scale (1/2, 1/4 or 1/8; `draft_scale`) that leaves both sides at least `min_side`
    pixels: a 4032 x 3024 photo is decoded as 1008 x 756 for `min_side` 512 (extraction's draft decoder asks
    for twice the resize target), at a sixteenth of the pixels. None for anything else (as `decode_jpeg_file`: `open_rgb` then decodes it or names the reason).
    `data`: the file's bytes when already read."""
    data = read_bytes(path) if data is None else data
    if data is None or not plain_jpeg(data):
        return None
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            im.draft(im.mode, (min_side, min_side))
            im.load()
            oriented = _oriented(im)
            if oriented.mode != "RGB":
                return to_rgb(oriented)
            return oriented if oriented is not im else im.copy()   # `im` is closed on leaving the block
    except Exception:  # noqa: BLE001 - truncated or corrupt: open_rgb names the reason
        return None


def decode_jpeg_draft(path, data: bytes | None = None, *, min_side: int):
    """`open_jpeg_draft` as an RGB uint8 tensor (3, H, W) (channels-last memory, as torchvision's decoder
    gives); None where it gives None. At scale 1 (a photo under twice `min_side` on its short side) the
    pixels equal torchvision's and TorchCodec's decoders' (all three are libjpeg-turbo)."""
    im = open_jpeg_draft(path, data, min_side=min_side)
    if im is None:
        return None
    import torch

    return torch.from_numpy(np.array(im)).permute(2, 0, 1)
