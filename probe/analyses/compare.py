"""Compare backbones (and their taps) on one dataset: every head on every selected extraction.

    selections = select_feature_sets("cache", data="pets", models=["all"], layers=["all"])
    comparison = compare("logreg,knn", selections, results_dir="results")
    print(format_table(comparison.rows, comparison.winner))
    write_comparison(comparison)     # results/<data label>/compare.json + .png (a layer sweep: layers.*)

Each (extraction, tap) is probed by `probe.api.evaluate`, which writes every head's result JSON
under the extraction's identity as usual. The winner is the row with the highest VALIDATION
top-1 (the chosen hyperparameters' score on the validation split); test top-1 is only reported,
never used to choose. Ties go to the first row in table order (backbones as selected, shallower
taps first, penultimate last, heads in the order asked).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from extract.core.atomic import write_errors, write_text_atomic
from extract.store.catalog import CacheQuery, FeatureSet, one_dataset, select
from extract.core.errors import UserError
from extract.store.identity import PENULTIMATE, DataRef, FeatureIdentity

from probe.output.plots import new_figure, save_png, wrap
from probe.protocol.options import FitOptions, fit_options

log = logging.getLogger(__name__)
SCHEMA = "featprobe.compare/1"
ALL = "all"
WINNER_RULE = ("highest validation top-1 of the chosen hyperparameters; ties go to the first row in table "
               "order (backbones as selected, shallower taps first, heads in the order asked); test top-1 "
               "is never used to choose")


@dataclass
class Comparison:
    """Every (backbone, tap, head) row of one dataset, and the row chosen on validation."""

    rows: list[dict]
    winner: dict | None
    data: DataRef
    heads: list[str]
    results_dir: Path = Path("results")
    settings: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """results/<data label>: where write_comparison puts its files by default."""
        return Path(self.results_dir) / self.data.label


# --- which extractions --------------------------------------------------------------------------

def _names(values: str | Sequence[str] | None) -> list[str] | None:
    """'a,b' or ['a', 'b'] -> ['a', 'b']; None and ['all'] -> None (no filter)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    names = [v.strip() for v in values if v and v.strip()]
    return None if not names or [n.lower() for n in names] == [ALL] else names


def _is_all(values: str | Sequence[str] | None) -> bool:
    """True for 'all' and ['all']."""
    names = values.split(",") if isinstance(values, str) else list(values or [])
    return [n.strip().lower() for n in names if n and n.strip()] == [ALL]


def _matching_sets(query: CacheQuery) -> list[tuple[int, FeatureSet]]:
    """(model rank, feature set) for every extraction matching the query (catalog.select per model)."""
    if not query.models:
        return [(0, g) for g in select(query.replace(model=None, layer=None))]
    found: dict[FeatureIdentity, tuple[int, FeatureSet]] = {}
    for rank, model in enumerate(query.models):
        for g in select(query.replace(layer=None), model):
            found.setdefault(g.identity, (rank, g))
    return list(found.values())


def _complete(g: FeatureSet) -> bool:
    """A probe needs a train split; its test rows are carved from it when it is the only split."""
    if "train" in g.files:
        return True
    log.warning(f"warning: skipping {g.describe()}: it has only the {', '.join(g.files)} split(s) cached; "
                "a probe needs a train split")
    return False


def _one_test_set(sets: list[tuple[int, FeatureSet]]) -> list[tuple[int, FeatureSet]]:
    """Where some extractions hold a test (or val) split, those with only train are left out: their
    test rows would be carved from train, so their scores would not compare."""
    held_out = [s for s in sets if set(s[1].files) - {"train"}]
    for _, g in sets:
        if held_out and set(g.files) == {"train"}:
            log.warning(f"warning: skipping {g.describe()}: it has only the train split cached, the others are "
                        "scored on the dataset's own test (or val) split")
    return held_out or sets


def _registry_taps(model: str) -> list[str]:
    """The registry's taps of a model's architecture in depth order; [] for an unknown one."""
    from extract.registry.models import get_spec   # only when several taps need ordering: imports torch

    try:
        return list(get_spec(model.split(".", 1)[0]).taps)
    except UserError:
        return []


def tap_order(model: str, taps: Sequence[str], stored: Sequence[str] = ()) -> list[str]:
    """`taps` in depth order: the registry's taps in registry order, then other module paths in the
    order the file lists them (`stored`), penultimate last."""
    taps = list(dict.fromkeys(taps))
    if len([t for t in taps if t != PENULTIMATE]) < 2:
        return sorted(taps, key=lambda t: t == PENULTIMATE)
    registry, stored = _registry_taps(model), list(stored)

    def key(tap):
        if tap == PENULTIMATE:
            return (2, 0, "")
        if tap in registry:
            return (0, registry.index(tap), "")
        return (1, stored.index(tap) if tap in stored else len(stored), tap)
    return sorted(taps, key=key)


def _stored_taps(g: FeatureSet) -> list[str]:
    from extract.store.cache import read_header

    header = read_header(g.files["train"]) or {}
    identity = header.get("identity")
    return list(identity.taps) if identity is not None else list(g.taps.get("train", []))


def _taps_for(g: FeatureSet, layers: list[str] | None, all_layers: bool) -> list[str]:
    """Taps of one extraction to probe: present in every split's file, in depth order."""
    common = set.intersection(*(set(t) for t in g.taps.values()))
    stored = [t for t in _stored_taps(g) if t in common]
    if all_layers:
        return tap_order(g.identity.model, common, stored)
    if layers is None:
        default = PENULTIMATE if PENULTIMATE in common else (stored or sorted(common))[0]
        return [default]
    return tap_order(g.identity.model, [t for t in layers if t in common], stored)


def select_feature_sets(query: CacheQuery) -> list[tuple[FeatureSet, str]]:
    """(feature set, tap) for every complete extraction of ONE dataset matching the query.

    `query.model`: names (``resnet50``, ``resnet50.swav``, comma-separated) or None/'all' for every
    cached backbone; `query.layer`: tap names, 'all' for every tap in the files, or None for each
    file's default tap (penultimate). Ordered by model (as listed, else by name), then tap depth
    (registry order, penultimate last). UserError naming what exists when nothing matches, or
    naming the datasets when `query.data` is None and several are cached.
    """
    cache_dir, layers = query.cache_dir, query.layer
    layer_names, all_layers = _names(layers), _is_all(layers)
    sets = [(rank, g) for rank, g in _matching_sets(query) if _complete(g)]
    if not sets:
        raise UserError(f"no complete extraction with a train split under {cache_dir} matches")
    one_dataset(sets, cache_dir)
    sets = _one_test_set(sets)
    out = []
    for rank, g in sorted(sets, key=lambda s: (s[0], s[1].identity.model, s[1].identity.variant)):
        taps = _taps_for(g, layer_names, all_layers)
        if not taps:
            log.info(f"{g.describe()} has none of the layers {', '.join(layer_names or [])}; left out")
        out += [(g, tap) for tap in taps]
    if not out:
        have = "; ".join(f"{g.identity.model}: {', '.join(sorted(set.intersection(*map(set, g.taps.values()))))}"
                         for _, g in sets)
        raise UserError(f"no cached extraction has the layer(s) {', '.join(layer_names or [])}; available: {have}")
    return out


# --- probing ------------------------------------------------------------------------------------

def backbone_label(identity: FeatureIdentity) -> str:
    """The model name, with the variant (explicit precision, storage dtype) when there is one."""
    return f"{identity.model} ({identity.variant})" if identity.variant else identity.model


def validation_top1(result: dict) -> float:
    """Validation top-1 of the chosen hyperparameters (their grid point; the best grid point if none matches)."""
    chosen = {k: v for k, v in (result.get("hyperparameters") or {}).items() if k != "scale"}
    grid = result.get("grid") or []
    scores = [g["val_top1"] for g in grid if g.get("params") == chosen]
    return float(max(scores or [g["val_top1"] for g in grid]))


def result_row(result: dict, path, identity: FeatureIdentity) -> dict:
    """One comparison row of a probe result."""
    return {"backbone": identity.model, "variant": identity.variant, "label": backbone_label(identity),
            "tap": result["layer"], "head": result["head"], "val_top1": validation_top1(result),
            "test_top1": float(result["metrics"]["top1"]), "hyperparameters": result.get("hyperparameters"),
            "path": str(path)}


def choose_winner(rows: list[dict]) -> dict | None:
    """The row with the highest validation top-1; ties go to the first row (see WINNER_RULE)."""
    return max(rows, key=lambda r: r["val_top1"]) if rows else None   # max keeps the first of equals


def compare(heads: str | Sequence[str], selections: list[tuple[FeatureSet, str]],
            options: FitOptions | None = None, **keywords) -> Comparison:
    """Run `probe.api.evaluate` for each (feature set, tap) and collect one row per head; pick the winner.

    `keywords` change single fields of `options` (FitOptions)."""
    from probe.api import evaluate, head_names

    options = fit_options(options, **keywords)
    if not selections:
        raise UserError("nothing to compare: no feature set was selected")
    data = one_dataset([(0, g) for g, _ in selections], "the selection")
    names = head_names(heads)
    rows = []
    for g, tap in selections:
        log.info(f"{backbone_label(g.identity)} / {tap}: {', '.join(names)}")
        query = CacheQuery(features=g.files["train"], test_features=g.files.get("test"),
                           val_features=g.files.get("val"), layer=tap)
        out = evaluate(names, query, options)
        rows += [result_row(run.result, path, g.identity) for run, path in zip(out.runs, out.result_paths)]
    settings = {"grid": options.grid, "seed": options.seed, "scale": options.scale,
                "max_search_samples": options.max_search_samples, "test_fraction": options.test_fraction,
                "split_seed": options.split_seed}
    return Comparison(rows, choose_winner(rows), data, names, Path(options.results_dir), settings)


# --- tables -------------------------------------------------------------------------------------

def row_label(row: dict, with_tap: bool) -> str:
    return f"{row['label']}/{row['tap']}" if with_tap else row["label"]


def _with_tap(rows: list[dict]) -> bool:
    return len({r["tap"] for r in rows}) > 1


def pivot(rows: list[dict], value: str = "test_top1") -> tuple[list[str], list[str], np.ndarray]:
    """(row labels 'backbone[/tap]', head columns, matrix of `value`; NaN where a head is missing),
    rows and columns in first-seen order. The tap is named when the rows have more than one."""
    with_tap = _with_tap(rows)
    labels = list(dict.fromkeys(row_label(r, with_tap) for r in rows))
    heads = list(dict.fromkeys(r["head"] for r in rows))
    matrix = np.full((len(labels), len(heads)), np.nan)
    for r in rows:
        matrix[labels.index(row_label(r, with_tap)), heads.index(r["head"])] = r[value]
    return labels, heads, matrix


def _winner_cell(rows: list[dict], winner: dict | None) -> tuple[str, str] | None:
    return (row_label(winner, _with_tap(rows)), winner["head"]) if winner else None


def format_table(rows: list[dict], winner: dict | None = None) -> str:
    """Test top-1 (%) as text: rows backbone[/tap], columns heads, the validation winner marked '*'."""
    labels, heads, matrix = pivot(rows)
    mark = _winner_cell(rows, winner)
    cells = [[("-" if np.isnan(v) else f"{100 * v:.2f}") + ("*" if mark == (label, h) else " ")
              for h, v in zip(heads, line)] for label, line in zip(labels, matrix)]
    first = max([len("backbone")] + [len(s) for s in labels])
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(heads)]
    out = ["  ".join(["backbone".ljust(first)] + [h.rjust(w) for h, w in zip(heads, widths)])]
    out += ["  ".join([label.ljust(first)] + [c.rjust(w) for c, w in zip(line, widths)])
            for label, line in zip(labels, cells)]
    out.append("test top-1 (%)" + (f"; * chosen on validation: {mark[0]} · {winner['head']} (validation "
                                   f"{100 * winner['val_top1']:.2f}%, test {100 * winner['test_top1']:.2f}%)"
                                   if mark else ""))
    return "\n".join(out) + "\n"


# --- charts -------------------------------------------------------------------------------------

def compare_figure(rows: list[dict], winner: dict | None = None, title: str = "") -> Figure:
    """Heat map of test top-1 (rows backbone[/tap], columns heads), the validation winner outlined."""
    labels, heads, matrix = pivot(rows)
    pct = 100 * matrix
    width = 3.2 + 1.1 * len(heads) + 0.06 * max(map(len, labels))
    fig = new_figure(figsize=(width, 1.9 + 0.45 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    finite = pct[np.isfinite(pct)]
    im = ax.imshow(np.ma.masked_invalid(pct), cmap="viridis", aspect="auto",
                   vmin=float(finite.min()) if finite.size else 0, vmax=float(finite.max()) if finite.size else 100)
    fig.colorbar(im, ax=ax).set_label("test top-1 (%)")
    mark = _winner_cell(rows, winner)
    for i, label in enumerate(labels):
        for j, head in enumerate(heads):
            if np.isfinite(pct[i, j]):
                star = "*" if mark == (label, head) else ""
                ax.text(j, i, f"{pct[i, j]:.1f}{star}", ha="center", va="center", fontsize=8,
                        color="white" if pct[i, j] < np.nanmean(pct) else "black")
    if mark:
        i, j = labels.index(mark[0]), heads.index(mark[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax.set_xticks(range(len(heads)), heads, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(wrap(title + ("\n" if title else "") + "test top-1 (%); * and red box: chosen on validation",
                      0.55 * width, 9), fontsize=9)
    return fig


def plot_compare(rows: list[dict], path, winner: dict | None = None, title: str = "") -> Path:
    """Write compare_figure as a PNG, atomically; returns path."""
    return save_png(compare_figure(rows, winner, title), path)


def _layer_series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows of each backbone that has more than one tap, in row (depth) order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    return {label: rs for label, rs in groups.items() if len({r["tap"] for r in rs}) > 1}


def layer_figure(rows: list[dict], title: str = "") -> Figure:
    """Top-1 against tap depth, one panel per backbone with several taps, one colour per head:
    test solid, validation dashed. Taps are taken in row order (compare's rows are in depth order)."""
    series = _layer_series(rows)
    if not series:
        raise ValueError("no backbone has more than one tap")
    heads = list(dict.fromkeys(r["head"] for r in rows))
    colours = {h: f"C{i % 10}" for i, h in enumerate(heads)}
    cols = min(3, len(series))
    nrows = -(-len(series) // cols)
    fig = new_figure(figsize=(4.2 * cols, 3.4 * nrows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols, sharey=True, squeeze=False)).ravel()
    for ax, (label, rs) in zip(axes, series.items()):
        taps = list(dict.fromkeys(r["tap"] for r in rs))
        for head in heads:
            by_tap = {r["tap"]: r for r in rs if r["head"] == head}
            x = [i for i, t in enumerate(taps) if t in by_tap]
            if not x:
                continue
            ax.plot(x, [100 * by_tap[taps[i]]["test_top1"] for i in x], "o-", color=colours[head], label=f"{head} test")
            ax.plot(x, [100 * by_tap[taps[i]]["val_top1"] for i in x], "x--", color=colours[head], alpha=0.7,
                    label=f"{head} validation")
        ax.set_xticks(range(len(taps)), taps, rotation=30, ha="right", fontsize=8)
        ax.set_title(wrap(label, 3.8, 9), fontsize=9)
        ax.set_xlabel("tap (shallow to deep)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    for ax in axes[len(series):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(wrap(title, 4.0 * cols, 10), fontsize=10)
    return fig


def plot_layer_curve(rows: list[dict], path, title: str = "") -> Path:
    """Write layer_figure as a PNG, atomically; returns path."""
    return save_png(layer_figure(rows, title), path)


# --- files --------------------------------------------------------------------------------------

def comparison_dict(comparison: Comparison) -> dict:
    """What compare.json holds: every row, the winner and the rule that chose it."""
    return {"schema": SCHEMA, "data": comparison.data.label, "dataset": comparison.data.describe(),
            "heads": comparison.heads, "settings": comparison.settings, "rule": WINNER_RULE,
            "winner": comparison.winner, "rows": comparison.rows,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_comparison(comparison: Comparison, folder=None) -> dict[str, Path]:
    """Write the pivot as JSON and a chart in `folder` (default results/<data label>/), atomically.

    A backbone comparison (one tap each) is compare.json / compare.png; a layer sweep (some backbone
    with several taps) is layers.json / layers.png plus the accuracy-against-depth layers-curve.png,
    so the two questions never overwrite each other's answer. Returns {'json', 'png'[, 'layers']: path}.
    """
    folder = Path(folder) if folder is not None else comparison.folder
    sweep = bool(_layer_series(comparison.rows))
    stem = "layers" if sweep else "compare"
    paths = {"json": folder / f"{stem}.json", "png": folder / f"{stem}.png"}
    with write_errors(paths["json"]):
        write_text_atomic(paths["json"], json.dumps(comparison_dict(comparison), indent=1, default=str))
    title = f"{comparison.data.label} · {len(comparison.rows)} runs"
    plot_compare(comparison.rows, paths["png"], comparison.winner, title=title)
    if sweep:
        paths["layers"] = plot_layer_curve(comparison.rows, folder / "layers-curve.png", title=comparison.data.label)
    return paths
