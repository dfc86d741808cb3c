"""featprobe on one GPU in one call: the CUDA tests, then the figures the README plans with.

    python bench/gpu.py                      # on the GPU machine; the report goes to $OUT (else ./gpu-report)
    python bench/gpu.py --out DIR --budget 420
    python bench/gpu.py --smoke              # every step at toy sizes on the CPU: checks the script itself

Installs nothing and reads nothing from the network (published weights only when already on disk). The
steps, in this order, each skipped rather than started when the time left in --budget is shorter than it
needs (about 7 minutes in all on an H200):

  env        torch, CUDA, the GPU, its compute capability and what --precision auto means on it
  pytest     `pytest -m cuda tests` (the CUDA tests; tests/test_cuda.py and the cuda-marked rest)
  memory     ResNet-50 at 224, bf16, eager: CIFAR-sized in-memory arrays (resized on the GPU) into the
             cache, images/s; beside it the pure forward on pre-loaded 224x224 tensors
  compile    the same with --compile: compile seconds, images/s after it, the short last batch (padded, no
             recompilation), compiled vs eager features
  jpeg       ~20,000 JPEG files (ants/bees repeated through symlinks): decode alone and whole extraction,
             --decoder cuda (nvJPEG) vs --decoder tensor on every core (16 workers on a 16-core machine)
  accuracy   ants/bees features on CUDA (fp32, bf16) vs the CPU (fp32): cosine per image and probe's logreg
             test top-1 on each
  torchrun   torchrun with 1 GPU writes the plain process's cache (bit for bit?); more ranks than GPUs
             is refused in one line
  finetune   ResNet-50 fine-tuning, bf16: images/s per epoch
  logreg     torch L-BFGS logistic regression on a large synthetic problem: seconds per C
  finetune_tests  tests/test_finetune.py on the GPU (exact resume, frozen weights), when time is left

It writes gpu_report.json and gpu_report.txt to the output folder after every step, so a run cut short
keeps what it measured. Exit status 0 when no step failed (skipped steps are not failures).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ASSET_DIRS = [os.environ.get("FEATPROBE_ASSETS"), REPO.parent / "shared" / "assets", REPO / "shared" / "assets"]


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the full sizes for a GPU, or toy ones (--smoke) that check the script on a CPU."""

    device: str = "cuda"
    precision: str = "bf16"            # memory, compile, jpeg and finetune
    model: str = "resnet50"
    memory_n: int = 20000              # CIFAR-sized in-memory images
    batch: int = 256
    pure_batches: int = 20
    jpeg_files: int = 20000
    accuracy_per_class: int | None = None   # None: every ants/bees image
    torchrun_n: int = 2048
    finetune_n: int = 6000             # synthetic train split (20% of it validates); the test split as large
    finetune_batch: int = 128
    finetune_epochs: int = 2
    logreg: tuple[int, int, int] = (400_000, 2048, 1000)   # rows, dims, classes (3.3 GB of float32)
    logreg_path: tuple[float, ...] = (1e-3, 1e-2)
    logreg_max_iter: int = 200
    pytest_paths: tuple[str, ...] = ("tests",)
    budget: float = 420.0


SMOKE = Sizes(device="cpu", precision="fp32", model="cifar_resnet20", memory_n=72, batch=32, pure_batches=2,
              jpeg_files=40, accuracy_per_class=4, torchrun_n=40, finetune_n=32, finetune_batch=16,
              finetune_epochs=2, logreg=(3000, 32, 10), logreg_path=(1e-2, 1.0), logreg_max_iter=100,
              pytest_paths=("tests/test_cuda.py",), budget=600.0)

# seconds each step needs on an H200 (it is skipped when less is left); the smoke run needs a few each
NEEDS = {"env": 5, "pytest": 60, "memory": 30, "compile": 90, "jpeg": 45, "accuracy": 30, "torchrun": 30,
         "finetune": 30, "logreg": 40, "finetune_tests": 60}
GRACE = 40   # a step still running this long after the budget is stopped (SIGALRM), and the rest skipped


class OutOfTime(BaseException):
    """Raised by SIGALRM in the running step; a BaseException, so that no library's `except Exception`
    (torch.compile falls back to eager on one) swallows it."""


def _out_of_time(signum, frame):
    raise OutOfTime(f"stopped: the budget plus {GRACE} s ran out during this step")


class Context:
    def __init__(self, sizes: Sizes, out: Path, tmp: Path, assets: Path | None, smoke: bool):
        self.sizes, self.out, self.tmp, self.assets, self.smoke = sizes, out, tmp, assets, smoke
        self.device = torch.device(sizes.device)
        self.started = time.perf_counter()
        self.state: dict = {}

    def left(self) -> float:
        return self.sizes.budget - (time.perf_counter() - self.started)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "PYTHONUNBUFFERED": "1"}


# --- helpers ------------------------------------------------------------------------------------------

def rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 1) if seconds > 0 else None


def cosine(a: np.ndarray, b: np.ndarray) -> dict:
    """Row-wise cosine of two feature arrays, with the largest absolute difference relative to b's scale."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {"rows": len(a), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "max_abs_diff_rel": float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))}


def features(path) -> np.ndarray:
    from extract import load_features
    return load_features(path).X


def cuda_memory(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def first_line(text: str) -> str:
    """The last 'error: ...' line of a CLI's stderr (the one-line message), else its last line."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:400]


def find_hymenoptera(assets: Path | None) -> Path | None:
    for d in [assets, *ASSET_DIRS]:
        if d and (Path(d) / "hymenoptera_data" / "train").is_dir():
            return Path(d) / "hymenoptera_data"
    return None


def image_files(root: Path) -> list[tuple[str, str, Path]]:
    """(split, class, path) of every image under root/<split>/<class>/."""
    from extract.registry.images import is_image_file
    return [(split.name, cls.name, f) for split in sorted(root.iterdir()) if split.is_dir()
            for cls in sorted(split.iterdir()) if cls.is_dir()
            for f in sorted(cls.iterdir()) if f.is_file() and is_image_file(f.name)]


def generated_photos(dest: Path, per_class: int = 60) -> Path:
    """Two classes of 500x375 JPEG 'photos' (smooth colour fields, textured), train/ and val/, when the
    ants/bees folder is not here."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c, name in enumerate(("ants", "bees")):
            (dest / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                phase = rng.uniform(0, 6.3, 3)
                a = np.stack([128 + 90 * np.sin(xx / (40 + 30 * c) + phase[k] + yy / 70) for k in range(3)], -1)
                a += rng.normal(0, 10, a.shape)
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(dest / split / name / f"{i}.jpg", quality=90)
    return dest


def linked_folder(files: list[tuple[str, str, Path]], dest: Path, n: int, split: str | None = "train") -> Path:
    """dest/<split or the file's own split>/<class>/ with n links to `files`, repeated as often as needed."""
    made = 0
    for k in range(math.ceil(n / max(1, len(files)))):
        for own_split, cls, f in files:
            if made == n:
                return dest
            target = dest / (split or own_split) / cls / f"r{k:03d}_{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(f.resolve(), target)
            except OSError:
                shutil.copyfile(f, target)
            made += 1
    return dest


def photos(ctx: Context) -> tuple[Path, str]:
    """The ants/bees folder (train/ and val/) and where it came from."""
    if "photos" not in ctx.state:
        found = find_hymenoptera(ctx.assets)
        ctx.state["photos"] = (found, "ants/bees (hymenoptera_data)") if found else \
            (generated_photos(ctx.tmp / "generated"), "generated 500x375 JPEGs (ants/bees folder not found)")
    return ctx.state["photos"]


def _pytest(ctx: Context, args: list[str], name: str) -> dict:
    junit = ctx.out / f"junit-{name}.xml"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                           "--continue-on-collection-errors", f"--junitxml={junit}", *args], cwd=REPO, env=ctx.env(),
                          capture_output=True, text=True, timeout=max(30, int(ctx.left())))
    out = {"command": "pytest " + " ".join(args), "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    out["failed_tests"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)   # ERROR: also collection
    out["output_tail"] = (proc.stdout + proc.stderr)[-2500:]
    if proc.returncode not in (0, 5):   # 5: nothing collected
        out["error"] = f"pytest exited {proc.returncode}: {', '.join(out['failed_tests'][:8]) or 'see output_tail'}"
    return out


# --- the steps ----------------------------------------------------------------------------------------

def step_env(ctx: Context) -> dict:
    import torchvision
    from extract.compute.engine import cpu_cores, cuda_auto_precision, default_workers, precision_name, \
        resolve_precision
    from extract.registry.images import tensor_decoder_available
    d = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cores": cpu_cores(),
         "cuda_available": torch.cuda.is_available(), "device": str(ctx.device),
         "tensor_decoder": tensor_decoder_available(),
         "tf32_defaults": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                           "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
         "auto_precision": precision_name(resolve_precision("auto", ctx.device)),
         "default_workers": default_workers(ctx.device), "sizes": asdict(ctx.sizes)}
    try:
        import torchcodec  # noqa: F401
        d["torchcodec"] = getattr(torchcodec, "__version__", "installed")
    except ImportError:
        d["torchcodec"] = None
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        d.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(), capability=list(cap),
                 is_bf16_supported=torch.cuda.is_bf16_supported(),
                 bf16_native=precision_name(cuda_auto_precision(cap)) == "bf16",
                 gpu_memory_gb=round(total / 1e9, 1), gpu_free_gb=round(free / 1e9, 1))
    d["summary"] = (f"{d.get('gpu', 'no GPU')} (capability {'.'.join(map(str, d.get('capability', []))) or '-'}), "
                    f"torch {d['torch']}, CUDA {d['cuda']}, {d['cores']} cores; "
                    f"--precision auto = {d['auto_precision']}")
    return d


def step_pytest(ctx: Context) -> dict:
    out = _pytest(ctx, ["-m", "cuda", *ctx.sizes.pytest_paths], "cuda")
    failed = out.get("failures", 0) + out.get("errors", 0)
    out["summary"] = (f"pytest -m cuda: {out.get('passed', '?')} passed, {failed} "
                      f"failed, {out.get('skipped', '?')} skipped in {out['seconds']} s")
    return out


def _memory_request(ctx: Context, **extra) -> dict:
    s = ctx.sizes
    return dict(model=s.model, weights="none", data="synthetic", dataset_options={"n": s.memory_n, "size": 32,
                "classes": 10}, splits=["train"], device=s.device, precision=s.precision, batch_size=s.batch,
                progress=False, **extra)


def pure_forward(ctx: Context, compile: bool = False) -> dict:
    """Images/s of the backbone alone on one pre-loaded crop-sized uint8 batch on the device (normalised
    there, as the pipeline does), after a warm-up; compiled: also the first call and a short batch."""
    from extract.compute.engine import Embedder, effective_preprocess, resolve_precision
    from extract.registry.models import load_backbone
    s = ctx.sizes
    torch.manual_seed(0)
    backbone = load_backbone(s.model, weights="none")
    pre = effective_preprocess(backbone.preprocess, in_memory=True)
    embedder = Embedder(backbone, ctx.device, resolve_precision(s.precision, ctx.device), pre, compile=compile)
    x = torch.randint(0, 256, (s.batch, 3, pre.crop, pre.crop), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)).to(ctx.device)
    out = {}
    t0 = time.perf_counter()
    embedder(x)
    ctx.sync()
    out["first_call_seconds"] = round(time.perf_counter() - t0, 2)
    for _ in range(2):
        embedder(x)
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(s.pure_batches):
        embedder(x)
    ctx.sync()
    out["images_per_second"] = rate(s.pure_batches * s.batch, time.perf_counter() - t0)
    if compile:
        from torch._dynamo.utils import counters
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        short = embedder(x[: s.batch // 2 + 3])
        ctx.sync()
        out.update(short_batch_seconds=round(time.perf_counter() - t0, 3),
                   short_batch_recompiled=counters["stats"]["unique_graphs"] > graphs,
                   short_batch_rows=len(next(iter(short.values()))), compile_seconds=embedder.compile_seconds)
    return {**out, "batch": s.batch, "crop": pre.crop, **cuda_memory(ctx)}


def step_memory(ctx: Context) -> dict:
    from extract.api import extract
    s = ctx.sizes
    t0 = time.perf_counter()
    res = extract(**_memory_request(ctx), cache_dir=ctx.tmp / "memory-eager")["train"]
    ctx.state["memory_eager"] = res.path
    pipeline = {"images": res.images, "seconds": round(res.seconds, 2),
                "images_per_second": rate(res.images, res.seconds), "wall_seconds": round(time.perf_counter() - t0, 1)}
    pure = pure_forward(ctx)
    ratio = pipeline["images_per_second"] / pure["images_per_second"] if pure["images_per_second"] else None
    return {"model": s.model, "precision": s.precision, "input": "32x32 uint8 arrays resized on the device",
            "pipeline_eager": pipeline, "pure_forward_eager": pure, "pipeline_over_pure": ratio and round(ratio, 3),
            "summary": f"{s.model} {s.precision} eager: {pipeline['images_per_second']} img/s into the cache, pure "
                       f"forward {pure['images_per_second']} img/s (ratio {ratio and round(ratio, 2)})"}


def step_compile(ctx: Context) -> dict:
    from torch import _dynamo
    from torch._dynamo.utils import counters

    try:
        return _compile(ctx, counters)
    finally:
        _dynamo.reset()   # the compiled graphs hold their networks on the GPU


def _compile(ctx: Context, counters) -> dict:
    from extract import load_features
    from extract.api import extract
    s = ctx.sizes
    pure = pure_forward(ctx, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    res = extract(**_memory_request(ctx, compile=True), cache_dir=ctx.tmp / "memory-compiled")["train"]
    wall = time.perf_counter() - t0
    prov = load_features(res.path).meta["provenance"]
    compile_s = prov.get("compile_seconds") or 0.0
    pipeline = {"images": res.images, "seconds": round(res.seconds, 2), "wall_seconds": round(wall, 1),
                "images_per_second": rate(res.images, res.seconds), "compile_seconds": round(compile_s, 1),
                "images_per_second_after_compile": rate(res.images - s.batch, res.seconds - compile_s),
                "compiled_batch": prov.get("compiled_batch"),
                "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
                "short_last_batch": res.images % s.batch}
    out = {"pure_forward_compiled": pure, "pipeline_compiled": pipeline}
    if "memory_eager" in ctx.state:
        out["compiled_vs_eager_features"] = cosine(features(res.path), features(ctx.state["memory_eager"]))
    eager = ctx.state.get("report", {}).get("memory", {})
    e_pipe = (eager.get("pipeline_eager") or {}).get("images_per_second")
    e_pure = (eager.get("pure_forward_eager") or {}).get("images_per_second")
    if e_pure and pure["images_per_second"]:
        out["pure_speedup"] = round(pure["images_per_second"] / e_pure, 2)
    if e_pipe and pipeline["images_per_second_after_compile"]:
        out["pipeline_speedup_after_compile"] = round(pipeline["images_per_second_after_compile"] / e_pipe, 2)
    out["summary"] = (f"--compile: {pipeline['images_per_second_after_compile']} img/s after "
                      f"{pipeline['compile_seconds']} s of compilation (pure forward {pure['images_per_second']}, "
                      f"x{out.get('pure_speedup')} over eager); "
                      f"{pipeline['graphs_compiled']} graph(s) for {res.images} images")
    return out


def _decode_only(ctx: Context, source, preprocess, decoder: str, workers: int) -> dict:
    from torch.utils.data import BatchSampler

    from extract.compute.pipeline import SourceBatches
    batches = list(BatchSampler(range(len(source)), ctx.sizes.batch, False))
    loader = SourceBatches(source, preprocess, batches, workers=workers, pin=ctx.device.type == "cuda",
                           decoder=decoder, device=ctx.device)
    t0, n, bad = time.perf_counter(), 0, 0
    for x, positions, reasons in loader:
        x = x.to(ctx.device, non_blocking=True)
        n += len(positions)
        bad += sum(1 for r in reasons if r)
    ctx.sync()
    seconds = time.perf_counter() - t0
    return {"workers": workers, "images": n, "unreadable": bad, "seconds": round(seconds, 2),
            "images_per_second": rate(n, seconds)}


def step_jpeg(ctx: Context) -> dict:
    from extract.api import extract, plan
    from extract.compute.engine import cpu_cores, default_workers
    from extract.compute.pipeline import resolve_decoder
    from extract.core.errors import UserError
    from extract.registry.datasets import load_dataset
    s = ctx.sizes
    src, origin = photos(ctx)
    root = linked_folder(image_files(src), ctx.tmp / "jpeg", s.jpeg_files)
    source = load_dataset("imagefolder", root=str(root)).splits["train"]
    preprocess = plan(model=s.model, weights="none", data="imagefolder", root=str(root), device=s.device,
                      precision=s.precision).identity.preprocess
    cores = cpu_cores()
    runs = {"cuda": default_workers(ctx.device), "tensor": cores}
    out = {"files": len(source), "from": origin, "model": s.model, "precision": s.precision, "cores": cores}
    try:
        resolve_decoder("cuda", ctx.device)
    except UserError as e:
        out["cuda_decoder_refused"] = str(e)
        runs.pop("cuda")
    paths = {}
    for decoder, workers in runs.items():
        out[f"decode_only_{decoder}"] = _decode_only(ctx, source, preprocess, decoder, workers)
        t0 = time.perf_counter()
        res = extract(model=s.model, weights="none", data="imagefolder", root=str(root), splits=["train"],
                      device=s.device, precision=s.precision, batch_size=s.batch, decoder=decoder, workers=workers,
                      cache_dir=ctx.tmp / f"jpeg-{decoder}", progress=False)["train"]
        paths[decoder] = res.path
        out[f"extract_{decoder}"] = {"workers": workers, "images": res.images, "seconds": round(res.seconds, 2),
                                     "images_per_second": rate(res.images, res.seconds),
                                     "wall_seconds": round(time.perf_counter() - t0, 1), "cache": res.path.name}
    if len(paths) == 2:
        out["cuda_vs_tensor_features"] = cosine(features(paths["cuda"]), features(paths["tensor"]))
    parts = [f"{d}: decode {out[f'decode_only_{d}']['images_per_second']} img/s, extract "
             f"{out[f'extract_{d}']['images_per_second']} img/s ({out[f'extract_{d}']['workers']} workers)"
             for d in paths]
    out["summary"] = f"{out['files']} JPEGs, {'; '.join(parts)}" + \
        ("" if "cuda" in paths else "; --decoder cuda refused here (no CUDA)")
    return out


def pick_accuracy_model(ctx: Context) -> tuple[str, str]:
    """A network with published weights already on disk (never downloads), else ResNet-50 at random init."""
    from extract.core.errors import UserError
    from extract.registry.models import resolve_weights
    if ctx.smoke:
        return ctx.sizes.model, "none"
    for model in ("resnet50", "efficientnet_lite0"):
        try:
            resolve_weights(model, "default", download=False)
            return model, "default"
        except (UserError, ImportError, OSError):
            continue
    return "resnet50", "none"


def step_accuracy(ctx: Context) -> dict:
    from extract.api import extract
    from probe.api import evaluate
    s = ctx.sizes
    src, origin = photos(ctx)
    if s.accuracy_per_class:
        files = image_files(src)
        keep = [f for f in files if sum(1 for g in files[: files.index(f) + 1] if g[:2] == f[:2])
                <= s.accuracy_per_class]
        src = linked_folder(keep, ctx.tmp / "accuracy-photos", len(keep), split=None)
    model, weights = pick_accuracy_model(ctx)
    runs = [("cuda", "fp32"), ("cuda", "bf16"), ("cpu", "fp32")] if ctx.device.type == "cuda" else \
        [("cpu", "fp32"), ("cpu", "fp32-again")]
    out = {"model": model, "weights": weights, "from": origin}
    paths = {}
    for device, precision in runs:
        name = f"{device}_{precision}"
        t0 = time.perf_counter()
        res = extract(model=model, weights=weights, data="imagefolder", root=str(src), device=device,
                      precision=precision.split("-")[0], cache_dir=ctx.tmp / f"accuracy-{name}", progress=False)
        test = [k for k in res if k != "train"][-1]
        paths[name] = (res["train"].path, res[test].path)
        (run,) = evaluate("logreg", features=res["train"].path, results_dir=ctx.tmp / "results", save=False,
                          progress=False, device="cpu").runs
        out[name] = {"top1": run.result["metrics"]["top1"], "seconds": round(time.perf_counter() - t0, 1),
                     "train": res["train"].images or None, test: res[test].images or None}
    ref = "cpu_fp32"
    for name in paths:
        if name != ref:
            out[f"{name}_vs_{ref}"] = cosine(np.concatenate([features(p) for p in paths[name]]),
                                             np.concatenate([features(p) for p in paths[ref]]))
    out["summary"] = f"{model} ({weights}) on {origin}: top-1 " + ", ".join(
        f"{n} {100 * out[n]['top1']:.2f}%" for n in paths) + "; cosine vs cpu fp32 " + ", ".join(
        f"{n} min {out[f'{n}_vs_{ref}']['cosine_min']:.5f}" for n in paths if n != ref)
    return out


def step_torchrun(ctx: Context) -> dict:
    """torchrun with one rank (--runner torchrun: its code path, world of one) writes the cache that the
    plain process (in this process) writes; on a GPU machine, one rank more than it has GPUs is refused."""
    from extract import load_features
    from extract.api import extract
    s = ctx.sizes
    request = ["-m", "extract", "--model", s.model, "--weights", "none", "--data", "synthetic", "--option",
               f"n={s.torchrun_n}", "--split", "train", "--precision", s.precision, "--batch-size", str(s.batch),
               "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    t0 = time.perf_counter()
    plain = extract(model=s.model, weights="none", data="synthetic", dataset_options={"n": s.torchrun_n},
                    splits=["train"], device=s.device, precision=s.precision, batch_size=s.batch, progress=False,
                    cache_dir=ctx.tmp / "torchrun-process")["train"].path
    out = {"process": {"seconds": round(time.perf_counter() - t0, 1)}}
    t0 = time.perf_counter()
    cache = ctx.tmp / "torchrun-1"
    proc = subprocess.run([*torchrun, "--nproc-per-node", "1", *request, "--device", s.device, "--runner", "torchrun",
                           "--cache-dir", str(cache)], cwd=ctx.tmp, env=ctx.env(), capture_output=True, text=True,
                          timeout=max(30, int(ctx.left())))
    out["torchrun_1"] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode:
        out["torchrun_1"]["stderr_tail"] = proc.stderr[-1500:]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {first_line(proc.stderr)}")
    a, b = load_features(plain), load_features(next(cache.rglob("train*.h5")))
    out.update(same_cache=bool(np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)),
               max_abs_diff=float(np.abs(a.X - b.X).max()), rows=len(a.X),
               runners=[a.meta["provenance"]["runner"], b.meta["provenance"]["runner"]])
    summary = f"torchrun 1 rank vs plain process: same cache {out['same_cache']} (max diff {out['max_abs_diff']:.3g})"
    if torch.cuda.is_available():   # one GPU per rank: more ranks than GPUs is one line from every rank
        ranks = torch.cuda.device_count() + 1
        proc = subprocess.run([*torchrun, "--nproc-per-node", str(ranks), *request, "--device", "cuda",
                               "--cache-dir", str(ctx.tmp / "torchrun-over")], cwd=ctx.tmp, env=ctx.env(),
                              capture_output=True, text=True, timeout=max(30, int(ctx.left())))
        message = first_line(proc.stderr)
        out["more_ranks_than_gpus"] = {"ranks": ranks, "rc": proc.returncode, "message": message,
                                       "refused_in_one_line": proc.returncode != 0 and "one GPU per rank" in message}
        summary += f"; {ranks} ranks on {ranks - 1} GPU(s): rc {proc.returncode}, '{message[:90]}'"
    out["summary"] = summary
    return out


def step_finetune(ctx: Context) -> dict:
    from finetune import finetune
    s = ctx.sizes
    t0 = time.perf_counter()
    res = finetune(s.model, "synthetic", weights="none", dataset_options={"n": s.finetune_n, "size": 32, "classes": 10},
                   epochs=s.finetune_epochs, batch_size=s.finetune_batch, lr=0.02, warmup_epochs=1,
                   precision=s.precision, device=s.device, progress=False, results_dir=ctx.tmp / "ft-results",
                   runs_dir=ctx.tmp / "ft-runs")
    epochs = [{k: h[k] for k in ("epoch", "images_per_second", "seconds", "train_loss", "val_top1")}
              for h in res.result["history"]]
    return {"model": s.model, "precision": res.result["precision"], "batch": s.finetune_batch,
            "train_images": res.result["sizes"]["train"], "epochs": epochs, "test_top1": res.result["metrics"]["top1"],
            "wall_seconds": round(time.perf_counter() - t0, 1), **cuda_memory(ctx),
            "summary": f"fine-tuning {s.model} {res.result['precision']}: " + ", ".join(
                f"epoch {e['epoch']} {e['images_per_second']} img/s" for e in epochs)}


def step_logreg(ctx: Context) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from probe.heads.torch_logreg import TorchLogisticRegression
    from torch_logreg import synthetic, warm_up   # bench/torch_logreg.py
    n, d, c = ctx.sizes.logreg
    t0 = time.perf_counter()
    X, y = synthetic(n, d, c)
    made = time.perf_counter() - t0
    cut = int(0.9 * n)
    warm_up(ctx.device)
    est = TorchLogisticRegression(device=str(ctx.device), warm_start=True, max_iter=ctx.sizes.logreg_max_iter)
    path = []
    for C in sorted(ctx.sizes.logreg_path):
        est.set_params(C=C)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            est.fit(X[:cut], y[:cut])
        ctx.sync()
        seconds = time.perf_counter() - t0
        path.append({"C": C, "seconds": round(seconds, 2), "iterations": int(est.n_iter_[0]),
                     "converged": not caught, "val_top1": float(np.mean(est.predict(X[cut:]) == y[cut:]))})
    return {"rows": cut, "val_rows": n - cut, "dims": d, "classes": c, "gb": round(X.nbytes / 1e9, 2),
            "made_seconds": round(made, 1), "max_iter": ctx.sizes.logreg_max_iter, "path": path, **cuda_memory(ctx),
            "summary": f"torch logreg {cut}x{d}, {c} classes: " + ", ".join(
                f"C={p['C']:g} {p['seconds']} s ({p['iterations']} it)" for p in path)}


def step_finetune_tests(ctx: Context) -> dict:
    out = _pytest(ctx, ["tests/test_finetune.py"], "finetune")
    out["summary"] = f"tests/test_finetune.py: {out.get('passed', '?')} passed, " \
                     f"{out.get('failures', 0) + out.get('errors', 0)} failed in {out['seconds']} s"
    return out


STEPS = {"env": step_env, "pytest": step_pytest, "memory": step_memory, "compile": step_compile, "jpeg": step_jpeg,
         "accuracy": step_accuracy, "torchrun": step_torchrun, "finetune": step_finetune, "logreg": step_logreg,
         "finetune_tests": step_finetune_tests}
SMOKE_STEPS = [name for name in STEPS if name != "finetune_tests"]   # CI runs that file anyway


# --- the report ---------------------------------------------------------------------------------------

HIDDEN = ("status", "seconds", "summary", "output_tail", "trace", "sizes", "stderr_tail")


def _lines(section: dict, indent: str = "    ") -> list[str]:
    """A step's figures, one `key: value` line each; nested dicts and lists of dicts one line per entry."""
    out = []
    for k, v in section.items():
        if k in HIDDEN:
            continue
        if isinstance(v, list) and v and isinstance(v[0], dict):
            out.append(f"{indent}{k}:")
            out += [f"{indent}  - {_short(item)}" for item in v]
        elif isinstance(v, dict) and any(isinstance(x, (dict, list)) for x in v.values()):
            out.append(f"{indent}{k}:")
            out += _lines(v, indent + "  ")
        else:
            out.append(f"{indent}{k}: {_short(v)}")
    return out


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_short(x)}" for k, x in v.items())
    return str(v)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"featprobe device report ({'smoke, CPU' if report['smoke'] else 'GPU'}), {report['started']}, "
             f"{report.get('elapsed_seconds', 0):.0f} s of {report['budget_seconds']:.0f}", ""]
    for name, sec in report["sections"].items():
        status = sec.get("status")
        head = f"[{status}] {name} ({sec.get('seconds', 0):.1f} s)"
        lines.append(f"{head}: {sec.get('summary') or sec.get('error') or sec.get('reason') or ''}")
        if status == "ok":
            lines += _lines(sec)
        elif status == "error":
            lines += [f"    {ln}" for ln in (sec.get("trace") or sec.get("output_tail") or "").splitlines()[-12:]]
        lines.append("")
    (out / "gpu_report.txt").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", help="report folder (default: $OUT, else ./gpu-report)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--budget", type=float, help="seconds for all steps (default: 420; smoke 600)")
    p.add_argument("--only", help="comma-separated steps to run (env always runs)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--assets", help="folder holding hymenoptera_data (default: $FEATPROBE_ASSETS, ../shared/assets)")
    p.add_argument("--keep", action="store_true", help="keep the temporary caches (their folder is reported)")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    if args.budget:
        sizes = replace(sizes, budget=args.budget)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here: run it on the GPU machine, or with --smoke to check the script on the CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or "gpu-report")
    names = SMOKE_STEPS if args.smoke else list(STEPS)
    if args.only:
        wanted = {"env", *args.only.split(",")}
        names = [n for n in names if n in wanted]
    names = [n for n in names if n not in args.skip.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="featprobe-gpu-"))
    os.environ.setdefault("FEATPROBE_HOME", str(tmp / "home"))   # remembered hashes stay out of ~/.cache
    ctx = Context(sizes, out, tmp, Path(args.assets) if args.assets else None, args.smoke)
    report = {"smoke": args.smoke, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "budget_seconds": sizes.budget, "tmp": str(tmp), "sections": {}}
    ctx.state["report"] = report["sections"]
    failed = False
    signal.signal(signal.SIGALRM, _out_of_time)
    try:
        for name in names:
            need = NEEDS[name] if not args.smoke else 1
            if ctx.left() < need:
                report["sections"][name] = {"status": "skipped", "reason": f"{ctx.left():.0f} s left of the budget, "
                                            f"needs about {need} s"}
            else:
                print(f"== {name} ({ctx.left():.0f} s left)", flush=True)
                t0 = time.perf_counter()
                signal.setitimer(signal.ITIMER_REAL, max(1.0, ctx.left() + GRACE))
                try:
                    result = STEPS[name](ctx)
                    status = "error" if result.get("error") else "ok"
                except (Exception, OutOfTime) as e:  # noqa: BLE001 - one step's failure is reported, the others run
                    result, status = {"error": f"{type(e).__name__}: {e}"[:600],
                                      "trace": traceback.format_exc()[-2500:]}, "error"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                failed |= status == "error"
                report["sections"][name] = {"status": status, **result, "seconds": round(time.perf_counter() - t0, 1)}
                print(f"   {status}: {result.get('summary') or result.get('error')}", flush=True)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            report["elapsed_seconds"] = round(time.perf_counter() - ctx.started, 1)
            write_report(report, out)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"report: {out / 'gpu_report.txt'} and {out / 'gpu_report.json'} ({report['elapsed_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
