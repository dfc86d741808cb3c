"""finetune: learning, freezing, lr groups, exact resume, results in probe's report, bad input.

A tiny CIFAR ResNet-20 on the generated `synthetic` set keeps every run to a few seconds.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.core.errors import UserError
from extract.registry.models import build_network, load_backbone
from finetune import finetune
from finetune.checkpoint import LAST
from finetune.cli import main, resume_command
from finetune.model import Classifier, apply_freeze, param_groups
from finetune.train import Interrupted
from probe.output.report import collect_rows
from probe.output.results import load_results

from finetune_fixtures import MODEL, init_weights, one_thread  # noqa: F401 - fixtures
DATA = {"n": 32, "size": 16}
FAST = dict(dataset_options=DATA, batch_size=16, lr=0.05, warmup_epochs=0, progress=False)




def _run(tmp_path, **kwargs):
    args = {**FAST, "results_dir": tmp_path / "results", "runs_dir": tmp_path / "runs", **kwargs}
    return finetune(MODEL, "synthetic", **args)


def test_learns_a_tiny_task_above_chance_and_writes_a_result(tmp_path):
    out = _run(tmp_path, from_scratch=True, epochs=2, optimizer="adamw", lr=1e-3, batch_size=8,
               dataset_options={"n": 48, "size": 16})
    r = out.result
    assert r["kind"] == "finetune" and r["head"] == "scratch-none" and r["layer"] == "penultimate"
    assert r["model"] == f"{MODEL}.none" and r["schema"] == "featprobe.result/1"
    assert r["identity"]["model"] == r["model"] and r["precision"] == r["identity"]["precision"]
    assert r["metrics"]["top1"] > 0.5  # 4 classes: chance is 0.25
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert set(r["history"][0]) >= {"epoch", "train_loss", "train_top1", "val_loss", "val_top1", "lr", "seconds"}
    assert r["schedule"]["name"] == "cosine" and r["epochs"] == 2
    assert r["sizes"] == {"train": 40, "val": 8, "test": 48}
    assert "stratified 20% of train" in r["validation"] and r["test_split"] == "test"
    best = max(r["history"], key=lambda h: (h["val_top1"], -h["val_loss"]))["epoch"]
    assert r["best_epoch"] == best
    assert json.loads(out.path.read_text())["head"] == "scratch-none"
    assert out.curves.is_file() and out.curves.stat().st_size > 1000
    assert (out.run_dir / "last.pt").is_file() and (out.run_dir / "best.pt").is_file()


def _snapshot(model):
    """The model's tensors on the CPU (the run may be on a GPU; torch.equal needs one device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec, frozen_prefixes", [
    ("backbone", ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")),
    ("until:layer3", ("conv1.", "bn1.", "layer1.", "layer2.")),
])
def test_frozen_tensors_stay_bit_identical_and_the_rest_trains(tmp_path, init_weights, spec, frozen_prefixes):
    init = torch.load(init_weights)
    snaps = {}
    out = _run(tmp_path, weights=str(init_weights), freeze=spec, epochs=2, head_lr_mult=5.0,
               on_epoch_end=lambda epoch, row, model: snaps.__setitem__(epoch, _snapshot(model)))
    final = snaps[2]
    assert out.result["head"] == f"finetune-{spec.replace(':', '-')}"
    n_frozen = 0
    for key, value in final.items():
        name = key.removeprefix("net.")
        if name.startswith(frozen_prefixes):
            n_frozen += 1
            assert torch.equal(value, init[name]), f"frozen {name} changed"
            assert torch.equal(snaps[1][key], init[name])
        elif name.startswith("linear."):
            assert not torch.equal(value, snaps[1][key]), f"head {name} did not train"
        elif not name.endswith("num_batches_tracked"):
            assert not torch.equal(value, init[name]), f"trainable {name} did not change"
    assert n_frozen > 10
    saved = torch.load(out.run_dir / LAST, weights_only=True)["optimizer"]["param_groups"]
    lrs = {g["name"]: g["initial_lr"] for g in saved}
    assert lrs["head"] == pytest.approx(0.05 * 5.0)
    if spec.startswith("until"):
        assert lrs["backbone"] == pytest.approx(0.05)
    else:
        assert all(name.startswith("head") for name in lrs)
    # the run is a row of probe's report
    assert [r["kind"] for r in load_results(tmp_path / "results")] == ["finetune"]
    rows = collect_rows(tmp_path / "results")
    assert rows[0]["head"] == out.result["head"] and rows[0]["model"].startswith("cifar_resnet20.tiny-")
    assert rows[0]["fit_s"] > 0 and 0 <= rows[0]["top1"] <= 1


def test_head_lr_mult_and_no_decay_groups():
    bb = load_backbone(MODEL, weights="none")
    model = Classifier(bb.net, bb.head_path, bb.dims["penultimate"], 3)
    apply_freeze(model, "until:layer3", bb.module_for)
    groups = {g["name"]: g for g in param_groups(model, lr=0.1, weight_decay=1e-4, head_lr_mult=10)}
    assert set(groups) == {"backbone", "backbone-no-decay", "head", "head-no-decay"}
    assert groups["head"]["lr"] == pytest.approx(1.0) and groups["backbone"]["lr"] == pytest.approx(0.1)
    assert groups["head"]["params"][0] is model.head.weight
    assert groups["head-no-decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 1e-4
    trained = {id(p) for g in groups.values() for p in g["params"]}
    assert id(model.net.layer3[0].conv1.weight) in trained and id(model.net.layer2[0].conv1.weight) not in trained


def test_until_a_parameter_free_tap_starts_at_the_layer_feeding_it():
    # VGG16's fc6 tap is the ReLU after classifier.0: until:fc6 trains fc6, fc7 and the new layer.
    with torch.device("meta"):
        bb_net = build_network("vgg16")
    from extract.registry.models import PENULTIMATE, get_spec, measure_dims
    spec = get_spec("vgg16")
    model = Classifier(bb_net, spec.head_path, measure_dims(spec, [PENULTIMATE])[PENULTIMATE], 5)
    apply_freeze(model, "until:fc6", lambda tap: bb_net.get_submodule(spec.taps[tap]))
    trained = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad})
    assert trained == ["net.classifier.0", "net.classifier.3", "net.classifier.6"]


def test_resume_after_an_interrupt_reproduces_the_uninterrupted_run(tmp_path, init_weights, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    common = dict(weights=str(init_weights), epochs=2, label_smoothing=0.1, warmup_epochs=1)
    whole = _run(tmp_path / "whole", **common)

    def stop(epoch, row, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        _run(tmp_path / "split", on_epoch_end=stop, **common)
    assert info.value.epochs_done == 1
    with pytest.raises(UserError, match="--resume"):
        _run(tmp_path / "split", **common)
    with pytest.raises(UserError, match="settings differ"):
        _run(tmp_path / "split", resume=True, **{**common, "label_smoothing": 0.0})
    resumed = _run(tmp_path / "split", resume=True, **common)
    assert any(r.name == "finetune.checkpoint" and "after epoch 1 of 2" in r.getMessage() for r in caplog.records)
    a = torch.load(whole.run_dir / LAST, weights_only=True)   # tensors and plain data only
    b = torch.load(resumed.run_dir / LAST, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k not in ("seconds", "images_per_second")}
                     for h in b["history"]]
    assert whole.result["metrics"] == resumed.result["metrics"]
    b["format"] = 1   # a checkpoint from before the torch schedulers cannot be continued
    torch.save(b, resumed.run_dir / LAST)
    with pytest.raises(UserError, match="older version"):
        _run(tmp_path / "split", resume=True, **common)


def test_a_checkpoint_from_another_device_resumes_with_a_warning(tmp_path, caplog):
    # a run checkpointed on a GPU (or, the other way, on the CPU and resumed on a GPU, which raised
    # KeyError 'device'): weights, optimizer and schedule continue; the device RNG cannot, and it says so
    def stop(epoch, row, model):
        if epoch == 1:
            raise KeyboardInterrupt

    common = dict(weights="none", epochs=2, precision="fp32", device="cpu")
    with pytest.raises(Interrupted):
        _run(tmp_path, on_epoch_end=stop, **common)
    last = next((tmp_path / "runs").rglob(LAST))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["rng"]["device_type"] == "cpu" and "device" not in ckpt["rng"]
    ckpt["rng"].update(device_type="cuda", device=torch.zeros(16, dtype=torch.uint8))
    torch.save(ckpt, last)
    caplog.set_level(logging.INFO, logger="finetune")
    out = _run(tmp_path, resume=True, **common)
    assert [h["epoch"] for h in out.result["history"]] == [1, 2]
    assert any("resuming on cpu a run checkpointed on cuda" in r.getMessage() for r in caplog.records)
    assert "tf32" not in out.result["provenance"]


class _WritesMarker:
    """Unpickling it creates a file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    first = _run(tmp_path, weights="none", epochs=1, precision="fp32")
    proof = tmp_path / "proof.pt"
    torch.save(_WritesMarker(tmp_path / "unsafe-load-ran"), proof)
    torch.load(proof, weights_only=False)
    assert (tmp_path / "unsafe-load-ran").exists(), "the crafted file does run code when fully unpickled"
    marker = tmp_path / "ran"
    torch.save({"format": 3, "epoch": 0, "config": {"epochs": 1}, "model": _WritesMarker(marker)},
               first.run_dir / LAST)
    with pytest.raises(UserError, match=r"cannot read checkpoint .*last\.pt \(Unsupported global: GLOBAL "
                                        r".*--no-resume starts over$") as info:
        _run(tmp_path, weights="none", epochs=1, precision="fp32", resume=True)
    assert "\n" not in str(info.value) and not marker.exists()
    again = _run(tmp_path, weights="none", epochs=1, precision="fp32")   # the default: start over, saying why
    assert not marker.exists() and again.result["epochs"] == 1
    assert any("cannot read checkpoint" in r.getMessage() and r.getMessage().endswith("starting over")
               for r in caplog.records if r.levelno == logging.WARNING)
    assert torch.load(again.run_dir / LAST, weights_only=True)["epoch"] == 1


def _global_rng():
    state = [random.getstate(), np.random.get_state(), torch.get_rng_state()]
    return state + ([torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [])


def _same_rng(a, b):
    return a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1])) and torch.equal(a[2], b[2]) \
        and all(torch.equal(x, y) for x, y in zip(a[3:], b[3:]))


def test_runs_are_seeded_and_leave_the_callers_random_state_alone(tmp_path):
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = _global_rng()
    first = _run(tmp_path / "a", weights="none", epochs=1, precision="fp32")
    assert _same_rng(before, _global_rng())
    torch.manual_seed(8)   # another caller state: the same run all the same
    random.random()
    second = _run(tmp_path / "b", weights="none", epochs=1, precision="fp32")
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    third = _run(tmp_path / "c", weights="none", epochs=1, precision="fp32", seed=1)
    assert not torch.equal(first.model.head.weight, third.model.head.weight)


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), colour).save(path)


def test_image_folder_skips_unreadable_training_images(tmp_path, init_weights, caplog):
    root = tmp_path / "pets"
    for split, n in (("train", 6), ("val", 3)):
        for c, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
            for i in range(n):
                _png(root / split / c / f"{i}.png", colour)
    (root / "train" / "cats" / "broken.png").write_bytes(b"not a png")
    out = finetune(MODEL, "imagefolder", root=str(root), weights=str(init_weights), epochs=1, batch_size=4,
                   workers=0, results_dir=tmp_path / "results", runs_dir=tmp_path / "runs", progress=False)
    from extract.api import plan
    identity = plan(MODEL, "imagefolder", root=str(root), weights=str(init_weights)).identity
    assert out.path.parent == identity.results_dir(tmp_path / "results", "penultimate"), \
        "image-folder results sit beside probe's, under the same identity"
    assert out.path.parts[-4].startswith("pets-")
    r = out.result
    # 13 train files, one per class carved off for validation; the broken one is a training row
    assert r["skipped"] == {"train": 1, "val": 0, "test": 0}
    assert r["sizes"]["train"] == 10 and r["sizes"]["val"] == 2
    assert r["test_split"] == "val" and "no test split" in r["validation"]
    assert r["sizes"]["test"] == 6
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 unreadable train image" in warned[0].getMessage()
    assert "broken.png" in warned[0].getMessage()


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet5O"], "unknown model"),
    (["--data", "cifar11"], "unknown dataset"),
    (["--freeze", "until:layer9"], "layer1, layer2, layer3"),
    (["--freeze", "partly"], "none | backbone | until:<layer>"),
    (["--weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
    (["--epochs", "0"], "--epochs"),
    (["--data", "imagefolder", "--root", "/nonexistent", "--option", "n=1"], "has no option n"),
    (["--resume"], "nothing to resume"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, argv, message):
    base = ["--model", MODEL, "--weights", "none", "--data", "synthetic", "--option", "n=16",
            "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_resume_command_repeats_the_arguments():
    cmd = resume_command(["--model", "resnet18", "--root", "my data", "--no-resume"])
    assert cmd == "python -m finetune --model resnet18 --root 'my data' --resume"


def test_cli_runs_end_to_end(tmp_path, capsys, init_weights):
    argv = ["--model", MODEL, "--weights", str(init_weights), "--data", "synthetic", "--option", "n=24",
            "--option", "size=8", "--epochs", "1", "--batch-size", "8", "--freeze", "backbone", "--sched", "step",
            "--optimizer", "adamw", "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs"),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = load_results(tmp_path / "r")[0]
    m = result["metrics"]
    assert f"finetune-backbone: test top-1 {100 * m['top1']:.2f}%, balanced {100 * m['balanced_accuracy']:.2f}%" in out
    assert "test: the dataset's own 'test' split" in out and f"wrote {result['_path']}" in out
    assert result["hyperparameters"]["optimizer"] == "adamw" and result["schedule"]["name"] == "step"
    assert np.isclose(result["hyperparameters"]["lr"], 1e-4)
