"""finetune's parts without training: schedules, augmentation, batches, split rules, freeze specs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from extract.registry.datasets import Dataset, ImageSource, load_dataset
from extract.core.errors import UserError
from extract.store.preprocess import Preprocess
from finetune.data import SplitLoader, augment_params, crop_params
from finetune.model import Classifier, apply_freeze, parse_freeze, set_train_mode
from finetune.schedule import describe, lr_scale, make_scheduler, step_milestones
from finetune.splits import plan_splits
from probe.protocol.splits import carve, validation_mask


def _lrs(name, epochs, steps_per_epoch, warmup_epochs, base=(0.1,)):
    """Each group's lr before every optimizer step, and after the last one."""
    params = [nn.Parameter(torch.zeros(1)) for _ in base]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base)], lr=base[0])
    sched = make_scheduler(opt, name=name, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    out.append([g["lr"] for g in opt.param_groups])
    return np.array(out), sched


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    lrs, _ = _lrs("cosine", epochs=4, steps_per_epoch=10, warmup_epochs=1)
    lr = lrs[:, 0]
    assert lr[:10] == pytest.approx([0.1 * (s + 1) / 11 for s in range(10)])
    assert lr[10] == pytest.approx(0.1)
    assert np.all(np.diff(lr[10:]) < 0)
    assert lr[25] == pytest.approx(0.05)          # half way through the cosine part
    assert lr[-2] < 0.001 and lr[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_without_warmup_starts_at_the_base_lr():
    lrs, _ = _lrs("cosine", epochs=2, steps_per_epoch=5, warmup_epochs=0)
    assert lrs[0, 0] == pytest.approx(0.1) and lrs[5, 0] == pytest.approx(0.05) and lrs[-1, 0] == pytest.approx(0)


def test_step_schedule_decays_tenfold_at_half_and_three_quarters_of_the_steps():
    assert step_milestones(8, 5) == [20, 30]
    lrs, _ = _lrs("step", epochs=8, steps_per_epoch=5, warmup_epochs=0)
    assert lrs[:20, 0] == pytest.approx([0.1] * 20)
    assert lrs[20:30, 0] == pytest.approx([0.01] * 10)
    assert lrs[30:, 0] == pytest.approx([0.001] * 11)
    lrs, _ = _lrs("step", epochs=8, steps_per_epoch=5, warmup_epochs=2)
    assert lrs[0, 0] == pytest.approx(0.1 / 11) and lrs[10:20, 0] == pytest.approx([0.1] * 10)
    assert lrs[20, 0] == pytest.approx(0.01) and lrs[30, 0] == pytest.approx(0.001)
    assert step_milestones(4, 5, warmup_epochs=2) == [15], "a milestone inside the warmup is dropped"
    assert describe(name="step", epochs=8, steps_per_epoch=5, warmup_epochs=0, base_lr=0.1)["milestones"] == [20, 30]


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_scheduler_keeps_the_ratio_between_param_groups_and_resumes_exactly(name):
    lrs, _ = _lrs(name, epochs=4, steps_per_epoch=3, warmup_epochs=1, base=(0.1, 1.0))
    assert lrs[:, 1] == pytest.approx(10 * lrs[:, 0])
    # stop after 5 steps, rebuild optimizer + scheduler from their state dicts, continue
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]

    def build():
        opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 1.0}], lr=0.1)
        return opt, make_scheduler(opt, name=name, epochs=4, steps_per_epoch=3, warmup_epochs=1)

    opt, sched = build()
    for _ in range(5):
        opt.step()
        sched.step()
    saved = torch.load(_roundtrip(opt.state_dict(), sched.state_dict()), weights_only=True)
    opt, sched = build()
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    assert sched.last_epoch == 5 and lr_scale(sched) == pytest.approx(lrs[5, 0] / 0.1)
    resumed = []
    for _ in range(7):
        resumed.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    resumed.append([g["lr"] for g in opt.param_groups])
    assert np.array_equal(np.array(resumed), lrs[5:])


def _roundtrip(*objects):
    buf = io.BytesIO()
    torch.save(objects, buf)
    buf.seek(0)
    return buf


def test_crops_stay_inside_the_image_and_follow_the_key():
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (20, 90), (300, 7)):
        for _ in range(50):
            top, left, ch, cw = crop_params(rng, h, w)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    assert augment_params(0, 1, 5, 32, 32) == augment_params(0, 1, 5, 32, 32)
    draws = {augment_params(0, epoch, 5, 32, 32) for epoch in range(10)}
    assert len(draws) == 10


def _source(n=12, size=8):
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:, :, : size // 2] = 255          # left half white, right half black
    return ImageSource("train", ["a", "b"], np.arange(n) % 2, arrays=x)


def test_device_augmentation_crops_flips_and_is_reproducible():
    pre = Preprocess(resize=16, crop=16, mean=(0, 0, 0), std=(1 / 255,) * 3)   # normalise = identity
    src = _source()
    loader = SplitLoader(src, np.arange(12), preprocess=pre, train=True, batch_size=5, seed=3)
    loader.set_epoch(1)
    first = [b.x.clone() for b in loader]
    again = [b.x for b in loader]
    assert [tuple(x.shape) for x in first] == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    loader.set_epoch(2)
    assert not all(torch.equal(a, b.x) for a, b in zip(first, loader))
    # every image is a crop of a white|black split: flipped ones are dark on the left
    rows = np.concatenate(loader.batches())
    x = torch.cat([b.x for b in loader])
    for img, index in zip(x, rows):
        flip = augment_params(3, 2, int(index), 8, 8)[4]
        left, right = img[0, :, :2].mean(), img[0, :, -2:].mean()
        assert (left < right) if flip else (left >= right)


def test_eval_batches_are_in_order_and_unaugmented():
    pre = Preprocess(resize=8, crop=8, mean=(0, 0, 0), std=(1 / 255,) * 3)
    src = _source(n=7)
    batches = list(SplitLoader(src, np.arange(7), preprocess=pre, train=False, batch_size=3))
    assert torch.equal(torch.cat([b.y for b in batches]), torch.from_numpy(src.labels))
    assert torch.equal(batches[0].x[0], torch.from_numpy(src.arrays[0]).permute(2, 0, 1).float())


def test_a_trailing_single_image_batch_is_dropped_only_in_training():
    pre = Preprocess(resize=8, crop=8)
    src = _source(n=11)
    assert [len(b) for b in SplitLoader(src, np.arange(11), preprocess=pre, train=True, batch_size=5).batches()] \
        == [5, 5]
    assert [len(b) for b in SplitLoader(src, np.arange(11), preprocess=pre, train=False, batch_size=5).batches()] \
        == [5, 5, 1]


def test_split_rules_match_probe():
    ds = load_dataset("synthetic", n=20)
    plan = plan_splits(ds, seed=0)
    mask = validation_mask(np.arange(20), ds.splits["train"].labels, seed=0)
    assert np.array_equal(plan.val.indices, np.flatnonzero(mask))
    assert np.array_equal(plan.train.indices, np.flatnonzero(~mask)) and plan.test_split == "test"
    own_val = Dataset("x", ds.classes, {"train": ds.splits["train"], "val": ds.splits["test"],
                                        "test": ds.splits["test"]}, {})
    plan = plan_splits(own_val)
    assert len(plan.train.indices) == 20 and plan.val.source is ds.splits["test"] and "own 'val'" in plan.validation
    train_val = Dataset("x", ds.classes, {"train": ds.splits["train"], "val": ds.splits["test"]}, {})
    plan = plan_splits(train_val)
    assert plan.test_split == "val" and plan.test.source is ds.splits["test"] and len(plan.val.indices) == 4
    only_train = Dataset("x", ds.classes, {"train": ds.splits["train"]}, {})
    plan = plan_splits(only_train, seed=3, split_seed=1, test_fraction=0.25)
    test, val = carve(np.arange(20), ds.splits["train"].labels, seed=3, test_fraction=0.25, split_seed=1)
    assert plan.test_split == "train" and plan.test.source is ds.splits["train"]
    assert np.array_equal(plan.test.indices, np.flatnonzero(test)) and len(plan.test.indices) == 4    # 1 of each class of 5
    assert np.array_equal(plan.val.indices, np.flatnonzero(val))
    parts = [set(p.indices) for p in (plan.train, plan.val, plan.test)]
    assert sum(map(len, parts)) == 20 and len(set.union(*parts)) == 20
    assert plan.describe_test()["description"] == "25% of train carved by split seed 1, 4 rows"
    moved = plan_splits(only_train, seed=4, split_seed=1, test_fraction=0.25)
    assert np.array_equal(moved.test.indices, plan.test.indices)    # the validation seed never moves test
    with pytest.raises(UserError, match="--test-fraction"):
        plan_splits(only_train, test_fraction=1.0)


@pytest.mark.parametrize("spec", ["", "until:", "backbone:x", "everything"])
def test_bad_freeze_specs(spec):
    with pytest.raises(UserError, match="until:<layer>"):
        parse_freeze(spec)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Identity()

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))))


def test_frozen_batchnorm_keeps_its_running_stats():
    model = Classifier(_Tiny(), "fc", 4, 2)
    frozen = apply_freeze(model, "until:block", model.net.get_submodule)
    assert frozen >= {"net.stem", "net.stem.0", "net.stem.1"} and "net.block.1" not in frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model, frozen)
    assert not model.net.stem[1].training and model.net.block[1].training and model.training
    model(torch.randn(4, 3, 9, 9)).sum().backward()
    after = model.state_dict()
    assert torch.equal(before["net.stem.1.running_mean"], after["net.stem.1.running_mean"])
    assert not torch.equal(before["net.block.1.running_mean"], after["net.block.1.running_mean"])
    assert model.net.stem[0].weight.grad is None and model.net.block[0].weight.grad is not None


def test_frozen_part_computes_fixed_features_while_the_rest_trains():
    model = Classifier(_Tiny(), "fc", 4, 2)
    model.net.stem.append(nn.Dropout(0.5))
    model.net.block.append(nn.Dropout(0.5))
    frozen = apply_freeze(model, "until:block", model.net.get_submodule)
    set_train_mode(model, frozen)
    x = torch.randn(4, 3, 9, 9)
    assert torch.equal(model.net.stem(x), model.net.stem(x)), "no dropout in the frozen stem"
    h = model.net.stem(x)
    assert not torch.equal(model.net.block(h), model.net.block(h)), "the trained block still uses dropout"


def _registry_taps():
    from extract.registry.models import get_spec, list_models
    return [(name, tap) for name in list_models() for tap in get_spec(name).taps]


@pytest.mark.slow
@pytest.mark.parametrize("name, tap", _registry_taps())
def test_every_registry_tap_is_a_valid_freeze_point(name, tap):
    from extract.registry.models import build_network, get_spec
    spec = get_spec(name)
    try:
        with torch.device("meta"):   # shapes only, no memory
            net = build_network(name)
    except NotImplementedError:      # an init that reads tensor values
        net = build_network(name)
    from extract.registry.models import PENULTIMATE, measure_dims
    model = Classifier(net, spec.head_path, measure_dims(spec, [PENULTIMATE])[PENULTIMATE], 3, embed=spec.embed)
    apply_freeze(model, f"until:{tap}", lambda t: model.net.get_submodule(spec.taps[t]))
    assert all(p.requires_grad for p in model.head.parameters())
    tapped = model.net.get_submodule(spec.taps[tap])
    first = next(model.parameters())
    if any(p is first for p in tapped.parameters()):   # e.g. VGG's pool5 is the whole convolutional trunk
        assert all(p.requires_grad for p in model.parameters())
        return
    flags = [p.requires_grad for p in model.parameters()]
    assert flags[0] is False and sum(flags) > 2, "the first layer is frozen, the tapped layer onward trains"
    if any(True for _ in tapped.parameters()):
        assert all(p.requires_grad for p in tapped.parameters())
