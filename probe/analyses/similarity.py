"""How alike are two backbones' representations? Linear CKA between every tap of one and every tap
of the other (or of one backbone with itself), on the same images, from the cache alone.

    a, b, split = pick_sides("cache", "resnet50,resnet50.swav", layers="all")
    result = similarity(a, b, split=split)
    write_similarity(result)     # results/<data label>/similarity-<a>--<b>.json + .png

Rows are paired by the cache's `index` column (each row's position in the source split), so two
extractions of one folder or dataset pair up whatever their row order or skipped images. Features
of different images are refused by name: a different dataset, or the split's fingerprint (its
files' paths, sizes and mtimes, or the arrays' bytes) differs, or paired rows disagree on label or
path. Estimator: `auto` reports the debiased one (Song et al. 2012) below DEBIASED_BELOW matched
rows, where the biased estimator's upward bias with wide features is largest, and the biased one
(Kornblith et al. 2019) from there on; both matrices are computed (they share every sum) and kept
in the JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from matplotlib.figure import Figure

from extract.core.atomic import write_errors, write_text_atomic
from extract.core.errors import UserError
from extract.store.cache import load_features, read_header
from extract.store.catalog import CacheQuery, FeatureSet, select
from extract.store.identity import PENULTIMATE, FeatureIdentity, describe_differences

from probe.analyses.cka import cka_sums
from probe.analyses.compare import _is_all, _names, backbone_label, tap_order
from probe.output.plots import new_figure, save_png, wrap
from probe.output.results import _safe

log = logging.getLogger(__name__)
SCHEMA = "featprobe.similarity/1"
ESTIMATORS = ("auto", "debiased", "biased")
DEBIASED_BELOW = 10_000
BLOCK_ROWS = 2048


@dataclass
class Side:
    """One extraction's cache file of the compared split, and its taps in depth order."""

    identity: FeatureIdentity
    path: Path
    taps: list[str]
    carve: dict | None = None   # only a train split: {fraction, split_seed} of its carved test rows
    rows: str = "all"           # "all" rows of the file, its carved "test" rows, or the "rest"

    @property
    def label(self) -> str:
        return backbone_label(self.identity)

    def positions(self, meta: dict, labels) -> np.ndarray:
        """Positions in the file of the rows compared (probe.protocol.data.carved_rows for a carve)."""
        if self.rows == "all":
            return np.arange(len(labels))
        from probe.protocol.data import carved_rows

        test, _ = carved_rows(meta, labels, test_fraction=self.carve["fraction"], split_seed=self.carve["split_seed"])
        return np.flatnonzero(test if self.rows == "test" else ~test)


@dataclass
class Similarity:
    """CKA matrices (rows: taps of a, columns: taps of b) and what they were computed on."""

    a: Side
    b: Side
    split: str
    n: int
    biased: np.ndarray
    debiased: np.ndarray | None
    estimator: str          # the one reported: debiased or biased
    results_dir: Path = Path("results")

    @property
    def chosen(self) -> np.ndarray:
        return self.debiased if self.estimator == "debiased" else self.biased

    @property
    def where(self) -> str:
        """'test split', or for a train-only dataset which of its rows were compared."""
        from probe.protocol.splits import describe_carve

        if self.a.rows == "all":
            return f"{self.split} split"
        carve = describe_carve(self.a.carve["fraction"], self.a.carve["split_seed"])
        return f"test rows ({carve})" if self.a.rows == "test" else f"train rows less the test rows ({carve})"


# --- which files ---------------------------------------------------------------------------------

def _one_set(query: CacheQuery, name: str) -> FeatureSet:
    """The one extraction `--model name` (and the query's filters) names; any split will do."""
    sets = select(query.replace(layer=None), name)
    datasets = sorted({g.identity.data.label for g in sets})
    if len(datasets) > 1:
        raise UserError(f"--model {name} is cached for {len(datasets)} datasets ({', '.join(datasets)}): "
                        "choose one with --data")
    if len(sets) > 1:
        raise UserError(f"--model {name} matches {len(sets)} extractions ({'; '.join(g.describe() for g in sets)}): "
                        "choose one with --precision, --dtype, --image-size or --normalize")
    return sets[0]


def _taps(g: FeatureSet, path: Path, layers) -> list[str]:
    """Taps of the file at `path` to compare, in depth order: `layers` names, every tap for 'all',
    else the file's default tap (penultimate)."""
    header = read_header(path)
    have, stored = header["layers"], [t for t in header["identity"].taps if t in header["layers"]]
    names = _names(layers)
    if _is_all(layers):
        return tap_order(g.identity.model, have, stored)
    if names is None:
        return [PENULTIMATE if PENULTIMATE in have else (stored or have)[0]]
    missing = [t for t in names if t not in have]
    if missing:
        raise UserError(f"{path} has no layer {', '.join(missing)}; it has {', '.join(have)}")
    return tap_order(g.identity.model, names, stored)


def _split_of(sets: list[FeatureSet], split: str | None) -> str:
    common = set.intersection(*(set(g.files) for g in sets))
    if common == {"train"} and all(set(g.files) == {"train"} for g in sets) and split in (None, "test", "train"):
        return split or "test"   # only a train split: its carved test rows, or the rest
    if split is not None:
        missing = [g.describe() for g in sets if split not in g.files]
        if missing:
            raise UserError(f"no {split} split cached for {'; '.join(missing)}")
        return split
    for candidate in ("test", "val", "train"):
        if candidate in common:
            return candidate
    raise UserError("the two extractions have no split in common")


def pick_sides(query: CacheQuery, split: str | None = None, carve: dict | None = None) -> tuple[Side, Side, str]:
    """The two sides named by `query.model` ('a,b', or 'a' for a with itself), with their taps
    (`query.layer`: names, 'all', or None for each file's default tap) and the split compared
    (default: test, then val, then train); the query's other filters apply to both. Extractions
    with only a train split compare its carved test rows (`carve`: {fraction, split_seed}, default
    0.2 and 0), or with split 'train' the rest of its rows."""
    layers = query.layer
    names = _names(query.model)
    if not names or len(names) > 2:
        raise UserError("similarity compares two backbones: --model a,b (or --model a for its taps with each other)")
    names = names if len(names) == 2 else names * 2
    sets = [_one_set(query, name) for name in names]
    chosen = _split_of(sets, split)
    if all(set(g.files) == {"train"} for g in sets):
        carve, rows = carve or {"fraction": 0.2, "split_seed": 0}, "test" if chosen == "test" else "rest"
        a, b = (Side(g.identity, Path(g.files["train"]), _taps(g, Path(g.files["train"]), layers), carve, rows)
                for g in sets)
        return a, b, chosen
    a, b = (Side(g.identity, Path(g.files[chosen]), _taps(g, Path(g.files[chosen]), layers)) for g in sets)
    return a, b, chosen


# --- pairing rows -------------------------------------------------------------------------------

def pair_rows(index_a, index_b) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in a, in b) of the rows of the same source index, in a's row order."""
    index_a, index_b = np.asarray(index_a), np.asarray(index_b)
    for name, idx in (("first", index_a), ("second", index_b)):
        if len(np.unique(idx)) != len(idx):
            raise UserError(f"the {name} cache file repeats source indices; its rows cannot be paired")
    _, pos_a, pos_b = np.intersect1d(index_a, index_b, assume_unique=True, return_indices=True)
    order = np.argsort(pos_a)
    return pos_a[order], pos_b[order]


def _refuse_other_images(a: Side, b: Side) -> None:
    if a.identity.data != b.identity.data:
        raise UserError(f"{a.label} and {b.label} are features of different images: "
                        f"{describe_differences(['data'])} ({a.identity.data.label} vs {b.identity.data.label})")
    fa, fb = read_header(a.path)["fingerprint"], read_header(b.path)["fingerprint"]
    if fa != fb:
        raise UserError(f"{a.label} and {b.label} are features of different images: the images changed between "
                        f"the two extractions (the split's fingerprints differ: {a.path} vs {b.path}); extract "
                        "both again from the folder as it is now")


def _check_pairs(meta_a: dict, meta_b: dict, pos_a, pos_b, labels) -> None:
    """Paired rows must agree on label and, for image files, on path."""
    ya, yb = labels
    if not np.array_equal(ya[pos_a], yb[pos_b]):
        raise UserError(f"rows of the same source index carry different labels in {meta_a['path']} and "
                        f"{meta_b['path']}: they are features of different images")
    pa, pb = meta_a.get("paths"), meta_b.get("paths")
    if pa is not None and pb is not None and any(pa[i] != pb[j] for i, j in zip(pos_a, pos_b)):
        raise UserError(f"rows of the same source index are different files in {meta_a['path']} and "
                        f"{meta_b['path']}: they are features of different images")


def _take(ds: h5py.Dataset, positions: np.ndarray) -> np.ndarray:
    """Rows at `positions` (any order), read as one contiguous slice when they are dense in it."""
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    lo, hi = int(wanted[0]), int(wanted[-1]) + 1
    block = ds[lo:hi][wanted - lo] if hi - lo <= 4 * len(wanted) else ds[wanted]
    out = np.empty_like(block)
    out[order] = block
    return out


# --- computing ----------------------------------------------------------------------------------

def choose_estimator(estimator: str, n: int) -> str:
    if estimator not in ESTIMATORS:
        raise UserError(f"unknown CKA estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if estimator == "auto":
        return "debiased" if n < DEBIASED_BELOW else "biased"
    return estimator


def similarity(a: Side, b: Side, *, split: str = "test", estimator: str = "auto", rows: int = BLOCK_ROWS,
               results_dir="results", progress: bool = True) -> Similarity:
    """Linear CKA between every tap of `a` and every tap of `b` over their rows of the same images."""
    choose_estimator(estimator, 0)
    _refuse_other_images(a, b)
    fa, fb = load_features(a.path, a.taps[0], lazy=True), load_features(b.path, b.taps[0], lazy=True)
    try:
        ya, yb = np.asarray(fa.y), np.asarray(fb.y)
        ka, kb = a.positions(fa.meta, ya), b.positions(fb.meta, yb)
        pos_a, pos_b = pair_rows(np.asarray(fa.meta["index"])[ka], np.asarray(fb.meta["index"])[kb])
        pos_a, pos_b = ka[pos_a], kb[pos_b]
        if len(pos_a) == 0:
            raise UserError(f"{a.path} and {b.path} share no source index: nothing to compare")
        _check_pairs(fa.meta, fb.meta, pos_a, pos_b, (ya, yb))
        unmatched = max(len(ka), len(kb)) - len(pos_a)
        if unmatched:
            log.info(f"{len(pos_a)} rows of the same images; {unmatched} rows have no partner (skipped images)")
        _require_taps(a, fa.meta["layers"])
        _require_taps(b, fb.meta["layers"])
        ds_a = {t: fa.meta["file"][f"features/{t}"] for t in a.taps}
        ds_b = {t: fb.meta["file"][f"features/{t}"] for t in b.taps}

        def blocks():
            for s in range(0, len(pos_a), rows):
                pa, pb = pos_a[s:s + rows], pos_b[s:s + rows]
                yield {t: _take(d, pa) for t, d in ds_a.items()}, {t: _take(d, pb) for t, d in ds_b.items()}
        sums = cka_sums(blocks, progress=progress, total=-(-len(pos_a) // rows))
    finally:
        fa.meta["file"].close()
        fb.meta["file"].close()
    n = sums.n
    debiased = sums.matrix(debiased=True) if n >= 4 else None
    chosen = choose_estimator(estimator, n)
    if chosen == "debiased" and debiased is None:
        raise UserError(f"the debiased CKA estimator needs at least 4 matched rows, not {n}")
    return Similarity(a, b, split, n, sums.matrix(debiased=False), debiased, chosen, Path(results_dir))


def _require_taps(side: Side, layers: list[str]) -> None:
    missing = [t for t in side.taps if t not in layers]
    if missing:
        raise UserError(f"{side.path} has no layer {', '.join(missing)}; it has {', '.join(layers)}")


# --- picture and files --------------------------------------------------------------------------

def similarity_figure(result: Similarity) -> Figure:
    """Heat map of the reported CKA matrix: rows a's taps, columns b's, values printed."""
    m = result.chosen
    rows, cols = result.a.taps, result.b.taps
    fig = new_figure(figsize=(2.8 + 0.75 * len(cols) + 0.06 * max(map(len, rows)),
                              2.0 + 0.5 * len(rows) + 0.05 * max(map(len, cols))), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap="magma", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax).set_label(f"linear CKA ({result.estimator})")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(result.b.label, fontsize=8)
    ax.set_ylabel(result.a.label, fontsize=8)
    ax.set_title(wrap(f"{result.a.identity.data.label} · {result.where} · {result.n} images",
                      0.6 * fig.get_figwidth(), 9), fontsize=9)
    return fig


def stem(result: Similarity) -> str:
    a, b = _safe(result.a.label.replace(" ", "")), _safe(result.b.label.replace(" ", ""))
    return f"similarity-{a}" if a == b else f"similarity-{a}--{b}"


def _matrix(m: np.ndarray | None):
    return None if m is None else [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]


def similarity_dict(result: Similarity) -> dict:
    return {"schema": SCHEMA, "data": result.a.identity.data.label, "split": result.split, "rows": result.where, "n": result.n,
            "a": {"label": result.a.label, "identity": result.a.identity.to_dict(), "file": str(result.a.path),
                  "taps": result.a.taps},
            "b": {"label": result.b.label, "identity": result.b.identity.to_dict(), "file": str(result.b.path),
                  "taps": result.b.taps},
            "estimator": result.estimator, "cka": _matrix(result.chosen), "biased": _matrix(result.biased),
            "debiased": _matrix(result.debiased),
            "note": "linear CKA; rows: a's taps, columns: b's taps; rows paired by source index",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def format_similarity(result: Similarity) -> str:
    """The reported matrix as text."""
    width = max(len(t) for t in result.a.taps + result.b.taps) + 1
    out = [f"linear CKA ({result.estimator}), {result.a.label} (rows) vs {result.b.label} (columns), "
           f"{result.where}, {result.n} images",
           " " * width + "".join(t.rjust(width) for t in result.b.taps)]
    for tap, row in zip(result.a.taps, result.chosen):
        out.append(tap.ljust(width) + "".join(("-" if not np.isfinite(v) else f"{v:.3f}").rjust(width) for v in row))
    return "\n".join(out) + "\n"


def write_similarity(result: Similarity, folder=None) -> dict[str, Path]:
    """<stem>.json and <stem>.png in `folder` (default results/<data label>/), atomically."""
    folder = Path(folder) if folder is not None else Path(result.results_dir) / result.a.identity.data.label
    paths = {"json": folder / f"{stem(result)}.json", "png": folder / f"{stem(result)}.png"}
    with write_errors(paths["json"]):
        write_text_atomic(paths["json"], json.dumps(similarity_dict(result), indent=1))
    save_png(similarity_figure(result), paths["png"])
    return paths
