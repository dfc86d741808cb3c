"""Extraction end to end: caches per split, hits, invalidation, bad images, interruption, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from extract import load_features
from extract.api import extract, plan
from extract.store.cache import digest_path, partial_path, read_header
from extract.store.chunks import ChunkStore
from extract.cli import main
from extract.core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model": "cifar_resnet20", "weights": "none", "progress": False}


def cache_file(cache, split="train", **request):
    """Where extract puts a split for a request: asked of the identity, never spelled by hand."""
    return plan(**request).identity.cache_path(cache, split)


def make_folder(root, per_class=6, size=40, classes=("cat", "dog"), splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[..., c] += 180
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "extract", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})}, timeout=300)


def test_every_split_gets_a_complete_cache_with_labels_and_provenance(tmp_path):
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 40}, **TINY)
    assert set(res) == {"train", "test"}
    X, y, meta = load_features(res["train"].path)
    assert X.shape == (len(y), 64) and X.dtype == np.float32 and np.isfinite(X).all()
    assert meta["model"] == "cifar_resnet20.none" and meta["split"] == "train"
    prov = meta["provenance"]
    assert prov["dataset"] == "synthetic" and prov["preprocess"]["crop"] == 32 and prov["classes"]
    assert set(meta["versions"]) >= {"torch", "torchvision", "featprobe", "h5py"}
    # the default request's path is the same on every CPU, whatever precision `auto` chose
    assert res["train"].path.relative_to(tmp_path).parts[1:] == ("cifar_resnet20.none", "train.h5")
    assert res["train"].path.parent.parent.name.startswith("synthetic-")
    assert meta["identity"].precision == prov["precision"] and meta["identity"].precision_requested == "auto"


def test_matching_cache_is_a_hit_and_is_not_rewritten(tmp_path):
    first = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 40}, **TINY)
    stamp = os.stat(first["train"].path).st_mtime_ns
    again = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 40}, **TINY)
    assert {r.status for r in again.values()} == {"hit"}
    assert os.stat(again["train"].path).st_mtime_ns == stamp


def test_new_layer_is_added_to_the_same_cache_in_one_pass(tmp_path):
    extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 24}, splits=["train"], **TINY)
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 24}, splits=["train"],
                  layers=["layer2"], **TINY)
    assert res["train"].status == "extracted"
    assert set(read_header(res["train"].path)["layers"]) == {"layer2", "penultimate"}
    assert load_features(res["train"].path, layer="layer2").X.shape[1] == 32


def test_float16_storage_is_its_own_key(tmp_path):
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 24}, splits=["train"],
                  dtype="float16", **TINY)
    assert res["train"].path.name == "train.float16.h5"
    assert load_features(res["train"].path).X.dtype == np.float16


def test_corrupt_images_are_skipped_and_recorded(tmp_path):
    root = make_folder(tmp_path / "pets")
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    res = extract(data="imagefolder", root=str(root), cache_dir=tmp_path / "cache", batch_size=4, **TINY)
    X, y, meta = load_features(res["train"].path)
    assert len(y) == 12 and res["train"].skipped == 2
    assert {os.path.basename(s["path"]) for s in meta["skipped"]} == {"broken.jpg", "empty.png"}
    assert all(s["reason"] for s in meta["skipped"])
    assert not any("broken" in p for p in meta["paths"])


def test_stop_on_error_names_the_file_and_keeps_what_was_done(tmp_path):
    root = make_folder(tmp_path / "pets", splits=("train",))
    (root / "train" / "dog" / "zz-broken.jpg").write_bytes(b"garbage")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="zz-broken.jpg"):
        extract(data="imagefolder", root=str(root), cache_dir=cache, batch_size=2, on_error="stop", chunk_rows=4,
                **TINY)
    final = cache_file(cache, model="cifar_resnet20", weights="none", data="imagefolder", root=str(root))
    store = ChunkStore.existing(final)
    assert not final.exists() and store.rows_done() == 12 and store.done() == {0, 1, 2}
    res = extract(data="imagefolder", root=str(root), cache_dir=cache, batch_size=2, chunk_rows=4, **TINY)
    assert res["train"].status == "resumed" and len(load_features(final).y) == 12


def _stopped_run(tmp_path):
    """A folder whose last image is broken, extracted with on_error=stop: chunks 0-2 of 4 are left."""
    root = make_folder(tmp_path / "pets", splits=("train",))
    (root / "train" / "dog" / "zz-broken.jpg").write_bytes(b"garbage")
    args = dict(data="imagefolder", root=str(root), cache_dir=tmp_path / "cache", batch_size=2, chunk_rows=4, **TINY)
    with pytest.raises(UserError, match="zz-broken.jpg"):
        extract(on_error="stop", **args)
    final = cache_file(tmp_path / "cache", model="cifar_resnet20", weights="none", data="imagefolder", root=str(root))
    assert ChunkStore.existing(final).done() == {0, 1, 2}
    return args, final


def test_a_truncated_chunk_is_discarded_and_computed_again(tmp_path, caplog):
    args, final = _stopped_run(tmp_path)
    chunk = ChunkStore.existing(final).chunk_path(1)
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 2)
    caplog.set_level("INFO", logger="extract")
    res = extract(**args)["train"]
    assert res.status == "resumed" and res.images == 4 + 1   # chunk 1 again, and the last chunk
    assert f"discarding chunk-000001.h5 in {partial_path(final)}" in caplog.text and "computing it again" in caplog.text
    fresh = extract(**{**args, "cache_dir": args["cache_dir"].parent / "fresh"})["train"]
    np.testing.assert_array_equal(load_features(final).X, load_features(fresh.path).X)


def test_overwrite_always_starts_from_no_chunks(tmp_path, caplog):
    args, final = _stopped_run(tmp_path)
    caplog.set_level("INFO", logger="extract")
    res = extract(overwrite=True, **args)["train"]
    assert res.status == "extracted" and res.images == 13 and not partial_path(final).exists()
    assert f"--overwrite: discarding {partial_path(final)}" in caplog.text


def test_what_an_interrupted_clean_up_left_beside_a_finished_file_is_removed(tmp_path, caplog):
    import shutil
    args, final = _stopped_run(tmp_path)
    leftover = tmp_path / "leftover"
    shutil.copytree(partial_path(final), leftover)
    assert extract(**args)["train"].status == "resumed" and not partial_path(final).exists()
    caplog.set_level("INFO", logger="extract")
    for manifest in (True, False):   # the chunks of this very file, or a folder whose manifest went first
        shutil.copytree(leftover, partial_path(final))
        if not manifest:
            (partial_path(final) / "manifest.json").unlink()
        assert extract(**args)["train"].status == "hit"
        assert not partial_path(final).exists()
        assert f"removing {partial_path(final)}, left from an earlier run" in caplog.text


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_features_as_an_uninterrupted_one(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=60, size=64, splits=("train",))
    args = ["--model", "resnet18", "--weights", "none", "--data", "imagefolder", "--root", str(root),
            "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--no-progress", "--chunk-size", "16"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "extract", *args, "--cache-dir", str(killed)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    request = dict(model="resnet18", weights="none", data="imagefolder", root=str(root), precision="fp32")
    final = cache_file(killed, **request)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        store = ChunkStore.existing(final)
        if store and store.done():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ChunkStore.existing(final)
    assert store is not None and 0 < len(store.done()) < store.total, "the run should have been killed midway"

    resumed = cli(*args, "--cache-dir", str(killed), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    whole = cli(*args, "--cache-dir", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    a = load_features(cache_file(killed, **request))
    b = load_features(cache_file(tmp_path / "whole", **request))
    np.testing.assert_array_equal(a.meta["index"], b.meta["index"])
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_second_process_on_one_key_waits_then_reuses_the_first_ones_work(tmp_path):
    args = ["--model", "resnet18", "--weights", "none", "--data", "synthetic", "--option", "n=160",
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": REPO}
    first = subprocess.Popen([sys.executable, "-m", "extract", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    final = cache_file(tmp_path / "cache", model="resnet18", weights="none", data="synthetic",
                       dataset_options={"n": 160})
    partial = partial_path(final)
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "extract", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    out_first = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, out_first + second.stderr
    assert "(extracted)" in out_first
    assert "waiting for another process" in second.stderr
    assert "train: " in second.stdout and "(hit)" in second.stdout
    X, y, _ = load_features(final)
    assert X.shape == (160, 512) and len(y) == 160


@pytest.mark.slow
def test_full_disk_gives_a_message_and_keeps_what_was_written(tmp_path, tiny_disk):
    proc = cli("--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--option", "n=6000",
               "--layer", "penultimate,layer1", "--cache-dir", str(tiny_disk), "--no-progress", "--chunk-size", "256",
               cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error: could not write" in proc.stderr and "No space left" in proc.stderr
    assert "Traceback" not in proc.stderr
    final = cache_file(tiny_disk, model="cifar_resnet20", weights="none", data="synthetic",
                       dataset_options={"n": 6000}, layers=["penultimate", "layer1"])
    store = ChunkStore.existing(final)
    assert store is not None and store.rows_done() > 0, "chunks finished before the disk filled are kept"


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet5O"], "did you mean"),
    (["--data", "cifar1O"], "did you mean"),
    (["--data", "imagefolder", "--root", "no/such/folder"], "no/such/folder"),
    (["--weights", "missing.pth", "--model", "resnet18"], "missing.pth"),
    (["--option", "nonsense"], "KEY=VALUE"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main([*args, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_module_entry_point_reports_bad_input_without_a_traceback(tmp_path):
    proc = cli("--model", "resnet5O", "--cache-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "did you mean" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_lists_models_with_dims(capsys):
    assert main(["--list-models"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("resnet50 "))
    assert "2048" in line


def test_reduced_precision_features_live_beside_fp32_ones(tmp_path):
    opts = dict(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"], **TINY)
    auto = extract(**opts)["train"].path
    fp32 = extract(precision="fp32", **opts)["train"].path
    bf16 = extract(precision="bf16", **opts)["train"].path
    assert (auto.name, fp32.name, bf16.name) == ("train.h5", "train.fp32.h5", "train.bf16.h5")
    assert load_features(fp32).meta["identity"].precision == "fp32"
    assert load_features(bf16).meta["identity"].precision == "bf16"
    a, b = load_features(fp32).X, load_features(bf16).X
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.1)


def test_provenance_records_effective_preprocessing_and_precision(tmp_path):
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"],
                  precision="fp32", **TINY)
    with h5py.File(res["train"].path) as f:
        assert f.attrs["model"] == "cifar_resnet20.none" and f.attrs["complete"]
    prov = load_features(res["train"].path).meta["provenance"]
    assert prov["precision"] == "fp32" and prov["weights"] == "none"


def test_same_named_folders_never_share_a_cache(tmp_path):
    a = make_folder(tmp_path / "a" / "pets")
    b = make_folder(tmp_path / "b" / "pets", per_class=4)
    ra = extract(data="imagefolder", root=str(a), cache_dir=tmp_path / "cache", **TINY)
    rb = extract(data="imagefolder", root=str(b), cache_dir=tmp_path / "cache", **TINY)
    assert rb["train"].status == "extracted" and ra["train"].path != rb["train"].path
    assert len(load_features(ra["train"].path).y) == 12 and len(load_features(rb["train"].path).y) == 8
    assert extract(data="imagefolder", root=str(a), cache_dir=tmp_path / "cache", **TINY)["train"].status == "hit"


def test_changed_preprocessing_is_never_a_silent_hit(tmp_path):
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"], **TINY)
    with h5py.File(res["train"].path, "a") as f:  # as if the registry's mean/std had been fixed since
        ident = json.loads(f.attrs["identity"])
        ident["preprocess"]["mean"] = [0.5, 0.5, 0.5]
        f.attrs["identity"] = json.dumps(ident)
    digest_path(res["train"].path).unlink()   # the edited file is not damaged, only made by other settings
    with pytest.raises(UserError, match="preprocessing changed.*--overwrite"):
        extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"], **TINY)


def test_in_memory_sources_have_no_paths_column(tmp_path):
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"], **TINY)
    assert load_features(res["train"].path).meta["paths"] is None


def test_checkpoint_missing_network_weights_is_refused_unless_allowed(tmp_path, capsys):
    import torch
    from extract.registry.models import build_network

    small = tmp_path / "resnet20-mine.pth"
    torch.save(build_network("cifar_resnet20").state_dict(), small)
    args = ["--model", "cifar_resnet56", "--weights", str(small), "--data", "synthetic", "--option", "n=8",
            "--split", "train", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--allow-missing-weights" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--allow-missing-weights"]) == 0
    path = next((tmp_path / "cache").glob("**/train.h5"))
    assert load_features(path).meta["provenance"]["allow_missing_weights"] is True


@pytest.mark.slow
def test_nearly_full_disk_at_creation_is_one_line(tmp_path, tiny_disk):
    filler = tiny_disk / "filler"
    with open(filler, "wb") as f:   # leave well under the space a new cache file needs
        try:
            f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    proc = cli("--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--option", "n=8",
               "--cache-dir", str(tiny_disk), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: could not create") and "free space" in proc.stderr


def test_symlink_loop_in_an_image_folder_is_skipped(tmp_path):
    root = make_folder(tmp_path / "pets")
    os.symlink(root / "train", root / "train" / "cat" / "loop")
    res = extract(data="imagefolder", root=str(root), cache_dir=tmp_path / "cache", **TINY)
    assert len(load_features(res["train"].path).y) == 12


def test_file_names_that_are_not_utf8_are_kept_exactly(tmp_path, capsys):
    root = make_folder(tmp_path / "pets", per_class=3)
    for split in ("train", "val"):
        folder = os.fsencode(root / split)
        os.rename(os.path.join(folder, b"dog"), os.path.join(folder, b"d\xf6g"))
        os.rename(os.path.join(folder, b"d\xf6g", b"000.png"), os.path.join(folder, b"d\xf6g", b"\xe9t\xe9.png"))
    args = ["--model", "cifar_resnet20", "--weights", "none", "--data", "imagefolder", "--root", str(root),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    request = dict(model="cifar_resnet20", weights="none", data="imagefolder", root=str(root))
    meta = load_features(cache_file(tmp_path / "cache", **request)).meta
    names = {os.fsencode(p) for p in meta["paths"]}
    assert os.fsencode(root / "train") + b"/d\xf6g/\xe9t\xe9.png" in names and len(names) == 6
    assert all(os.path.isfile(p) for p in meta["paths"])
    assert meta["classes"] == ["cat", "d\\xf6g"]
    assert main(args) == 0 and "Nothing to extract" in capsys.readouterr().out
    os.utime(os.fsencode(root / "train") + b"/d\xf6g/\xe9t\xe9.png", ns=(1, 1))
    assert main(args) == 0 and "1 changed" in capsys.readouterr().out
    from probe.api import evaluate
    ev = evaluate("linear", cache_dir=tmp_path / "cache", results_dir=tmp_path / "results", progress=False)
    assert ev.runs[0].result["classes"] == ["cat", "d\\xf6g"] and ev.head_paths[0].exists()


def test_damaged_cache_is_extracted_again(tmp_path):
    res = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"], **TINY)
    res["train"].path.write_bytes(b"not hdf5")
    again = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 16}, splits=["train"], **TINY)
    assert again["train"].status == "extracted" and len(load_features(again["train"].path).y) == 16


def test_model_and_weights_spellings_name_one_identity(tmp_path):
    first = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 8}, splits=["train"],
                    model="cifar_resnet20.none", progress=False)
    again = extract(data="synthetic", cache_dir=tmp_path, dataset_options={"n": 8}, splits=["train"],
                    model="cifar_resnet20", weights="none", progress=False)
    assert again["train"].status == "hit" and again["train"].path == first["train"].path


def test_weights_file_under_home_is_read_with_tilde(tmp_path, monkeypatch):
    import torch
    from extract.registry.models import build_network, resolve_weights

    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(build_network("cifar_resnet20").state_dict(), tmp_path / "ckpt.pth")
    by_tilde = resolve_weights("cifar_resnet20", "~/ckpt.pth")
    by_path = resolve_weights("cifar_resnet20", str(tmp_path / "ckpt.pth"))
    assert by_tilde == by_path and by_tilde.file == tmp_path / "ckpt.pth"
    assert by_tilde.name.startswith("cifar_resnet20.ckpt-") and by_tilde.sha256


def test_summary_reads_as_a_sentence_for_work_and_for_hits(tmp_path, capsys):
    args = ["--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--option", "n=8",
            "--cache-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Extracted 16 images in ") and last.endswith(".") and "Features are in " in last
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Nothing to extract: train and test are already cached in ") and last.endswith(" s).")


def test_summary_of_a_rerun_that_only_assembled_finished_chunks(tmp_path):
    from extract.run.extraction import SplitResult, summary
    results = {"train": SplitResult("train", tmp_path / "train.h5", "resumed"),
               "test": SplitResult("test", tmp_path / "test.h5", "hit")}
    text = summary(results, time.perf_counter())
    assert text.startswith("Assembled train from chunks already computed in ") and str(tmp_path) in text
    only = summary({"train": results["train"]}, time.perf_counter())
    assert only.startswith("Assembled train from chunks")


@pytest.mark.parametrize("images, seconds", [(6, 0.056), (20, 5.1), (1797, 13.3)])
def test_the_printed_rate_agrees_with_the_printed_count_and_time(tmp_path, images, seconds):
    import re

    from extract.run.extraction import SplitResult, summary
    text = summary({"train": SplitResult("train", tmp_path / "train.h5", "extracted", images, seconds)},
                   time.perf_counter())
    count, rate, over = re.search(r"Extracted ([\d,]+) images .*\(([\d.]+) images/s over ([\d.]+) s", text).groups()
    assert int(count.replace(",", "")) == images
    assert abs(float(rate) * float(over) - images) <= 0.01 * images, text


@pytest.fixture
def small_mount(tmp_path):
    """A real 4 MiB tmpfs that the test may remount read-only."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_read_only_cache_serves_hits_and_new_work_is_one_line(small_mount, capsys):
    args = ["--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--cache-dir", str(small_mount),
            "--no-progress"]
    assert main([*args, "--option", "n=8"]) == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    capsys.readouterr()
    assert main([*args, "--option", "n=8"]) == 0
    assert "Nothing to extract: train and test are already cached" in capsys.readouterr().out
    assert main([*args, "--option", "n=12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write in ") and "Read-only file system" in err
    assert len(err.strip().splitlines()) == 1


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for where in ("afile", "afile/below"):
        assert main(["--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--option", "n=4",
                     "--cache-dir", str(tmp_path / where), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --cache-dir {tmp_path / where} is not a folder: {tmp_path / 'afile'} is a file\n"


@pytest.mark.parametrize("value", ["abc", "1.5", ""])
def test_a_numeric_dataset_option_that_is_not_a_number_is_one_line(tmp_path, capsys, value):
    assert main(["--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--option", f"n={value}",
                 "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: dataset option n must be a whole number, got {value!r}\n"


def test_user_error_is_a_value_error_for_library_callers():
    with pytest.raises(ValueError, match="unknown model"):
        extract(model="no_such_net", data="synthetic", progress=False)


@pytest.mark.slow
def test_published_weights_come_from_the_hub_cache_and_a_missing_one_is_one_line(tmp_path, monkeypatch, capsys):
    import torch
    from extract.registry.models import build_network

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FEATPROBE_OFFLINE", "1")
    args = ["--data", "synthetic", "--option", "n=4", "--split", "train", "--cache-dir", str(tmp_path / "c"),
            "--no-progress"]
    assert main(["--model", "resnet18.barlowtwins", *args]) == 2   # not a resnet18 tag
    assert main(["--model", "resnet50.vicreg", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "vicreg_resnet50.pth" in err[-1] and str(tmp_path / "torch" / "hub" / "checkpoints") in err[-1]
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(build_network("resnet50").state_dict(), folder / "vicreg_resnet50.pth")
    assert main(["--model", "resnet50.vicreg", *args]) == 0
    X, _, meta = load_features(data="synthetic", model="resnet50.vicreg", cache_dir=tmp_path / "c")
    assert X.shape == (4, 2048) and meta["identity"].weights_sha256


def _two_checkpoints(tmp_path):
    import torch
    from extract.registry.models import build_network

    torch.manual_seed(0)
    r20, r32 = tmp_path / "mine20.pth", tmp_path / "mine32.pth"
    torch.save(build_network("cifar_resnet20").state_dict(), r20)
    torch.save(build_network("cifar_resnet32").state_dict(), r32)
    return r20, r32


@pytest.mark.parametrize("spelling", ["in-model", "per-position"])
def test_each_model_gets_its_own_weights(tmp_path, capsys, spelling):
    r20, r32 = _two_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    args = {"in-model": ["--model", f"cifar_resnet20.none,cifar_resnet32={r32}"],
            "per-position": ["--model", "cifar_resnet20,cifar_resnet32", "--weights", f"none,{r32}"]}[spelling]
    assert main([*args, "--data", "synthetic", "--option", "n=8", "--split", "train", "--cache-dir", str(cache),
                 "--no-progress"]) == 0, capsys.readouterr().err
    metas = {p.parent.name: load_features(p).meta for p in cache.glob("*/*/train.h5")}
    mine = f"cifar_resnet32.mine32-{_sha(r32)[:8]}"
    assert sorted(metas) == ["cifar_resnet20.none", mine]
    assert metas[mine]["identity"].weights_sha256 == _sha(r32)
    assert metas["cifar_resnet20.none"]["identity"].weights_sha256 is None


def _sha(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("weights, words", [
    ("FILE", ["with 2 models (cifar_resnet20, cifar_resnet32)", "one per model", "arch=FILE"]),
    ("none,FILE,none", ["3 weights for 2 models"]),
    ("none,missing.pth", ["cifar_resnet32", "not found"])])
def test_weights_for_several_models_are_checked_before_any_work(tmp_path, capsys, weights, words):
    r20, _ = _two_checkpoints(tmp_path)
    code = main(["--model", "cifar_resnet20,cifar_resnet32", "--weights", weights.replace("FILE", str(r20)),
                 "--data", "synthetic", "--option", "n=8", "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "cache").exists()


def test_a_checkpoint_that_does_not_fit_names_its_model_and_leaves_no_folder(tmp_path, capsys):
    r20, _ = _two_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    code = main(["--model", f"cifar_resnet20.none,cifar_resnet32={r20}", "--data", "synthetic", "--option", "n=8",
                 "--split", "train", "--cache-dir", str(cache), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: --model cifar_resnet32={r20}: ") and "lacks" in err[-1]
    # the first model's cache is there; the second left nothing, not even a folder holding a lock file
    assert sorted(p.name for p in next(cache.iterdir()).iterdir()) == ["cifar_resnet20.none"]
    code = main(["--model", f"cifar_resnet32={r20}", "--data", "synthetic", "--option", "n=8",
                 "--cache-dir", str(tmp_path / "fresh" / "cache"), "--no-progress"])
    assert code == 2 and not (tmp_path / "fresh").exists()


def test_a_stop_on_a_bad_image_leaves_nothing_unless_a_chunk_finished(tmp_path, capsys):
    root = make_folder(tmp_path / "pets", per_class=3, splits=("train",))
    (root / "train" / "cat" / "zz-broken.png").write_bytes(b"not a png")
    args = ["--model", "cifar_resnet20.none", "--data", "imagefolder", "--root", str(root), "--on-error", "stop",
            "--no-progress"]
    assert main([*args, "--cache-dir", str(tmp_path / "one")]) == 2        # one chunk: nothing was finished
    assert not (tmp_path / "one").exists()
    assert main([*args, "--cache-dir", str(tmp_path / "two"), "--chunk-size", "2"]) == 2
    kept = sorted(p.name for p in (tmp_path / "two").glob("*/*/train.h5.partial/*"))
    assert kept == ["chunk-000000.h5", "manifest.json"]                    # the finished chunk stays for resume
    assert "zz-broken.png" in capsys.readouterr().err
