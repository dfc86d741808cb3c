"""What a feature set *is*, and the one rule that says whether a cache file holds it.

A :class:`FeatureIdentity` is built once from a request (``extract.api.plan``) and passed to
every stage; none re-derives it. It alone decides where the cache lives (:meth:`cache_path`),
where results live (:meth:`results_dir`), what the HDF5 attributes say (:meth:`to_attrs`,
:meth:`from_attrs`) and whether a file is a hit (:func:`verdict`). Adding a component is a
one-place change: a field here (and, if a person should see it in paths, a word in `variant`).

Paths read as ``<cache>/<data label>/<model>/<split>[.<variant>].h5``:

- data label: the registry name (``digits``, ``cifar10``); an image folder's name plus a short
  hash of its resolved path (``pets-3f2a9c``), so same-named folders never share a cache;
  dataset options add a short hash too (``synthetic-8d01c2``).
- model: ``arch`` with its default weights, else ``arch.tag`` (``resnet50.swav``, ``cifar_resnet20.none``,
  a local file as ``arch.<file stem>-<sha256 prefix>``).
- variant: empty for the default request, so the same command gives the same path on every
  CPU; a non-default input size (``size32``), normalisation by the dataset's own statistics
  (``normdata``), image files decoded otherwise than by torchvision's JPEG decoder (``pil``,
  ``torchcodec``, ``draft``: reduced DCT scale, ``cuda``), an explicitly
  requested precision (``bf16``), a non-default storage dtype (``float16``) and an inference engine
  other than torch (``openvino``) are named, in that order. The precision actually computed is
  recorded inside.

Whatever is not spelled in the path (weights file hash, preprocessing, the precision `auto`
chose, the images' fingerprint, the format) is checked by :func:`verdict` and a difference is
refused by name, never mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from extract.store.preprocess import Preprocess

FORMAT = 2
DEFAULT_PRECISION = "auto"
DEFAULT_DTYPE = "float32"
PENULTIMATE = "penultimate"
DEFAULT_NORMALIZE = "weights"       # the weights' own mean/std; "dataset": the train split's own
NORMALIZE_CHOICES = ("weights", "dataset")
DEFAULT_ENGINE = "torch"            # what runs the network; "openvino": OpenVINO on the CPU
ENGINES = ("torch", "openvino")
DEFAULT_DECODER = "tensor"          # image files: JPEGs decoded by torchvision, the rest by PIL; "pil": all by PIL;
                                    # "torchcodec": JPEGs by TorchCodec; "draft": JPEGs by PIL at a reduced DCT
                                    # scale; "cuda": JPEGs by nvJPEG on the GPU, the rest as "tensor"
DECODERS = ("auto", "tensor", "torchcodec", "draft", "pil", "cuda")   # --decoder
LEGACY_DECODER = "pil"              # what files made before the decoder was recorded used


def short_hash(value, n: int = 6) -> str:
    """First `n` hex digits of the sha256 of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class DataRef:
    """Which dataset: registry name, resolved folder (image folders only) and options."""

    name: str
    root: str | None = None
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        """Folder name in the cache and results trees."""
        if self.root is not None:
            return f"{Path(self.root).name}-{short_hash(self.root)}"
        if self.options:
            return f"{self.name}-{short_hash(self.options)}"
        return self.name

    def describe(self) -> str:
        return self.root or self.name + "".join(f" {k}={v}" for k, v in self.options)

    def matches(self, wanted: str) -> bool:
        """True when a user's --data value names this dataset (name, label, folder name or path)."""
        candidates = {self.name, self.label}
        if self.root:
            candidates |= {Path(self.root).name, self.root}
            try:
                return wanted in candidates or str(Path(wanted).expanduser().resolve()) == self.root
            except OSError:
                return wanted in candidates
        return wanted in candidates


@dataclass(frozen=True)
class FeatureIdentity:
    """Everything that makes two feature sets the same; the split is given where it matters."""

    data: DataRef
    model: str                          # arch or arch.tag
    weights_sha256: str | None          # content hash of the weights file; None for random init
    preprocess: Preprocess              # what was actually applied
    precision: str                      # computed at: fp32 | bf16 | fp16
    precision_requested: str = DEFAULT_PRECISION
    dtype: str = DEFAULT_DTYPE          # storage dtype
    taps: tuple[str, ...] = (PENULTIMATE,)
    format: int = FORMAT
    image_size: int | None = None       # input side the network sees; None: the weights' own crop size
    normalize: str = DEFAULT_NORMALIZE  # where preprocess.mean/std come from: "weights" or "dataset"
    engine: str = DEFAULT_ENGINE        # what ran the network: "torch" or "openvino" (never "auto")
    decoder: str | None = DEFAULT_DECODER  # image files: "tensor", "torchcodec", "draft", "pil" or "cuda"; None for
                                           # in-memory arrays
    calibration: str | None = None      # int8: the calibration images' fingerprint (extract.compute.calibration)

    @property
    def arch(self) -> str:
        return self.model.split(".", 1)[0]

    @property
    def variant(self) -> str:
        """Readable words for what the user chose beyond the defaults ('' for the default request)."""
        words = []
        if self.image_size is not None:
            words.append(f"size{self.image_size}")
        if self.normalize != DEFAULT_NORMALIZE:
            words.append("normdata" if self.normalize == "dataset" else f"norm{self.normalize}")
        if self.decoder not in (None, DEFAULT_DECODER):
            words.append(self.decoder)
        if self.precision_requested != DEFAULT_PRECISION:
            words.append(self.precision)
        if self.dtype != DEFAULT_DTYPE:
            words.append(self.dtype)
        if self.engine != DEFAULT_ENGINE:
            words.append(self.engine)
        return ".".join(words)

    def cache_path(self, cache_dir, split: str) -> Path:
        suffix = f".{self.variant}" if self.variant else ""
        return Path(cache_dir) / self.data.label / self.model / f"{split}{suffix}.h5"

    def results_dir(self, results_root, layer: str) -> Path:
        folder = Path(results_root) / self.data.label / self.model
        return (folder / self.variant if self.variant else folder) / layer

    def with_taps(self, taps) -> "FeatureIdentity":
        return dataclasses.replace(self, taps=tuple(dict.fromkeys(taps)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"]["options"] = dict(self.data.options)
        d["preprocess"] = self.preprocess.as_dict()
        d["taps"] = list(self.taps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureIdentity":
        """The inverse of `to_dict`, field by field; fields an older file lacks take `_LEGACY` values
        (else the dataclass default)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                values[f.name] = _READ.get(f.name, lambda v: v)(d[f.name])
            elif f.name in _LEGACY:
                values[f.name] = _LEGACY[f.name](values)
        return cls(**values)

    def to_attrs(self) -> dict:
        """HDF5 attributes: the identity as JSON, plus flat copies for tools such as h5ls."""
        return {"identity": json.dumps(self.to_dict(), sort_keys=True), "format": self.format,
                "model": self.model, "dataset": self.data.label, "precision": self.precision, "dtype": self.dtype}

    @classmethod
    def from_attrs(cls, attrs) -> "FeatureIdentity | None":
        """The identity stored in a file's attributes; None for files of an older format."""
        raw = attrs.get("identity")
        if raw is None:
            return None
        try:
            return cls.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            return None


def _read_data(d: dict) -> DataRef:
    return DataRef(d["name"], d.get("root"), tuple(sorted(d.get("options", {}).items())))


def _read_preprocess(d: dict) -> Preprocess:
    return Preprocess(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


# how a stored JSON value becomes a field value (the others are taken as stored)
_READ = {"data": _read_data, "preprocess": _read_preprocess, "taps": tuple, "format": int,
         "image_size": lambda v: None if v is None else int(v)}
# what a file written before a field existed meant by it, from the fields read so far
_LEGACY = {"decoder": lambda values: LEGACY_DECODER if values["data"].root is not None else None}

_WHAT = {"data": "the dataset differs", "model": "the model or weights differ",
         "weights_sha256": "the weights file changed", "preprocess": "the preprocessing changed",
         "precision": "the compute precision differs", "precision_requested": "the requested precision differs",
         "dtype": "the storage dtype differs", "format": "the cache format is older",
         "fingerprint": "the images changed", "image_size": "the input size differs",
         "normalize": "the normalisation statistics differ", "engine": "the inference engine differs",
         "decoder": "the image decoder differs", "calibration": "the int8 calibration images differ"}


def differences(stored: FeatureIdentity, wanted: FeatureIdentity) -> list[str]:
    """Names of the components that differ; taps are not compared (see `verdict`)."""
    return [f.name for f in dataclasses.fields(FeatureIdentity)
            if f.name != "taps" and getattr(stored, f.name) != getattr(wanted, f.name)]


def describe_differences(names: list[str], stored: FeatureIdentity | None = None,
                         wanted: FeatureIdentity | None = None) -> str:
    """'the weights file changed, the compute precision differs (bf16 vs fp32)'."""
    parts = []
    for name in names:
        text = _WHAT.get(name, f"{name} differs")
        if stored is not None and wanted is not None and name in ("precision", "dtype", "model", "normalize", "decoder",
                                                                    "engine"):
            text += f" ({getattr(stored, name)} vs {getattr(wanted, name)})"
        elif stored is not None and wanted is not None and name == "image_size":
            text += f" ({stored.preprocess.crop} vs {wanted.preprocess.crop} pixels)"
        parts.append(text)
    return ", ".join(parts)


@dataclass(frozen=True)
class Verdict:
    """What a cache file means for a request: a hit, missing taps to add, or a conflict."""

    hit: bool
    missing_taps: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()


def verdict(stored: FeatureIdentity | None, stored_fingerprint: str | None, wanted: FeatureIdentity,
            fingerprint: str) -> Verdict:
    """The cache-hit rule: every component equal, the same images, and every requested tap present."""
    if stored is None:
        return Verdict(False, conflicts=("format",))
    conflicts = differences(stored, wanted) + (["fingerprint"] if stored_fingerprint != fingerprint else [])
    missing = tuple(t for t in wanted.taps if t not in stored.taps)
    return Verdict(not conflicts and not missing, missing_taps=missing, conflicts=tuple(conflicts))
