"""Command line: `python -m probe --head NAME`, `--report`, and `predict`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extract.core.errors import UserError, guarded
from extract.core.helpformat import DefaultsHelp
from extract.store.catalog import CacheQuery

from probe.heads.catalog import GRIDS, OPT_IN, SCALES, list_heads
from probe.heads.placement import SOLVERS
from probe.protocol.options import FitOptions
from probe.output.report import FORMATS

EPILOG = """examples:
  python -m probe --head logreg                 newest extraction under ./cache
  python -m probe --head all --data digits      every head, one comparison table
  python -m probe --head logreg,knn --model all every cached backbone, one pivot table + chart
  python -m probe --head logreg --solver torch --device cuda    L-BFGS on the GPU (streams big caches)
  python -m probe --head logreg --layer all     accuracy against depth
  python -m probe --head logreg --shots 1,2,5,10,20,all --seeds 5   few-shot curve
  python -m probe --features cache/x/m/train.h5 --test-features cache/x/m/test.h5 --head svm
  python -m probe --report --format markdown    collate every result under ./results
  python -m probe predict --head logreg photo.jpg more_photos/
  python -m probe map --head logreg             t-SNE of the test features, mistakes marked
  python -m probe samples --head logreg         test images with true and predicted labels
  python -m probe rank --model all              LogME / H-score of every cached backbone (train split only)
  python -m probe similarity --model a,b --layer all   linear CKA between every tap of a and of b
  python -m probe --head retrieval              cosine retrieval: recall@k, mAP@R of test queries
"""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelp)    # --help states every default
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line on stderr, exit code 2, no usage dump
        raise UserError(f"{message} (see --help)")


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which features (default: the newest complete extraction under --cache-dir)")
    g.add_argument("--model", help="backbone as extract names it (efficientnet_lite0, resnet50.swav); several "
                                   "comma-separated, or all: compare them in one table")
    g.add_argument("--data", help="dataset: registry name (cifar10, digits), or an image folder's name or path")
    g.add_argument("--layer", help="feature layer inside the cache (default: its first layer); several "
                                   "comma-separated, or all: a layer sweep")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], help="only features computed at this precision")
    g.add_argument("--dtype", choices=["float32", "float16"], help="only features stored as this dtype")
    g.add_argument("--image-size", type=int, help="only features of this input size (extract --image-size)")
    g.add_argument("--normalize", choices=["weights", "dataset"],
                   help="only features normalised with the weights' or the dataset's statistics")
    g.add_argument("--engine", help="only features computed by this engine (torch, openvino)")
    g.add_argument("--decoder", help="only features of image files decoded this way (tensor, torchcodec, draft, pil, cuda)")
    g.add_argument("--features", metavar="TRAIN_H5", help="explicit train cache file; sibling val/test files are used")
    g.add_argument("--test-features", metavar="TEST_H5", help="explicit test cache file")
    g.add_argument("--val-features", metavar="VAL_H5", help="explicit validation cache file")
    g.add_argument("--cache-dir", default="cache", help="cache root (default: ./cache)")
    g.add_argument("--results-dir", default="results", help="where results go (default: ./results)")


def _carve_args(p: argparse.ArgumentParser, note: str = "") -> None:
    g = p.add_argument_group("test rows of a dataset with only a train split (a folder of class folders)"
                             + (f"; {note}" if note else ""))
    g.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                   help="stratified share of train carved as test rows (default: 0.2); a dataset with its own "
                        "test (or val) split keeps it")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of that carve, apart from --seed so the validation seed never moves the test set "
                        "(default: 0)")


def _carve(args) -> dict:
    """{fraction, split_seed} of the test rows carved from a train-only dataset."""
    from probe.protocol.splits import check_fraction
    return {"fraction": check_fraction(args.test_fraction, "--test-fraction"), "split_seed": args.split_seed}


def _query(args) -> CacheQuery:
    return CacheQuery(args.cache_dir, data=args.data, model=args.model, layer=args.layer, precision=args.precision,
                      dtype=args.dtype, image_size=args.image_size, normalize=args.normalize, engine=args.engine,
                      decoder=args.decoder, features=args.features, test_features=args.test_features,
                      val_features=args.val_features)


def _options(args) -> FitOptions:
    return FitOptions(grid=args.grid, scale=args.scale, seed=args.seed, test_fraction=args.test_fraction,
                      split_seed=args.split_seed, n_jobs=args.n_jobs,
                      max_search_samples=args.max_search_samples, solver=args.solver, device=args.device,
                      max_memory=args.max_memory, progress=args.progress, save=args.save,
                      results_dir=args.results_dir)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m probe", description="Fit, tune and compare classical heads on cached embeddings.",
                epilog=EPILOG)
    p.add_argument("--head", default="logreg",
                   help=f"one of {', '.join(list_heads())}, several comma-separated, or all (default: logreg); "
                        f"opt-in, not in all: {', '.join(OPT_IN)} (cosine retrieval, recall@k and mAP@R)")
    p.add_argument("--report", action="store_true", help="collate every result JSON under --results-dir")
    p.add_argument("--format", default="table", choices=(*FORMATS, "html"),
                   help="report format on stdout (default: table); html writes one self-contained results/report.html")
    _selection_args(p)
    _carve_args(p)
    p.add_argument("--grid", default="fast", choices=GRIDS, help="hyperparameter grid size (default: fast)")
    p.add_argument("--scale", choices=SCALES, help="feature scaling inside the pipeline (default: per head)")
    p.add_argument("--seed", type=int, default=0, help="validation carve, subsampling, estimator seeds")
    p.add_argument("--n-jobs", type=int, default=None, help="threads for BLAS/OpenMP during fits and processes for rf "
                   "(default: 1 for small problems, else the physical cores other processes leave free now, at "
                   "most 8; -1: every core, the libraries' own choice)")
    p.add_argument("--solver", default="auto", choices=SOLVERS,
                   help="logreg's solver: sklearn, or torch (full-batch L-BFGS on --device, the same objective; "
                        "streams features larger than memory); auto (default): torch when a CUDA GPU is present "
                        "or the features do not fit in memory, else sklearn")
    p.add_argument("--device", default="auto",
                   help="device of --solver torch and knn: auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="memory the features may take (default: the RAM available now); above it they are "
                        "streamed from the cache, which logreg on torch and knn can do")
    p.add_argument("--max-search-samples", type=int, default=None, metavar="N",
                   help="search hyperparameters on a stratified subsample of N train rows (refit uses all)")
    p.add_argument("--shots", metavar="K,K,...",
                   help="few-shot curve: k labelled images per class, e.g. 1,2,5,10,20,all (JSON + PNG per head)")
    p.add_argument("--seeds", type=int, default=5, help="seeded draws per few-shot point (default: 5)")
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="save the refit head (<head>.skops) beside its result (default: yes)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    sub = p.add_subparsers(dest="command", metavar="{predict,map,samples,rank,similarity}", parser_class=_Parser)
    q = sub.add_parser("predict", help="label new images with a saved head",
                       description="Label new images with a saved head and the backbone recorded in its cache.")
    q.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    q.add_argument("--head", default="logreg", help="saved head to use (default: logreg)")
    q.add_argument("--head-file", help="path of a saved <head>.skops (instead of looking it up)")
    _selection_args(q)
    q.add_argument("--top", type=int, default=1, help="show the top K labels per image (default: 1)")
    q.add_argument("--device", default="auto", help="device for the backbone (default: auto)")
    q.add_argument("--batch-size", type=int, default=32, help="images per forward pass of the backbone")
    m = sub.add_parser("map", help="2-D map (t-SNE or UMAP) of the test features, coloured by class",
                       description="A 2-D map of the test split's features coloured by class; with --head, the "
                                   "images that saved head gets wrong are marked.")
    m.add_argument("--head", help="mark the test images this saved head misclassifies (e.g. logreg)")
    m.add_argument("--method", default="tsne", choices=["tsne", "umap"], help="umap needs pip install umap-learn")
    m.add_argument("--max-points", type=int, default=5000, help="stratified subsample above this (default: 5000)")
    m.add_argument("--seed", type=int, default=0, help="t-SNE/UMAP and subsample seed (default: 0)")
    _selection_args(m)
    _carve_args(m, "without --head; with one, the rows its result names")
    g = sub.add_parser("samples", help="a grid of test images with true and predicted labels",
                       description="Sample test images with their true and predicted labels, mistakes in red.")
    g.add_argument("--head", default="logreg", help="saved head whose predictions are shown (default: logreg)")
    g.add_argument("-n", type=int, default=16, help="images in the grid (default: 16)")
    g.add_argument("--only-mistakes", action="store_true", help="show only misclassified images")
    g.add_argument("--seed", type=int, default=0, help="which images are drawn")
    _selection_args(g)
    _analysis_parsers(sub)
    return p


def _analysis_parsers(sub) -> None:
    """The rank and similarity subcommands."""
    r = sub.add_parser("rank", help="transferability scores (LogME, H-score) of every cached backbone/tap",
                       description="LogME and the regularised H-score of every selected backbone/tap of one "
                                   "dataset, computed on the train split only, ranked, and compared with measured "
                                   "probe accuracy (Kendall's tau) where results exist.")
    r.add_argument("--head", default="logreg", help="whose measured test top-1 the scores are compared with "
                                                    "(default: logreg)")
    _selection_args(r)
    _carve_args(r, "rank leaves those rows out")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    c = sub.add_parser("similarity", help="linear CKA between the taps of two backbones (or one with itself)",
                       description="Linear CKA between every tap of --model a and every tap of b on the same "
                                   "images (rows paired by source index): a heat map and JSON.")
    c.add_argument("--split", choices=["train", "val", "test"],
                   help="split whose images are compared (default: test, else val, else train)")
    c.add_argument("--estimator", default="auto", choices=["auto", "debiased", "biased"],
                   help="HSIC estimator: debiased (Song et al. 2012), biased, or auto (default): debiased below "
                        "10,000 images")
    _selection_args(c)
    _carve_args(c, "--split test compares those rows, --split train the rest")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _params(h: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())


def _where(result: dict) -> str:
    """' (torch on cuda, streamed)' for heads fit on torch; nothing for scikit-learn ones."""
    if result.get("solver") != "torch":
        return ""
    return f" (torch on {result['device']}" + (", streamed)" if result.get("streamed") else ")")


def run_heads(args) -> int:
    from probe.api import evaluate
    from probe.output.report import format_rows, result_row

    out = evaluate(args.head, _query(args), _options(args))
    data = out.data
    print(f"{data.dataset} / {data.model} / layer {data.layer} ({data.identity.precision}, {data.identity.dtype}): "
          f"{data.sizes['train']} train, {data.sizes['val']} validation, {data.sizes['test']} test "
          f"({'carved from train' if data.test_carve else repr(data.test_split) + ' split'}), {len(data.classes)} classes, "
          f"{data.X_train.shape[1]} dims")
    print(f"test: {data.test['description']}")
    print(f"validation: {data.validation}")
    for run, path in zip(out.runs, out.result_paths):
        r = run.result
        best_val = max(g["val_top1"] for g in r["grid"])
        m, t = r["metrics"], r["timing"]
        params = _params(r["hyperparameters"])
        print(f"{r['head']}{_where(r)}: {params + ' ' if params else ''}(val top-1 {_pct(best_val)}) -> test top-1 "
              f"{_pct(m['top1'])}" + (f", top-5 {_pct(m['top5'])}" if m["top5"] is not None else "")
              + f", balanced {_pct(m['balanced_accuracy'])}, macro-F1 {_pct(m['macro_f1'])}"
              + f" [search {t['search_seconds']:.2f} s, refit {t['fit_seconds']:.2f} s]")
        if r.get("kind") == "retrieval":
            from probe.analyses.retrieval import describe
            print(f"  {describe(r)}")
        print(f"  wrote {path}")
    if out.comparison:
        rows = [result_row(r.result) for r in out.runs]
        cols = ("head", "top1", "balanced_acc", "macro_f1", "fit_s")
        print("\n" + format_rows(sorted(rows, key=lambda r: -(r["top1"] or 0)), "table", cols).rstrip())
        print(f"wrote {out.comparison}")
    return 0


def _many(value: str | None) -> bool:
    return value is not None and (value == "all" or "," in value)


def run_compare(args) -> int:
    """--model all / a,b or --layer all / a,b: every selected backbone and tap, one pivot table."""
    from probe.analyses.compare import compare, format_table, select_feature_sets, write_comparison

    out = compare(args.head, select_feature_sets(_query(args)), _options(args))
    print(format_table(out.rows, out.winner))
    for path in write_comparison(out).values():
        print(f"wrote {path}")
    return 0


def run_fewshot(args) -> int:
    """--shots: a few-shot curve per selected feature set and head, one combined picture."""
    from probe.api import head_names
    from probe.analyses.compare import select_feature_sets
    from probe.protocol.data import load_probe_data, selection_from_paths
    from probe.analyses.fewshot import fewshot, parse_shots, plot_fewshot, write_fewshot

    shots = parse_shots(args.shots)
    if args.features:
        selections = [selection_from_paths(args.features, args.test_features, args.val_features, args.layer)]
    else:
        selections = [selection_from_paths(g.files["train"], g.files.get("test"), g.files.get("val"), tap)
                      for g, tap in select_feature_sets(_query(args))]
    curves = []
    for selection in selections:
        data = load_probe_data(selection, seed=args.seed, test_fraction=args.test_fraction,
                               split_seed=args.split_seed)
        for head in head_names(args.head):
            curve = fewshot(head, data, shots, args.seeds, _options(args))
            curves.append(curve)
            points = ", ".join(f"{'all' if k is None else k}: {100 * p['mean']:.1f}%"
                               for k, p in zip(curve["k"], curve["points"]))
            print(f"{curve['label']} ({data.layer}): {points}")
            for path in write_fewshot(curve, args.results_dir):
                print(f"  wrote {path}")
    if len(curves) > 1:
        label = data.identity.data.label
        print(f"wrote {plot_fewshot(curves, Path(args.results_dir) / label / 'fewshot.png', title=label)}")
    return 0


def run_report(args) -> int:
    from probe.output.report import format_rows, write_report
    rows, paths = write_report(args.results_dir)
    if not rows:
        raise UserError(f"no result files under {args.results_dir}: run `python -m probe --head ...` first")
    if args.format == "html":
        from probe.output.html import write_html_report
        print(write_html_report(args.results_dir))
        return 0
    print(format_rows(rows, args.format), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def run_predict(args) -> int:
    from extract.registry.folders import readable
    from probe.analyses.predict import find_head_file, predict_files

    head_file = Path(args.head_file) if args.head_file else find_head_file(args.head, _query(args), args.results_dir)
    out = predict_files(head_file, args.images, device=args.device, batch_size=args.batch_size, top=args.top)
    for row in out.rows:
        shown = ", ".join(f"{lab} {p:.3f}" if p is not None else lab for lab, p in row["labels"])
        print(f"{readable(row['path'])}\t{shown}")
    for path, reason in out.unreadable:
        print(f"unreadable: {readable(path)}: {reason}", file=sys.stderr)
    if not out.rows:
        raise UserError(f"none of the {len(out.unreadable)} images could be read")
    return 0


def _test_features(selection, args, head_file=None):
    """The test split's cache file, else its val split's; a train split alone: its carved test rows
    (with a saved head, None: the rows its result names)."""
    from extract.store.cache import load_features
    from probe.protocol.data import carved_test

    files = selection.files
    if "test" in files or "val" in files:
        return files.get("test") or files["val"]
    if head_file is not None:
        return None
    return carved_test(load_features(files["train"], selection.layer), args.test_fraction, args.split_seed)


def run_map(args) -> int:
    from probe.api import choose_for_saved_head
    from probe.analyses.maps import write_map
    from probe.analyses.predict import find_head_file

    query = _query(args)
    head_file = find_head_file(args.head, query, args.results_dir) if args.head else None
    test = _test_features(choose_for_saved_head(query), args, head_file)
    print(write_map(test, head_file=head_file, results_root=args.results_dir, layer=args.layer,
                    method=args.method, seed=args.seed, max_points=args.max_points))
    return 0


def run_samples(args) -> int:
    from probe.analyses.predict import find_head_file
    from probe.analyses.samples import write_samples

    head_file = find_head_file(args.head, _query(args), args.results_dir)
    print(write_samples(head_file=head_file, results_root=args.results_dir, n=args.n, seed=args.seed,
                        only_mistakes=args.only_mistakes, layer=args.layer))
    return 0


def _every_match(args) -> CacheQuery:
    """The query of an analysis that reads every matching extraction (explicit files are refused)."""
    explicit = [flag for flag, v in (("--features", args.features), ("--test-features", args.test_features),
                                     ("--val-features", args.val_features)) if v]
    if explicit:
        raise UserError(f"{args.command} reads every matching extraction under --cache-dir; "
                        f"{', '.join(explicit)} is not used here")
    return _query(args)


def run_rank(args) -> int:
    """rank: LogME and H-score of every selected backbone/tap (train split only), with Kendall's tau."""
    from probe.api import head_names
    from probe.analyses.compare import select_feature_sets
    from probe.analyses.ranking import format_ranking, rank, write_ranking

    heads = head_names(args.head)
    if len(heads) != 1:
        raise UserError("rank compares the scores with one head's measured accuracy: --head NAME")
    selections = select_feature_sets(_every_match(args))
    ranking = rank(selections, results_dir=args.results_dir, head=heads[0], progress=args.progress,
                   carve=_carve(args))
    print(format_ranking(ranking), end="")
    for path in write_ranking(ranking).values():
        print(f"wrote {path}")
    return 0


def run_similarity(args) -> int:
    """similarity: linear CKA between every tap of two backbones (or one with itself)."""
    from probe.analyses.similarity import format_similarity, pick_sides, similarity, write_similarity

    a, b, split = pick_sides(_every_match(args), split=args.split, carve=_carve(args))
    result = similarity(a, b, split=split, estimator=args.estimator, results_dir=args.results_dir,
                        progress=args.progress)
    print(format_similarity(result), end="")
    for path in write_similarity(result).values():
        print(f"wrote {path}")
    return 0


def _run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command in ("predict", "map", "samples", "rank", "similarity"):
        return {"predict": run_predict, "map": run_map, "samples": run_samples, "rank": run_rank,
                "similarity": run_similarity}[args.command](args)
    if args.report:
        return run_report(args)
    if args.shots:
        return run_fewshot(args)
    if (_many(args.model) or _many(args.layer)) and not args.features:
        return run_compare(args)
    return run_heads(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return guarded(lambda: _run(argv), ("extract", "probe"))
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
