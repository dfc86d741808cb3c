"""The torch heads on a CUDA GPU give what they give on the CPU (skipped without CUDA)."""

import h5py
import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from probe.heads.knn import KNNClassifier
from probe.heads.placement import place
from probe.heads.torch_logreg import TorchLogisticRegression

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _data():
    X, y = make_classification(n_samples=4000, n_features=64, n_informative=24, n_classes=10,
                               n_clusters_per_class=2, class_sep=1.5, random_state=0)
    return X.astype(np.float32), y


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_logreg_on_cuda_equals_cpu(C):
    X, y = _data()
    cpu = TorchLogisticRegression(C=C, device="cpu", tol=1e-6).fit(X, y)
    gpu = TorchLogisticRegression(C=C, device="cuda", tol=1e-6).fit(X, y)
    assert gpu.objective_ == pytest.approx(cpu.objective_, rel=1e-5)
    assert np.abs(gpu.coef_ - cpu.coef_).max() < 1e-2
    assert np.mean(gpu.predict(X) == cpu.predict(X)) >= 0.999


def test_streamed_features_held_on_the_gpu_equal_in_memory(tmp_path):
    X, y = _data()
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = X
    memory = TorchLogisticRegression(C=0.1, device="cuda").fit(X, y)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        streamed = TorchLogisticRegression(C=0.1, device="cuda", block_rows=333).fit(f["x"], y)
    assert streamed.objective_ == pytest.approx(memory.objective_, rel=1e-5)


def test_knn_on_cuda_equals_cpu():
    rng = np.random.default_rng(4)   # no exact ties among the top-200 similarities (see test_streaming)
    X, y = rng.normal(size=(2000, 48)).astype(np.float32), rng.integers(0, 6, 2000)
    query = rng.normal(size=(300, 48)).astype(np.float32)
    cpu = KNNClassifier(device="cpu").fit(X, y)
    gpu = KNNClassifier(device="cuda", bank_bytes=4 * 48 * 500).fit(X, y)
    assert np.array_equal(gpu.kneighbors(query, 200)[1], cpu.kneighbors(query, 200)[1])
    assert np.array_equal(gpu.predict(query), cpu.predict(query))


def test_auto_picks_torch_on_cuda():
    head = place("logreg")
    assert (head.solver, torch.device(head.device).type) == ("torch", "cuda")
