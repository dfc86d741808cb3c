"""The places featprobe grows by: a new engine or runner is one class and one registration."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from extract import load_features
from extract.api import extract, plan
from extract.cli import parser
from extract.compute.engine import Embedder, RunStats
from extract.compute.engines import Engine, engine_names, register_engine, resolve_engine, unregister_engine
from extract.core.errors import UserError
from extract.run.runners import Runner, register_runner, runner_names, unregister_runner
from extract.run.runners.base import compute_here
from extract.store.modelref import ModelRef

TINY = {"model": "cifar_resnet20", "weights": "none", "progress": False, "precision": "fp32", "device": "cpu",
        "data": "synthetic", "dataset_options": {"n": 40}}


class Float64Embedder(Embedder):
    """The torch embedder computing in float64: a different engine with (nearly) the same features."""

    def __init__(self, backbone, context):
        super().__init__(backbone.double(), context.device, None, context.preprocess)

    def __call__(self, x):
        with torch.inference_mode():
            from extract.compute.pipeline import to_model_input

            out = self.backbone(to_model_input(x, self.preprocess, self.device).double())
        return {k: v.float() for k, v in out.items()}

    def provenance(self):
        return {"float64": True}


class Float64Engine(Engine):
    name = "float64"

    def build(self, backbone, context):
        return Float64Embedder(backbone, context)


@pytest.fixture
def float64_engine():
    register_engine(Float64Engine())
    yield
    unregister_engine("float64")


def test_a_registered_engine_is_a_cli_choice_and_part_of_the_identity(tmp_path, float64_engine):
    assert "float64" in engine_names() and resolve_engine("float64") == "float64"
    assert parser().parse_args(["--engine", "float64"]).engine == "float64"
    res = extract(cache_dir=tmp_path, engine="float64", splits=["train"], **TINY)
    X, _, meta = load_features(res["train"].path)
    assert meta["identity"].engine == "float64" and res["train"].path.name == "train.fp32.float64.h5"
    assert meta["provenance"]["float64"] is True
    plain = extract(cache_dir=tmp_path, splits=["train"], **TINY)["train"].path
    X32 = load_features(plain).X
    assert plain != res["train"].path                      # never mixed with torch's features
    np.testing.assert_allclose(X, X32, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="unknown engine 'float32'"):
        plan(cache_dir=tmp_path, engine="float32", **TINY)


def test_engine_names_are_registered_once(float64_engine):
    with pytest.raises(ValueError, match="already registered"):
        register_engine(Float64Engine())
    with pytest.raises(ValueError, match="reserved"):
        register_runner("auto", lambda request: ThreadsRunner())


class ThreadsRunner(Runner):
    """Two threads, each with its own copy of the backbone, computing every other chunk of a split."""

    name = "threads"

    def compute(self, job, work, chunks):
        copies = [dataclasses.replace(work, backbone=work.plan.load_backbone(work.identity.taps)) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            parts = list(pool.map(lambda own, part: compute_here(job, own, part, 0, 1), copies,
                                  [chunks[0::2], chunks[1::2]]))
        return RunStats(sum(s.images for s in parts), max(s.seconds for s in parts),
                        sorted(x for s in parts for x in s.skipped), parts[0].provenance)


@pytest.fixture
def threads_runner():
    register_runner("threads", lambda request: ThreadsRunner())
    yield
    unregister_runner("threads")


def test_a_registered_runner_gives_the_same_cache_bit_for_bit(tmp_path, threads_runner):
    assert "threads" in runner_names()
    assert parser().parse_args(["--runner", "threads"]).runner == "threads"
    ours = extract(cache_dir=tmp_path / "threads", runner="threads", chunk_rows=8, **TINY)
    plain = extract(cache_dir=tmp_path / "plain", chunk_rows=8, **TINY)
    for split in ("train", "test"):
        a, b = load_features(ours[split].path), load_features(plain[split].path)
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.meta["index"], b.meta["index"])
        assert a.meta["provenance"]["runner"] == "threads" and b.meta["provenance"]["runner"] == "process"
        assert a.meta["identity"] == b.meta["identity"]
    with pytest.raises(UserError, match="unknown runner 'thread'"):
        extract(cache_dir=tmp_path / "x", runner="thread", **TINY)


@pytest.mark.parametrize("text, weights, arch, choice", [
    ("resnet50", "default", "resnet50", "default"),
    ("resnet50.swav", "default", "resnet50", "swav"),
    ("resnet50", "swav", "resnet50", "swav"),
    ("resnet50.swav", "SWAV", "resnet50", "swav"),
    ("cifar_resnet20=ckpt/resnet20-12fca82f.th", "default", "cifar_resnet20", "ckpt/resnet20-12fca82f.th"),
    ("cifar_resnet20", None, "cifar_resnet20", "none"),
])
def test_one_parser_reads_every_spelling_of_a_model(text, weights, arch, choice):
    ref = ModelRef.parse(text, weights)
    assert (ref.arch, ref.weights) == (arch, choice)


def test_a_tag_in_the_name_and_another_weights_flag_are_refused_by_name():
    with pytest.raises(UserError, match="already names weights 'swav'"):
        ModelRef.parse("resnet50.swav", "dino")


def test_model_filters_match_the_spellings_of_one_cache():
    assert ModelRef.parse("resnet50").same_model("resnet50")
    assert ModelRef.parse("resnet50.IMAGENET1K_V2").same_model("resnet50", "IMAGENET1K_V2")
    assert not ModelRef.parse("resnet50").same_model("resnet50.swav", "swav")
    assert ModelRef.parse("resnet50.swav").same_model("resnet50.swav", "swav")
    assert not ModelRef.parse("resnet50.dino").same_model("resnet50.swav", "swav")
