"""The torch heads on a CUDA GPU give what they give on the CPU (skipped without CUDA)."""

import logging

import h5py
import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from extract import load_features
from extract.api import extract
from extract.compute.engine import Embedder, resolve_device, resolve_precision
from extract.compute.pipeline import DecodedFiles, SourceBatches, resolve_decoder
from extract.core.errors import UserError
from extract.store.preprocess import Preprocess
from probe.heads.device import resolve_device as probe_device
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


# --- extraction and fine-tuning on the GPU (the decisions themselves: tests/test_gpu_logic.py) ---------

def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively():
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert resolve_precision("auto", torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)


def test_a_gpu_beyond_those_seen_is_one_line():
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == probe_device(f"cuda:{n - 1}") == torch.device(f"cuda:{n - 1}")
    for resolve in (resolve_device, probe_device):
        with pytest.raises(UserError, match=f"device cuda:{n} asked for, but this process sees {n} GPU"):
            resolve(f"cuda:{n}")


def test_out_of_gpu_memory_in_the_on_device_resize_is_one_line():
    from test_gpu_logic import _Flat
    embedder = Embedder(_Flat(), torch.device("cuda"), None, Preprocess(resize=10 ** 6, crop=10 ** 6))
    with pytest.raises(UserError, match=r"^out of CUDA memory at a batch of 4 images: rerun the same command with "
                                        r"--batch-size 2"):
        embedder(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))


def test_fp32_on_cuda_is_ieee_fp32_and_matches_the_cpu(tmp_path):
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    req = dict(model="cifar_resnet20", weights="none", data="synthetic", dataset_options={"n": 64},
               splits=["train"], precision="fp32", progress=False, batch_size=16)
    gpu = load_features(extract(**req, device="cuda", cache_dir=tmp_path / "gpu")["train"].path)
    cpu = load_features(extract(**req, device="cpu", cache_dir=tmp_path / "cpu")["train"].path)
    assert gpu.meta["provenance"]["tf32"] is False and "tf32" not in cpu.meta["provenance"]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags   # restored
    assert np.abs(gpu.X - cpu.X).max() <= 1e-4 * np.abs(cpu.X).max()   # TF32 would be ~1e-3


def test_jpegs_decoded_on_the_gpu_match_the_cpu_decoder(tmp_path):
    from test_gpu_decode import _files
    from test_fastcpu import PRE, _source
    files = _files(tmp_path)
    names = list(files)
    source = _source(list(files.values()))
    (x, positions, reasons), = SourceBatches(source, PRE, [list(range(len(names)))], decoder="cuda",
                                             device=torch.device("cuda"), pin=True)
    assert x.device.type == "cuda" and positions.tolist() == list(range(len(names)))
    cpu = DecodedFiles(source, PRE, decoder="tensor")
    for k, name in enumerate(names):
        want, _, reason = cpu[k]
        assert reasons[k] == reason, name
        diff = (x[k].cpu().int() - want.int()).abs().float()
        if name in ("plain", "grey"):   # nvJPEG's IDCT and the GPU's resize: within a few levels
            assert diff.mean() < 3, (name, float(diff.mean()))
        else:                           # decoded on the CPU: the same pixels
            assert diff.max() == 0, name
    with pytest.raises(UserError, match="not with --device cpu"):
        resolve_decoder("cuda", torch.device("cpu"))


def test_a_run_checkpointed_on_the_cpu_resumes_on_cuda(tmp_path, caplog):
    from finetune import finetune
    from finetune.train import Interrupted

    def stop(epoch, row, model):
        if epoch == 1:
            raise KeyboardInterrupt

    args = dict(weights="none", dataset_options={"n": 32, "size": 16}, batch_size=16, lr=0.05, warmup_epochs=0,
                epochs=2, precision="fp32", progress=False, results_dir=tmp_path / "results",
                runs_dir=tmp_path / "runs")
    with pytest.raises(Interrupted):
        finetune("cifar_resnet20", "synthetic", device="cpu", on_epoch_end=stop, **args)
    caplog.set_level(logging.INFO, logger="finetune")
    out = finetune("cifar_resnet20", "synthetic", device="cuda", resume=True, **args)
    assert [h["epoch"] for h in out.result["history"]] == [1, 2] and out.result["provenance"]["tf32"] is False
    assert any("resuming on cuda a run checkpointed on cpu" in r.getMessage() for r in caplog.records)
