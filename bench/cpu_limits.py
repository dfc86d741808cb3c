"""Where CPU extraction time goes: decode, forward and the whole process, in one run on the same images.

  forward    images/s of the backbone alone on pre-decoded uint8 batches (normalised as extract does),
             per engine and precision (the same 224-pixel crops whatever the photos' size)
  then for each set of photos (--sets): ImageNet-sized JPEGs (the ants/bees photos, hard-linked
  --copies times) and 12 MP photos (every second ants/bees photo fitted to 4032 x 3024 by
  bench/large_photos.py, hard-linked --large-copies times):
  decode     images/s (and ms per image) of read + decode + resize + centre crop to uint8, per
             --decoder (pil, tensor, torchcodec, draft), one process and thread
  extract    images/s of a whole `python -m extract` process on a fresh cache (start-up and the
             OpenVINO conversion included), per engine, precision and --decoder; for the first set also
             torch with the allocator tuning turned off; its peak RSS
  tutorial   the PyTorch transfer-learning tutorial's loop as a whole process: ImageFolder + PIL
             transforms, fp32 NCHW, per-batch .numpy() append

Every measurement is a fresh subprocess (the allocator setting belongs to a process); medians of
--repeats, the configurations of a table taking turns within each repeat (a busy spell of a shared
machine is shared out rather than landing on one configuration).

    python bench/cpu_limits.py --copies 2 --large-copies 2 --repeats 3
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu_limits.py --copies 2 --large-copies 2 --repeats 3 --precisions fp32
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

def child_decode(root: Path, model: str, decoder: str, limit: int) -> dict:
    import torch

    from extract.registry.datasets import load_dataset
    from extract.registry.models import resolve_weights
    from extract.compute.pipeline import DecodedFiles

    torch.set_num_threads(1)
    source = load_dataset("imagefolder", root=str(root)).splits["train"]
    preprocess = resolve_weights(model).preprocess
    files = DecodedFiles(source, preprocess, decoder=decoder)
    n = min(limit, len(source) - 1)
    files[len(source) - 1]   # warm-up (imports, first allocations), on an image not timed
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
    if engine == "openvino":   # int8: quantized (calibrated on the train sample) before the clock starts
        from extract.compute.calibration import Calibration
        from extract.compute.engines.openvino_engine import OpenVINOEmbedder
        embed = OpenVINOEmbedder(backbone, p.autocast, p.identity.preprocess, Path(tempfile.mkdtemp()),
                                 calibration=Calibration.of(p.dataset.splits) if precision == "int8" else None)
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
    kind += ", AMX" if "amx_tile" in flags else ""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return kind + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def versions() -> str:
    import importlib.metadata as md

    out = []
    for name in ("torch", "torchvision", "torchcodec", "openvino", "pillow"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


class Table:
    """Rows printed as they are measured: median images/s, ms per image, each repeat, peak RSS."""

    def __init__(self):
        self.rows: dict[str, float] = {}

    def record(self, name: str, values: list[float], rss: list[float] | None = None) -> float:
        med = statistics.median(values)
        self.rows[name] = med
        extra = f", peak RSS {statistics.median(rss):.0f} MiB" if rss else ""
        print(f"  {name:<66} {med:7.1f} images/s {1000 / med:8.2f} ms   ({', '.join(f'{v:.1f}' for v in values)}){extra}",
              flush=True)
        return med

    def take_turns(self, runs: dict, repeats: int) -> None:
        """{name: () -> images/s or (images/s, peak RSS)}: every run once per repeat, in turn (so that a
        busy spell of the machine is shared out), then one row each."""
        results: dict[str, list] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                results[name].append(run())
        for name, values in results.items():
            if isinstance(values[0], tuple):
                self.record(name, [v[0] for v in values], [v[1] for v in values])
            else:
                self.record(name, values)


def whole_extract(root: Path, n: int, model: str, engine: str | None, precision: str, decoder: str, batch: int,
                  env: dict | None = None) -> tuple[float, float]:
    """(images/s, peak RSS MiB) of one whole `python -m extract` process on a fresh cache; engine None: the
    default command (no engine, precision, decoder or batch size given)."""
    asked = [] if engine is None else ["--precision", precision, "--engine", engine, "--decoder", decoder,
                                       "--batch-size", str(batch)]
    with tempfile.TemporaryDirectory() as cache:
        wall, peak = timed_process([sys.executable, "-m", "extract", "--model", model, "--data", "imagefolder",
                                    "--root", str(root), "--cache-dir", cache, *asked, "--no-progress"], env)
    return n / wall, peak


def ideal(forward: float, decode: float, cores: int) -> float:
    """images/s when decoding (`decode` images/s on one core) and the forward pass (`forward` images/s on all
    cores) take turns on every core with nothing lost: cores / (cores / forward + 1 / decode)."""
    return cores / (cores / forward + 1 / decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--root", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--copies", type=int, default=2, help="hard links of each ImageNet-sized photo")
    ap.add_argument("--large", help="folder of the 12 MP photos (made from --root when missing; default: temporary)")
    ap.add_argument("--large-copies", type=int, default=2, help="hard links of each 12 MP photo")
    ap.add_argument("--sets", default="imagenet,12mp")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16,int8", help="int8: OpenVINO only, where NNCF is installed")
    ap.add_argument("--engines", default="torch,openvino")
    ap.add_argument("--decoders", default="pil,tensor,torchcodec,draft", help="decoders timed alone")
    ap.add_argument("--extract-decoders", default="tensor,draft", help="decoders of the whole-process runs")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = {"decode": lambda: child_decode(Path(rest[0]), args.model, rest[1], int(rest[2])),
               "forward": lambda: child_forward(Path(rest[0]), args.model, rest[1], rest[2], args.batch_size,
                                                int(rest[3])),
               "tutorial": lambda: child_tutorial(Path(rest[0]), args.model, args.batch_size)}[kind]()
        print(json.dumps(out))
        return

    from large_photos import make_large_photos   # bench/ is on sys.path when this file runs as a script

    from extract.registry.images import torchcodec_available

    decoders = [d for d in args.decoders.split(",") if d != "torchcodec" or torchcodec_available()]
    from extract.compute.engines.openvino_engine import nncf_available

    combos = [(e, p) for e in args.engines.split(",") for p in args.precisions.split(",")
              if p != "int8" or (e == "openvino" and nncf_available())]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{args.model}, batch {args.batch_size}; {cpu_model()}, {os.cpu_count()} cores, {cpu_flags()}; "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}; load average {os.getloadavg()[0]:.1f} at the start; "
              f"{versions()}; medians of {args.repeats}")
        table = Table()
        small = tmp / "imagenet"
        n_small = repeated_folder(Path(args.root), small, args.copies)
        print("\nforward only (pre-decoded 224-pixel crops, the same for every set)")
        table.take_turns({f"forward {engine} {precision}": (
            lambda e=engine, p=precision: run_child(["--model", args.model, "--batch-size", str(args.batch_size),
                                                     "--child", "forward", str(small), e, p, "256"])["images_per_s"])
            for engine, precision in combos}, args.repeats)
        for k, name in enumerate(args.sets.split(",")):
            if name == "imagenet":
                root, n, what = small, n_small, f"{Path(args.root).name} x {args.copies}"
            else:
                large = Path(args.large) if args.large else tmp / "large-src"
                made = make_large_photos(Path(args.root), large)
                root = tmp / "12mp"
                n = repeated_folder(large, root, args.large_copies)
                what = f"{made} photos at 4032 x 3024 x {args.large_copies}"
            print(f"\n{name}: {n} JPEGs ({what}); load average {os.getloadavg()[0]:.1f}")
            limit = "400" if name == "imagenet" else "120"
            table.take_turns({f"[{name}] decode + resize + crop, {decoder} (1 thread)": (
                lambda d=decoder, r=root: run_child(["--model", args.model, "--child", "decode", str(r), d,
                                                     limit])["images_per_s"]) for decoder in decoders}, args.repeats)
            decoders_here = args.extract_decoders.split(",") if name != "imagenet" else \
                [d for d in args.extract_decoders.split(",") if d != "draft"]   # draft = tensor below 4x the resize
            runs = [(None, "auto", "auto", {})] + [(e, p, d, {}) for e, p in combos for d in decoders_here]
            if k == 0:
                runs += [("torch", p, args.extract_decoders.split(",")[0], {"FEATPROBE_MALLOC_TUNING": "0"})
                         for p in args.precisions.split(",") if p != "int8"]
            whole = {(f"[{name}] whole extract: default command" if e is None else
                      f"[{name}] whole extract: {e} {p} --decoder {d}") + (", allocator tuning off" if env else ""): (
                lambda e=e, p=p, d=d, env=env, r=root, n=n: whole_extract(r, n, args.model, e, p, d, args.batch_size,
                                                                         env))
                for e, p, d, env in runs}

            def tutorial(r=root, n=n) -> float:
                wall, _ = timed_process([sys.executable, __file__, "--model", args.model, "--batch-size",
                                         str(args.batch_size), "--child", "tutorial", str(r)])
                return n / wall

            tutorial_name = f"[{name}] whole tutorial loop (fp32, NCHW, PIL)"
            table.take_turns({**whole, tutorial_name: tutorial}, args.repeats)
            mine = {r: v for r, v in table.rows.items() if r.startswith(f"[{name}] whole extract") and "off" not in r}
            best = max(mine, key=mine.get)
            default = table.rows[f"[{name}] whole extract: default command"]
            tutorial_rate = table.rows[tutorial_name]
            print(f"  default command / tutorial loop = {default / tutorial_rate:.1f}x; best whole extract / tutorial "
                  f"loop = {mine[best] / tutorial_rate:.1f}x ({best.split(': ', 1)[1]})")
            forwards = {r: v for r, v in table.rows.items() if r.startswith("forward ")}
            decodes = {r: v for r, v in table.rows.items() if r.startswith(f"[{name}] decode")}
            f_best, d_best = max(forwards, key=forwards.get), max(decodes, key=decodes.get)
            top = ideal(forwards[f_best], decodes[d_best], cores)
            print(f"  ideal with {cores} cores = {top:.1f} images/s ({f_best}; {d_best}): default command "
                  f"{default / top:.2f}x of it, best whole extract {mine[best] / top:.2f}x; load average "
                  f"{os.getloadavg()[0]:.1f} at the end")

if __name__ == "__main__":
    main()
