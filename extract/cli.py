"""`python -m extract`: command line -> one ExtractRequest per model -> one-line summary each.

When every split of every model is already cached, the answer comes from the cache files without
importing torch (`extract.run.hits`); otherwise the registry and the engines are imported here.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from extract.core.precision import PRECISIONS
from extract.compute.engines import AUTO, engine_names
from extract.core.errors import UserError, guarded
from extract.core.helpformat import DefaultsHelp
from extract.registry.datasets import describe_datasets
from extract.run.hits import lookup
from extract.run.outcome import summary
from extract.run.request import DEFAULT_DATA, DEFAULT_MODEL, ExtractRequest
from extract.run.runners import runner_names
from extract.store.identity import DECODERS
from extract.store.modelref import split_models

LOGGERS = ("extract",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extract", formatter_class=DefaultsHelp,
                                description="Run a frozen pretrained backbone over a dataset and cache the "
                                            "embeddings to HDF5 (one file per split).")
    p.add_argument("--model", action="append", metavar="MODEL",
                   help="backbone as arch or arch.weights (resnet50, resnet50.swav), any torchvision "
                        "classification model, or a timm model as on the hub, timm/<arch>[.<tag>] (timm/convnext_tiny.fb_in22k_ft_in1k; "
                        "see --list-models 'timm/convnext*'); several "
                        "comma-separated (or repeated) run in turn; default: " + DEFAULT_MODEL)
    p.add_argument("--weights", default="default",
                   help="weights tag (e.g. IMAGENET1K_V2, swav), 'none' for random init, or a local checkpoint file "
                        "(default: each model's default weights); with several models one per model, comma-separated "
                        "in the same order, or 'none' for all; or name each model's own in --model: arch.tag, "
                        "arch=FILE (efficientnet_lite0,cifar_resnet20=resnet20.th)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"dataset name (see --list-datasets); default: {DEFAULT_DATA}")
    p.add_argument("--root", help="dataset folder (imagefolder: the folder with train/val/test or class folders)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download torchvision datasets that are not on disk")
    p.add_argument("--layer", action="append", dest="layers", metavar="LAYER",
                   help="tap to extract (repeat or comma-separate for several); 'all' = penultimate and every "
                        "registry tap of each model, in one pass; default: penultimate")
    p.add_argument("--split", action="append", dest="splits", metavar="SPLIT", help="only these splits")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. --option n=500 for the synthetic set")
    p.add_argument("--cache-dir", default="cache", help="cache root (default: ./cache)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 256 on CUDA, else 64)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: by device and cores); with --ray, "
                   "the number of Ray actors (default: from the cluster)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="autocast precision; auto = bf16/fp16 where the hardware has it, else fp32 (default); "
                        "int8 = the network quantized by NNCF after calibrating on 300 train images, with "
                        "--engine openvino or auto (pip install -e \".[int8]\"; named .int8)")
    p.add_argument("--engine", default="torch", choices=[*engine_names(), AUTO],
                   help="what runs the network: torch (default), openvino (CPU only; pip install -e \".[openvino]\"; "
                        "converted once per model and kept under the cache), or auto (openvino on the CPU when "
                        "installed, else torch); an engine other than torch is named in the cache path")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype in the cache")
    p.add_argument("--image-size", metavar="N",
                   help="input side in pixels the network sees (8-1024; e.g. 32 for CIFAR's native size); "
                        "default: the weights' own crop size")
    p.add_argument("--normalize", default="weights", choices=["weights", "dataset"],
                   help="mean/std: the weights' own (default), or the train split's own, computed once "
                        "and remembered beside the cache")
    p.add_argument("--decoder", default="auto", choices=DECODERS,
                   help="image files: tensor (JPEGs decoded and resized as uint8 tensors by torchvision, other "
                        "files by PIL), torchcodec (the same with TorchCodec's JPEG decoder; named .torchcodec), "
                        "draft (JPEGs decoded by PIL at the largest DCT scale, 1/2 to 1/8, that keeps twice the "
                        "resize target on the short side, then resized as tensor: about twice as fast on 12 MP "
                        "photos; named .draft), pil (every file by PIL; named .pil), cuda (JPEGs decoded in batches on "
                        "the GPU by nvJPEG, the rest as tensor; with a CUDA --device; named .cuda), or auto "
                        "(tensor where torchvision still has its JPEG decoder, else torchcodec where installed, "
                        "else pil; default)")
    p.add_argument("--compile", action="store_true",
                   help="run the backbone through torch.compile (the torch engine; the first batch pays for the "
                        "compilation, logged and kept in the provenance)")
    p.add_argument("--chunk-size", type=int, default=1024, metavar="N",
                   help="images per chunk: the unit of resume and of sharing work between torchrun ranks or "
                        "Ray actors (default: 1024)")
    p.add_argument("--runner", default="auto", choices=["auto", *runner_names()],
                   help="where the chunks are computed: auto (torchrun when launched by it, ray with --ray, else "
                        "this process; default), or a registered runner by name")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster: auto (the one this machine belongs to), ray://host:port, or local "
                        "(start one here); pip install -e \".[ray]\"; images must be at a path every node sees")
    p.add_argument("--on-error", default="skip", choices=["skip", "stop"],
                   help="unreadable images: skip and record them (default), or stop at the first")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a cache made from different inputs")
    p.add_argument("--allow-missing-weights", action=argparse.BooleanOptionalAction, default=False,
                   help="use a checkpoint that leaves weights of the network at random init (recorded in provenance)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument("--list-models", nargs="?", const="", default=None, metavar="PATTERN",
                   help="list backbones with dims and weights, then exit; with a glob PATTERN ('resnet*', "
                        "'timm/convnext*'), every matching registry, torchvision and timm model")
    p.add_argument("--list-datasets", action="store_true", help="list datasets, then exit")
    return p


def parse_options(pairs: list[str]) -> dict:
    """['n=500', 'name=x'] -> {'n': 500, 'name': 'x'} (dataset options from --option KEY=VALUE)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option takes KEY=VALUE, got {pair!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _split_list(values: list[str] | None) -> list[str] | None:
    return [v for value in values for v in value.split(",") if v] if values else None


def weights_per_model(models: list[str], weights: str | None) -> list[str]:
    """--weights for each model in turn: the one value for one model, 'default' or 'none' for every
    model, else one comma-separated value per model (several models and one weights choice is refused)."""
    given = "default" if weights is None else str(weights)
    if len(models) == 1 or given.lower() in ("default", "none"):
        return [given] * len(models)
    parts = [w.strip() for w in given.split(",")]
    if len(parts) == 1:
        raise UserError(f"--weights {given} with {len(models)} models ({', '.join(models)}): give one per model, "
                        "comma-separated in the same order (--weights a,b), or name each model's weights in --model "
                        "(arch.tag, arch=FILE)")
    if len(parts) != len(models):
        raise UserError(f"--weights names {len(parts)} weights for {len(models)} models ({', '.join(models)}): "
                        "give one per model, in the same order")
    return [w or "default" for w in parts]


def named(model: str, error: UserError) -> UserError:
    """The error with the model named first, unless it names the model already."""
    text = str(error)
    arch = model.split("=", 1)[0].split(".", 1)[0]
    said = any(re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text) for name in (model, arch))
    return error if said else UserError(f"--model {model}: {text}")


def base_request(args: argparse.Namespace) -> ExtractRequest:
    """The command line's request, before a model is chosen."""
    return ExtractRequest(data=args.data, weights=args.weights, root=args.root, download=args.download,
                          dataset_options=parse_options(args.option), splits=_split_list(args.splits),
                          cache_dir=args.cache_dir, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, precision=args.precision, dtype=args.dtype, on_error=args.on_error,
                          overwrite=args.overwrite, progress=args.progress,
                          allow_missing_weights=args.allow_missing_weights, image_size=args.image_size,
                          normalize=args.normalize, engine=args.engine, decoder=args.decoder,
                          chunk_rows=args.chunk_size, runner=args.runner, ray=args.ray, compile=args.compile)


def model_requests(args: argparse.Namespace) -> list[ExtractRequest]:
    """One request per model with its own weights choice; layers as given (not yet expanded)."""
    base = base_request(args)
    models = split_models(args.model) or [DEFAULT_MODEL]
    return [base.replace(model=model, weights=choice, layers=_split_list(args.layers))
            for model, choice in zip(models, weights_per_model(models, args.weights))]


def requests(args: argparse.Namespace) -> list:
    """One ExtractRequest per model, with its weights resolved and its taps checked: every name and
    weights file is checked before any work starts. Returns [(request, resolved weights)]."""
    from extract.registry.models import expand_taps, resolve_weights

    out = []
    for request in model_requests(args):
        try:
            weights = resolve_weights(request.model, request.weights)
        except UserError as e:
            raise named(request.model, e) from None
        out.append((request.replace(layers=expand_taps(weights.spec, request.layers)), weights))
    return out


def cached_runs(args: argparse.Namespace) -> tuple[list | None, object]:
    """([({split: hit}, start time)] per model when every split of every model is cached already, else
    None; the dataset read on the way, for the run that follows). Imports no torch."""
    found, dataset = [], None
    for request in model_requests(args):
        started = time.perf_counter()
        results, dataset = lookup(request, dataset)
        if results is None:
            return None, dataset
        found.append((results, started))
    return found, dataset


def print_models(pattern: str | None = None) -> None:
    from extract.registry.models import MAX_DESCRIBED, describe_model, model_names

    names = model_names(pattern)
    if not names:
        raise UserError(f"no model matches {pattern!r}; timm models are named timm/<arch> (e.g. 'timm/convnext*')")
    if len(names) > MAX_DESCRIBED:
        print("\n".join(names))
        print(f"{len(names)} models match {pattern!r}: narrow the pattern (at most {MAX_DESCRIBED}) to see their "
              "widths, input sizes and weights")
        return
    rows = [describe_model(n) for n in names]
    width = max(22, *(len(r["name"]) for r in rows))
    print(f"{'model':<{width}} {'dim':>5} {'input':>5}  {'default weights':<26} taps (width)")
    for r in rows:
        taps = ", ".join(f"{t} {d}" for t, d in r.get("taps", {}).items())
        default = f"{r.get('default_weights', '')}{' (on disk)' if r.get('weights_on_disk') else ''}"
        print(f"{r['name']:<{width}} {r.get('dim', ''):>5} {r.get('input', ''):>5}  {default:<26} {taps}")
        tags = [t for t in r.get("weights", []) if t != r.get("default_weights")]
        if tags:
            print(f"{'':<{width}} {'':>5} {'':>5}  also: {', '.join(tags)}")
    print("dim: width of the default tap (penultimate); widths measured on the meta device; input: the default "
          "weights' crop size")
    if not pattern:
        print("every torchvision classification model and every timm model (timm/<arch>, weights timm/<arch>.<tag>) "
              "works too: list them with a pattern, e.g. --list-models 'timm/convnext*' or --list-models 'vit*'")


def print_datasets() -> None:
    rows = describe_datasets()
    width = max(map(len, rows))
    for name, text in rows.items():
        print(f"{name:<{width}}  {text}")


def run(args: argparse.Namespace) -> int:
    if args.list_models is not None:
        print_models(args.list_models)
        return 0
    if args.list_datasets:
        print_datasets()
        return 0
    found, dataset = cached_runs(args)
    if found is not None:
        for results, started in found:
            report(results, started)
        return 0
    from extract.run.extraction import run_request

    for request, weights in requests(args):
        started = time.perf_counter()
        results = run_request(request, weights, dataset)
        if leader():
            report(results, started)
    return 0


def report(results: dict, started: float) -> None:
    for r in results.values():
        print(f"{r.split:>6}: {r.path} ({r.status}{': ' + r.reuse if r.reuse else ''})")
    print(summary(results, started))


def leader() -> bool:
    """False in torchrun ranks other than 0, which print nothing."""
    import os

    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return guarded(lambda: run(args), LOGGERS, speaks=leader())
    finally:
        if "torch" in sys.modules:   # a torchrun rank joined a process group
            from extract.run.runners.torchrun import leave_process_group

            leave_process_group()
