"""finetune's defaults (the small-data recipe) and the frozen probe every run is measured against.

The end-to-end test trains a tiny CIFAR ResNet-20 on scikit-learn's real digits at 8x8 pixels.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace

import pytest
import torch

from extract.cli import main as extract_main
from extract.run.plan import plan
from extract.run.request import ExtractRequest
from finetune.baseline import compare, hint, probe_command, probe_results
from finetune.cli import main, parser
from finetune.config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, TrainConfig
from probe.cli import main as probe_main
from probe.output.results import SCHEMA, load_results

from finetune_fixtures import MODEL, init_weights, one_thread  # noqa: F401 - fixtures
TEST = {"split": "test", "rows": 8, "carved": None, "description": "the dataset's own 'test' split, 8 rows"}




def test_defaults_are_the_small_data_recipe_and_help_states_them():
    c = TrainConfig()
    assert (c.optimizer, c.epochs, c.sched, c.warmup_epochs, c.freeze) == ("sgd", 5, "cosine", 1, "none")
    assert c.learning_rate == DEFAULT_LR["sgd"] == 1e-3 and c.decay == DEFAULT_WEIGHT_DECAY["sgd"] == 1e-4
    assert c.momentum == 0.9 and c.head_lr_mult is None
    assert DEFAULT_LR["adamw"] == 1e-4 and DEFAULT_WEIGHT_DECAY["adamw"] == 0.05
    args = parser().parse_args([])
    for name in ("optimizer", "epochs", "batch_size", "sched", "warmup_epochs", "momentum", "freeze",
                 "label_smoothing", "val_fraction", "test_fraction", "split_seed", "seed", "lr", "weight_decay",
                 "head_lr_mult"):
        assert getattr(args, name) == getattr(c, name), name
    text = " ".join(parser().format_help().split())
    for said in ("training rows (default: 5)", "sgd (with --momentum) or adamw (default: sgd)",
                 "(default: sgd 0.001, adamw 0.0001)", "weight decay (default: sgd 0.0001, adamw 0.05)",
                 "(default: 10, or 1 for random init)", "(default: cosine)", "warmup epochs (default: 1)",
                 "optimizer step (default: 32)", "SGD momentum (default: 0.9)"):
        assert said in text, said


def _write_probe(results, identity, top1, test=TEST, head="logreg", layer="penultimate"):
    folder = identity.results_dir(results, layer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{head}.json"
    path.write_text(json.dumps({"schema": SCHEMA, "kind": "probe", "head": head, "layer": layer,
                                "identity": identity.to_dict(), "metrics": {"top1": top1}, "test": test}))
    return path


def test_the_best_matching_probe_is_compared_and_others_are_left_out(tmp_path):
    ident = plan(ExtractRequest(model=MODEL, data="synthetic", weights="none", dataset_options={"n": 16})).identity
    results = tmp_path / "results"
    searched = str(results / ident.data.label / ident.model)
    none = compare(0.8, ident, TEST, results, "CMD")
    assert none == {"found": 0, "best": None, "probe_better": None, "command": "CMD", "searched": searched}
    assert hint(none, 0.8) == f"no frozen-probe result for this model and data in {searched}; the cheaper " \
                              "baseline to compare with:\n  CMD"
    _write_probe(results, ident, 0.7)
    _write_probe(results, replace(ident, precision="fp32", precision_requested="fp32"), 0.85,
                 head="svm")                                                  # computed otherwise: counts
    _write_probe(results, replace(ident, image_size=8), 0.99, head="knn")     # other pixels: left out
    _write_probe(results, ident, 0.99, head="rf", test={**TEST, "split": "val"})   # other test rows: left out
    entry = compare(0.8, ident, TEST, results, "CMD")
    assert entry["found"] == 2 and entry["best"]["head"] == "svm" and entry["best"]["top1"] == 0.85
    assert entry["probe_better"] is True and entry["margin"] == pytest.approx(0.05)
    line = hint(entry, 0.8)
    assert line.startswith("the frozen probe scored higher on the same test rows: svm on penultimate 85.00%")
    assert "vs 80.00% fine-tuned" in line and "better choice" in line
    assert compare(0.9, ident, TEST, results, "CMD")["probe_better"] is False
    assert "is 5.00 points above the frozen probe" in hint(compare(0.9, ident, TEST, results, "CMD"), 0.9)
    assert "ties the frozen probe" in hint(compare(0.85, ident, TEST, results, "CMD"), 0.85)
    assert len(probe_results(ident, TEST, results)) == 2


def test_the_suggested_command_carries_the_test_carve_and_input_size():
    c = TrainConfig(model="resnet18", data="imagefolder", root="my photos", image_size=160, precision="fp32",
                    test_fraction=0.25, split_seed=3)
    cmd = probe_command(c, carved=True)
    assert cmd == ("python -m extract --model resnet18 --data imagefolder --root 'my photos' --image-size 160 "
                   "--precision fp32 && python -m probe --head logreg --model resnet18 --data 'my photos' "
                   "--image-size 160 --precision fp32 --test-fraction 0.25 --split-seed 3")
    assert "--test-fraction" not in probe_command(c, carved=False)
    assert probe_command(c.replace(results_dir="elsewhere"), carved=False).endswith(
        "--precision fp32 --results-dir elsewhere")
    assert "--weights none" in probe_command(TrainConfig(from_scratch=True), carved=False)


def test_defaults_on_real_digits_then_the_suggested_probe_is_found(tmp_path, monkeypatch, capsys, init_weights):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", MODEL, "--weights", str(init_weights), "--data", "digits", "--image-size", "8",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (r,) = load_results("results")
    c = TrainConfig()
    # the param groups: backbone at the optimizer's default lr, the new layer x10, no decay on 1-D tensors
    groups = {g["name"]: g for g in r["param_groups"]}
    base = DEFAULT_LR[c.optimizer]
    assert set(groups) == {"backbone", "backbone-no-decay", "head", "head-no-decay"}
    assert groups["backbone"]["lr"] == pytest.approx(base) and groups["head"]["lr"] == pytest.approx(10 * base)
    assert groups["head-no-decay"]["lr"] == pytest.approx(10 * base)
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == DEFAULT_WEIGHT_DECAY[c.optimizer]
    assert groups["backbone-no-decay"]["weight_decay"] == groups["head-no-decay"]["weight_decay"] == 0
    assert groups["head"]["parameters"] == 64 * 10 and r["hyperparameters"]["optimizer"] == c.optimizer
    # the schedule: one epoch of linear warmup to the base lr, then cosine to zero over the remaining steps
    s = r["schedule"]
    spe, epochs = s["steps_per_epoch"], c.epochs
    assert (s["name"], s["unit"], s["epochs"]) == ("cosine", "optimizer step", epochs) and spe >= 30
    assert s["warmup_steps"] == spe and s["total_steps"] == epochs * spe
    cosine = [base * 0.5 * (1 + math.cos(math.pi * (e - 1) / (epochs - 1))) for e in range(1, epochs + 1)]
    assert [h["lr"] for h in r["history"]] == pytest.approx(cosine, abs=1e-12)
    assert r["metrics"]["top1"] > 0.2   # 10 classes; the small default lr suits real pretrained weights
    # no probe of these features yet: the output says how to make one
    entry = r["frozen_probe"]
    assert entry["found"] == 0 and f"no frozen-probe result for this model and data in {entry['searched']}" in out
    assert entry["searched"].startswith("results")
    assert entry["command"] in out
    extract_cmd, probe_cmd = entry["command"].split(" && ")
    assert extract_cmd.startswith("python -m extract ") and "--image-size 8" in extract_cmd
    assert extract_main(shlex.split(extract_cmd)[3:] + ["--no-progress"]) == 0
    assert probe_main(shlex.split(probe_cmd)[3:] + ["--no-progress"]) == 0
    capsys.readouterr()
    (probe,) = [x for x in load_results("results") if x["kind"] == "probe"]
    # a run that learns nothing now meets the higher probe, and says so
    assert main(argv + ["--epochs", "1", "--lr", "1e-9"]) == 0
    out = capsys.readouterr().out
    (r,) = [x for x in load_results("results") if x["kind"] == "finetune"]
    entry = r["frozen_probe"]
    assert entry["found"] == 1 and entry["best"]["head"] == "logreg" and entry["command"] is None
    assert entry["best"]["top1"] == probe["metrics"]["top1"] > r["metrics"]["top1"] and entry["probe_better"]
    assert "the frozen probe scored higher on the same test rows: logreg on penultimate" in out
