"""What a cache folder holds, read from the files' identities (never from their names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from extract.store.cache import PARTIAL, read_header
from extract.core.errors import UserError
from extract.store.identity import FeatureIdentity

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """The complete cache files of one identity (taps aside): split -> path, newest first."""

    identity: FeatureIdentity
    files: dict[str, Path] = field(default_factory=dict)
    taps: dict[str, list[str]] = field(default_factory=dict)   # split -> taps in its file
    mtime: float = 0.0

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
        if getattr(self.identity, "engine", "torch") != "torch":
            words.append(f"--engine {self.identity.engine}")
        return " ".join(words)


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
        group = groups.setdefault(key, FeatureSet(key, mtime=c["mtime"]))
        if c["split"] not in group.files:
            group.files[c["split"]] = c["path"]
            group.taps[c["split"]] = c["layers"]
    return sorted(groups.values(), key=lambda g: g.mtime, reverse=True)


def _same_model(stored: FeatureIdentity, wanted: str) -> bool:
    if wanted == stored.model:
        return True
    arch, _, tag = wanted.partition(".")
    if not tag or arch != stored.model:
        return False
    from extract.registry.models import get_spec   # only for 'arch.DEFAULT_TAG' spellings: needs the registry
    try:
        return tag.lower() == get_spec(arch).default_weights.lower()
    except UserError:
        return False


def select(cache_dir, *, data: str | None = None, model: str | None = None, layer: str | None = None,
           precision: str | None = None, dtype: str | None = None, image_size: int | None = None,
           normalize: str | None = None) -> list[FeatureSet]:
    """Feature sets matching the filters, newest first; UserError naming what exists when none do.

    image_size matches the input side the network saw (so the weights' own size finds the default
    extraction too); normalize is "weights" or "dataset".
    """
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
    wanted = [g for g in groups
              if (data is None or g.identity.data.matches(data)) and (model is None or _same_model(g.identity, model))
              and (precision is None or g.identity.precision == precision)
              and (dtype is None or g.identity.dtype == dtype)
              and (image_size is None or g.identity.preprocess.crop == int(image_size))
              and (normalize is None or g.identity.normalize == normalize)
              and (layer is None or any(layer in t for t in g.taps.values()))]
    if not wanted:
        what = " ".join(f"--{k} {v}" for k, v in (("data", data), ("model", model), ("layer", layer),
                                                 ("precision", precision), ("dtype", dtype),
                                                 ("image-size", image_size), ("normalize", normalize)) if v)
        have = "; ".join(sorted({g.describe() for g in groups}))
        raise UserError(f"no complete cache under {cache_dir} for {what}; available: {have}")
    return wanted


def choose(groups: list[FeatureSet]) -> FeatureSet:
    """The default request's extraction where there is one, else the newest."""
    plain = [g for g in groups if not g.identity.variant]
    return (plain or groups)[0]


def find_one(cache_dir, *, data=None, model=None, split="train", layer=None, precision=None, dtype=None,
             image_size=None, normalize=None) -> Path:
    """The cache file of one split for a request (see `select`)."""
    group = choose(select(cache_dir, data=data, model=model, layer=layer, precision=precision, dtype=dtype,
                          image_size=image_size, normalize=normalize))
    if split not in group.files:
        raise UserError(f"no complete {split} split cached for {group.describe()} under {cache_dir} "
                        f"(it has {', '.join(group.files)})")
    return group.files[split]

