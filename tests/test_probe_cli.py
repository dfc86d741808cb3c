"""Command line: a full run, --head all, --report, and one clear error line (exit 2) for bad input."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.store.cache import partial_path
from probe.cli import main
from probe_helpers import blobs, toy_cache, write_split

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *words):
    """Exit 2 and one `error:` line, the last on stderr (progress notes may precede it)."""
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    for w in words:
        assert w in lines[-1], lines[-1]


def test_default_picks_newest_extraction_and_writes_results(tmp_path, capsys):
    toy_cache(tmp_path / "cache", splits=("train", "test"), dataset="older", model="m1")
    toy_cache(tmp_path / "cache", splits=("train", "val"), dataset="newer", model="m2")
    code, out, err = run_cli(["--head", "svm", "--cache-dir", tmp_path / "cache", "--results-dir",
                              tmp_path / "results", "--no-progress"], capsys)
    assert code == 0, err
    assert "newest complete extraction" in err and "newer" in err
    assert "no test split" in out  # train+val only: val is the test split, and we say so
    folder = tmp_path / "results" / "newer" / "m2" / "penultimate"
    result = json.loads((folder / "svm.json").read_text())
    assert result["metrics"]["top1"] >= 0.95 and result["test_split"] == "val"
    assert (folder / "svm.skops").exists() and (folder / "svm.skops.json").exists()


def test_explicit_selection_and_all_heads(tmp_path, capsys):
    toy_cache(tmp_path / "cache", splits=("train", "test"), dataset="a", model="m1")
    toy_cache(tmp_path / "cache", splits=("train", "test"), dataset="b", model="m1")
    code, out, err = run_cli(["--head", "all", "--data", "a", "--model", "m1", "--cache-dir", tmp_path / "cache",
                              "--results-dir", tmp_path / "results", "--no-progress", "--no-save"], capsys)
    assert code == 0, err
    folder = tmp_path / "results" / "a" / "m1" / "penultimate"
    assert sorted(p.stem for p in folder.glob("*.json")) == ["knn", "linear", "logreg", "rf", "svm", "svm-rbf"]
    assert (folder / "comparison.png").stat().st_size > 0
    table = out[out.index("head "):]
    assert all(h in table for h in ("linear", "logreg", "svm-rbf", "rf", "knn"))
    code, out, err = run_cli(["--report", "--format", "csv", "--results-dir", tmp_path / "results"], capsys)
    assert code == 0 and out.startswith("kind,head,dataset,model,layer,precision,dtype,variant,top1,balanced_acc,macro_f1,fit_s")
    assert len(out.strip().splitlines()) == 7
    assert (tmp_path / "results" / "report.md").exists() and (tmp_path / "results" / "report.png").exists()


def test_features_flags(tmp_path, capsys):
    paths = toy_cache(tmp_path / "cache", splits=("train", "test"))
    code, out, err = run_cli(["--features", paths["train"], "--test-features", paths["test"], "--head", "knn",
                              "--results-dir", tmp_path / "r", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "toy" / "tinynet" / "penultimate" / "knn.json").exists()


def _bad(tmp_path, kind):
    """A cache folder broken in one way; returns extra CLI args."""
    c = tmp_path / "cache"
    if kind == "missing":
        return ["--cache-dir", tmp_path / "nothing"]
    if kind == "partial":
        paths = toy_cache(c, splits=("train", "test"))
        paths["test"].rename(partial_path(paths["test"]))
        with h5py.File(partial_path(paths["test"]), "a") as f:
            f.attrs["complete"] = False
        return ["--features", paths["train"], "--test-features", paths["test"]]
    if kind == "models":
        a = toy_cache(c, splits=("train",), model="m1")["train"]
        b = toy_cache(c, splits=("test",), model="m2")["test"]
        return ["--features", a, "--test-features", b]
    if kind == "dims":
        a = toy_cache(c, splits=("train",), dim=16)["train"]
        X, y = blobs(10, 3, 8)
        b = write_split(c, "test", X, y)
        return ["--features", a, "--test-features", b]
    X, y = blobs(20, 3, 8)
    Xt, yt = blobs(10, 3, 8, seed=1)
    if kind == "nan":
        X[3, 2] = np.nan
    if kind == "inf":
        Xt[0, 0] = np.inf
    if kind == "one-class":
        y[:] = 1
    if kind == "empty":
        Xt, yt = Xt[:0], yt[:0]
    write_split(c, "train", X, y, classes=["a", "b", "c"])
    write_split(c, "test", Xt, yt, classes=["a", "b", "c"])
    return ["--cache-dir", c]


@pytest.mark.parametrize("kind,words", [
    ("missing", ["no complete feature cache"]), ("partial", ["incomplete"]), ("models", ["different extractions", "model or weights differ"]),
    ("dims", ["different dimensions"]), ("nan", ["NaN or inf"]), ("inf", ["NaN or inf", "test"]),
    ("one-class", ["only one class"]), ("empty", ["empty"])])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, kind, words):
    args = _bad(tmp_path, kind)
    code, out, err = run_cli(["--head", "linear", "--results-dir", tmp_path / "r", "--no-progress", *args], capsys)
    assert_user_error(code, err, *words)


def test_unknown_head_suggests(tmp_path, capsys):
    code, out, err = run_cli(["--head", "logistic", "--cache-dir", tmp_path], capsys)
    assert_user_error(code, err, "unknown head", "logreg")


def test_bad_flag_is_one_line(capsys):
    code, out, err = run_cli(["--grid", "huge"], capsys)
    assert_user_error(code, err, "--grid")


def test_report_without_results(tmp_path, capsys):
    code, out, err = run_cli(["--report", "--results-dir", tmp_path], capsys)
    assert_user_error(code, err, "no result files")


@pytest.mark.slow
def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "probe", "--head", "svm", "--cache-dir", tmp_path / "none"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_predict_missing_head_is_user_error(tmp_path, capsys):
    toy_cache(tmp_path / "cache", splits=("train", "test"))
    img = tmp_path / "x.png"
    img.write_bytes(b"not really")
    code, out, err = run_cli(["predict", "--head", "svm", "--cache-dir", tmp_path / "cache", "--results-dir",
                              tmp_path / "r", img], capsys)
    assert_user_error(code, err, "no saved head")


@pytest.mark.parametrize("explicit", [False, True])
def test_fp32_and_bf16_results_coexist(tmp_path, capsys, explicit):
    """Two precisions of one model and dataset never overwrite each other's results or heads."""
    for precision in ("fp32", "bf16"):
        requested = precision if explicit or precision == "bf16" else "auto"
        toy_cache(tmp_path / "cache", precision=precision, precision_requested=requested)
    written = []
    for precision in ("fp32", "bf16"):
        code, out, err = run_cli(["--head", "linear", "--precision", precision, "--cache-dir", tmp_path / "cache",
                                  "--results-dir", tmp_path / "r", "--no-progress"], capsys)
        assert code == 0, err
        written.append(next(line.split("wrote ")[1] for line in out.splitlines() if "wrote " in line))
    assert written[0] != written[1]
    results = [json.loads(Path(p).read_text()) for p in written]
    assert [r["precision"] for r in results] == ["fp32", "bf16"]
    assert all(Path(p).with_suffix(".skops").exists() for p in written)
    code, out, err = run_cli(["--report", "--results-dir", tmp_path / "r"], capsys)
    assert code == 0 and "precision" in out.splitlines()[0]
    assert {"fp32", "bf16"} <= set(out.split())


def test_mixed_precision_pair_is_refused_naming_the_difference(tmp_path, capsys):
    train = toy_cache(tmp_path / "a", splits=("train",), precision="fp32", precision_requested="fp32")["train"]
    test = toy_cache(tmp_path / "b", splits=("test",), precision="bf16", precision_requested="fp32")["test"]
    code, out, err = run_cli(["--features", train, "--test-features", test, "--head", "linear", "--results-dir",
                              tmp_path / "r", "--no-progress"], capsys)
    assert_user_error(code, err, "compute precision differs (fp32 vs bf16)")


@pytest.mark.slow
def test_predict_with_a_local_checkpoint_and_one_unreadable_image(tmp_path, capsys):
    import torch
    from extract.api import extract
    from extract.registry.models import build_network

    weights = tmp_path / "mine.pth"
    torch.save(build_network("cifar_resnet20").state_dict(), weights)
    extract(model="cifar_resnet20", weights=str(weights), data="synthetic", dataset_options={"n": 40},
            cache_dir=tmp_path / "cache", progress=False)
    assert run_cli(["--head", "knn", "--cache-dir", tmp_path / "cache", "--results-dir", tmp_path / "r",
                    "--no-progress"], capsys)[0] == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 40, 40)).save(photos / "a.png")
    (photos / "b.png").write_bytes(b"not a png")
    code, out, err = run_cli(["predict", "--head", "knn", "--cache-dir", tmp_path / "cache", "--results-dir",
                              tmp_path / "r", photos], capsys)
    assert code == 0 and out.startswith(str(photos / "a.png") + "\t") and len(out.strip().splitlines()) == 1
    assert "unreadable: " in err and "b.png" in err
    torch.save({k: v + 1 for k, v in build_network("cifar_resnet20").state_dict().items()}, weights)
    code, out, err = run_cli(["predict", "--head", "knn", "--cache-dir", tmp_path / "cache", "--results-dir",
                              tmp_path / "r", photos / "a.png"], capsys)
    assert_user_error(code, err, "weights file changed")


def test_one_split_given_for_two_roles_is_refused(tmp_path, capsys):
    paths = toy_cache(tmp_path / "cache", splits=("train", "test"))
    copy = tmp_path / "elsewhere" / "copy.h5"
    copy.parent.mkdir()
    copy.write_bytes(paths["train"].read_bytes())
    for flag, other, words in (("--test-features", paths["train"], ["given as both the train and the test"]),
                               ("--val-features", paths["train"], ["given as both the train and the val"]),
                               ("--test-features", copy, ["both the 'train' split", "sharing 120 images"])):
        code, out, err = run_cli(["--features", paths["train"], flag, other, "--head", "linear", "--results-dir",
                                  tmp_path / "r", "--no-progress"], capsys)
        assert_user_error(code, err, *words)
    assert not (tmp_path / "r").exists()


def test_a_folder_given_as_features_asks_for_a_cache_file(tmp_path, capsys):
    paths = toy_cache(tmp_path / "cache", splits=("train", "test"))
    for flags in (["--features", paths["train"].parent], ["--features", paths["train"], "--test-features",
                                                          paths["train"].parent]):
        code, out, err = run_cli([*flags, "--head", "linear", "--no-progress"], capsys)
        assert_user_error(code, err, "expects a cache file (.h5) such as", "is a folder", "--cache-dir")
        assert "damaged" not in err


@pytest.mark.parametrize("head", ["svm", "knn"])
def test_a_test_class_absent_from_train_is_said_once_and_recorded(tmp_path, capsys, head):
    X, y = blobs(30, 7, 8)
    keep = y != 6
    write_split(tmp_path / "cache", "train", X[keep], y[keep], classes=list("abcdefg"))
    Xt, yt = blobs(10, 7, 8)
    write_split(tmp_path / "cache", "test", Xt, yt, classes=list("abcdefg"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no raw library warning
        code, out, err = run_cli(["--head", head, "--cache-dir", tmp_path / "cache", "--results-dir", tmp_path / "r",
                                  "--no-progress", "--no-save"], capsys)
    assert code == 0, err
    said = [line for line in err.splitlines() if "never occur in train" in line]
    assert said == ["warning: test class g (10 test images) never occur in train or validation: the head cannot "
                    "predict them, so they count as errors"]
    result = json.loads(next((tmp_path / "r").glob(f"**/{head}.json")).read_text())
    assert result["test_classes_not_in_train"] == ["g"]
    assert result["metrics"]["top1"] <= 60 / 70 and result["metrics"]["top5"] <= 60 / 70 + 1e-9


@pytest.mark.parametrize("command", ["predict", "map", "samples"])
def test_saved_head_commands_refuse_to_guess_between_datasets(tmp_path, capsys, command):
    """Two datasets cached, no --data: predict, map and samples name both instead of taking the newest;
    with --data they run on the one named."""
    cache, results = tmp_path / "cache", tmp_path / "r"
    toy_cache(cache, splits=("train", "test"), dataset="ants", model="m1")
    toy_cache(cache, splits=("train", "test"), dataset="digits", model="m1")
    for data in ("ants", "digits"):
        assert run_cli(["--head", "knn", "--data", data, "--cache-dir", cache, "--results-dir", results,
                        "--no-progress"], capsys)[0] == 0
    extra = {"predict": [tmp_path / "x.png"], "map": [], "samples": ["-n", "4"]}[command]
    code, out, err = run_cli([command, "--head", "knn", "--cache-dir", cache, "--results-dir", results, *extra],
                             capsys)
    assert_user_error(code, err, "2 datasets (ants, digits)", "--data")
    if command == "map":   # toy caches have no images to predict from or to show
        code, out, err = run_cli([command, "--head", "knn", "--data", "ants", "--cache-dir", cache, "--results-dir",
                                  results, *extra], capsys)
        assert code == 0, err
        assert "/ants/" in out.strip().splitlines()[-1]
