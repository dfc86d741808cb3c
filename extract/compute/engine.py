"""Batched frozen inference: what happens to a batch, top to bottom.

source -> uint8 batches (DataLoader workers decode + resize files; in-memory arrays are sliced)
-> device (pinned, non-blocking) -> resize on device if needed -> normalise -> channels_last
(those steps are extract.compute.pipeline, shared with finetune)
-> backbone under autocast -> pooled features -> writer thread -> HDF5.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import BatchSampler
from tqdm import tqdm

from extract.compute.allocator import tune_malloc
from extract.core.errors import UserError
from extract.compute.gpu_decode import is_out_of_memory
from extract.compute.pipeline import SourceBatches, to_model_input
from extract.core.precision import PRECISIONS, cpu_has_bf16  # noqa: F401 - re-exported
from extract.store.preprocess import (MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Preprocess,  # noqa: F401 - re-exported
                                      check_image_size, effective_preprocess)

INT8 = torch.int8   # not an autocast dtype: the marker of a post-training quantized network (engines that offer it)
log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; cuda:N must name a GPU this process sees."""
    if device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device} asked for, but CUDA is not available here")
        if dev.type == "cuda":
            check_gpu_index(device, dev.index, torch.cuda.device_count())
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_gpu_index(name: str, index: int | None, count: int) -> None:
    """A one-line UserError when `name` (cuda:N) asks for a GPU beyond the `count` this process sees."""
    if index is None or 0 <= index < count:
        return
    have = "no GPU" if count == 0 else "1 GPU (cuda:0)" if count == 1 else f"{count} GPUs (cuda:0 to cuda:{count - 1})"
    raise UserError(f"device {name} asked for, but this process sees {have}; CUDA_VISIBLE_DEVICES decides which "
                    "GPUs it sees and numbers them from 0")


def on_device(device: torch.device):
    """A context in which `device` (cuda:N) is the current CUDA device, so that pinned copies, the
    DataLoader's pinning thread and calls without a device use that GPU; a no-op for other devices."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return nullcontext()


BF16_CAPABILITY = (8, 0)   # Ampere and later compute bf16 natively


def cuda_auto_precision(capability: tuple[int, int]) -> torch.dtype:
    """What `auto` means on a GPU of this compute capability: bf16 from BF16_CAPABILITY on, else fp16.
    (torch.cuda.is_bf16_supported() is also True on older GPUs, where bf16 is emulated and slow.)"""
    return torch.bfloat16 if tuple(capability) >= BF16_CAPABILITY else torch.float16


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a precision name; None means plain fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "int8":
        return INT8
    if device.type == "cuda":
        return cuda_auto_precision(torch.cuda.get_device_capability(device))
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def precision_name(autocast: torch.dtype | None) -> str:
    """'fp32', 'bf16', 'fp16' or 'int8' for a resolved autocast dtype."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", INT8: "int8"}[autocast]


@contextmanager
def ieee_fp32(device: torch.device, autocast: torch.dtype | None) -> Iterator[None]:
    """fp32 on CUDA means IEEE fp32: TF32 is turned off for cuDNN convolutions and matmuls while the
    block runs (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) and restored
    after. Other devices and precisions: unchanged."""
    if device.type != "cuda" or autocast is not None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tf32_provenance(device: torch.device, autocast: torch.dtype | None) -> dict:
    """What the cache records about TF32: {"tf32": False} for fp32 on CUDA (IEEE fp32, see `ieee_fp32`)."""
    return {"tf32": False} if device.type == "cuda" and autocast is None else {}


def pad_rows(x: torch.Tensor, rows: int, channels_last: bool = False) -> torch.Tensor:
    """A batch grown to `rows` rows by repeating its last row (channels_last when asked)."""
    if len(x) >= rows:
        return x
    x = torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])])
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CORES_PER_DECODE_WORKER = 4


def default_workers(device: torch.device, cores: int | None = None) -> int:
    """DataLoader workers for image files: up to 8 beside a GPU, up to 4 beside MPS; on the CPU
    see `cpu_split`."""
    cores = cores or cpu_cores()
    if device.type == "cpu":
        return cpu_split(cores)[0]
    return min(8, cores) if device.type == "cuda" else max(1, min(4, cores - 1))


def cpu_split(cores: int | None = None) -> tuple[int, int]:
    """(decode workers, torch intra-op threads) for extraction on `cores` CPU cores.

    Decoding and resizing a JPEG costs a fraction of a forward pass (ants/bees for Lite0: ~2 ms
    against ~10-20 ms per image and core), so a core given to a worker mostly waits. Below
    CORES_PER_DECODE_WORKER cores the main process decodes between batches and every core computes
    (measured on 2 cores, whole pipeline, Lite0: 0 workers + 2 threads 82 img/s fp32 and 131 bf16;
    1 worker + 2 threads 74 and 127; 1 worker + 1 thread 54 and 99). From there one core in
    CORES_PER_DECODE_WORKER decodes in a DataLoader worker and the others compute (16 cores: 4 + 12),
    so that inline decoding does not leave many threads idle and no thread shares a core with a
    busy worker.
    """
    cores = max(1, cores or cpu_cores())
    workers = cores // CORES_PER_DECODE_WORKER
    return workers, cores - workers


def compute_threads(workers: int, cores: int | None = None) -> int:
    """torch intra-op threads for a CPU run beside `workers` decode workers: the cores they leave, but
    workers beyond `cpu_split`'s share do not take more cores from compute (2 cores, Lite0, 1 or 2
    workers: 2 threads 74-79 img/s fp32, 1 thread 54)."""
    cores = cores or cpu_cores()
    return max(1, cores - min(workers, cores // CORES_PER_DECODE_WORKER))


class Embedder:
    """A frozen backbone on a device at a precision: uint8 batch in, {layer: (B, D) tensor} out.

    compile=True runs the backbone through torch.compile. The first batch fixes the compiled batch
    size: a shorter batch (the last of a chunk) is padded to it by repeating its last row, so it does
    not trigger a recompilation; `compile_seconds` adds up the first call of every input shape
    (compilation included). fp32 on CUDA runs with TF32 off (`ieee_fp32`).
    """

    def __init__(self, backbone, device: torch.device, precision: torch.dtype | None, preprocess: Preprocess,
                 compile: bool = False):
        self.device, self.precision, self.preprocess = device, precision, preprocess
        self.channels_last = device.type in ("cuda", "cpu")
        backbone.eval().requires_grad_(False)
        self.backbone = backbone.to(device, memory_format=torch.channels_last) if self.channels_last \
            else backbone.to(device)
        self.compiled = compile
        self.compile_seconds: float | None = None
        self.compiled_rows: int | None = None     # the batch size the compiled graph was made for
        self._shapes: set[tuple[int, ...]] = set()
        if compile:
            self.backbone = torch.compile(self.backbone)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        n = len(x)
        try:
            x = to_model_input(x, self.preprocess, self.device, self.channels_last)
            if self.compiled:
                self.compiled_rows = self.compiled_rows or n
                x = pad_rows(x, self.compiled_rows, self.channels_last)
            with ieee_fp32(self.device, self.precision), \
                    torch.autocast(self.device.type, dtype=self.precision or torch.float32,
                                   enabled=self.precision is not None):
                out = self.backbone(x)
        except RuntimeError as e:   # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
            raise UserError(f"out of {self.device.type.upper()} memory at a batch of {n} images: rerun the "
                            f"same command with --batch-size {max(1, n // 2)} (finished chunks are kept)") \
                from None
        if self.compiled and tuple(x.shape) not in self._shapes:
            self._shapes.add(tuple(x.shape))
            took = time.perf_counter() - started
            self.compile_seconds = (self.compile_seconds or 0.0) + took
            log.info(f"torch.compile: the first batch of shape {tuple(x.shape)} took {took:.1f} s "
                     "(compilation included)")
        return {k: v[:n].float() for k, v in out.items()}

    def provenance(self) -> dict:
        return {"compile": self.compiled, "compile_seconds": self.compile_seconds,
                **({"compiled_batch": self.compiled_rows} if self.compiled else {}),
                **tf32_provenance(self.device, self.precision)}


@dataclass
class RunStats:
    """What one extraction pass did."""

    images: int = 0
    seconds: float = 0.0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)   # what ran (engine, device, workers), for the cache file

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def check_finite(features: dict[str, np.ndarray], precision: str | None = None) -> None:
    """A one-line UserError when a batch's features hold inf or NaN (nothing of it is written)."""
    bad = {k: int((~np.isfinite(v)).any(axis=tuple(range(1, v.ndim))).sum()) for k, v in features.items() if v.size}
    bad = {k: n for k, n in bad.items() if n}
    if not bad:
        return
    tap, n = next(iter(bad.items()))
    rows = len(features[tap])
    where = f"{n} of {rows} images ({tap})"
    if precision == "fp16":
        raise UserError(f"fp16 features overflowed to inf/NaN in {where}: this network exceeds fp16's range; "
                        "use --precision bf16 or fp32 (finished chunks are kept)")
    raise UserError(f"the network gave non-finite features (inf/NaN) in {where}"
                    + (f" at {precision}" if precision else "")
                    + "; nothing of this batch was written: check the weights (finished chunks are kept)")


class _WriterThread:
    """Moves feature batches to the host, checks they are finite and puts them into the sink while the
    next batch computes."""

    def __init__(self, sink, precision: str | None = None):
        self.sink, self.error, self.precision = sink, None, precision
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    feats, kept, n, skipped = item
                    feats = {k: v.cpu().numpy() for k, v in feats.items()}
                    check_finite(feats, self.precision)
                    self.sink.add(feats, kept, n, skipped)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def put(self, item):
        self._check()
        self.queue.put(item)

    def _check(self):
        if self.error is not None:
            raise self.error

    def close(self):
        self.queue.put(None)
        self.thread.join()
        self._check()


def run(embedder: Embedder, source, sink, batches: Sequence[Sequence[int]], *, workers: int = 0,
        on_error: str = "skip", progress: bool = True, desc: str = "", decoder: str = "auto",
        threads: int | None = None) -> RunStats:
    """Embed the source positions of `batches` (lists of positions) into `sink`, batch by batch.

    `sink.add(features, kept, n, skipped)` receives each batch's features (numpy, readable images
    only), their positions, the batch size and the unreadable images as (position, path, reason),
    in a writer thread. decoder: how image files are decoded (extract.compute.pipeline.resolve_decoder).
    threads: torch's intra-op threads while it runs on the CPU (None: `compute_threads(workers)`);
    restored after. On cuda:N that GPU is the current device while it runs (`on_device`). A batch whose
    features are not finite (fp16 overflow) stops the run with one line before it is written.
    """
    if embedder.device.type != "cpu":
        with on_device(embedder.device):
            return _run(embedder, source, sink, batches, workers, on_error, progress, desc, decoder)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or compute_threads(workers))
    try:
        return _run(embedder, source, sink, batches, workers, on_error, progress, desc, decoder)
    finally:
        torch.set_num_threads(saved)


def _run(embedder: Embedder, source, sink, batches, workers, on_error, progress, desc, decoder) -> RunStats:
    stats = RunStats()
    pin = embedder.device.type == "cuda"
    bar = tqdm(total=sum(map(len, batches)), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
               smoothing=0.1)
    decode_threads = torch.get_num_threads() if embedder.device.type == "cpu" else 1
    loader = SourceBatches(source, embedder.preprocess, batches, workers=workers, pin=pin, decoder=decoder,
                           device=embedder.device, decode_threads=decode_threads)
    writer = _WriterThread(sink, _precision_label(embedder))
    t0 = time.perf_counter()
    try:
        for x, positions, reasons in loader:
            bad = [k for k, r in enumerate(reasons) if r]
            skipped = []
            for k in bad:
                path = source.paths[positions[k]] if source.paths else None
                if on_error == "stop":
                    writer.close()
                    raise UserError(f"cannot read {path}: {reasons[k]} (the chunks finished before it are saved; "
                                    "fix or remove the file and rerun, or use --on-error skip)")
                stats.skipped.append((int(positions[k]), path or "", reasons[k]))
                skipped.append(stats.skipped[-1])
            keep = np.array([not r for r in reasons])
            feats = embedder(x)
            if len(bad):
                feats = {k: v[torch.from_numpy(keep).to(v.device)] for k, v in feats.items()}
            writer.put((feats, positions[keep], len(positions), skipped))
            stats.images += len(positions)
            bar.update(len(positions))
            bar.set_postfix_str(f"{stats.images / (time.perf_counter() - t0):.1f} img/s", refresh=False)
        writer.close()
    finally:
        if writer.thread.is_alive():
            writer.queue.put(None)
            writer.thread.join()
        bar.close()
        stats.seconds = time.perf_counter() - t0
    return stats


def _precision_label(embedder) -> str | None:
    """'fp32', 'bf16' or 'fp16' for a torch Embedder; None for engines that say it otherwise."""
    try:
        return precision_name(embedder.precision)
    except (AttributeError, KeyError, TypeError):
        return None


class Collect:
    """A sink that keeps rows and skipped images in memory (for `embed` and Ray's actors)."""

    def __init__(self):
        self.rows, self.index, self.skipped, self.n = [], [], [], 0

    def add(self, features, kept, n, skipped):
        self.rows.append(features)
        self.index.append(np.asarray(kept, np.int64))
        self.skipped += skipped
        self.n += n


@dataclass
class Embedded:
    """Features of the readable images of a source, their positions, and the unreadable ones."""

    features: dict[str, np.ndarray]      # {tap: (N, D) float32}
    index: np.ndarray                    # source position of each row
    skipped: list[tuple[int, str, str]]  # (position, path, reason)


def embed(backbone, source, *, preprocess: Preprocess | None = None, precision: str = "auto", batch_size: int = 64,
          device: str = "auto", workers: int = 0, progress: bool = False, decoder: str = "auto") -> Embedded:
    """Embed a small source in memory; unreadable images are listed, not fatal.

    `preprocess` defaults to the backbone's own (as extract applies it); pass a cache's recorded
    preprocessing, precision and decoder to reproduce its features. On the CPU glibc's malloc is
    tuned for the process first (`extract.compute.allocator`).
    """
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_malloc()
    preprocess = preprocess or effective_preprocess(backbone.preprocess, source.arrays is not None)
    sink = Collect()
    run(Embedder(backbone, dev, resolve_precision(precision, dev), preprocess), source, sink,
        list(BatchSampler(range(len(source)), batch_size, False)), workers=workers, progress=progress,
        decoder=decoder)
    features = {k: np.concatenate([r[k] for r in sink.rows]) if sink.rows else np.zeros((0, d), np.float32)
                for k, d in backbone.dims.items()}
    index = np.concatenate(sink.index) if sink.index else np.zeros(0, np.int64)
    return Embedded(features, index, sink.skipped)
