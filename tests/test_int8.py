"""--precision int8: NNCF post-training quantization calibrated on a seeded sample of the train split,
the sample's fingerprint in the identity, the quantized network kept once, one-line refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from extract.api import extract, plan
from extract.compute.calibration import CALIBRATION_IMAGES, Calibration
from extract.compute.engines import openvino_engine, resolve_engine
from extract.core.errors import UserError
from extract.registry.datasets import load_dataset

if not (openvino_engine.available() and openvino_engine.nncf_available()):
    pytest.skip('OpenVINO and NNCF are not installed (pip install -e ".[int8]")', allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MODEL = "cifar_resnet20.none"


def make_folder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                pixels[..., c] += 160
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.jpg", quality=90)
    return root


def _extract(cache, root, precision="int8", **kw):
    return extract(model=MODEL, data="imagefolder", root=str(root), cache_dir=cache, precision=precision,
                   batch_size=8, progress=False, engine="openvino", **kw)


def _read(path):
    with h5py.File(path, "r") as f:
        return (json.loads(f.attrs["identity"]), json.loads(f.attrs["provenance"]),
                f["features"]["penultimate"][:])


def test_int8_is_named_calibrated_on_train_kept_once_and_close_to_fp32(tmp_path):
    root = make_folder(tmp_path / "photos")
    q = _extract(tmp_path / "cache", root)
    f = _extract(tmp_path / "cache", root, precision="fp32")
    for split in ("train", "val"):
        assert q[split].path.name == f"{split}.int8.openvino.h5"
    identity, prov, feats = _read(q["train"].path)
    calibration = Calibration.of(load_dataset("imagefolder", root=str(root)).splits)
    assert identity["precision"] == "int8" and identity["calibration"] == calibration.fingerprint
    assert calibration.fingerprint.startswith("train:24:")            # 24 train images < CALIBRATION_IMAGES
    assert _read(f["train"].path)[0]["calibration"] is None
    int8_file = Path(prov["openvino"]["model_file"])
    assert "-int8-" in int8_file.name and int8_file.is_file() and int8_file.with_suffix(".bin").is_file()
    assert prov["openvino"]["int8"] == {"calibration": calibration.fingerprint, "quantized_now": True}
    assert _read(q["val"].path)[1]["openvino"]["int8"]["quantized_now"] is False   # the val split reused it
    ref = _read(f["train"].path)[2]
    cos = (feats * ref).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref, axis=1))
    assert feats.shape == ref.shape and cos.min() > 0.9 and not np.array_equal(feats, ref)
    assert _extract(tmp_path / "cache", root)["train"].status == "hit"


def test_the_calibration_sample_is_seeded_and_its_fingerprint_follows_the_images(tmp_path):
    splits = load_dataset("synthetic", n=CALIBRATION_IMAGES + 50).splits
    a, b = Calibration.of(splits), Calibration.of(splits)
    assert a.positions == b.positions and len(a.positions) == CALIBRATION_IMAGES
    assert list(a.positions) == sorted(a.positions) and a.positions != tuple(range(CALIBRATION_IMAGES))
    assert Calibration.of(splits, seed=1).positions != a.positions
    other = load_dataset("synthetic", n=CALIBRATION_IMAGES + 50, seed=1).splits
    assert Calibration.of(other).fingerprint != a.fingerprint
    assert Calibration.of({"test": splits["test"]}).fingerprint.startswith("test:")   # no train split


def test_changed_train_images_name_the_calibration_for_every_split(tmp_path):
    root = make_folder(tmp_path / "photos")
    _extract(tmp_path / "cache", root)
    before = plan(model=MODEL, data="imagefolder", root=str(root), precision="int8", engine="openvino").identity
    victim = root / "train" / "cat" / "000.jpg"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    after = plan(model=MODEL, data="imagefolder", root=str(root), precision="int8", engine="openvino").identity
    assert after.calibration != before.calibration
    r = subprocess.run([sys.executable, "-m", "extract", "--model", MODEL, "--data", "imagefolder", "--root", str(root),
                        "--precision", "int8", "--engine", "openvino", "--cache-dir", str(tmp_path / "cache"),
                        "--split", "val", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                       timeout=300)
    assert r.returncode == 2 and "the int8 calibration images differ" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_int8_needs_openvino_and_one_process(tmp_path):
    assert resolve_engine("auto", "cpu", "int8") == "openvino"
    with pytest.raises(UserError, match="add --engine openvino"):
        plan(model=MODEL, data="synthetic", precision="int8", engine="torch")
    with pytest.raises(UserError, match="drop --ray"):
        plan(model=MODEL, data="synthetic", precision="int8", engine="openvino", ray="local")
