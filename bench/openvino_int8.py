"""Would int8 pay off? NNCF post-training quantization of the OpenVINO network against f32 and bf16.

For each image folder (train + val): the network converted as `--engine openvino` converts it, then
quantized by NNCF (`nncf.quantize`, default preset, fast bias correction) with --calibration train
images as extraction preprocesses them (the first N in file order). In one run, on the same
pre-decoded images: images/s of the compiled f32, bf16 (native only) and int8 models (THROUGHPUT, the
batch split across streams, as the engine runs them; configurations take turns, medians), feature
cosine against f32, and test top-1 of the same logistic regression (standardised features, C chosen
on a split of train, the val split as test) on each model's features.

    pip install nncf
    python bench/openvino_int8.py --roots ../shared/assets/hymenoptera_data /tmp/cifar10-int8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract.compute.engine import cpu_has_bf16, effective_preprocess
from extract.compute.engines import openvino_engine as ove
from extract.compute.pipeline import DecodedFiles
from extract.registry.datasets import load_dataset
from extract.registry.models import load_backbone
from openvino_speed import rate   # bench/ is on sys.path when this file runs as a script

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def images(source, preprocess, limit: int | None = None) -> torch.Tensor:
    files = DecodedFiles(source, preprocess)
    n = len(source) if limit is None else min(limit, len(source))
    return torch.stack([files[i][0] for i in range(n)])


class Compiled:
    """A compiled OpenVINO model run as OpenVINOEmbedder runs it (one part of the batch per stream)."""

    def __init__(self, model, hint: str, threads: int):
        ov = ove.import_openvino()
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": threads}
        with ove.signal_stack_kept():
            self.compiled = ov.Core().compile_model(model, "CPU", config)
            n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self.requests = [self.compiled.create_infer_request() for _ in range(n)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        parts = np.array_split(x, max(1, min(len(self.requests), len(x))))
        requests = self.requests[:len(parts)]
        for request, part in zip(requests, parts):
            request.start_async({0: part})
        for request in requests:
            request.wait()
        return np.concatenate([r.get_output_tensor(0).data for r in requests])


def features(run, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run(x[a:a + batch]) for a in range(0, len(x), batch)])


def top1(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Logistic regression on standardised features, C from {0.01, 0.1, 1, 10} by a 75/25 split of train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(c, x, y):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, y)

    a, b, ya, yb = train_test_split(train_x, train_y, test_size=0.25, random_state=seed, stratify=train_y)
    best = max((0.01, 0.1, 1.0, 10.0), key=lambda c: fit(c, a, ya).score(b, yb))
    return fit(best, train_x, train_y).score(test_x, test_y)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    import nncf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roots", nargs="+", default=[str(ASSETS / "hymenoptera_data")])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--calibration", type=int, default=300, help="train images NNCF calibrates on")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=256, help="images timed per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = ove.cores()
    backbone = load_backbone(args.model, layers=["penultimate"])
    print(f"{args.model}, OpenVINO {ove.version()}, NNCF {nncf.__version__}, {threads} threads, batch {args.batch_size}, "
          f"native bf16: {cpu_has_bf16()}; medians of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for root in map(Path, args.roots):
            data = load_dataset("imagefolder", root=str(root))
            prep = effective_preprocess(backbone.preprocess, False)
            train, test = data.splits["train"], [s for n, s in data.splits.items() if n != "train"][-1]
            xtr, xte = ove.network_input(images(train, prep), prep), ove.network_input(images(test, prep), prep)
            model, _, _, _ = ove.converted_model(backbone, prep.crop, Path(tmp))
            calib = xtr[:args.calibration]
            start = time.perf_counter()
            quantized = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                                      subset_size=len(calib))
            q_seconds = time.perf_counter() - start
            runs = {"f32": Compiled(model, "f32", threads), "int8": Compiled(quantized, "f32", threads)}
            if cpu_has_bf16():
                runs["bf16"] = Compiled(model, "bf16", threads)
                runs["int8+bf16"] = Compiled(quantized, "bf16", threads)
            timed = np.concatenate([xtr, xte])[:args.images]
            rates: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    rates[name].append(rate(run, timed, args.batch_size))
            ytr, yte = np.asarray(train.labels), np.asarray(test.labels)
            feats = {k: (features(r, xtr, args.batch_size), features(r, xte, args.batch_size)) for k, r in runs.items()}
            print(f"\n{root.name}: {len(xtr)} train / {len(xte)} test; calibration on {len(calib)} train images, "
                  f"quantization {q_seconds:.0f} s")
            ref = feats["f32"]
            base = top1(ref[0], ytr, ref[1], yte)
            for name in runs:
                t = top1(feats[name][0], ytr, feats[name][1], yte)
                cos = cosines(np.concatenate(feats[name]), np.concatenate(ref))
                print(f"  {name:<10} {statistics.median(rates[name]):7.1f} images/s "
                      f"({', '.join(f'{v:.1f}' for v in rates[name])})  top-1 {100 * t:6.2f} "
                      f"({100 * (t - base):+.2f} vs f32)  cosine vs f32 {cos.mean():.5f} / {cos.min():.5f}", flush=True)


if __name__ == "__main__":
    main()
