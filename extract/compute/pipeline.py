"""One image pipeline for extraction and fine-tuning: source rows -> uint8 batches -> model input.

Files are decoded (and resized + cropped, or augmented) in DataLoader workers and shipped as uint8:
for evaluation, JPEGs by torchvision's decoder (decoder "tensor"), by TorchCodec's ("torchcodec") or by
PIL at the largest DCT reduction that keeps twice the resize target ("draft"), and resized as uint8 tensors;
every other file, and every file under decoder "pil" or a training transform, with PIL. Decoder
"cuda" ships JPEG bytes instead and decodes them on the GPU in batches (extract.compute.gpu_decode).
An unreadable file becomes a zero image with its reason, never an exception. In-memory
uint8 arrays (CIFAR, digits) are sliced in the main process. `to_model_input` then copies a batch
to the device, resizes it there when needed, normalises it and makes it channels_last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from extract.compute import gpu_decode
from extract.core.errors import UserError
from extract.registry.images import (ImageError, decode_jpeg_draft, decode_jpeg_file, decode_jpeg_torchcodec,
                                     open_jpeg_draft, read_bytes, tensor_decoder_available, torchcodec_available)
from extract.store.identity import DECODERS
from extract.store.preprocess import Preprocess

Transform = Callable[[Image.Image, object], torch.Tensor]  # (RGB image, item) -> uint8 (3, crop, crop)


# decoder "draft": JPEGs are decoded at the largest DCT scale that leaves DRAFT_MARGIN x the resize target on
# the short side, so the antialiased resize that follows still shrinks at least 2x. With a margin of 1 an
# 800 x 533 photo is decoded at 1/2 and resized by 0.96, nearly unfiltered: 6.8 grey levels from the full
# decode's pixels on average (ants/bees, Lite0's 256 resize) against 0.3 with 2; see bench/decoders.py.
DRAFT_MARGIN = 2
TORCHCODEC_HINT = 'pip install -e ".[torchcodec]"'


def resolve_decoder(decoder: str = "auto", device: torch.device | None = None) -> str:
    """The decoder that runs for a --decoder value (the identity records it; never 'auto'):

    'tensor' (JPEGs by torchvision, other files by PIL), 'torchcodec' (JPEGs by TorchCodec, the same
    libjpeg-turbo pixels; other files by PIL), 'draft' (JPEGs by PIL at the largest DCT scale, 1/2 to
    1/8, that leaves DRAFT_MARGIN x the resize target on the short side; other files by PIL), 'pil' (every
    file by PIL) or 'cuda' (JPEGs by nvJPEG on the GPU that computes, in batches; the rest as 'tensor').
    'auto' is 'tensor' where torchvision still has its JPEG decoder (deprecated since 0.29), else
    'torchcodec' where TorchCodec is installed, else 'pil'. A decoder that is not installed, or 'cuda'
    without CUDA or (when `device` is given) off a CUDA device: a one-line UserError."""
    if decoder not in DECODERS:
        raise UserError(f"unknown decoder {decoder!r}: use {', '.join(DECODERS)}")
    available = tensor_decoder_available()
    if decoder in ("tensor", "cuda") and not available:
        raise UserError(f"--decoder {decoder} needs torchvision.io.decode_jpeg, which this torchvision lacks; "
                        "use --decoder torchcodec, draft or pil")
    if decoder == "torchcodec" and not torchcodec_available():
        raise UserError(f"--decoder torchcodec needs TorchCodec, which is not installed: {TORCHCODEC_HINT}; "
                        "or use --decoder tensor, draft or pil")
    if decoder == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--decoder cuda decodes JPEGs on a CUDA GPU, and CUDA is not available here: use "
                            "--decoder tensor (the default) or pil")
        if device is not None and device.type != "cuda":
            raise UserError(f"--decoder cuda decodes on the GPU that computes the features, not with --device "
                            f"{device}: use --device cuda, or --decoder tensor")
    if decoder != "auto":
        return decoder
    return "tensor" if available else "torchcodec" if torchcodec_available() else "pil"


def position(item) -> int:
    """Source position of a sampler item: the item itself, or the first element of a tuple."""
    return int(item[0] if isinstance(item, tuple) else item)


class DecodedFiles(Dataset):
    """Items of a file source -> (uint8 (3, crop, crop), position, reason); reason '' when readable.

    An item is a position, or a tuple starting with one (the rest is for `transform`, e.g. an
    epoch). `transform(image, item)` defaults to the eval resize + centre crop, which decoders
    "tensor", "torchcodec" and "draft" compute on uint8 tensors for 8-bit greyscale and colour JPEGs
    (decoded by torchvision, TorchCodec, or PIL at a reduced DCT scale); PIL takes the rest: other
    formats, CMYK, corrupt or truncated files, whose reasons PIL names, and 'nearest' resizing (with
    "draft", of the reduced image). "pil" decodes all with PIL. "cuda" gives the bytes of the JPEGs
    nvJPEG takes as a 1-D uint8 tensor instead (decoded on the GPU by `SourceBatches`; the rest as
    "tensor"). The cuda decoder's device checks are `resolve_decoder`'s, made where the device is known.
    """

    def __init__(self, source, preprocess: Preprocess, transform: Transform | None = None, decoder: str = "auto"):
        self.source, self.preprocess, self.transform = source, preprocess, transform
        self.decoder = decoder if decoder == "cuda" else resolve_decoder(decoder)
        eval_files = transform is None and getattr(source, "paths", None) is not None
        # 'nearest' stays with PIL: torch picks a neighbouring pixel for ~0.1% of them (up to 253 levels off)
        tensors = eval_files and preprocess.interpolation != "nearest"
        self._jpeg = None          # path, bytes -> RGB uint8 (3, H, W) or None (then PIL)
        self._draft_side = DRAFT_MARGIN * preprocess.resize
        if tensors and self.decoder in ("tensor", "cuda"):
            self._jpeg = decode_jpeg_file
        elif tensors and self.decoder == "torchcodec":
            self._jpeg = decode_jpeg_torchcodec
        elif tensors and self.decoder == "draft":
            self._jpeg = partial(decode_jpeg_draft, min_side=self._draft_side)
        self._draft_pil = eval_files and not tensors and self.decoder == "draft"
        self.gpu = self._jpeg is not None and self.decoder == "cuda"

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item) -> tuple[torch.Tensor, int, str]:
        i = position(item)
        data = None
        if self.gpu:
            data = read_bytes(self.source.paths[i])
            if gpu_decode.for_the_gpu(data):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), i, ""
        x, reason = self.decode_on_cpu(i, item, data)
        return x, i, reason

    def decode_on_cpu(self, i: int, item=None, data: bytes | None = None) -> tuple[torch.Tensor, str]:
        """Position `i` decoded and resized here: (uint8 (3, crop, crop), '') or (zeros, reason)."""
        if self._jpeg is not None:
            x = self._jpeg(self.source.paths[i], data)
            if x is not None:
                return self.preprocess.resize_crop_tensor(x), ""
        elif self._draft_pil:
            img = open_jpeg_draft(self.source.paths[i], data, min_side=self._draft_side)
            if img is not None:
                return self.preprocess.resize_crop_pil(img), ""
        try:
            img = self.source.load(i)
        except ImageError as e:
            crop = self.preprocess.crop
            return torch.zeros(3, crop, crop, dtype=torch.uint8), e.reason
        return (self.transform(img, i if item is None else item) if self.transform
                else self.preprocess.resize_crop_pil(img)), ""


def array_batch(arrays: np.ndarray, rows) -> torch.Tensor:
    """Rows (a slice or indices) of an (N, H, W, 3) uint8 array as a (B, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(arrays[rows])).permute(0, 3, 1, 2)


def _collate(items) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    x, positions, reasons = zip(*items)
    return torch.stack(x), np.array(positions, dtype=np.int64), list(reasons)


def _collate_list(items) -> tuple[list[torch.Tensor], np.ndarray, list[str]]:
    """For decoder cuda: JPEG bytes and decoded images side by side, stacked after the GPU decodes."""
    x, positions, reasons = zip(*items)
    return list(x), np.array(positions, dtype=np.int64), list(reasons)


class SourceBatches:
    """Iterate (uint8 (B, 3, H, W), positions (B,), reasons) over the batches of `batch_sampler`.

    `batch_sampler` yields lists of items (see DecodedFiles) and is read afresh on every pass.
    For files the DataLoader is built once, so `persistent` workers outlive a pass; its
    workers are seeded from a private generator, never from the global torch RNG. Decoder "cuda"
    (files, eval transform) yields batches already on `device`, decoded there
    (extract.compute.gpu_decode); `resolve_decoder` refuses it without a CUDA `device`.
    """

    def __init__(self, source, preprocess: Preprocess, batch_sampler: Iterable[Sequence], *,
                 transform: Transform | None = None, workers: int = 0, pin: bool = False,
                 persistent: bool = False, decoder: str = "auto", device: torch.device | None = None,
                 decode_threads: int = 1):
        self.source, self.batch_sampler, self.pin, self.preprocess = source, batch_sampler, pin, preprocess
        self.loader, self.device = None, device
        self.decode_threads = decode_threads if workers == 0 else 1
        if source.arrays is None:
            files = DecodedFiles(source, preprocess, transform, decoder)
            if files.gpu:
                resolve_decoder("cuda", device or torch.device("cpu"))
            self.files = files
            self.loader = DataLoader(
                files, batch_sampler=batch_sampler, num_workers=workers,
                collate_fn=_collate_list if files.gpu else _collate, pin_memory=pin,
                persistent_workers=persistent and workers > 0,
                prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str]]]:
        if self.loader is not None and self.files.gpu:
            for items, positions, reasons in self.loader:
                x, reasons = gpu_decode.decode_batch(items, positions, reasons, preprocess=self.preprocess,
                                                     device=self.device, fallback=self.files.decode_on_cpu)
                yield x, positions, reasons
            return
        if self.loader is not None and self.decode_threads > 1:
            yield from self._threaded()
            return
        if self.loader is not None:
            yield from self.loader
            return
        for items in self.batch_sampler:
            rows = np.array([position(it) for it in items], dtype=np.int64)
            x = array_batch(self.source.arrays, rows)
            yield (x.pin_memory() if self.pin else x), rows, [""] * len(rows)

    def _threaded(self) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str]]]:
        """Batches decoded in the calling process by `decode_threads` threads at once, torch's own ops
        (resizing) on one thread each meanwhile. With no DataLoader worker the compute waits for each
        batch; decoding it on every core rather than one shortens that wait (ants/bees x 4, Lite0 bf16, whole
        process, 2 cores, medians of 3: OpenVINO 97.8 -> 109.7 images/s, torch 83.5 -> 86.4). A DataLoader
        has no thread-pool mode; its workers are processes that would decode beside the compute instead."""
        with ThreadPoolExecutor(self.decode_threads) as pool:
            for items in self.batch_sampler:
                saved = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    decoded = list(pool.map(self.files.__getitem__, items))
                finally:
                    torch.set_num_threads(saved)
                x, positions, reasons = _collate(decoded)
                yield (x.pin_memory() if self.pin else x), positions, reasons


def to_model_input(x: torch.Tensor, preprocess: Preprocess, device: torch.device,
                   channels_last: bool = False) -> torch.Tensor:
    """Batch in [0, 255] (B, 3, h, w) -> normalised float32 (B, 3, crop, crop) on `device`.

    Copies non-blocking (pinned batches overlap with compute); resizes + crops on the device
    only when the batch is not already crop-sized.
    """
    x = x.to(device, non_blocking=True)
    if tuple(x.shape[-2:]) != (preprocess.crop, preprocess.crop):
        x = preprocess.resize_crop_batch(x)
    x = preprocess.normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
