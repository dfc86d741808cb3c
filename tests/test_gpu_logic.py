"""The CUDA branches' decisions, checked on the CPU: auto precision by compute capability, cuda:N beyond the
GPUs, one GPU per torchrun rank, IEEE fp32, out of memory before the forward, non-finite features, the
mean/std kept on the device, a CPU checkpoint resumed elsewhere. The same paths on a GPU: tests/test_cuda.py
and bench/gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from extract.compute.engine import (Collect, Embedder, check_finite, check_gpu_index, cuda_auto_precision,
                                    ieee_fp32, resolve_device, run, tf32_provenance)
from extract.core.errors import UserError
from extract.registry.datasets import ImageSource
from extract.run.runners.torchrun import TorchrunRunner, rank_device
from extract.store.preprocess import Preprocess, scaled_mean_std
from finetune.runtime import rng_state, saved_device_type, set_rng_state

CPU = torch.device("cpu")


@pytest.mark.parametrize("capability, dtype", [((6, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                               ((12, 1), torch.bfloat16)])
def test_auto_precision_on_a_gpu_wants_native_bf16(capability, dtype):
    # torch.cuda.is_bf16_supported() is True on a T4 (7.5) too, where bf16 is emulated
    assert cuda_auto_precision(capability) == dtype


def test_a_gpu_index_beyond_those_seen_is_one_line():
    check_gpu_index("cuda:1", 1, 2)
    check_gpu_index("cuda", None, 1)
    for name, index, count, have in (("cuda:1", 1, 1, "1 GPU (cuda:0)"), ("cuda:8", 8, 8, "8 GPUs (cuda:0 to cuda:7)"),
                                     ("cuda:0", 0, 0, "no GPU")):
        with pytest.raises(UserError, match=rf"device {name} asked for, but this process sees {re_escape(have)}"):
            check_gpu_index(name, index, count)


def re_escape(text: str) -> str:
    import re
    return re.escape(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_devices_without_cuda_are_one_line():
    from probe.heads.device import resolve_device as probe_device
    for name in ("cuda", "cuda:3"):
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(name)
        with pytest.raises(UserError, match="CUDA is not available"):
            probe_device(name)


@pytest.mark.parametrize("requested, local_rank, local_world, gpus, expected", [
    ("auto", 1, 2, 2, "cuda:1"), ("cuda", 0, 2, 4, "cuda:0"), ("auto", 1, 2, 0, "cpu"), ("cpu", 1, 2, 2, "cpu"),
    ("cuda:3", 0, 1, 4, "cuda:3"),   # one rank per node (several nodes): the GPU asked for
])
def test_each_torchrun_rank_takes_its_own_gpu(requested, local_rank, local_world, gpus, expected):
    assert rank_device(requested, local_rank, local_world, gpus) == expected


@pytest.mark.parametrize("requested, local_world, gpus, message", [
    ("auto", 2, 1, "torchrun started 2 ranks on this node, which has 1 GPU: one GPU per rank, so use "
                   "--nproc-per-node 1"),
    ("cuda", 8, 4, "which has 4 GPUs"),
    ("cuda:0", 2, 2, "--device cuda:0 under torchrun would put the 2 ranks of this node on one GPU"),
    ("cuda", 2, 0, "CUDA is not available"),
])
def test_more_ranks_than_gpus_is_one_line_on_every_rank(requested, local_world, gpus, message):
    for rank in range(local_world):
        with pytest.raises(UserError, match=re_escape(message)):
            rank_device(requested, rank, local_world, gpus)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torchrun_asked_for_cuda_without_it_stops_before_joining_the_group(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="CUDA is not available"):
        TorchrunRunner("cuda")
    assert not torch.distributed.is_initialized()


def test_fp32_on_cuda_turns_tf32_off_and_restores_it():
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    saved = flags()
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with ieee_fp32(torch.device("cuda"), None):
            assert flags() == (False, False)
        assert flags() == (True, True)
        with ieee_fp32(torch.device("cuda"), torch.bfloat16), ieee_fp32(CPU, None):
            assert flags() == (True, True)
        with pytest.raises(KeyError), ieee_fp32(torch.device("cuda:0"), None):
            raise KeyError
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert tf32_provenance(torch.device("cuda"), None) == {"tf32": False}
    assert tf32_provenance(torch.device("cuda"), torch.bfloat16) == tf32_provenance(CPU, None) == {}


class _Flat(nn.Module):
    """A backbone stand-in: flatten, one linear layer, {'penultimate': (B, 4)}."""

    def __init__(self, scale: float = 1.0, size: int = 8):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, 4)
        nn.init.constant_(self.fc.weight, scale)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return {"penultimate": self.fc(x.flatten(1))}


def test_out_of_memory_while_resizing_on_the_device_is_the_one_line_message():
    # the resize to 1e8 x 1e8 pixels fails to allocate before the forward (the CPU allocator's error here,
    # torch.OutOfMemoryError on a GPU); both are the batch-size hint, not a traceback
    embedder = Embedder(_Flat(), CPU, None, Preprocess(resize=10 ** 8, crop=10 ** 8))
    with pytest.raises(UserError, match=r"^out of CPU memory at a batch of 6 images: rerun the same command with "
                                        r"--batch-size 3"):
        embedder(torch.zeros(6, 3, 8, 8, dtype=torch.uint8))


def test_other_runtime_errors_are_not_called_out_of_memory():
    embedder = Embedder(_Flat(size=4), CPU, None, Preprocess(resize=8, crop=8))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        embedder(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def _run(precision, scale, n=5):
    arrays = np.full((n, 8, 8, 3), 255, np.uint8)
    source = ImageSource("train", ["a"], np.zeros(n, np.int64), arrays=arrays)
    sink = Collect()
    stats = run(Embedder(_Flat(scale), CPU, precision, Preprocess(resize=8, crop=8)), source, sink,
                [[0, 1], [2, 3], [4]], progress=False)
    return stats, sink


def test_fp16_features_that_overflow_are_refused_before_they_are_written():
    # 192 inputs of about 2.2 times 300: about 1.3e5, beyond fp16's 65504 (finite in fp32 and bf16)
    stats, sink = _run(None, 300.0)
    assert stats.images == 5 and np.isfinite(np.concatenate([r["penultimate"] for r in sink.rows])).all()
    _, sink = _run(torch.bfloat16, 300.0)
    assert len(sink.rows) == 3
    with pytest.raises(UserError, match=r"^fp16 features overflowed to inf/NaN in 2 of 2 images \(penultimate\): "
                                        r"this network exceeds fp16's range; use --precision bf16 or fp32"):
        _run(torch.float16, 300.0)


def test_non_finite_features_at_any_precision_are_refused():
    with pytest.raises(UserError, match=r"non-finite features \(inf/NaN\) in 2 of 2 images \(penultimate\) at fp32"):
        _run(None, float("inf"))
    check_finite({"a": np.ones((3, 2), np.float32), "b": np.zeros((0, 4), np.float32)})
    bad = np.ones((4, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(UserError, match=r"in 1 of 4 images \(b\); nothing of this batch was written"):
        check_finite({"a": np.ones((4, 2), np.float32), "b": bad})


def test_mean_and_std_are_built_once_per_device():
    pre = Preprocess(resize=8, crop=8, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))
    x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    first = scaled_mean_std(pre.mean, pre.std, x.device)
    with torch.inference_mode():
        out = pre.normalize(x)
    assert scaled_mean_std(pre.mean, pre.std, torch.device("cpu")) is first
    assert not first[0].is_inference() and not first[0].requires_grad
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[1.0, 1.5, 3.5]] * 2))


def test_a_checkpoint_from_the_cpu_resumes_on_a_gpu_without_its_device_rng(caplog):
    state = rng_state(CPU)
    assert saved_device_type(state) == "cpu"
    # the CPU state restores everything it has; the GPU's own (seeded) RNG is left as it is
    assert set_rng_state(state, torch.device("cuda")) is False
    assert set_rng_state(state, CPU) is True
    older = {k: v for k, v in state.items() if k != "device_type"}   # saved before device_type was recorded
    assert saved_device_type(older) == "cpu" and saved_device_type({**older, "device": None}) == "cuda"
    assert set_rng_state(older, torch.device("mps")) is False
