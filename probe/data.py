"""Which cache files a probe run reads, and the train / validation / test arrays it gets from them.

Rules (GUIDE §5): validation is the dataset's own val split when it also has a test split, else a
seeded stratified 20% of train; a dataset with only train and val uses val as its test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extract.cache import find_caches, load_features
from extract.errors import UserError

from .splits import split_roles, validation_mask

SPLITS = ("train", "val", "test")


@dataclass
class ProbeData:
    """Features and class ids of the three roles; y_test is only read after selection."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    validation: str = "given"
    test_split: str = "test"
    dataset: str = "unknown"
    model: str = "unknown"
    model_dir: str = "unknown"
    weights: str = ""
    layer: str = "penultimate"
    provenance: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)    # role -> cache path
    index_train: np.ndarray | None = None          # source indices of the train rows (subsampling)

    @property
    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


@dataclass
class Selection:
    """The cache files of one extraction: split name -> path."""

    files: dict[str, Path]
    dataset: str
    model: str
    weights: str
    layer: str | None = None
    note: str = ""


# --- choosing cache files ---------------------------------------------------------------------

def _in_layout(path: Path, model: str) -> bool:
    """True if path sits at <cache_dir>/<dataset>/<model>[.<weights>]/<split>.h5."""
    return path.parent.name.split(".")[0] == model


def cache_names(path: Path, meta_dataset: str, model: str, weights: str) -> tuple[str, str]:
    """(dataset, model folder) as the cache layout names them; results mirror these names.

    The dataset folder distinguishes image folders that all share the registry name "imagefolder".
    """
    path = Path(path)
    if _in_layout(path, model):
        return path.parent.parent.name, path.parent.name
    return meta_dataset, (model if not weights else f"{model}.{weights}")


def select_caches(cache_dir="cache", *, model: str | None = None, data: str | None = None,
                  weights: str | None = None, layer: str | None = None) -> Selection:
    """The newest complete extraction under cache_dir matching the given filters."""
    found = find_caches(cache_dir)
    if not found:
        partial = sorted(Path(cache_dir).glob("**/*.h5.partial"))
        if partial:
            raise UserError(f"the only cache under {cache_dir} is incomplete ({partial[0]}): "
                            "rerun the same extract command to finish it")
        raise UserError(f"no complete feature cache under {cache_dir}: run `python -m extract` first")

    def key(c):
        return (c["dataset"], c["model"], c["weights"])

    wanted = [c for c in found
              if (data is None or data in (c["dataset"], Path(c["path"]).parent.parent.name)) and (model is None or c["model"] == model)
              and (weights is None or c["weights"] == weights or Path(c["path"]).parent.name.endswith(f".{weights}"))
              and (layer is None or layer in c["layers"])]
    if not wanted:
        have = sorted({f"--data {d} --model {m}" + (f" --weights {w}" if w else "") for d, m, w in map(key, found)})
        what = " ".join(f"--{k} {v}" for k, v in (("data", data), ("model", model), ("weights", weights),
                                                 ("layer", layer)) if v)
        raise UserError(f"no complete cache under {cache_dir} for {what}; available: {'; '.join(have)}")
    newest = wanted[0]  # find_caches sorts newest first
    def folder_and_dtype(c):  # train.h5, train.bf16.h5 and train.float16.h5 are different extractions
        p = Path(c["path"])
        return p.parent, p.name.split(".", 1)[1]

    group = [c for c in wanted if key(c) == key(newest) and folder_and_dtype(c) == folder_and_dtype(newest)]
    files: dict[str, Path] = {}
    for c in sorted(group, key=lambda c: -c["mtime"]):
        files.setdefault(c["split"], Path(c["path"]))
    if "train" not in files:
        raise UserError(f"no complete train split cached for {newest['dataset']}/{newest['model']} "
                        f"under {cache_dir}: run `python -m extract` for the train split")
    return Selection(files, newest["dataset"], newest["model"], newest["weights"], layer)


def selection_from_paths(features, test_features=None, val_features=None, layer=None) -> Selection:
    """Explicit files; with only --features, sibling val/test files of the same extraction are used."""
    train = Path(features)
    if not train.exists():
        if Path(str(train) + ".partial").exists():
            load_features(train)  # raises the "incomplete" UserError
        raise UserError(f"no cache file at {train}")
    files = {"train": train}
    if test_features:
        files["test"] = Path(test_features)
    if val_features:
        files["val"] = Path(val_features)
    if not test_features and not val_features:
        suffix = train.name[len(train.name.split(".")[0]):]  # ".h5" or ".float16.h5"
        for split in ("val", "test"):
            sibling = train.with_name(split + suffix)
            if sibling.exists():
                files[split] = sibling
    return Selection(files, "", "", "", layer)


# --- loading and checking ---------------------------------------------------------------------

def _load(path: Path, layer: str | None, role: str):
    feats = load_features(path, layer)
    X = np.asarray(feats.X, dtype=np.float32)
    if X.ndim != 2 or len(X) == 0:
        raise UserError(f"{role} split in {path} is empty")
    bad = ~np.isfinite(X)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise UserError(f"{role} features in {path} contain NaN or inf values in {rows} of {len(X)} rows")
    return X, np.asarray(feats.y, np.int64), feats.meta


def _check_same_source(metas: dict[str, dict], dims: dict[str, int]) -> None:
    ref_role, ref = next(iter(metas.items()))
    for role, meta in metas.items():
        for field_ in ("model", "weights", "dataset", "layer"):
            if meta.get(field_) != ref.get(field_):
                raise UserError(f"{ref_role} and {role} caches come from different {field_}s: "
                                f"{ref.get(field_)!r} ({ref['path']}) vs {meta.get(field_)!r} ({meta['path']})")
        if dims[role] != dims[ref_role]:
            raise UserError(f"{ref_role} and {role} features have different dimensions: "
                            f"{dims[ref_role]} ({ref['path']}) vs {dims[role]} ({meta['path']})")
        if list(meta.get("classes") or []) != list(ref.get("classes") or []):
            raise UserError(f"{ref_role} and {role} caches have different class lists "
                            f"({ref['path']} vs {meta['path']})")


def _require_classes(y: np.ndarray, role: str, what: str) -> None:
    if len(y) == 0:
        raise UserError(f"the {role} split is empty ({what})")
    if len(np.unique(y)) < 2:
        raise UserError(f"the {role} split has only one class ({what}); a classifier needs at least two")


def load_probe_data(selection: Selection, seed: int = 0, val_fraction: float = 0.2) -> ProbeData:
    """Read the selected cache files, check they belong together, and assign train/val/test roles."""
    files = selection.files
    roles = split_roles(files)
    if roles is None:
        raise UserError(f"only a train split is cached ({files['train']}); a probe needs a held-out "
                        "test (or val) split: extract one, or pass --test-features")
    test_split, val_split = roles
    arrays, metas = {}, {}
    for split in dict.fromkeys(["train", val_split, test_split]):
        if split:
            X, y, meta = _load(files[split], selection.layer, split)
            arrays[split], metas[split] = (X, y), meta
    _check_same_source(metas, {s: a[0].shape[1] for s, a in arrays.items()})
    train_meta = metas["train"]
    classes = [str(c) for c in (train_meta.get("classes") or [])]
    X_tr, y_tr = arrays["train"]
    index_tr = np.asarray(train_meta["index"])
    _require_classes(y_tr, "train", str(files["train"]))
    if val_split:
        X_va, y_va = arrays[val_split]
        validation = f"the dataset's own '{val_split}' split"
    else:
        mask = _validation_rows(index_tr, y_tr, train_meta.get("skipped") or [], seed, val_fraction)
        X_va, y_va = X_tr[mask], y_tr[mask]
        X_tr, y_tr, index_tr = X_tr[~mask], y_tr[~mask], index_tr[~mask]
        validation = f"stratified {val_fraction:.0%} of train (seed {seed})"
        if test_split == "val":
            validation += "; the dataset has no test split, so its 'val' split is the test set"
        _require_classes(y_tr, "train", f"after carving validation from {files['train']}")
    _require_classes(y_va, "validation", validation)
    X_te, y_te = arrays[test_split]
    if len(y_te) == 0:
        raise UserError(f"the test split is empty ({files[test_split]})")
    if len(np.unique(y_te)) < 2:
        raise UserError(f"the test split has only one class ({files[test_split]}); its scores would mean little")
    if not classes:
        classes = [str(c) for c in range(int(max(y_tr.max(), y_va.max(), y_te.max())) + 1)]
    top = int(max(y_tr.max(), y_va.max(), y_te.max()))
    if top >= len(classes) or min(y_tr.min(), y_va.min(), y_te.min()) < 0:
        raise UserError(f"labels in {files['train']} fall outside its {len(classes)} classes")
    model = train_meta.get("model") or selection.model or "unknown"
    weights = train_meta.get("weights") or ""
    dataset, model_dir = cache_names(Path(files["train"]), train_meta.get("dataset") or "unknown", model, weights)
    return ProbeData(
        X_tr, y_tr, X_va, y_va, X_te, y_te, classes, validation=validation, test_split=test_split,
        dataset=dataset, model=model, weights=weights, model_dir=model_dir,
        layer=train_meta["layer"], provenance=train_meta.get("provenance", {}),
        sources={role: str(files[s]) for role, s in (("train", "train"), ("val", val_split), ("test", test_split)) if s},
        index_train=index_tr)


def _validation_rows(index, labels, skipped: list[dict], seed: int, fraction: float) -> np.ndarray:
    """validation_mask over every train image, unreadable ones included, so finetune carves the same rows."""
    known = [s for s in skipped if s.get("label", -1) >= 0]
    full_index = np.concatenate([index, np.asarray([s["index"] for s in known], dtype=index.dtype)])
    full_labels = np.concatenate([labels, np.asarray([s["label"] for s in known], dtype=labels.dtype)])
    return validation_mask(full_index, full_labels, seed=seed, fraction=fraction)[:len(index)]
