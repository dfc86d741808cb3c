"""Which cache files a probe run reads, and the train / validation / test arrays it gets from them.

Rules (GUIDE §5): validation is the dataset's own val split when it also has a test split, else a
seeded stratified 20% of train; a dataset with only train and val uses val as its test split; a
dataset with only train (class folders) gets a seeded stratified test fraction of train carved on
its own seed first (probe.protocol.splits.carve), and validation from the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extract.store.cache import load_features
from extract.store.catalog import CacheQuery, FeatureSet, choose, select
from extract.core.errors import UserError
from extract.store.identity import FeatureIdentity, describe_differences, differences

from probe.protocol.rows import Rows
from probe.protocol.splits import carve, check_fraction, describe_carve, split_roles

@dataclass
class ProbeData:
    """Features and class ids of the three roles; y_test is only read after selection.

    The X arrays are probe.protocol.rows.Rows views instead when the features are streamed from the cache.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    identity: FeatureIdentity
    layer: str = "penultimate"
    validation: str = "given"
    test_split: str = "test"
    provenance: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)    # role -> cache path
    index_train: np.ndarray | None = None          # source indices of the train rows (subsampling)
    index_val: np.ndarray | None = None            # source indices of the validation rows
    index_test: np.ndarray | None = None           # source indices of the test rows
    test_carve: dict | None = None                 # {fraction, split_seed} when test rows came from train

    @property
    def test(self) -> dict:
        """Which rows are test, for the result file and the printed summary."""
        n = len(self.y_test)
        if self.test_carve:
            what = describe_carve(self.test_carve["fraction"], self.test_carve["split_seed"], n)
        else:
            what = f"the dataset's {'own ' if self.test_split == 'test' else ''}'{self.test_split}' split, {n} rows"
        return {"split": self.test_split, "rows": n, "carved": self.test_carve, "description": what}

    @property
    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    @property
    def dataset(self) -> str:
        return self.identity.data.label

    @property
    def model(self) -> str:
        return self.identity.model


@dataclass
class Selection:
    """The cache files of one extraction: split name -> path."""

    files: dict[str, Path]
    layer: str | None = None


# --- choosing cache files ---------------------------------------------------------------------

def select_caches(query: CacheQuery) -> Selection:
    """The newest complete extraction matching the query (read from the files' identities); the
    default request's extraction wins over ones with explicit choices."""
    group: FeatureSet = choose(select(query))
    if "train" not in group.files:
        raise UserError(f"no complete train split cached for {group.describe()} under {query.cache_dir}: "
                        "run `python -m extract` for the train split")
    return Selection(dict(group.files), query.layer)


def selection_from_paths(features, test_features=None, val_features=None, layer=None) -> Selection:
    """Explicit files; with only --features, the other splits of the same identity in its folder are used."""
    train = _cache_file(features, "--features")
    if not train.exists():
        if Path(str(train) + ".partial").exists():
            load_features(train)  # raises the "incomplete" UserError
        raise UserError(f"no cache file at {train}")
    files = {"train": train}
    if test_features:
        files["test"] = _cache_file(test_features, "--test-features")
    if val_features:
        files["val"] = _cache_file(val_features, "--val-features")
    if not test_features and not val_features:
        suffix = train.name[len(train.name.split(".")[0]):]  # ".h5" or ".bf16.h5": the same variant
        for split in ("val", "test"):
            sibling = train.with_name(split + suffix)
            if sibling.exists():
                files[split] = sibling
    return Selection(files, layer)


def _cache_file(path, flag: str) -> Path:
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))
        hint = f" such as {path / found[0]}" if found else ""
        raise UserError(f"{flag} expects a cache file (.h5){hint}, but {path} is a folder "
                        "(to search a folder of caches, use --cache-dir)")
    return path


# --- loading and checking ---------------------------------------------------------------------

def check_distinct(files: dict, metas: dict[str, dict]) -> None:
    """Refuse one file, or copies of one split, given for two roles: a model would be scored on the
    images it was fitted on."""
    splits = list(metas)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            pa, pb = Path(files[a]), Path(files[b])
            if pa.resolve() == pb.resolve() or os.path.samefile(pa, pb):
                raise UserError(f"{pa} is given as both the {a} and the {b} features; give each split its "
                                "own cache file")
            split = metas[a].get("split")
            if split and split == metas[b].get("split"):
                shared = len(np.intersect1d(metas[a]["index"], metas[b]["index"]))
                if shared:
                    raise UserError(f"the {a} features ({pa}) and the {b} features ({pb}) are both the {split!r} "
                                    f"split of one extraction, sharing {shared} images; give each split its own "
                                    "cache file")


def _load(path: Path, layer: str | None, role: str, lazy: bool = False):
    if lazy:  # a view of the file; blocks are checked for NaN/inf as they are read
        feats = load_features(path, layer, lazy=True)
        name = feats.X.name
        feats.meta.pop("file").close()
        X = Rows.of(path, name)
        if len(X) == 0:
            raise UserError(f"{role} split in {path} is empty")
        return X, np.asarray(feats.y, np.int64), feats.meta
    feats = load_features(path, layer)
    X = np.asarray(feats.X, dtype=np.float32)
    if X.ndim != 2 or len(X) == 0:
        raise UserError(f"{role} split in {path} is empty")
    bad = ~np.isfinite(X)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise UserError(f"{role} features in {path} contain NaN or inf values in {rows} of {len(X)} rows")
    return X, np.asarray(feats.y, np.int64), feats.meta


def check_same_identity(metas: dict[str, dict]) -> None:
    """Refuse files whose identities differ in anything but the split (and the taps they hold)."""
    ref_role, ref = next(iter(metas.items()))
    for role, meta in metas.items():
        diff = differences(ref["identity"], meta["identity"])
        if diff:
            raise UserError(f"{ref_role} and {role} features come from different extractions: "
                            f"{describe_differences(diff, ref['identity'], meta['identity'])} "
                            f"({ref['path']} vs {meta['path']})")
        if meta["layer"] != ref["layer"]:
            raise UserError(f"{ref_role} and {role} features are of different layers: {ref['layer']!r} vs "
                            f"{meta['layer']!r}")
        if list(meta.get("classes") or []) != list(ref.get("classes") or []):
            raise UserError(f"{ref_role} and {role} caches have different class lists "
                            f"({ref['path']} vs {meta['path']})")


def _require_classes(y: np.ndarray, role: str, what: str) -> None:
    if len(y) == 0:
        raise UserError(f"the {role} split is empty ({what})")
    if len(np.unique(y)) < 2:
        raise UserError(f"the {role} split has only one class ({what}); a classifier needs at least two")


def load_probe_data(selection: Selection, seed: int = 0, val_fraction: float = 0.2, lazy: bool = False,
                    test_fraction: float = 0.2, split_seed: int = 0) -> ProbeData:
    """Read the selected cache files, check they belong together, and assign train/val/test roles.

    Only a train split: its test rows are a seeded stratified `test_fraction` of it (`split_seed`).
    lazy=True leaves the features in their files (Rows views) and reads only labels and metadata.
    """
    files = selection.files
    test_split, val_split = split_roles(files) or ("train", None)
    carved = test_split == "train"
    arrays, metas = {}, {}
    for split in dict.fromkeys(["train", val_split, test_split]):
        if split:
            X, y, meta = _load(files[split], selection.layer, split, lazy)
            arrays[split], metas[split] = (X, y), meta
    check_same_identity(metas)
    check_distinct(files, metas)
    dims = {role: X.shape[1] for role, (X, _) in arrays.items()}
    if len(set(dims.values())) > 1:
        raise UserError(f"the splits' features have different dimensions ({dims}): the files were not written "
                        "by one extraction")
    train_meta = metas["train"]
    classes = [str(c) for c in (train_meta.get("classes") or [])]
    X_tr, y_tr = arrays["train"]
    index_tr = np.asarray(train_meta["index"])
    _require_classes(y_tr, "train", str(files["train"]))
    if carved:
        _refuse_uncached_split(train_meta)
    if carved or not val_split:
        test_rows, val_rows = carved_rows(train_meta, y_tr, seed=seed, val_fraction=val_fraction,
                                          test_fraction=check_fraction(test_fraction, "--test-fraction") if carved
                                          else None, split_seed=split_seed)
    if carved:
        X_te, y_te, index_te = X_tr[test_rows], y_tr[test_rows], index_tr[test_rows]
        carve_note = describe_carve(test_fraction, split_seed)
    else:
        X_te, y_te = arrays[test_split]
        index_te = np.asarray(metas[test_split]["index"])
    if val_split:
        X_va, y_va = arrays[val_split]
        index_va = np.asarray(metas[val_split]["index"])
        validation = f"the dataset's own '{val_split}' split"
    else:
        X_va, y_va, index_va = X_tr[val_rows], y_tr[val_rows], index_tr[val_rows]
        validation = f"stratified {val_fraction:.0%} of {'the rest of ' if carved else ''}train (seed {seed})"
        if test_split == "val":
            validation += "; the dataset has no test split, so its 'val' split is the test set"
        if carved:
            validation += f"; the dataset has only a train split, so its test rows are {carve_note}"
        keep = ~(test_rows | val_rows)
        X_tr, y_tr, index_tr = X_tr[keep], y_tr[keep], index_tr[keep]
        _require_classes(y_tr, "train", f"after carving validation from {files['train']}")
    _require_classes(y_va, "validation", validation)
    if len(y_te) == 0:
        raise UserError(f"the test split is empty ({files[test_split]})")
    if len(np.unique(y_te)) < 2:
        raise UserError(f"the test split has only one class ({files[test_split]}); its scores would mean little")
    if not classes:
        classes = [str(c) for c in range(int(max(y_tr.max(), y_va.max(), y_te.max())) + 1)]
    top = int(max(y_tr.max(), y_va.max(), y_te.max()))
    if top >= len(classes) or min(y_tr.min(), y_va.min(), y_te.min()) < 0:
        raise UserError(f"labels in {files['train']} fall outside its {len(classes)} classes")
    return ProbeData(
        X_tr, y_tr, X_va, y_va, X_te, y_te, classes, train_meta["identity"], layer=train_meta["layer"],
        validation=validation, test_split=test_split, provenance=train_meta.get("provenance", {}),
        sources={role: str(files[s]) for role, s in (("train", "train"), ("val", val_split), ("test", test_split)) if s},
        index_train=index_tr, index_val=index_va, index_test=index_te,
        test_carve={"fraction": float(test_fraction), "split_seed": int(split_seed)} if carved else None)


def _refuse_uncached_split(meta: dict) -> None:
    """A dataset that has its own test (or val) split is scored on it, never on rows carved from train."""
    held_out = [s for s in (meta.get("provenance") or {}).get("dataset_splits") or [] if s in ("test", "val")]
    if held_out:
        raise UserError(f"only the train split of {meta['identity'].data.describe()} is cached ({meta['path']}), but "
                        f"the dataset has its own '{held_out[0]}' split: extract it (the same extract command "
                        f"without --split) so the probe is scored on it")


def carved_rows(meta: dict, labels, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float | None = None,
                split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(test, validation) masks over a train cache's rows (probe.protocol.splits.carve), computed over
    every train image, unreadable ones included, so finetune carves the same rows."""
    index = np.asarray(meta["index"])
    labels = np.asarray(labels)
    known = [s for s in meta.get("skipped") or [] if s.get("label", -1) >= 0]
    full_index = np.concatenate([index, np.asarray([s["index"] for s in known], dtype=index.dtype)])
    full_labels = np.concatenate([labels, np.asarray([s["label"] for s in known], dtype=labels.dtype)])
    test, val = carve(full_index, full_labels, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                      split_seed=split_seed)
    return test[:len(index)], val[:len(index)]


def carved_test(feats, fraction: float, split_seed: int):
    """The test rows carved from a train cache's Features (X, y and the meta's index and paths narrowed;
    meta['test'] says how they were chosen)."""
    from extract.store.cache import Features

    X, y, meta = feats
    test, _ = carved_rows(meta, y, test_fraction=check_fraction(fraction, "--test-fraction"), split_seed=split_seed)
    meta = {**meta, "index": np.asarray(meta["index"])[test],
            "test": describe_carve(fraction, split_seed, int(test.sum()))}
    if meta.get("paths") is not None:
        meta["paths"] = [p for p, keep in zip(meta["paths"], test) if keep]
    return Features(np.asarray(X)[test], np.asarray(y)[test], meta)
