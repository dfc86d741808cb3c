"""--decoder cuda: JPEG files decoded on the GPU in batches, everything else on the CPU as before.

DataLoader workers read each file and pass on the bytes of the JPEGs nvJPEG takes (8-bit greyscale or
colour, within PIL's pixel limit, without an EXIF rotation: torchvision applies EXIF orientation on the
CPU only) as 1-D uint8 tensors; every other file (PNG, CMYK, 12-bit, rotated, not an image) is decoded and
resized in the worker as by the `tensor` decoder, unreadable ones with their reasons. The main process then
decodes a batch's JPEG bytes on the GPU in one call (torchvision.io.decode_jpeg(device="cuda"), nvJPEG),
resizes and crops each image there, and stacks the batch on the device. A batch that nvJPEG refuses is
decoded image by image, and an image it still refuses goes to the CPU (`fallback`: the tensor decoder,
then PIL), which decodes it or names the reason, so the skip and stop rules see what other decoders see.
Out of GPU memory is never a fallback: it is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from extract.registry.images import exif_rotated, plain_jpeg
from extract.store.preprocess import Preprocess

Decode = Callable[[list[torch.Tensor]], list[torch.Tensor]]   # JPEG bytes (CPU) -> RGB uint8 (3, H, W) each
Fallback = Callable[[int], tuple[torch.Tensor, str]]          # position -> (uint8 (3, crop, crop), reason)


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory error (GPU), or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or \
        (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def for_the_gpu(data: bytes | None) -> bool:
    """True for file bytes that nvJPEG decodes as the CPU decoders would (see the module docstring)."""
    return data is not None and plain_jpeg(data) and not exif_rotated(data)


def is_encoded(x: torch.Tensor) -> bool:
    """A worker's item is JPEG bytes still to decode (1-D), not a decoded image (3, crop, crop)."""
    return x.dim() == 1


def nvjpeg(device: torch.device) -> Decode:
    """torchvision's batched nvJPEG decode onto `device`, as RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # torchvision 0.29+: "use TorchCodec"
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return decode


def _decode_each(datas: list[torch.Tensor], decode: Decode) -> list[torch.Tensor | None]:
    """All at once; when that fails, one by one (None for each one that fails)."""

    try:
        return list(decode(datas))
    except (RuntimeError, ValueError) as e:
        if is_out_of_memory(e):
            raise
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            out.append(decode([data])[0])
        except (RuntimeError, ValueError) as e:
            if is_out_of_memory(e):
                raise
            out.append(None)
    return out


def decode_batch(items: Sequence[torch.Tensor], positions: Sequence[int], reasons: list[str], *,
                 preprocess: Preprocess, device: torch.device, fallback: Fallback,
                 decode: Decode | None = None) -> tuple[torch.Tensor, list[str]]:
    """A batch of worker items (JPEG bytes or decoded (3, crop, crop) images) -> uint8 (B, 3, crop, crop)
    on `device`, and the reasons with those of the images only the CPU could judge. `decode` defaults to
    nvJPEG on `device`; `fallback(position)` decodes one image on the CPU."""
    decode = decode or nvjpeg(device)
    reasons = list(reasons)
    out: list[torch.Tensor | None] = [None if is_encoded(x) else x.to(device, non_blocking=True) for x in items]
    encoded = [k for k, x in enumerate(items) if is_encoded(x)]
    if encoded:
        for k, image in zip(encoded, _decode_each([items[k] for k in encoded], decode)):
            if image is None:
                x, reasons[k] = fallback(int(positions[k]))
                out[k] = x.to(device, non_blocking=True)
            else:
                image = image.expand(3, -1, -1) if image.shape[0] == 1 else image   # greyscale
                out[k] = preprocess.resize_crop_tensor(image)
    return torch.stack(out), reasons
