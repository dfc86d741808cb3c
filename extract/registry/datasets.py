"""Dataset registry: a name (+ root and options) -> a Dataset of named ImageSource splits.

Sources hold either file paths (decoded lazily with `open_rgb`) or small uint8
arrays already in memory (CIFAR, STL-10, SVHN, MNIST, digits, synthetic), which
the engine can resize on the device in whole batches.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import numbers
import os
import pickle
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from extract.core.errors import UserError
from extract.store.identity import DataRef
from extract.registry.folders import list_classes, subdirs as folder_names
from extract.registry.images import ImageError, open_rgb

log = logging.getLogger(__name__)

__all__ = ["Dataset", "ImageSource", "ImageError", "list_datasets", "describe_datasets",
           "load_dataset", "DEFAULT_ROOT", "SPLIT_ORDER"]

DEFAULT_ROOT = "data"
SPLIT_ORDER = ("train", "val", "test")
_SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class ImageSource:
    """One split: labelled images held as file paths or as an (N, H, W, 3) uint8 array."""

    def __init__(self, name: str, classes: list[str], labels, *, paths: list[str] | None = None,
                 arrays: np.ndarray | None = None, root: str | None = None):
        if (paths is None) == (arrays is None):
            raise ValueError("give exactly one of paths or arrays")
        self.name = name
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = list(paths) if paths is not None else None
        self.arrays = arrays
        self.root = root
        if arrays is not None and (arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[-1] != 3):
            raise ValueError(f"arrays must be (N, H, W, 3) uint8, got {arrays.dtype} {arrays.shape}")
        if len(self.labels) != len(self):
            raise ValueError(f"{len(self.labels)} labels for {len(self)} images")

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.arrays)

    def __repr__(self) -> str:
        kind = "files" if self.paths is not None else f"arrays {self.arrays.shape[1:3]}"
        return f"ImageSource({self.name!r}, {len(self)} images, {len(self.classes)} classes, {kind})"

    def load(self, i: int) -> Image.Image:
        """Image `i` as RGB PIL; raises ImageError(path, reason) for an unreadable file."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i], "RGB")
        return open_rgb(self.paths[i])

    def subset(self, indices) -> "ImageSource":
        """A new source with the images at `indices` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.arrays is not None:
            return ImageSource(self.name, self.classes, self.labels[idx], arrays=self.arrays[idx])
        return ImageSource(self.name, self.classes, self.labels[idx],
                           paths=[self.paths[i] for i in idx], root=self.root)

    def fingerprint(self, stamps: np.ndarray | None = None) -> str:
        """sha256 hex of what identifies the content.

        Files: (path relative to the root, size, mtime_ns, label) per image, without reading
        the files (`stamps`: their (size, mtime_ns) when already known, see
        extract.store.incremental.stamps_of). Arrays: the array bytes and shape. Both include the
        labels and class names.
        """
        h = hashlib.sha256()
        h.update(repr(self.classes).encode())
        if self.arrays is not None:
            h.update(repr(self.arrays.shape).encode())
            h.update(np.ascontiguousarray(self.arrays).data)
            h.update(np.ascontiguousarray(self.labels).data)
            return h.hexdigest()
        if stamps is None:
            from extract.store.incremental import stamps_of

            stamps = stamps_of(self.paths)
        root = self.root or ""
        for path, label, (size, mtime) in zip(self.paths, self.labels.tolist(), stamps.tolist()):
            rel = os.path.relpath(path, root) if root else path
            h.update(f"{rel}\0{size}\0{mtime}\0{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


@dataclass
class Dataset:
    """A named dataset: class names, splits in train/val/test order, and a JSON-able identity."""

    name: str
    classes: list[str]
    splits: dict[str, ImageSource]
    identity: dict
    left_out: list[tuple[str, str]] = field(default_factory=list)   # (path, reason) not listed as images

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Dataset({self.name!r}, {len(self.classes)} classes, {sizes})"

    @property
    def ref(self) -> DataRef:
        """The dataset's part of a feature identity: name, folder (image folders only), options."""
        root = self.identity.get("root") if self.name == "imagefolder" else None
        return DataRef(self.name, root, tuple(sorted((self.identity.get("options") or {}).items())))


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., Dataset]
    description: str
    options: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {}


def _register(name: str, description: str, options: tuple[str, ...] = ()):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = _Entry(fn, description, options)
        return fn
    return deco


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def describe_datasets() -> dict[str, str]:
    """name -> one-line description, for --list-datasets."""
    return {name: _REGISTRY[name].description for name in list_datasets()}


def load_dataset(name: str, root: str | None = None, download: bool = False, **opts) -> Dataset:
    """Build the dataset `name`; UserError for unknown names, unknown options or missing files."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {n.replace("-", "").replace("_", ""): n for n in _REGISTRY}
    if key not in aliases:
        close = difflib.get_close_matches(name.lower(), list_datasets(), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"unknown dataset {name!r}{hint} (known: {', '.join(list_datasets())})")
    entry = _REGISTRY[aliases[key]]
    unknown = sorted(set(opts) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise UserError(f"dataset {aliases[key]!r} has no option {', '.join(unknown)} (options: {allowed})")
    return entry.loader(root=root, download=download, **opts)


def _ordered(splits: dict[str, ImageSource]) -> dict[str, ImageSource]:
    return {k: splits[k] for k in SPLIT_ORDER if k in splits}


# ---------------------------------------------------------------- imagefolder

@_register("imagefolder", "folder of class subfolders, optionally under train/val/validation/test (--root DIR)")
def _imagefolder(root=None, download=False) -> Dataset:
    if root is None:
        raise UserError("dataset imagefolder needs --root DIR (a folder of class folders, "
                        "or of train/val/test folders of class folders)")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise UserError(f"imagefolder root {root} is not a folder")
    subdirs = folder_names(root)
    split_dirs: dict[str, str] = {}
    for d in subdirs:
        split = _SPLIT_DIRS.get(d.lower())
        if split is None:
            continue
        if split in split_dirs:
            raise UserError(f"{root} has two folders for split {split!r}: "
                            f"{split_dirs[split]!r} and {d!r}")
        split_dirs[split] = d
    if not split_dirs:
        split_dirs = {"train": ""}  # the root's class folders are the one split

    listings = {split: list_classes(os.path.join(root, d)) for split, d in split_dirs.items()}
    left_out = [item for listing in listings.values() for item in listing.left_out]
    _warn_left_out(root, left_out)
    listed = {split: listing.classes for split, listing in listings.items()}
    classes = sorted({c for per_class in listed.values() for c in per_class})
    if not classes:
        raise UserError(f"no images found under {root}: expected {root}/<class>/<image> "
                        f"or {root}/train/<class>/<image> (extensions: jpg, png, ...)")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, per_class in listed.items():
        if not per_class:
            folder = os.path.join(root, split_dirs[split])
            raise UserError(f"split folder {folder} has no class folders with images in them")
        paths, labels = [], []
        for c in sorted(per_class):
            paths += per_class[c]
            labels += [index[c]] * len(per_class[c])
        splits[split] = ImageSource(split, classes, labels, paths=paths, root=root)
    return Dataset("imagefolder", classes, _ordered(splits),
                   {"name": "imagefolder", "root": root, "options": {}}, left_out)


def _warn_left_out(root: str, left_out: list[tuple[str, str]]) -> None:
    if left_out:
        shown = "; ".join(f"{os.path.relpath(p, root)}: {r}" for p, r in left_out[:3])
        log.warning(f"left out {len(left_out)} entr{'y' if len(left_out) == 1 else 'ies'} of {root} ({shown}"
                    + (" ..." if len(left_out) > 3 else "") + ")")


# ---------------------------------------------------------------- in-memory sets

@_register("digits", "scikit-learn's 1,797 8x8 handwritten digits as RGB, stratified 75/25 train/test")
def _digits(root=None, download=False) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    y = d.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    classes = [str(i) for i in range(10)]
    splits = {name: ImageSource(name, classes, y[np.sort(idx)], arrays=rgb[np.sort(idx)])
              for name, idx in (("train", train), ("test", test))}
    return Dataset("digits", classes, splits, {"name": "digits", "root": None, "options": {}})


@_register("synthetic", "tiny generated colour/stripe classes for tests (options n, size, classes, seed)",
           ("n", "size", "classes", "seed"))
def _synthetic(root=None, download=False, n: int = 64, size: int = 32, classes: int = 4,
               seed: int = 0) -> Dataset:
    n, size, k, seed = (_whole_number(name, v) for name, v in (("n", n), ("size", size), ("classes", classes),
                                                               ("seed", seed)))
    if n < 1 or size < 4 or k < 2:
        raise UserError("synthetic needs n >= 1, size >= 4 and classes >= 2")
    names = [f"class{i}" for i in range(k)]
    splits = {}
    for offset, split in enumerate(("train", "test")):
        rng = np.random.default_rng([seed, offset])
        labels = rng.permutation(np.arange(n) % k)
        splits[split] = ImageSource(split, names, labels, arrays=_synthetic_images(labels, size, k, rng))
    return Dataset("synthetic", names, splits,
                   {"name": "synthetic", "root": None,
                    "options": {"n": n, "size": size, "classes": k, "seed": seed}})


def _whole_number(name: str, value) -> int:
    """A dataset option that must be a whole number (given as one, or as its digits)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise UserError(f"dataset option {name} must be a whole number, got {value!r}")


def _synthetic_images(labels: np.ndarray, size: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Class c: a hue at angle c/k on the colour wheel, stripes at angle c*pi/k, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for i, c in enumerate(labels.tolist()):
        hue = 2 * np.pi * c / k
        colour = 0.5 + 0.35 * np.cos(hue + np.array([0.0, 2.094, 4.189], np.float32))
        theta = np.pi * c / k
        phase = rng.uniform(0, 2 * np.pi)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        img = colour * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 0.08, (size, size, 3))
        out[i] = np.rint(np.clip(img, 0, 1) * 255)
    return out


# ---------------------------------------------------------------- torchvision sets

def _tv_root(root) -> str:
    return os.path.abspath(os.fspath(root) if root is not None else DEFAULT_ROOT)


def _tv_build(title: str, expected: str, make: Callable[[], object], root: str, download: bool,
              hint: str = ""):
    """Construct one torchvision dataset, turning missing files or failed downloads into UserError."""
    try:
        return make()
    except RuntimeError as e:
        if download:
            raise UserError(f"could not download {title} into {root}: {e}") from None
        if "download" not in str(e).lower():
            raise UserError(f"{title} under {root} is unreadable: {e}") from None
        raise UserError(f"{title} not found: expected {os.path.join(root, expected)}; "
                        f"pass --download to fetch it into {root} (or --root DIR where it is){hint}") from None
    except OSError as e:  # URLError, HTTPError, socket errors while downloading; unreadable files
        if download:
            raise UserError(f"could not download {title} into {root}: {e}") from None
        raise UserError(f"could not read {title} under {root}: {e}") from None
    except (ValueError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise UserError(f"{title} under {root} is unreadable ({type(e).__name__}: {e}); "
                        "delete it and pass --download") from None


def _tv_dataset(name: str, classes: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                root: str) -> Dataset:
    srcs = {s: ImageSource(s, classes, y, arrays=x) for s, (x, y) in splits.items()}
    return Dataset(name, classes, _ordered(srcs), {"name": name, "root": root, "options": {}})


def _cifar(name, cls_name, title, expected, root, download):
    """CIFAR-10/100 from torchvision's python pickles; the JPEG folder layout is `imagefolder`."""
    import torchvision.datasets as tvd

    hint = f"; for {title} as JPEG class folders use --data imagefolder --root DIR"
    root = _tv_root(root)
    cls = getattr(tvd, cls_name)
    splits, classes = {}, None
    for split, train in (("train", True), ("test", False)):
        ds = _tv_build(title, expected, lambda: cls(root, train=train, download=download),
                       root, download, hint)
        splits[split] = (np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets))
        classes = list(ds.classes)
    return _tv_dataset(name, classes, splits, root)


@_register("cifar10", "CIFAR-10, 32x32, 10 classes, train 50k / test 10k (torchvision; --root, --download)")
def _cifar10(root=None, download=False) -> Dataset:
    return _cifar("cifar10", "CIFAR10", "CIFAR-10", "cifar-10-batches-py", root, download)


@_register("cifar100", "CIFAR-100, 32x32, 100 classes, train 50k / test 10k (torchvision; --root, --download)")
def _cifar100(root=None, download=False) -> Dataset:
    return _cifar("cifar100", "CIFAR100", "CIFAR-100", "cifar-100-python", root, download)


@_register("stl10", "STL-10, 96x96, 10 classes, train 5k / test 8k labelled (torchvision; --root, --download)")
def _stl10(root=None, download=False) -> Dataset:
    from torchvision.datasets import STL10

    root = _tv_root(root)
    splits, classes = {}, None
    for split in ("train", "test"):
        ds = _tv_build("STL-10", "stl10_binary", lambda: STL10(root, split=split, download=download),
                       root, download)
        splits[split] = (np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), np.asarray(ds.labels))
        classes = list(ds.classes)
    return _tv_dataset("stl10", classes, splits, root)


@_register("svhn", "SVHN digits, 32x32, train 73k / test 26k (torchvision; --root, --download)")
def _svhn(root=None, download=False) -> Dataset:
    from torchvision.datasets import SVHN

    root = _tv_root(root)
    splits = {}
    for split in ("train", "test"):
        ds = _tv_build("SVHN", f"{split}_32x32.mat", lambda: SVHN(root, split=split, download=download),
                       root, download)
        splits[split] = (np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), np.asarray(ds.labels))
    return _tv_dataset("svhn", [str(i) for i in range(10)], splits, root)


def _mnist_like(name, cls_name, title, root, download, classes=None):
    import torchvision.datasets as tvd

    root = _tv_root(root)
    cls = getattr(tvd, cls_name)
    splits = {}
    for split, train in (("train", True), ("test", False)):
        ds = _tv_build(title, os.path.join(cls_name, "raw"),
                       lambda: cls(root, train=train, download=download), root, download)
        grey = ds.data.numpy().astype(np.uint8)
        splits[split] = (np.repeat(grey[..., None], 3, axis=-1), ds.targets.numpy())
        classes = classes or list(ds.classes)
    return _tv_dataset(name, classes, splits, root)


@_register("mnist", "MNIST digits as RGB, 28x28, train 60k / test 10k (torchvision; --root, --download)")
def _mnist(root=None, download=False) -> Dataset:
    return _mnist_like("mnist", "MNIST", "MNIST", root, download, [str(i) for i in range(10)])


@_register("fashionmnist", "Fashion-MNIST as RGB, 28x28, train 60k / test 10k (torchvision; --root, --download)")
def _fashionmnist(root=None, download=False) -> Dataset:
    return _mnist_like("fashionmnist", "FashionMNIST", "Fashion-MNIST", root, download)
