"""Frozen logistic-regression probe vs fine-tuning, side by side in one process, on ants/bees.

  (a) probe      extract penultimate features to a fresh HDF5 cache, then probe's logreg head
                 through probe's Python API (probe.api.evaluate, what `python -m probe --head logreg` runs)
  (b) backbone   finetune --freeze backbone: only the new linear layer trains (the PyTorch
                 tutorial's "fixed feature extractor"), on augmented images every epoch
  (c) none       finetune --freeze none: full fine-tuning

All three use the same rows: the hymenoptera 'val' folder is the test split, and validation is
a seeded stratified 20% of train (probe's rule, which finetune shares). Prints test top-1,
wall-clock seconds (probe: extraction and head separately and together), seconds per epoch
and the best (validation-selected) epoch, then the tutorial's reference numbers.

    python bench/finetune_vs_probe.py                       # E=3 epochs for (b) and (c)
    python bench/finetune_vs_probe.py --epochs 5 --full-epochs 2 --lr 0.005
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from extract.api import extract
from extract.registry.datasets import load_dataset
from extract.compute.engine import default_workers, precision_name, resolve_device, resolve_precision
from extract.core.errors import UserError
from finetune import finetune
from finetune.splits import plan_splits
from finetune.config import DEFAULT_LR
from probe.api import evaluate

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
TUTORIAL = ("PyTorch transfer-learning tutorial (ResNet-18, ImageNet weights, 25 epochs, GPU; its best epoch is "
            "picked on the same 'val' folder it reports, so its numbers are optimistic):\n"
            "  fixed feature extractor  ~0.96 top-1\n"
            "  fine-tuning              ~0.94 top-1")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_probe(args, tmp: Path) -> dict:
    """(a): fresh extraction, then probe's logreg head via probe.api.evaluate; returns timings and the result."""
    t0 = time.perf_counter()
    res = extract(model=args.model, data="imagefolder", root=args.root, cache_dir=tmp / "cache",
                  batch_size=args.extract_batch_size, workers=args.workers, precision=args.precision,
                  progress=False)
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        out = evaluate("logreg", features=res["train"].path, results_dir=tmp / "results", seed=args.seed,
                       progress=False)
    except UserError as e:
        sys.exit(f"probe failed: {e}")
    probe_s = time.perf_counter() - t0
    (run,), (path,) = out.runs, out.result_paths
    return {"extract_s": extract_s, "probe_s": probe_s, "result": run.result, "path": path,
            "images": sum(r.images for r in res.values())}


class _Tagged(logging.Handler):
    """finetune's log lines on stdout as `  [tag] message`, between the benchmark's own lines."""

    def __init__(self, tag: str):
        super().__init__(logging.INFO)
        self.tag = tag

    def emit(self, record: logging.LogRecord) -> None:
        print(f"  [{self.tag}] {record.getMessage()}", flush=True)


@contextlib.contextmanager
def _finetune_lines(tag: str):
    logger = logging.getLogger("finetune")
    handler, level = _Tagged(tag), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_finetune(args, tmp: Path, freeze: str, epochs: int, tag: str) -> dict:
    """(b) or (c): finetune.finetune in this process; returns wall seconds and the result dict."""
    t0 = time.perf_counter()
    with _finetune_lines(tag):
        out = finetune(model=args.model, data="imagefolder", root=args.root, freeze=freeze, epochs=epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, precision=args.precision,
                       workers=args.workers, results_dir=tmp / "results", runs_dir=tmp / "runs", resume=False,
                       progress=False)
    return {"wall_s": time.perf_counter() - t0, "result": out.result, "path": out.path}


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--root", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for (b) and (c) (default: 3)")
    ap.add_argument("--full-epochs", type=int, default=None,
                    help="epochs for (c) alone when full fine-tuning is too slow for --epochs (default: --epochs)")
    ap.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size (finetune default: 32)")
    ap.add_argument("--lr", type=float, default=None,
                    help=f"fine-tuning base learning rate (finetune default: sgd {DEFAULT_LR['sgd']})")
    ap.add_argument("--extract-batch-size", type=int, default=64, help="extraction batch size (extract default: 64)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: by device and cores)")
    ap.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (default: auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", action="append", default=[], choices=["probe", "backbone", "none"],
                    help="leave out one of the three runs (repeatable)")
    args = ap.parse_args()
    full_epochs = args.epochs if args.full_epochs is None else args.full_epochs
    if args.epochs < 1 or full_epochs < 1:
        ap.error("epochs must be at least 1")

    device = resolve_device("auto")
    amp = resolve_precision(args.precision, device)
    plan = plan_splits(load_dataset("imagefolder", root=args.root), seed=args.seed)
    sizes = {role: len(getattr(plan, role).indices) for role in ("train", "val", "test")}
    workers = default_workers(device) if args.workers is None else args.workers
    load_before = _load()
    print(f"featprobe fine-tune vs frozen probe: {args.model} on {Path(args.root).name}")
    print(f"  data      {sizes['train']} train / {sizes['val']} validation ({plan.validation}) / "
          f"{sizes['test']} test ('{plan.test_split}' folder)")
    print(f"  device    {device} ({platform.processor() or platform.machine()}, {_cores()} cores), "
          f"{torch.get_num_threads()} torch threads, {workers} DataLoader worker(s), torch {torch.__version__}")
    print(f"  precision {precision_name(amp)} (--precision {args.precision})")
    print(f"  training  sgd, lr {args.lr if args.lr is not None else DEFAULT_LR['sgd']} (head x10), cosine with "
          f"1 warmup epoch, batch {args.batch_size}; (b) {args.epochs} epochs, (c) {full_epochs} epochs")
    print(f"  load avg  {load_before} before the runs")
    if full_epochs != args.epochs:
        print(f"  NOTE      full fine-tuning runs {full_epochs} epoch(s), not {args.epochs}, to keep the "
              f"benchmark short on this CPU")
    print(flush=True)

    rows, extra, paths = [], [], []
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="finetune_vs_probe.") as tmp_name:
        tmp = Path(tmp_name)
        if "probe" not in args.skip:
            print("(a) extract + logreg probe ...", flush=True)
            a = run_probe(args, tmp)
            r = a["result"]
            paths.append(a["path"])
            total = a["extract_s"] + a["probe_s"]
            hp = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["hyperparameters"].items())
            print(f"  [a] extraction {a['extract_s']:.1f} s ({a['images']} images), probe {a['probe_s']:.1f} s "
                  f"(search {r['timing']['search_seconds']:.2f} s, refit {r['timing']['fit_seconds']:.2f} s); "
                  f"{hp}; sizes {r['sizes']}", flush=True)
            rows.append({"run": "(a) frozen features + logreg", "trained": "head (sklearn)", "epochs": "-",
                         "top1": r["metrics"]["top1"], "bal": r["metrics"]["balanced_accuracy"], "wall": total,
                         "per_epoch": None, "best": "-"})
            extra.append(f"(a) wall = extraction {a['extract_s']:.1f} s + probe {a['probe_s']:.1f} s "
                         f"(extraction {a['images'] / a['extract_s']:.1f} images/s over train+val folders)")
        for freeze, epochs, label, tag in (("backbone", args.epochs, "(b) finetune --freeze backbone", "b"),
                                           ("none", full_epochs, "(c) finetune --freeze none", "c")):
            if freeze in args.skip:
                continue
            print(f"{label} ...", flush=True)
            f = run_finetune(args, tmp, freeze, epochs, tag)
            r = f["result"]
            paths.append(f["path"])
            hist = r["history"]
            per_epoch = sum(h["seconds"] for h in hist) / len(hist)
            ips = sum(h["images_per_second"] for h in hist) / len(hist)
            rows.append({"run": label, "trained": f"{r['trainable_parameters']:,} params", "epochs": str(epochs),
                         "top1": r["metrics"]["top1"], "bal": r["metrics"]["balanced_accuracy"],
                         "wall": f["wall_s"], "per_epoch": per_epoch, "best": f"{r['best_epoch']}/{epochs}"})
            epoch_s = " ".join(f"{h['seconds']:.1f}" for h in hist)
            val_top1 = " ".join(f"{h['val_top1']:.3f}" for h in hist)
            extra.append(f"{label[:3]} per epoch {per_epoch:.1f} s (train pass {ips:.1f} images/s + validation), "
                         f"epochs {epoch_s} s; val top-1 by epoch {val_top1}; test pass "
                         f"{r['timing']['predict_seconds']:.1f} s")
        folders = sorted({str(p.parent.relative_to(tmp / "results")) for p in paths})
    elapsed = time.perf_counter() - start
    cpu_share = (_cpu_seconds() - cpu_start) / elapsed / _cores()
    load_after = _load()

    print()
    head = f"{'run':<32} {'trained':<20} {'epochs':>6} {'test top-1':>10} {'balanced':>8} {'wall s':>7} " \
           f"{'s/epoch':>7} {'best ep':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['run']:<32} {r['trained']:<20} {r['epochs']:>6} {r['top1']:>10.4f} {r['bal']:>8.4f} "
              f"{r['wall']:>7.1f} {_fmt_s(r['per_epoch']):>7} {r['best']:>7}")
    print()
    for line in extra:
        print(line)
    where = f"all in results/{folders[0]}" if len(folders) == 1 else "SPLIT across " + ", ".join(folders)
    print(f"result files: {where} (python -m probe --report shows them side by side when they share a folder)")
    print(f"total {elapsed:.0f} s; test set {sizes['test']} images, so one image is "
          f"{1 / sizes['test']:.4f} top-1")
    contended = max(os.getloadavg()[:2]) > _cores() + 0.5 or cpu_share < 0.6
    print(f"load avg {load_after} after the runs on {_cores()} cores; this process used {100 * cpu_share:.0f}% "
          f"of the cores' time" + ("  <- other jobs were competing for the CPU: timings are contended, "
                                   "expect them to be slower than on an idle machine" if contended else ""))
    print()
    print(TUTORIAL)


if __name__ == "__main__":
    main()
