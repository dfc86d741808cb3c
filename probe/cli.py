"""Command line: `python -m probe --head NAME`, `--report`, and `predict`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extract.errors import UserError, guarded

from .heads import GRIDS, SCALES, list_heads
from .report import FORMATS

EPILOG = """examples:
  python -m probe --head logreg                 newest extraction under ./cache
  python -m probe --head all --data digits      every head, one comparison table
  python -m probe --features cache/x/m/train.h5 --test-features cache/x/m/test.h5 --head svm
  python -m probe --report --format markdown    collate every result under ./results
  python -m probe predict --head logreg photo.jpg more_photos/
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2, no usage dump
        raise UserError(f"{message} (see --help)")


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which features (default: the newest complete extraction under --cache-dir)")
    g.add_argument("--model", help="backbone as extract names it (efficientnet_lite0, resnet50.swav)")
    g.add_argument("--data", help="dataset: registry name (cifar10, digits), or an image folder's name or path")
    g.add_argument("--layer", help="feature layer inside the cache (default: its first layer)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="only features computed at this precision")
    g.add_argument("--dtype", choices=["float32", "float16"], help="only features stored as this dtype")
    g.add_argument("--features", metavar="TRAIN_H5", help="explicit train cache file; sibling val/test files are used")
    g.add_argument("--test-features", metavar="TEST_H5", help="explicit test cache file")
    g.add_argument("--val-features", metavar="VAL_H5", help="explicit validation cache file")
    g.add_argument("--cache-dir", default="cache", help="cache root (default: ./cache)")
    g.add_argument("--results-dir", default="results", help="where results go (default: ./results)")


def _selection(args) -> dict:
    return {"cache_dir": args.cache_dir, "data": args.data, "model": args.model, "layer": args.layer,
            "precision": args.precision, "dtype": args.dtype, "features": args.features,
            "test_features": args.test_features, "val_features": args.val_features}


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m probe", description="Fit, tune and compare classical heads on cached embeddings.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", default="logreg",
                   help=f"one of {', '.join(list_heads())}, several comma-separated, or all (default: logreg)")
    p.add_argument("--report", action="store_true", help="collate every result JSON under --results-dir")
    p.add_argument("--format", default="table", choices=FORMATS, help="report format on stdout (default: table)")
    _selection_args(p)
    p.add_argument("--grid", default="fast", choices=GRIDS, help="hyperparameter grid size (default: fast)")
    p.add_argument("--scale", choices=SCALES, help="feature scaling inside the pipeline (default: per head)")
    p.add_argument("--seed", type=int, default=0, help="validation carve, subsampling, estimator seeds")
    p.add_argument("--n-jobs", type=int, default=None, help="threads for BLAS/OpenMP during fits and processes for rf "
                   "(default: the libraries' choice; 1 is often fastest on a busy machine)")
    p.add_argument("--max-search-samples", type=int, default=None, metavar="N",
                   help="search hyperparameters on a stratified subsample of N train rows (refit uses all)")
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="save the refit head with joblib beside its result (default: yes)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    sub = p.add_subparsers(dest="command", metavar="{predict}", parser_class=_Parser)
    q = sub.add_parser("predict", help="label new images with a saved head",
                       description="Label new images with a saved head and the backbone recorded in its cache.")
    q.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    q.add_argument("--head", default="logreg", help="saved head to use (default: logreg)")
    q.add_argument("--head-file", help="path of a saved <head>.joblib (instead of looking it up)")
    _selection_args(q)
    q.add_argument("--top", type=int, default=1, help="show the top K labels per image (default: 1)")
    q.add_argument("--device", default="auto", help="device for the backbone (default: auto)")
    q.add_argument("--batch-size", type=int, default=32)
    return p


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _params(h: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())


def run_heads(args) -> int:
    from .api import evaluate
    from .report import format_rows, result_row

    out = evaluate(args.head, **_selection(args), results_dir=args.results_dir, grid=args.grid, scale=args.scale,
                   seed=args.seed, n_jobs=args.n_jobs, max_search_samples=args.max_search_samples, save=args.save,
                   progress=args.progress)
    data = out.data
    print(f"{data.dataset} / {data.model} / layer {data.layer} ({data.identity.precision}, {data.identity.dtype}): "
          f"{data.sizes['train']} train, {data.sizes['val']} validation, {data.sizes['test']} test "
          f"('{data.test_split}' split), {len(data.classes)} classes, {data.X_train.shape[1]} dims")
    print(f"validation: {data.validation}")
    for run, path in zip(out.runs, out.result_paths):
        r = run.result
        best_val = max(g["val_top1"] for g in r["grid"])
        m, t = r["metrics"], r["timing"]
        print(f"{r['head']}: {_params(r['hyperparameters'])} (val top-1 {_pct(best_val)}) -> test top-1 "
              f"{_pct(m['top1'])}" + (f", top-5 {_pct(m['top5'])}" if m["top5"] is not None else "")
              + f", balanced {_pct(m['balanced_accuracy'])}, macro-F1 {_pct(m['macro_f1'])}"
              + f" [search {t['search_seconds']:.2f} s, refit {t['fit_seconds']:.2f} s]")
        print(f"  wrote {path}")
    if out.comparison:
        rows = [result_row(r.result) for r in out.runs]
        cols = ("head", "top1", "balanced_acc", "macro_f1", "fit_s")
        print("\n" + format_rows(sorted(rows, key=lambda r: -(r["top1"] or 0)), "table", cols).rstrip())
        print(f"wrote {out.comparison}")
    return 0


def run_report(args) -> int:
    from .report import format_rows, write_report
    rows, paths = write_report(args.results_dir)
    if not rows:
        raise UserError(f"no result files under {args.results_dir}: run `python -m probe --head ...` first")
    print(format_rows(rows, args.format), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def run_predict(args) -> int:
    from .predict import find_head_file, predict_files

    head_file = Path(args.head_file) if args.head_file else find_head_file(args.head, **_selection(args),
                                                                             results_dir=args.results_dir)
    out = predict_files(head_file, args.images, device=args.device, batch_size=args.batch_size, top=args.top)
    for row in out.rows:
        shown = ", ".join(f"{lab} {p:.3f}" if p is not None else lab for lab, p in row["labels"])
        print(f"{row['path']}\t{shown}")
    for path, reason in out.unreadable:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)
    if not out.rows:
        raise UserError(f"none of the {len(out.unreadable)} images could be read")
    return 0


def _run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "predict":
        return run_predict(args)
    return run_report(args) if args.report else run_heads(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return guarded(lambda: _run(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
