"""Batches for training and evaluation: augmentation here, everything else in extract.compute.pipeline.

Augmentation draws from a generator seeded by (seed, epoch, source index), so a batch's
pixels do not depend on worker count or on where a run was interrupted and resumed.
Files are decoded and augmented with PIL in DataLoader workers and shipped as uint8;
small in-memory arrays (CIFAR, digits) go to the device as they are and are cropped,
flipped and resized there in one grid_sample. Normalisation always runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from extract.compute.pipeline import SourceBatches, to_model_input
from extract.store.preprocess import Preprocess

CROP_SCALE = (0.08, 1.0)   # RandomResizedCrop's area range, as torchvision
CROP_RATIO = (3 / 4, 4 / 3)


def crop_params(rng: np.random.Generator, height: int, width: int,
                scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_params(seed: int, epoch: int, index: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """Crop box and flip for one image in one epoch: (top, left, h, w, flip)."""
    rng = np.random.default_rng([seed, epoch, index])
    box = crop_params(rng, height, width)
    return (*box, bool(rng.random() < 0.5))


@dataclass
class Batch:
    x: torch.Tensor | None        # normalised float batch on the device (None if every image failed)
    y: torch.Tensor | None        # labels on the device
    skipped: list[tuple[int, str]]  # (source index, reason) of unreadable images


def augment_pil(img: Image.Image, item: tuple[int, int], *, preprocess: Preprocess, seed: int) -> torch.Tensor:
    """Random resized crop + flip of one decoded file for item (source index, epoch) -> uint8 (3, crop, crop)."""
    index, epoch = item
    top, left, h, w, flip = augment_params(seed, epoch, index, img.height, img.width)
    size = preprocess.crop
    img = TF.resized_crop(img, top, left, h, w, [size, size],
                          interpolation=InterpolationMode(preprocess.interpolation), antialias=True)
    return TF.pil_to_tensor(TF.hflip(img) if flip else img)


def batch_indices(indices: np.ndarray, batch_size: int, shuffle_key: Sequence[int] | None) -> list[np.ndarray]:
    """Split (optionally shuffled) indices into batches; a trailing batch of one is dropped
    when shuffling (BatchNorm cannot train on a single image)."""
    if shuffle_key is not None:
        indices = np.random.default_rng(list(shuffle_key)).permutation(indices)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if shuffle_key is not None and len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


class _EpochBatches(torch.utils.data.Sampler):
    """Batch sampler whose batches (and their (index, epoch) items) follow `epoch`."""

    def __init__(self, loader: "SplitLoader"):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        for b in ld.batches():
            yield [(int(i), ld.epoch) for i in b] if ld.train else [int(i) for i in b]

    def __len__(self):
        return len(self.loader)


class SplitLoader:
    """Iterate one split's selected rows as normalised device batches.

    train=True: shuffled per epoch, RandomResizedCrop to the crop size + horizontal flip.
    train=False: in order, the backbone's eval preprocessing (resize, centre crop).
    """

    def __init__(self, source, indices, *, preprocess: Preprocess, train: bool, batch_size: int,
                 seed: int = 0, workers: int = 0, device: torch.device | str = "cpu",
                 channels_last: bool = False):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.preprocess, self.train, self.batch_size, self.seed = preprocess, train, batch_size, seed
        self.device, self.channels_last = torch.device(device), channels_last
        self.epoch = 0
        self.in_memory = source.arrays is not None
        transform = partial(augment_pil, preprocess=preprocess, seed=seed) if train else None
        self._batches = SourceBatches(source, preprocess, _EpochBatches(self), transform=transform,
                                      workers=workers, pin=self.device.type == "cuda", persistent=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        key = (self.seed, self.epoch) if self.train else None
        return batch_indices(self.indices, self.batch_size, key)

    def __len__(self) -> int:
        return len(self.batches())

    @property
    def n_images(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Batch]:
        for x, positions, reasons in self._batches:
            keep = np.array([not r for r in reasons])
            skipped = [(int(i), r) for i, r in zip(positions, reasons) if r]
            if not keep.any():
                yield Batch(None, None, skipped)
                continue
            if skipped:
                x, positions = x[torch.from_numpy(keep)], positions[keep]
            if self.train and self.in_memory:
                x = self._augment_on_device(x.to(self.device, non_blocking=True), positions)
            y = torch.from_numpy(self.source.labels[positions]).to(self.device, non_blocking=True)
            yield Batch(to_model_input(x, self.preprocess, self.device, self.channels_last), y, skipped)

    # Hand-written rather than torchvision's RandomResizedCrop so each crop is a pure function
    # of (seed, epoch, index): a resumed run sees exactly the pixels of an uninterrupted one.
    def _augment_on_device(self, x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Random resized crop + flip of a (B, 3, H, W) uint8 batch straight to (B, 3, crop, crop)."""
        n, _, height, width = x.shape
        theta = torch.zeros(n, 2, 3)
        for k, index in enumerate(rows):
            top, left, h, w, flip = augment_params(self.seed, self.epoch, int(index), height, width)
            theta[k, 0, 0] = (w / width) * (-1 if flip else 1)
            theta[k, 0, 2] = (left + w / 2) / width * 2 - 1
            theta[k, 1, 1] = h / height
            theta[k, 1, 2] = (top + h / 2) / height * 2 - 1
        size = self.preprocess.crop
        grid = F.affine_grid(theta.to(x.device), [n, 3, size, size], align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
