"""Command line: `python -m probe --head NAME`, `--report`, and `predict`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extract.errors import UserError, guarded

from .heads import GRIDS, SCALES, get_head, list_heads
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
    g.add_argument("--model", help="backbone name used by extract (e.g. efficientnet_lite0)")
    g.add_argument("--data", help="dataset name of the cache (e.g. cifar10, digits, an image folder's name)")
    g.add_argument("--weights", help="weights id or the cache folder's weights suffix")
    g.add_argument("--layer", help="feature layer inside the cache (default: its first layer)")
    g.add_argument("--features", metavar="TRAIN_H5", help="explicit train cache file; sibling val/test files are used")
    g.add_argument("--test-features", metavar="TEST_H5", help="explicit test cache file")
    g.add_argument("--val-features", metavar="VAL_H5", help="explicit validation cache file")
    g.add_argument("--cache-dir", default="cache", help="cache root (default: ./cache)")
    g.add_argument("--results-dir", default="results", help="where results go (default: ./results)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m probe", description="Fit, tune and compare classical heads on cached embeddings.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", default="logreg", help=f"one of {', '.join(list_heads())}, or all (default: logreg)")
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
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m probe predict",
                description="Label new images with a saved head and the backbone recorded in its cache.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--head", default="logreg", help="saved head to use (default: logreg)")
    p.add_argument("--head-file", help="path of a saved <head>.joblib (instead of looking it up)")
    _selection_args(p)
    p.add_argument("--top", type=int, default=1, help="show the top K labels per image (default: 1)")
    p.add_argument("--device", default="auto", help="device for the backbone (default: auto)")
    p.add_argument("--batch-size", type=int, default=32)
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _selection(args, notify=_say):
    from .data import select_caches, selection_from_paths
    if args.features:
        sel = selection_from_paths(args.features, args.test_features, args.val_features, args.layer)
        notify("using " + ", ".join(f"{s}: {p}" for s, p in _ordered(sel.files)))
        return sel
    if args.test_features or args.val_features:
        raise UserError("--test-features/--val-features need --features TRAIN_H5 as well")
    sel = select_caches(args.cache_dir, model=args.model, data=args.data, weights=args.weights, layer=args.layer)
    chosen = "" if any((args.model, args.data, args.weights, args.layer)) else "newest complete extraction, "
    folder = Path(next(iter(sel.files.values()))).parent
    notify(f"using {folder} ({chosen}splits: {', '.join(s for s, _ in _ordered(sel.files))})")
    return sel


def _ordered(files: dict) -> list:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(files.items(), key=lambda kv: order.get(kv[0], 3))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _params(h: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())


def run_heads(args) -> int:
    from .data import load_probe_data
    from .plots import plot_comparison
    from .protocol import run_probe
    from .report import format_rows, result_row
    from .results import result_dir, save_head, write_result

    names = list_heads() if args.head == "all" else [get_head(args.head).name]
    if args.max_search_samples is not None and args.max_search_samples < 2:
        raise UserError("--max-search-samples must be at least 2")
    data = load_probe_data(_selection(args), seed=args.seed)
    _say(f"{data.dataset} / {data.model_dir} / layer {data.layer}: {data.sizes['train']} train, "
         f"{data.sizes['val']} validation, {data.sizes['test']} test ('{data.test_split}' split), "
         f"{len(data.classes)} classes, {data.X_train.shape[1]} dims")
    _say(f"validation: {data.validation}")
    rows = []
    for name in names:
        run = run_probe(name, data, grid=args.grid, scale=args.scale, seed=args.seed, n_jobs=args.n_jobs,
                        max_search_samples=args.max_search_samples, progress=args.progress, notify=_warn)
        r = run.result
        path = write_result(r, args.results_dir)
        if args.save:
            save_head(run.pipeline, r, args.results_dir)
        best_val = max(g["val_top1"] for g in r["grid"])
        m, t = r["metrics"], r["timing"]
        _say(f"{name}: {_params(r['hyperparameters'])} (val top-1 {_pct(best_val)}) -> test top-1 {_pct(m['top1'])}"
             + (f", top-5 {_pct(m['top5'])}" if m["top5"] is not None else "")
             + f", balanced {_pct(m['balanced_accuracy'])}, macro-F1 {_pct(m['macro_f1'])}"
             + f" [search {t['search_seconds']:.2f} s, refit {t['fit_seconds']:.2f} s]")
        _say(f"  wrote {path}")
        rows.append(result_row(r))
    if len(names) > 1:
        cols = ("head", "top1", "balanced_acc", "macro_f1", "fit_s")
        _say("\n" + format_rows(sorted(rows, key=lambda r: -(r["top1"] or 0)), "table", cols).rstrip())
        png = plot_comparison([{"label": r["head"], "top1": r["top1"], "seconds": r["fit_s"]} for r in rows],
                              result_dir(run.result, args.results_dir) / "comparison.png",
                              title=f"{data.dataset} · {data.model_dir} · {data.layer}")
        _say(f"wrote {png}")
    return 0


def run_report(args) -> int:
    from .report import format_rows, write_report
    rows, paths = write_report(args.results_dir)
    if not rows:
        raise UserError(f"no result files under {args.results_dir}: run `python -m probe --head ...` first")
    print(format_rows(rows, args.format), end="")
    _warn("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "predict":
        from .predict import run_predict
        return run_predict(predict_parser().parse_args(argv[1:]), notify=_warn)
    args = parser().parse_args(argv)
    return run_report(args) if args.report else run_heads(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return guarded(lambda: _run(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
