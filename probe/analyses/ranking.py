"""Rank every cached backbone/tap of one dataset by transferability scores, computed on the TRAIN
split only, and say how well each score's ranking agrees with measured probe accuracy.

    selections = select_feature_sets(CacheQuery("cache", data="digits", model="all"))
    ranking = rank(selections, results_dir="results", head="logreg")
    print(format_ranking(ranking))
    write_ranking(ranking)     # results/<data label>/rank.json + rank.png

Scores: LogME and the regularised H-score (probe.analyses.transfer), from the train split's cache
file alone; validation and test rows are never read, so a score costs no labels beyond training
ones. Where probe results exist for the same feature identity and tap (probe.output.results), the
head's test top-1 is shown beside the scores and Kendall's tau-b (scipy.stats.kendalltau) between
each score and that top-1 is reported over the rows that have one (at least two are needed).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from extract.core.atomic import write_errors, write_text_atomic
from extract.core.errors import UserError
from extract.store.catalog import FeatureSet
from extract.store.identity import DataRef, FeatureIdentity

from probe.analyses.compare import backbone_label
from probe.analyses.transfer import BLOCK_BYTES, scores_of_file
from probe.output.plots import new_figure, plain, save_png, wrap
from probe.output.results import load_results

log = logging.getLogger(__name__)
SCHEMA = "featprobe.rank/1"
SCORES = {"logme": "LogME", "hscore": "H-score (regularised)"}
SPLIT_NOTE = ("scores computed on the train split only (the cache's train file, less the test rows carved from "
             "it where it is the only split); test rows never enter a score")


@dataclass
class Ranking:
    """One row per (backbone, tap) with its scores and measured top-1, and each score's Kendall's tau."""

    rows: list[dict]
    data: DataRef
    head: str
    correlation: dict = field(default_factory=dict)
    results_dir: Path = Path("results")

    @property
    def folder(self) -> Path:
        return Path(self.results_dir) / self.data.label


def _same_features(result: dict, identity: FeatureIdentity, tap: str) -> bool:
    if result.get("layer") != tap or not result.get("identity"):
        return False
    try:
        return FeatureIdentity.from_dict(result["identity"]).with_taps(()) == identity.with_taps(())
    except (KeyError, TypeError, ValueError):
        return False


def measured(results: list[dict], identity: FeatureIdentity, tap: str, head: str) -> dict | None:
    """{'top1', 'path'} of the head's result on these features, or None when there is none."""
    for r in results:
        if r.get("head") == head and _same_features(r, identity, tap):
            return {"top1": float(r["metrics"]["top1"]), "path": r.get("_path")}
    return None


def kendall(rows: list[dict], score: str) -> dict:
    """Kendall's tau-b between a score and the measured test top-1, over the rows that have both."""
    pairs = [(r[score], r["test_top1"]) for r in rows if r.get("test_top1") is not None]
    if len(pairs) < 2:
        return {"tau": None, "p": None, "n": len(pairs),
                "reason": "needs probe results for at least two of the ranked feature sets"}
    x, y = map(np.asarray, zip(*pairs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # constant input: scipy warns and returns nan
        tau, p = kendalltau(x, y)
    if not np.isfinite(tau):
        return {"tau": None, "p": None, "n": len(pairs), "reason": "the scores or the top-1 values are all equal"}
    return {"tau": float(tau), "p": float(p), "n": len(pairs)}


def _ranks(values: list[float]) -> list[int]:
    """1 for the highest value; equal values share the better rank."""
    return [1 + sum(v > w for v in values) for w in values]


def _not_test(g: FeatureSet, tap: str, carve: dict | None) -> np.ndarray | None:
    """For a feature set with only a train split, the mask of its rows that are not carved test rows
    (probe.protocol.data.carved_rows with `carve`'s fraction and split seed); else None (every row)."""
    from extract.store.cache import load_features
    from probe.protocol.data import carved_rows

    if "test" in g.files or "val" in g.files:
        return None
    carve = carve or {"fraction": 0.2, "split_seed": 0}
    feats = load_features(g.files["train"], tap, lazy=True)
    feats.meta.pop("file").close()
    test, _ = carved_rows(feats.meta, feats.y, test_fraction=carve["fraction"], split_seed=carve["split_seed"])
    return ~test


def rank(selections: list[tuple[FeatureSet, str]], *, results_dir="results", head: str = "logreg",
         block_bytes: int = BLOCK_BYTES, progress: bool = True, carve: dict | None = None) -> Ranking:
    """Score every (feature set, tap) on its train split, attach measured top-1, rank by LogME.

    A feature set with only a train split is scored without its carved test rows (`carve`:
    {fraction, split_seed}, default 0.2 and 0, as probe carves them)."""
    if not selections:
        raise UserError("nothing to rank: no feature set was selected")
    datasets = {g.identity.data for g, _ in selections}
    if len(datasets) > 1:
        raise UserError(f"the selection holds {len(datasets)} datasets "
                        f"({', '.join(sorted(d.label for d in datasets))}): rank one with --data")
    results = load_results(results_dir)
    rows = []
    for g, tap in tqdm(selections, desc="transferability", unit="set", disable=None if progress else True):
        log.info(f"{backbone_label(g.identity)} / {tap}: scoring {g.files['train']}")
        keep = _not_test(g, tap, carve)
        scores = scores_of_file(g.files["train"], tap, block_bytes=block_bytes, progress=progress, keep=keep)
        found = measured(results, g.identity, tap, head)
        rows.append({"backbone": g.identity.model, "variant": g.identity.variant, "label": backbone_label(g.identity),
                     "tap": tap, **scores, "test_top1": found and found["top1"],
                     "result": found and found["path"], "train_file": str(g.files["train"]),
                     **({"test_rows_left_out": int((~keep).sum())} if keep is not None else {})})
    for score in SCORES:
        for r, position in zip(rows, _ranks([r[score] for r in rows])):
            r[f"{score}_rank"] = position
    rows.sort(key=lambda r: (r["logme_rank"], r["hscore_rank"]))
    correlation = {score: kendall(rows, score) for score in SCORES}
    return Ranking(rows, next(iter(datasets)), head, correlation, Path(results_dir))


# --- text ---------------------------------------------------------------------------------------

def _label(row: dict, with_tap: bool) -> str:
    return f"{row['label']}/{row['tap']}" if with_tap else row["label"]


def _with_tap(rows: list[dict]) -> bool:
    return len({r["tap"] for r in rows}) > 1 or len({r["label"] for r in rows}) < len(rows)


def describe_tau(c: dict) -> str:
    if c["tau"] is None:
        return f"- ({c['reason']})"
    return f"{c['tau']:+.3f} (p = {c['p']:.2g}, n = {c['n']})"


def format_ranking(ranking: Ranking) -> str:
    """The ranking as an aligned table, then each score's Kendall's tau against the measured top-1."""
    with_tap = _with_tap(ranking.rows)
    top1 = f"{ranking.head} test top-1 %"
    header = ["rank", "backbone/tap" if with_tap else "backbone", "LogME", "H-score", "N", "dims", top1]
    cells = [[str(r["logme_rank"]), _label(r, with_tap), f"{r['logme']:.4f}", f"{r['hscore']:.3f}", str(r["n"]),
              str(r["dims"]), "-" if r["test_top1"] is None else f"{100 * r['test_top1']:.2f}"]
             for r in ranking.rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values):   # the label column left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if i == 1 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    out = [f"{ranking.data.label}: {SPLIT_NOTE}", line(header), *map(line, cells)]
    out += [f"Kendall's tau, {SCORES[s]} vs {ranking.head} test top-1: {describe_tau(c)}"
            for s, c in ranking.correlation.items()]
    return "\n".join(out) + "\n"


# --- picture ------------------------------------------------------------------------------------

def ranking_figure(ranking: Ranking) -> Figure:
    """One bar panel per score (rows in LogME order, best on top), and the measured top-1 where known;
    each score's panel title gives its Kendall's tau."""
    rows = ranking.rows
    labels = [_label(r, _with_tap(rows)) for r in rows]
    known = [r["test_top1"] for r in rows if r["test_top1"] is not None]
    panels = list(SCORES) + (["test_top1"] if known else [])
    fig = new_figure(figsize=(3.4 * len(panels) + 0.07 * max(map(len, labels)), 1.6 + 0.38 * len(rows)),
                     layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = np.arange(len(rows))
    for ax, key in zip(axes, panels):
        if key == "test_top1":
            values = [np.nan if r["test_top1"] is None else 100 * r["test_top1"] for r in rows]
            ax.set_title(f"{ranking.head} test top-1 (%)", fontsize=9)
            finite = [v for v in values if np.isfinite(v)]
            ax.set_xlim(max(0.0, min(finite) - 10), 100)
        else:
            values = [r[key] for r in rows]
            c = ranking.correlation.get(key, {})
            tau = "" if c.get("tau") is None else f"\ntau vs top-1 = {c['tau']:+.2f} (n = {c['n']})"
            ax.set_title(SCORES[key] + tau, fontsize=9)
        ax.barh(y, np.nan_to_num(values, nan=0.0), color="tab:green" if key == "test_top1" else "tab:blue")
        for i, v in enumerate(values):
            if np.isfinite(v):
                ax.annotate(plain(v), (v, i), xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(wrap(f"{ranking.data.label}: transferability on the train split only", 3.2 * len(panels), 10),
                 fontsize=10)
    return fig


# --- files --------------------------------------------------------------------------------------

def ranking_dict(ranking: Ranking) -> dict:
    return {"schema": SCHEMA, "data": ranking.data.label, "dataset": ranking.data.describe(), "split": "train",
            "note": SPLIT_NOTE, "scores": SCORES, "head": ranking.head, "correlation": ranking.correlation,
            "rows": ranking.rows, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_ranking(ranking: Ranking, folder=None) -> dict[str, Path]:
    """rank.json and rank.png in `folder` (default results/<data label>/), atomically."""
    folder = Path(folder) if folder is not None else ranking.folder
    paths = {"json": folder / "rank.json", "png": folder / "rank.png"}
    with write_errors(paths["json"]):
        write_text_atomic(paths["json"], json.dumps(ranking_dict(ranking), indent=1, default=str))
    save_png(ranking_figure(ranking), paths["png"])
    return paths
