"""A 2-D map of the test split's features (t-SNE, or UMAP when installed), coloured by true class,
with the points a saved head gets wrong marked: where the classes overlap in feature space.

    m = class_map("cache/digits/resnet50/test.h5", head_file="results/.../logreg.skops")
    plot_map(m["xy"], m["y"], m["classes"], "map.png", wrong=m["wrong"])
    write_map(head_file="results/.../logreg.skops")     # map-tsne-logreg.png beside the head
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from extract.store.cache import Features, load_features
from extract.core.errors import UserError
from extract.store.identity import FeatureIdentity, describe_differences, differences

from probe.output.plots import fit_label, new_figure, save_png, wrap

log = logging.getLogger(__name__)

METHODS = ("tsne", "umap")
LEGEND_MAX = 20          # more classes than this get a colour bar instead of a legend
_PCA_DIMS = 50           # t-SNE runs on at most this many principal components
_EXACT_MAX = 1000        # up to this many points exact t-SNE is faster than Barnes-Hut (2-core CPU)


class Embedding(NamedTuple):
    """2-D coordinates of the rows `rows` of the input (all rows unless subsampled)."""

    xy: np.ndarray
    rows: np.ndarray


# --- choosing rows and embedding them ---------------------------------------------------------

def stratified_rows(y, n: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of exactly min(n, len(y)) rows keeping class proportions (largest remainder;
    every class keeps a row while n allows); seeded."""
    y = np.asarray(y)
    if n >= len(y):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    order = np.argsort(-(quota - take), kind="stable")
    i = 0
    while take.sum() < n:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > n:   # the minimum of one row per class overshot: trim the largest classes
        take[np.argmax(take)] -= 1
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))


def subsample(n_rows: int, y=None, max_points: int = 5000, seed: int = 0) -> np.ndarray:
    """Rows to embed: all of them, or a seeded (stratified when y is given) subsample of max_points."""
    if max_points < 1:
        raise UserError("max_points must be at least 1")
    if n_rows <= max_points:
        return np.arange(n_rows)
    if y is not None:
        return stratified_rows(y, max_points, seed)
    return np.sort(np.random.default_rng(seed).choice(n_rows, max_points, replace=False))


def embed_2d(X, y=None, *, method: str = "tsne", seed: int = 0, max_points: int = 5000) -> Embedding:
    """(xy (M, 2), rows (M,)): X's rows embedded in 2-D; above max_points a seeded subsample,
    stratified by y when given. t-SNE from scikit-learn (PCA init), or UMAP (`pip install umap-learn`)."""
    if method not in METHODS:
        raise UserError(f"unknown map method {method!r}: use {' or '.join(METHODS)}")
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or not len(X):
        raise UserError(f"need a non-empty (N, D) feature array to map, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise UserError("the features contain NaN or inf; they cannot be mapped")
    rows = subsample(len(X), y, max_points, seed)
    if len(rows) < len(X):
        log.info(f"mapping a seeded{' stratified' if y is not None else ''} subsample of {len(rows)} "
                 f"of {len(X)} rows")
    X = X[rows]
    xy = _umap(X, seed) if method == "umap" else _tsne(X, seed)
    return Embedding(np.asarray(xy, dtype=np.float64), rows)


def perplexity_for(n: int) -> float:
    """30 (scikit-learn's default) for large sets; (n - 1) / 3 below, so it stays under n."""
    return float(max(1.0, min(30.0, (n - 1) / 3.0)))


def _reduced(X: np.ndarray, seed: int) -> np.ndarray:
    """At most _PCA_DIMS principal components (faster neighbour search, less noise)."""
    n_comp = min(_PCA_DIMS, X.shape[0], X.shape[1])
    if X.shape[1] <= _PCA_DIMS or n_comp < 2:
        return X
    from sklearn.decomposition import PCA
    return PCA(n_components=n_comp, random_state=seed).fit_transform(X)


def _trivial(X: np.ndarray) -> np.ndarray | None:
    """Coordinates for sets too small to embed (1 or 2 points); None otherwise."""
    if len(X) == 1:
        return np.zeros((1, 2))
    if len(X) == 2:
        return np.array([[-1.0, 0.0], [1.0, 0.0]])
    return None


def _tsne(X: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    small = _trivial(X)
    if small is not None:
        return small
    X = _reduced(X, seed)
    tsne = TSNE(n_components=2, perplexity=perplexity_for(len(X)), init="pca", learning_rate="auto",
                random_state=seed, method="exact" if len(X) <= _EXACT_MAX else "barnes_hut")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tsne.fit_transform(X)


def _umap(X: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap
    except ImportError:
        raise UserError("the UMAP map needs umap-learn: `pip install umap-learn` "
                        "(or `pip install -e \".[umap]\"`), or use the t-SNE map") from None
    small = _trivial(X)
    if small is not None:
        return small
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, len(X) - 1)), random_state=seed,
                        init="spectral" if len(X) > 3 else "random")
    return reducer.fit_transform(X)


# --- saved heads on cached features -----------------------------------------------------------

def open_features(features, layer: str | None = None) -> Features:
    """A cache path (read whole) or Features; X as float32."""
    if isinstance(features, Features):
        X, y, meta = features
        if layer is not None and meta.get("layer") not in (None, layer):
            raise UserError(f"these features are of layer {meta.get('layer')!r}, not {layer!r}")
    else:
        X, y, meta = load_features(features, layer)
    return Features(np.asarray(X, dtype=np.float32), np.asarray(y), meta)


def load_head_logged(head_file):
    """(pipeline, sidecar) through probe.output.results.load_head; a version mismatch becomes a log warning."""
    from probe.output.headfile import load_head

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline, sidecar = load_head(head_file)
    for w in caught:
        log.warning(f"warning: {w.message}")
    return pipeline, sidecar


def head_name(head_file, sidecar: dict) -> str:
    return str(sidecar.get("head") or Path(head_file).name.removesuffix(".skops"))


def check_head_fits(sidecar: dict, meta: dict, head_file) -> None:
    """Refuse a head fitted on other features (another extraction or layer) than these."""
    if sidecar.get("layer") and sidecar["layer"] != meta["layer"]:
        raise UserError(f"head {head_file} was fitted on layer {sidecar['layer']!r}, these features are "
                        f"layer {meta['layer']!r}")
    if sidecar.get("identity"):
        head_id, feat_id = FeatureIdentity.from_dict(sidecar["identity"]), meta["identity"]
        diff = differences(head_id, feat_id)
        if diff:
            raise UserError(f"head {head_file} was fitted on other features than {meta.get('path')}: "
                            f"{describe_differences(diff, head_id, feat_id)}")


def head_predict(pipeline, sidecar: dict, feats: Features, head_file) -> np.ndarray:
    """Predicted class ids for every row of cached features, from a loaded head that fits them."""
    check_head_fits(sidecar, feats.meta, head_file)
    want = getattr(pipeline, "n_features_in_", feats.X.shape[1])
    if want != feats.X.shape[1]:
        raise UserError(f"head {head_file} expects {want} features per image, the cache has {feats.X.shape[1]}")
    return np.asarray(pipeline.predict(feats.X)).astype(np.int64)


def head_test_features(head_file) -> Path | Features:
    """The test features a saved head was scored on, read from its result JSON (<head>.json): the
    test-split cache file, or, where the test rows were carved from train, those rows (Features)."""
    from probe.protocol.data import carved_test

    result_path = Path(head_file).with_suffix(".json")
    try:
        result = json.loads(result_path.read_text())
        path = Path(result["sources"]["test"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"cannot tell which test features {head_file} was scored on: {result_path} is missing "
                        "or names no test source; give the test cache file") from None
    if not path.exists():
        raise UserError(f"the test features {path} that {head_file} was scored on are gone: extract them again")
    carved = (result.get("test") or {}).get("carved")
    if carved:
        return carved_test(load_features(path, result.get("layer")), carved["fraction"], carved["split_seed"])
    return path


def split_label(meta: dict) -> str:
    """'test', 'val' or 'test (20% of train carved by split seed 0, 49 rows)': which rows these are."""
    if meta.get("test"):
        return f"test ({meta['test']})"
    return meta.get("split") or "test"


def class_names(meta: dict, sidecar: dict | None, y) -> list[str]:
    names = list(meta.get("classes") or (sidecar or {}).get("classes") or [])
    top = int(np.max(y)) + 1 if len(y) else 0
    return names + [str(i) for i in range(len(names), top)]


# --- the map ----------------------------------------------------------------------------------

def class_map(test_features=None, *, head_file=None, layer: str | None = None, method: str = "tsne",
              seed: int = 0, max_points: int = 5000) -> dict:
    """The test split's features in 2-D, coloured by true class; with a saved head, the rows it gets wrong.

    Returns {xy, y, wrong (bool per point, or None without a head), pred, classes, rows (cache rows
    mapped), index (their source positions), identity, layer, split, method, head}.
    """
    if test_features is None:
        if head_file is None:
            raise UserError("give the test features or a saved head (whose result names them)")
        test_features = head_test_features(head_file)
    pipeline, sidecar, head, pred = None, None, None, None
    if head_file is not None:
        pipeline, sidecar = load_head_logged(head_file)
        head = head_name(head_file, sidecar)
        if layer is None and not isinstance(test_features, Features):
            layer = sidecar.get("layer")
    feats = open_features(test_features, layer)
    meta = feats.meta
    if pipeline is not None:
        pred = head_predict(pipeline, sidecar, feats, head_file)
    xy, rows = embed_2d(feats.X, feats.y, method=method, seed=seed, max_points=max_points)
    y = feats.y[rows]
    return {"xy": xy, "y": y, "wrong": None if pred is None else pred[rows] != y,
            "pred": None if pred is None else pred[rows], "classes": class_names(meta, sidecar, feats.y),
            "rows": rows, "index": np.asarray(meta["index"])[rows], "identity": meta["identity"],
            "layer": meta["layer"], "split": split_label(meta), "method": method, "head": head}


def map_figure(xy, y, classes, *, wrong=None, title: str = "") -> Figure:
    """Scatter of xy coloured by class (legend up to LEGEND_MAX classes, else a colour bar);
    points flagged in `wrong` get a black x."""
    xy, y = np.asarray(xy, dtype=float), np.asarray(y)
    fig = new_figure(figsize=(8.5, 7), layout="constrained")
    ax = fig.add_subplot()
    size = float(np.clip(3000 / max(len(y), 1), 4, 40))
    present = np.unique(y)
    if len(present) <= LEGEND_MAX:
        cmap = colormaps["tab10" if len(present) <= 10 else "tab20"]
        for i, c in enumerate(present):
            m = y == c
            name = fit_label(classes[c] if c < len(classes) else str(c), 32)
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(i), alpha=0.8, linewidths=0, label=name)
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=y, cmap="turbo", alpha=0.8, linewidths=0)
        fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.02).set_label("class index")
    if wrong is not None:
        wrong = np.asarray(wrong, bool)
        ax.scatter(xy[wrong, 0], xy[wrong, 1], s=size * 1.3, marker="x", color="black", linewidths=1,
                   label=f"misclassified ({int(wrong.sum())} of {len(wrong)})")
    if len(present) <= LEGEND_MAX:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=1.5, frameon=False)
    elif wrong is not None:     # the colour bar sits where the legend would
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(wrap(title, 5.5, 9), fontsize=9)
    return fig


def plot_map(xy, y, classes, path, *, wrong=None, title: str = "") -> Path:
    """Write map_figure as a PNG; returns path."""
    return save_png(map_figure(xy, y, classes, wrong=wrong, title=title), path)


def map_title(m: dict) -> str:
    ident = m["identity"]
    first = f"{m['method']} of {m['split'] or 'test'} features"
    if m["wrong"] is not None:
        first += f" · {m['head']}: {int(m['wrong'].sum())} of {len(m['wrong'])} wrong"
    return first + "\n" + " · ".join((ident.data.label, ident.model, m["layer"]))


def write_map(test_features=None, *, head_file=None, results_root="results", layer: str | None = None,
              method: str = "tsne", seed: int = 0, max_points: int = 5000) -> Path:
    """class_map drawn to <results>/<identity>/<layer>/map-<method>[-<head>].png; returns the path."""
    m = class_map(test_features, head_file=head_file, layer=layer, method=method, seed=seed,
                  max_points=max_points)
    name = f"map-{method}" + (f"-{m['head']}" if m["head"] else "") + ".png"
    path = m["identity"].results_dir(results_root, m["layer"]) / name.replace("/", "_")
    plot_map(m["xy"], m["y"], m["classes"], path, wrong=m["wrong"], title=map_title(m))
    log.info(f"wrote {path}")
    return path
