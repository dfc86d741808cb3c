"""Eval preprocessing as a property of the weights: resize, centre crop, scale, normalise.

The spatial part (resize + crop) runs either per file in DataLoader workers
(files of any size: on PIL images, or on uint8 tensors for JPEGs that
torchvision decoded) or on whole uint8 batches on the device (small in-memory
images such as CIFAR or digits). Normalisation always runs on the
device, so workers ship compact uint8 tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from extract.core.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_MODES = ("center", "squash")   # timm's eval crop modes that this preprocessing reproduces
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `crop`, then (x/255 - mean) / std.

    ``crop_mode`` "squash" (timm's eval mode of some weights) resizes both sides to `resize`,
    ignoring the aspect ratio, before the centre crop; "center" (default) keeps the aspect ratio.
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {list(CROP_MODES)}")

    @property
    def squash(self) -> bool:
        return self.crop_mode == "squash"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.crop_mode == "center":   # the default: files written before crop modes read the same
            del d["crop_mode"]
        return d

    def resize_crop_pil(self, img: "Image.Image") -> "torch.Tensor":
        """RGB PIL image -> uint8 tensor (3, crop, crop)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if self.squash and img.size != (self.resize, self.resize):
            img = TF.resize(img, [self.resize, self.resize], interpolation=InterpolationMode(self.interpolation))
        elif min(img.size) != self.resize:
            img = TF.resize(img, self.resize, interpolation=InterpolationMode(self.interpolation))
        if img.size != (self.crop, self.crop):
            img = TF.center_crop(img, self.crop)
        return TF.pil_to_tensor(img)

    def resize_crop_tensor(self, x: "torch.Tensor") -> "torch.Tensor":
        """uint8 tensor (3, H, W) -> uint8 tensor (3, crop, crop): the same geometry as `resize_crop_pil`
        (shorter side to `resize`, antialiased), computed by torch; bilinear and bicubic within 2 levels
        of PIL's ('nearest' as nearest-exact, PIL's rule, yet ~0.1% of pixels are a neighbour's)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F2

        mode = InterpolationMode.NEAREST_EXACT if self.interpolation == "nearest" \
            else InterpolationMode(self.interpolation)
        if self.squash and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F2.resize(x, [self.resize, self.resize], interpolation=mode, antialias=True)
        elif not self.squash and min(x.shape[-2:]) != self.resize:
            x = F2.resize(x, [self.resize], interpolation=mode, antialias=True)
        if tuple(x.shape[-2:]) != (self.crop, self.crop):
            x = F2.center_crop(x, [self.crop, self.crop])
        return x.contiguous()

    def resize_crop_batch(self, x: "torch.Tensor") -> "torch.Tensor":
        """uint8 or float batch (B, 3, h, w) on any device -> float batch (B, 3, crop, crop) in [0, 255]."""
        import torch.nn.functional as F
        from torchvision.transforms import functional as TF

        x = x.float()
        h, w = x.shape[-2:]
        if (h, w) != (self.resize, self.resize) and (self.squash or min(h, w) != self.resize):
            scale = self.resize / min(h, w)
            size = (self.resize, self.resize) if self.squash else \
                (max(self.resize, round(h * scale)), max(self.resize, round(w * scale)))
            mode = "nearest" if self.interpolation == "nearest" else self.interpolation
            shrinks = (self.resize < h or self.resize < w) if self.squash else scale < 1
            x = F.interpolate(x, size=size, mode=mode, antialias=mode != "nearest" and shrinks,
                              align_corners=False if mode != "nearest" else None)
            x = x.clamp_(0, 255)
        return TF.center_crop(x, [self.crop, self.crop])

    def normalize(self, x: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """Batch in [0, 255] (uint8 or float) -> normalised `dtype` (default float32) batch, same device."""
        import torch

        dtype = dtype or torch.float32
        mean, std = scaled_mean_std(tuple(self.mean), tuple(self.std), x.device)
        return ((x.float() - mean) / std).to(dtype)


def check_image_size(image_size) -> int | None:
    """None, or an input side in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE] as an int; else a one-line UserError."""
    if image_size is None:
        return None
    try:
        size = int(image_size)
        if size != float(image_size):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"--image-size takes a whole number of pixels, got {image_size!r}") from None
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size {size} is out of range: use {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels")
    return size


def effective_preprocess(preprocess: Preprocess, in_memory: bool, image_size: int | None = None) -> Preprocess:
    """The spatial preprocessing actually applied.

    Small in-memory images (CIFAR, digits) are resized straight to the crop size, not cropped.
    `image_size` N makes the network see N x N inputs: crop N, and files are first resized to
    round(N * resize / crop) of the weights' own preprocessing (same crop ratio).
    """
    if image_size is not None:
        resize = round(image_size * preprocess.resize / preprocess.crop)
        preprocess = dataclasses.replace(preprocess, resize=max(resize, image_size), crop=image_size)
    return dataclasses.replace(preprocess, resize=preprocess.crop) if in_memory else preprocess


@lru_cache(maxsize=64)
def scaled_mean_std(mean: tuple[float, ...], std: tuple[float, ...], device) -> tuple["torch.Tensor", "torch.Tensor"]:
    """mean * 255 and std * 255 as (1, C, 1, 1) float32 tensors on `device`, built once per device (not a
    host-to-device copy per batch); ordinary tensors, usable inside and outside inference mode."""
    import torch

    with torch.inference_mode(False), torch.no_grad():
        return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255 for v in (mean, std))
