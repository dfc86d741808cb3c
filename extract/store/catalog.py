"""What a cache folder holds, read from the files' identities (never from their names), and which
of it a `CacheQuery` asks for."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from extract.store.cache import Features, read_header
from extract.store.cache import load_features as read_features
from extract.store.chunks import PARTIAL
from extract.core.errors import UserError
from extract.store.identity import DataRef, FeatureIdentity
from extract.store.modelref import ModelRef, split_models

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """The complete cache files of one identity (taps aside): split -> path, newest first."""

    identity: FeatureIdentity
    files: dict[str, Path] = field(default_factory=dict)
    taps: dict[str, list[str]] = field(default_factory=dict)   # split -> taps in its file
    mtime: float = 0.0
    weights_tag: str | None = None    # the weights tag the files recorded (so arch.TAG finds arch)

    def describe(self) -> str:
        words = [f"--data {self.identity.data.describe()}", f"--model {self.identity.model}"]
        if self.identity.image_size is not None:
            words.append(f"--image-size {self.identity.image_size}")
        if self.identity.normalize != "weights":
            words.append(f"--normalize {self.identity.normalize}")
        if self.identity.precision_requested != "auto":
            words.append(f"--precision {self.identity.precision}")
        if self.identity.dtype != "float32":
            words.append(f"--dtype {self.identity.dtype}")
        if self.identity.engine != "torch":
            words.append(f"--engine {self.identity.engine}")
        if self.identity.decoder not in (None, "tensor"):
            words.append(f"--decoder {self.identity.decoder}")
        return " ".join(words)


@dataclass(frozen=True)
class CacheQuery:
    """Which cached features a command means: the cache root, filters on the identity (None: any),
    or explicit files (`features` = train, with `test_features` / `val_features`).

    `model` and `layer` may name several (comma-separated) or `all` where a command compares them.
    """

    cache_dir: str | Path = "cache"
    data: str | None = None
    model: str | None = None
    layer: str | None = None
    precision: str | None = None
    dtype: str | None = None
    image_size: int | None = None
    normalize: str | None = None
    engine: str | None = None
    decoder: str | None = None
    features: str | Path | None = None
    test_features: str | Path | None = None
    val_features: str | Path | None = None

    def replace(self, **changes) -> "CacheQuery":
        return dataclasses.replace(self, **changes)

    @property
    def filtered(self) -> bool:
        """True when any filter (not only the cache root) was given."""
        return any(getattr(self, f) is not None for f in _FILTERS)

    @property
    def models(self) -> list[str]:
        """The model names asked for; [] for any (None or all)."""
        names = split_models(self.model)
        return [] if names in ([], ["all"]) else names

    def matches(self, group: FeatureSet, model: str | None = None) -> bool:
        """Whether a feature set passes every filter; `model`: one name (default: the query's, if one)."""
        ident = group.identity
        model = model if model is not None else (self.model if len(self.models) == 1 else None)
        return ((self.data is None or ident.data.matches(self.data))
                and (model is None or ModelRef.parse(model).same_model(ident.model, group.weights_tag))
                and (self.precision is None or ident.precision == self.precision)
                and (self.dtype is None or ident.dtype == self.dtype)
                and (self.image_size is None or ident.preprocess.crop == int(self.image_size))
                and (self.normalize is None or ident.normalize == self.normalize)
                and (self.engine is None or ident.engine == self.engine)
                and (self.decoder is None or ident.decoder == self.decoder)
                and (self.layer is None or "," in self.layer or self.layer == "all"
                     or any(self.layer in t for t in group.taps.values())))

    def describe(self) -> str:
        """The filters as command-line flags: '--data digits --model resnet18'."""
        return " ".join(f"--{f.replace('_', '-')} {getattr(self, f)}" for f in _FILTERS
                        if getattr(self, f) is not None)


_FILTERS = ("data", "model", "layer", "precision", "dtype", "image_size", "normalize", "engine", "decoder")


def find_caches(cache_dir) -> list[dict]:
    """Every cache file under `cache_dir` with its header (complete or not), newest first."""
    found = []
    for path in Path(cache_dir).glob("**/*.h5"):
        if path.parent.name.endswith(PARTIAL):   # chunks of an unfinished run
            continue
        header = read_header(path)
        if header is not None:
            found.append({**header, "path": path, "mtime": path.stat().st_mtime})
    return sorted(found, key=lambda c: c["mtime"], reverse=True)


def feature_sets(cache_dir) -> list[FeatureSet]:
    """Complete caches grouped by identity, newest first; files of an older format are left out, and
    damaged ones too, each named in a warning."""
    groups: dict[FeatureIdentity, FeatureSet] = {}
    for c in find_caches(cache_dir):
        if c.get("damaged"):
            log.warning(f"warning: skipped {c['path']}: it is damaged ({c['damaged']}); rerun the extract "
                        "command that made it to rebuild it")
        if not c["complete"] or c["identity"] is None:
            continue
        key = c["identity"].with_taps(())
        group = groups.setdefault(key, FeatureSet(key, mtime=c["mtime"],
                                                  weights_tag=(c.get("provenance") or {}).get("weights")))
        if c["split"] not in group.files:
            group.files[c["split"]] = c["path"]
            group.taps[c["split"]] = c["layers"]
    return sorted(groups.values(), key=lambda g: g.mtime, reverse=True)


def select(query: CacheQuery, model: str | None = None) -> list[FeatureSet]:
    """Feature sets matching the query (`model`: one of its names), newest first; UserError naming
    what exists when none do.

    image_size matches the input side the network saw (so the weights' own size finds the default
    extraction too); normalize is "weights" or "dataset".
    """
    cache_dir = query.cache_dir
    groups = feature_sets(cache_dir)
    if not groups:
        partial = sorted(Path(cache_dir).glob("**/*.h5.partial"))
        if partial:
            raise UserError(f"the only cache under {cache_dir} is incomplete ({partial[0]}): "
                            "rerun the same extract command to finish it")
        damaged = [c["path"] for c in find_caches(cache_dir) if c.get("damaged")]
        if damaged:
            raise UserError(f"the only cache under {cache_dir} is damaged ({damaged[0]}): delete it and rerun "
                            "the same `python -m extract` command to rebuild it")
        raise UserError(f"no complete feature cache under {cache_dir}: run `python -m extract` first")
    wanted = [g for g in groups if query.matches(g, model)]
    if not wanted:
        what = query.describe() if model is None else query.replace(model=model).describe()
        have = "; ".join(sorted({g.describe() for g in groups}))
        raise UserError(f"no complete cache under {cache_dir} for {what}; available: {have}")
    return wanted


def one_dataset(sets: list[tuple[int, FeatureSet]], cache_dir) -> DataRef:
    """The one dataset of these (rank, feature set) pairs; several: a UserError naming them."""
    datasets = list(dict.fromkeys(g.identity.data for _, g in sets))
    if len(datasets) > 1:
        names = ", ".join(sorted(d.label for d in datasets))
        raise UserError(f"the cache under {cache_dir} holds features of {len(datasets)} datasets ({names}): "
                        "choose one with --data")
    return datasets[0]


def choose(groups: list[FeatureSet]) -> FeatureSet:
    """The default request's extraction where there is one, else the newest."""
    plain = [g for g in groups if not g.identity.variant]
    return (plain or groups)[0]


def find_one(query: CacheQuery, split: str = "train") -> Path:
    """The cache file of one split for a query (see `select`)."""
    group = choose(select(query))
    if split not in group.files:
        raise UserError(f"no complete {split} split cached for {group.describe()} under {query.cache_dir} "
                        f"(it has {', '.join(group.files)})")
    return group.files[split]


def load_features(path=None, layer: str | None = None, lazy: bool = False, *, split: str = "train",
                  **query) -> Features:
    """Read one tap of a complete cache: X (N, D), y (N,) and metadata.

    Give the file's path, or the request that made it as CacheQuery keywords (``data="digits",
    model="efficientnet_lite0", split="train"``; `precision`/`dtype`/`image_size`/`normalize`/
    `engine`/`decoder` choose among several extractions of one model). With lazy=True, X is an open
    h5py.Dataset read on demand (slice it in chunks for large caches).
    """
    if path is None:
        path = find_one(CacheQuery(layer=layer, **query), split)
    return read_features(path, layer, lazy)
