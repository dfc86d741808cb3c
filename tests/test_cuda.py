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
    """The same neighbours up to ties: two rows whose similarities to a query agree within float error
    may come in either order (the GPU sums in another order), and at the k-th place either may be kept."""
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(2000, 48)).astype(np.float32), rng.integers(0, 6, 2000)
    query = rng.normal(size=(300, 48)).astype(np.float32)
    cpu = KNNClassifier(device="cpu").fit(X, y)
    gpu = KNNClassifier(device="cuda", bank_bytes=4 * 48 * 500).fit(X, y)
    cpu_s, cpu_i = cpu.kneighbors(query, 200)
    gpu_s, gpu_i = gpu.kneighbors(query, 200)
    np.testing.assert_allclose(gpu_s, cpu_s, atol=1e-5)   # rank by rank, the same similarities
    exact = _unit(query.astype(np.float64)) @ _unit(X.astype(np.float64)).T
    rows, ranks = np.nonzero(gpu_i != cpu_i)
    swapped = np.abs(exact[rows, gpu_i[rows, ranks]] - exact[rows, cpu_i[rows, ranks]])
    assert (swapped < 1e-5).all(), f"neighbours differ beyond ties: {swapped.max()}"
    same = (gpu_i == cpu_i).all(axis=1)
    assert same.mean() > 0.9
    assert np.array_equal(gpu.predict(query)[same], cpu.predict(query)[same])


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_auto_picks_torch_on_cuda():
    head = place("logreg")
    assert (head.solver, torch.device(head.device).type) == ("torch", "cuda")
