"""bench/gpu.py, the device script, end to end at toy sizes on the CPU (--smoke): every step runs and the
report has what the GPU run will fill in. Its pytest step is left out here (it runs tests/test_cuda.py,
which this suite runs anyway); `python bench/gpu.py --smoke` runs it too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

KEYS = {
    "env": {"torch", "cuda", "cores", "auto_precision", "tf32_defaults", "default_workers", "sizes"},
    "memory": {"model", "precision", "pipeline_eager", "pure_forward_eager", "pipeline_over_pure"},
    "compile": {"pure_forward_compiled", "pipeline_compiled", "compiled_vs_eager_features", "pure_speedup",
                "pipeline_speedup_after_compile"},
    "jpeg": {"files", "from", "cores", "decode_only_tensor", "extract_tensor", "cuda_decoder_refused"},
    "accuracy": {"model", "weights", "cpu_fp32", "cpu_fp32-again", "cpu_fp32-again_vs_cpu_fp32"},
    "torchrun": {"process", "torchrun_1", "same_cache", "max_abs_diff", "runners"},
    "finetune": {"model", "precision", "epochs", "test_top1", "train_images"},
    "logreg": {"rows", "dims", "classes", "path", "gb"},
}


@pytest.mark.slow
def test_the_device_script_runs_every_step_at_toy_sizes_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--skip", "pytest",
                           "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    sections = report["sections"]
    assert report["smoke"] is True and list(sections) == list(KEYS)
    for name, keys in KEYS.items():
        assert sections[name]["status"] == "ok", (name, sections[name].get("error"))
        assert keys <= set(sections[name]), (name, keys - set(sections[name]))
        assert sections[name]["summary"] and sections[name]["seconds"] >= 0
    assert sections["memory"]["pipeline_eager"]["images"] == 72
    compiled = sections["compile"]
    pipeline = compiled["pipeline_compiled"]
    assert pipeline["graphs_compiled"] <= 1 and pipeline["compiled_batch"] == 32 and pipeline["short_last_batch"] == 8
    assert compiled["pure_forward_compiled"]["short_batch_recompiled"] is False
    assert compiled["compiled_vs_eager_features"]["cosine_min"] > 0.9999
    jpeg = sections["jpeg"]
    assert jpeg["extract_tensor"]["images"] == jpeg["decode_only_tensor"]["images"] == 40
    assert jpeg["cuda_decoder_refused"].startswith("--decoder cuda decodes JPEGs on a CUDA GPU")
    assert sections["torchrun"]["same_cache"] is True and sections["torchrun"]["runners"] == ["process", "torchrun"]
    assert [e["epoch"] for e in sections["finetune"]["epochs"]] == [1, 2]
    assert all(e["images_per_second"] > 0 for e in sections["finetune"]["epochs"])
    assert [p["C"] for p in sections["logreg"]["path"]] == [0.01, 1.0]
    text = (tmp_path / "gpu_report.txt").read_text()
    assert all(f"[ok] {name}" in text for name in KEYS)
    assert not list(Path(report["tmp"]).parent.glob(Path(report["tmp"]).name))   # the caches were removed


def test_without_a_gpu_the_full_run_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA GPU here")
    assert len(proc.stderr.strip().splitlines()) == 1
