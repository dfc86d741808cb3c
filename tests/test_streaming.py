"""Features larger than memory: k-NN over a streamed bank, where heads run, and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.core.errors import UserError
from probe.cli import main
from probe.heads.device import cuda_available
from probe.heads.catalog import KNN_K
from probe.heads.knn import KNNClassifier, cosine_topk, l2_normalize
from probe.heads.placement import IN_MEMORY_COPIES, available_memory, memory_for, place
from probe.output.headfile import load_head
from probe.protocol.rows import Rows
from probe_helpers import toy_cache


def _todays_topk(train, query, k, chunk_bytes=128 * 1024 * 1024):
    """probe.heads.knn.cosine_topk as it was before streaming: the whole bank, query chunks, torch on the CPU."""
    k = min(k, len(train))
    bank = torch.from_numpy(np.ascontiguousarray(train))
    rows = max(1, chunk_bytes // (4 * max(1, len(train))))
    sims, idx = np.empty((len(query), k), np.float32), np.empty((len(query), k), np.int64)
    for start in range(0, len(query), rows):
        s, i = (torch.from_numpy(np.ascontiguousarray(query[start:start + rows])) @ bank.T).topk(k, dim=1)
        sims[start:start + rows], idx[start:start + rows] = s.numpy(), i.numpy()
    return sims, idx


@pytest.fixture
def bank(tmp_path):
    rng = np.random.default_rng(4)   # a seed whose top-200 similarities have no exact ties
    X, y = rng.normal(size=(2000, 48)).astype(np.float32), rng.integers(0, 6, 2000)
    query = rng.normal(size=(300, 48)).astype(np.float32)
    with h5py.File(tmp_path / "bank.h5", "w") as f:
        f["x"] = X
    return X, y, query, tmp_path / "bank.h5"


def test_knn_streamed_bank_equals_todays_in_memory_path(bank):
    X, y, query, path = bank
    want_s, want_i = _todays_topk(l2_normalize(X), l2_normalize(query), 200)
    assert np.all(np.diff(want_s, axis=1) < 0), "the data must have no tied similarities"
    got_s, got_i = cosine_topk(l2_normalize(X), l2_normalize(query), 200, device="cpu")
    assert np.array_equal(got_s, want_s) and np.array_equal(got_i, want_i)
    with h5py.File(path, "r") as f:
        for bank_rows in (97, 700, 2000):   # several bank blocks, a ragged last one, one block
            s, i = cosine_topk(f["x"], l2_normalize(query), 200, device="cpu", bank_bytes=4 * 48 * bank_rows)
            assert np.array_equal(i, want_i)
            assert np.allclose(s, want_s, atol=1e-6)
    memory = KNNClassifier(device="cpu").fit(X, y)
    streamed = KNNClassifier(device="cpu", bank_bytes=4 * 48 * 333).fit(Rows.of(path, "x"), y)
    for k in KNN_K:
        memory.set_params(n_neighbors=k)
        streamed.set_params(n_neighbors=k)
        assert np.array_equal(streamed.predict(query), memory.predict(query))
        assert np.allclose(streamed.predict_proba(query), memory.predict_proba(query), atol=1e-6)


def test_knn_streams_a_subset_view_and_survives_pickling(bank):
    import pickle
    X, y, query, path = bank
    keep = np.arange(len(y)) % 4 != 0
    memory = KNNClassifier(device="cpu").fit(X[keep], y[keep])
    streamed = pickle.loads(pickle.dumps(KNNClassifier(device="cpu", bank_bytes=4 * 48 * 250)
                                         .fit(Rows.of(path, "x")[keep], y[keep])))
    assert np.array_equal(streamed.kneighbors(query, 50)[1], memory.kneighbors(query, 50)[1])


def test_solver_placement_rules():
    assert place("logreg", device="cpu").solver == "sklearn"
    streamed = place("logreg", device="cpu", streamed=True)
    assert (streamed.solver, streamed.device, streamed.scales_itself) == ("torch", "cpu", True)
    assert place("logreg", solver="torch", device="cpu").build(C=2.0).C == 2.0
    assert place("knn", device="cpu", streamed=True).build().device == "cpu"
    with pytest.raises(UserError, match="needs the features in memory.*--head logreg --solver torch or --head knn"):
        place("svm", streamed=True)
    with pytest.raises(UserError, match="--solver sklearn needs the features in memory"):
        place("logreg", solver="sklearn", streamed=True)
    with pytest.raises(UserError, match="applies only to --head logreg"):
        place("knn", solver="torch")
    with pytest.raises(UserError, match="unknown device"):
        place("logreg", solver="torch", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        place("logreg", solver="torch", device="cuda")
    assert place("logreg").solver == "sklearn"   # auto picks the CPU and scikit-learn here


@pytest.mark.skipif(cuda_available(), reason="needs a machine without CUDA")
def test_choosing_sklearn_does_not_import_torch():
    code = "import sys; from probe.heads.placement import place; print(place('logreg').solver, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert out.split() == ["sklearn", "False"]


def test_memory_estimate_counts_every_split(tmp_path):
    files = toy_cache(tmp_path, splits=("train", "val", "test"), n_classes=3, dim=16, n_per_class=40)
    rows = sum(len(h5py.File(p, "r")["labels"]) for p in files.values())
    memory = memory_for(files, max_memory_gb=1.0)
    assert memory.need == IN_MEMORY_COPIES * rows * 16 * 4
    assert memory.fits and not memory_for(files, max_memory_gb=1e-6).fits
    assert available_memory() > 0


def run_cli(args, capsys):
    code = main([str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[-1], lines[-1]


def test_solver_is_recorded_in_the_result(tmp_path, capsys):
    toy_cache(tmp_path / "cache", n_classes=4, dim=20, n_per_class=50)
    for solver in ("sklearn", "torch"):
        code, out, err = run_cli(["--head", "logreg", "--solver", solver, "--device", "cpu", "--cache-dir",
                                  tmp_path / "cache", "--results-dir", tmp_path / solver, "--no-save"], capsys)
        assert code == 0, err
        result = json.loads(next((tmp_path / solver).glob("**/logreg.json")).read_text())
        assert (result["solver"], result["device"], result["streamed"]) == (solver, "cpu", False)
        assert result["metrics"]["top1"] > 0.9
        assert ("logreg (torch on cpu):" in out) == (solver == "torch")


def test_solver_torch_with_another_head_is_one_error_line(tmp_path, capsys):
    code, out, err = run_cli(["--head", "svm", "--solver", "torch", "--cache-dir", tmp_path], capsys)
    one_error_line(code, err, "--solver torch applies only to --head logreg", "svm")


def test_in_memory_heads_refuse_features_larger_than_memory(tmp_path, capsys):
    toy_cache(tmp_path / "cache")
    code, out, err = run_cli(["--head", "svm", "--max-memory", "1e-6", "--cache-dir", tmp_path / "cache",
                              "--results-dir", tmp_path / "r"], capsys)
    one_error_line(code, err, "svm needs the features in memory (about", "MB", "--head logreg --solver torch",
                   "--head knn")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("splits", [("train", "test"), ("train", "val", "test")])
def test_streamed_run_matches_in_memory_run(tmp_path, capsys, splits):
    toy_cache(tmp_path / "cache", splits=splits, n_classes=4, dim=20, n_per_class=60)
    results = {}
    for name, extra in (("memory", []), ("streamed", ["--max-memory", "1e-6"])):
        for head, solver in (("logreg", "torch"), ("knn", "auto")):
            code, out, err = run_cli(["--head", head, "--solver", solver, "--device", "cpu", *extra,
                                      "--cache-dir", tmp_path / "cache", "--results-dir", tmp_path / name], capsys)
            assert code == 0, err
            assert ("streaming them from the cache" in err) == (name == "streamed")
            path = next((tmp_path / name).glob(f"**/{head}.json"))
            results[name, head] = json.loads(path.read_text()), path
    with h5py.File(next((tmp_path / "cache").glob("**/test.h5")), "r") as f:
        X, y = f["features/penultimate"][()], f["labels"][()]
    for head in ("logreg", "knn"):
        (memory, memory_path), (streamed, path) = results["memory", head], results["streamed", head]
        assert streamed["streamed"] and not memory["streamed"]
        assert streamed["hyperparameters"] == memory["hyperparameters"]
        assert streamed["metrics"]["top1"] == memory["metrics"]["top1"]
        assert streamed["sizes"] == memory["sizes"]
        # saved heads load again; the streamed knn head reads its bank from the cache file
        pipe, _ = load_head(path.with_suffix(".skops"))
        assert np.mean(pipe.predict(X) == y) == pytest.approx(streamed["metrics"]["top1"])
        assert np.array_equal(pipe.predict(X), load_head(memory_path.with_suffix(".skops"))[0].predict(X))
