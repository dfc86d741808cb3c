"""Where CPU extraction time goes: decode, forward and the whole process, in one run on the same images.

  decode     images/s of read + decode + resize + centre crop to uint8, per decoder, one process and thread
  forward    images/s of the backbone alone on pre-decoded uint8 batches (normalised as extract does),
             per engine and precision
  extract    images/s of a whole `python -m extract` process on a fresh cache (start-up included),
             per engine and precision, and torch with the allocator tuning turned off; its peak RSS
  tutorial   the PyTorch transfer-learning tutorial's loop as a whole process: ImageFolder + PIL
             transforms, fp32 NCHW, per-batch .numpy() append

Every measurement is a fresh subprocess (the allocator setting belongs to a process); medians of
--repeats, run back to back. The images are the ants/bees JPEGs hard-linked --copies times into a
temporary folder (--copies 8: 3,184 files).

    python bench/cpu_limits.py --copies 8 --repeats 3
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu_limits.py --copies 8 --precisions fp32   # an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


def repeated_folder(src: Path, dst: Path, copies: int) -> int:
    """dst/<split>/<class>/<copy>-<name>: every image of src hard-linked `copies` times; returns the count."""
    n = 0
    for path in sorted(src.glob("*/*/*")):
        if not path.is_file():
            continue
        split, cls = path.parent.parent.name, path.parent.name
        (dst / split / cls).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            target = dst / split / cls / f"{c}-{path.name}"
            try:
                os.link(path, target)
            except OSError:
                target.write_bytes(path.read_bytes())
            n += 1
    return n


def run_child(args: list[str]) -> dict:
    """The JSON line a `python bench/cpu_limits.py --child ...` subprocess prints."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"child {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed_process(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a whole command, measured by the parent through wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


# --- children: each prints one JSON line ---------------------------------------------------------

def child_decode(root: Path, decoder: str, limit: int) -> dict:
    import torch

    from extract.registry.datasets import load_dataset
    from extract.registry.models import resolve_weights
    from extract.compute.pipeline import DecodedFiles

    torch.set_num_threads(1)
    source = load_dataset("imagefolder", root=str(root)).splits["train"]
    preprocess = resolve_weights("efficientnet_lite0").preprocess
    files = DecodedFiles(source, preprocess, decoder=decoder)
    n = min(limit, len(source))
    start = time.perf_counter()
    for i in range(n):
        files[i]
    return {"images_per_s": n / (time.perf_counter() - start)}


def child_forward(root: Path, model: str, engine: str, precision: str, batch: int, limit: int) -> dict:
    import torch

    from extract.api import plan
    from extract.compute.engine import Embedder
    from extract.registry.models import load_backbone
    from extract.compute.pipeline import DecodedFiles

    p = plan(model, "imagefolder", root=str(root), precision=precision, engine=engine)
    source = p.dataset.splits["train"]
    files = DecodedFiles(source, p.identity.preprocess)
    images = torch.stack([files[i][0] for i in range(min(limit, len(source)))])
    backbone = load_backbone(model)
    if engine == "openvino":
        from extract.compute.engines.openvino_engine import OpenVINOEmbedder
        embed = OpenVINOEmbedder(backbone, p.autocast, p.identity.preprocess, Path(tempfile.mkdtemp()))
    else:
        embed = Embedder(backbone, p.device, p.autocast, p.identity.preprocess)
    embed(images[:batch])  # warm-up
    start = time.perf_counter()
    for a in range(0, len(images), batch):
        embed(images[a:a + batch])
    return {"images_per_s": len(images) / (time.perf_counter() - start)}


def child_tutorial(root: Path, model: str, batch: int) -> dict:
    from extract_speed import naive_loop   # bench/ is on sys.path when this file runs as a script

    from extract.registry.models import load_backbone

    return {"images_per_s": naive_loop(load_backbone(model), root, batch, workers=1)}


# --- the parent ------------------------------------------------------------------------------------

def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return kind + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--root", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--engines", default="torch,openvino")
    ap.add_argument("--decoders", default="pil,tensor")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = {"decode": lambda: child_decode(Path(rest[0]), rest[1], int(rest[2])),
               "forward": lambda: child_forward(Path(rest[0]), args.model, rest[1], rest[2], args.batch_size,
                                                int(rest[3])),
               "tutorial": lambda: child_tutorial(Path(rest[0]), args.model, args.batch_size)}[kind]()
        print(json.dumps(out))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        n = repeated_folder(Path(args.root), root, args.copies)
        print(f"{args.model}, {n} JPEGs ({Path(args.root).name} x {args.copies}), batch {args.batch_size}, "
              f"{os.cpu_count()} cores, {cpu_flags()}; medians of {args.repeats}")
        rows = []

        def record(name: str, values: list[float], rss: list[float] | None = None) -> None:
            med = statistics.median(values)
            rows.append((name, med))
            extra = f", peak RSS {statistics.median(rss):.0f} MiB" if rss else ""
            print(f"  {name:<44} {med:8.1f} images/s   ({', '.join(f'{v:.1f}' for v in values)}){extra}",
                  flush=True)

        for decoder in args.decoders.split(","):
            record(f"decode {decoder} (1 thread)",
                   [run_child(["--child", "decode", str(root), decoder, "400"])["images_per_s"]
                    for _ in range(args.repeats)])
        combos = [(e, p) for e in args.engines.split(",") for p in args.precisions.split(",")]
        for engine, precision in combos:
            record(f"forward {engine} {precision}",
                   [run_child(["--child", "forward", str(root), engine, precision, "256"])["images_per_s"]
                    for _ in range(args.repeats)])
        runs = [(e, p, {}) for e, p in combos] + [("torch", p, {"FEATPROBE_MALLOC_TUNING": "0"})
                                                  for p in args.precisions.split(",")]
        for engine, precision, env in runs:
            rates, rss = [], []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as cache:
                    wall, peak = timed_process([sys.executable, "-m", "extract", "--model", args.model, "--data",
                                                "imagefolder", "--root", str(root), "--cache-dir", cache,
                                                "--precision", precision, "--engine", engine,
                                                "--batch-size", str(args.batch_size), "--no-progress"], env)
                rates.append(n / wall)
                rss.append(peak)
            name = f"whole extract: {engine} {precision}" + (", allocator tuning off" if env else "")
            record(name, rates, rss)
        tut = []
        for _ in range(args.repeats):
            wall, _ = timed_process([sys.executable, __file__, "--model", args.model, "--child", "tutorial",
                                     str(root)])
            tut.append(n / wall)
        record("whole tutorial loop (fp32, NCHW, PIL)", tut)
        best = max(v for name, v in rows if name.startswith("whole extract") and "off" not in name)
        print(f"best whole extract / tutorial loop = {best / statistics.median(tut):.1f}x")


if __name__ == "__main__":
    main()
