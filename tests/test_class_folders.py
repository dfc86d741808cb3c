"""A folder of class folders (no train/ or test/): extracted as one train split, probed with test rows
carved from it, the same rows in every analysis and in finetune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from extract.cli import main as extract_main
from extract.registry.datasets import load_dataset
from extract.store.catalog import CacheQuery
from finetune.splits import plan_splits
from probe.cli import main as probe_main
from probe.protocol.data import load_probe_data, select_caches

PER_CLASS = {"ant": 14, "bee": 12, "wasp": 10}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three class folders of coloured PNGs (one unreadable file among the ants), extracted once."""
    root = tmp_path_factory.mktemp("photos") / "bugs"
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(PER_CLASS.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 60, (36, 36, 3), dtype=np.uint8)
            pixels[..., c] += 180
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    (root / "ant" / "999-broken.png").write_bytes(b"not a png")
    cache = root.parent / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = extract_main(["--model", "cifar_resnet20", "--weights", "none", "--data", "imagefolder", "--root",
                             str(root), "--cache-dir", str(cache), "--layer", "layer2,penultimate", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root, cache


def run(args, capsys):
    code = probe_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_probe_carves_test_rows_says_so_and_never_overlaps(folder, capsys, tmp_path):
    root, cache = folder
    results = tmp_path / "results"
    out, _ = run(["--head", "logreg,knn", "--cache-dir", cache, "--results-dir", results, "--no-progress"], capsys)
    data = load_probe_data(select_caches(CacheQuery(cache)))
    assert f"test: 20% of train carved by split seed 0, {len(data.y_test)} rows" in out, out
    result = json.loads(next(results.glob("**/logreg.json")).read_text())
    assert result["test"]["carved"] == {"fraction": 0.2, "split_seed": 0} and result["test_split"] == "train"
    carved = np.bincount(data.y_test, minlength=3)       # 20% of 15 ants (the unreadable one counted), 12, 10
    assert carved[1:].tolist() == [2, 2] and carved[0] in (2, 3)
    roles = [set(data.index_train.tolist()), set(data.index_val.tolist()), set(data.index_test.tolist())]
    assert not (roles[0] & roles[1]) and not (roles[0] & roles[2]) and not (roles[1] & roles[2])
    assert sum(map(len, roles)) == sum(PER_CLASS.values())          # every readable image has one role
    assert result["sizes"] == {"train": len(roles[0]), "val": len(roles[1]), "test": len(roles[2]),
                               "search_train": len(roles[0])}


@pytest.mark.parametrize("seed, fraction, split_seed", [(0, 0.2, 0), (3, 0.3, 5)])
def test_finetune_carves_the_rows_probe_carves(folder, seed, fraction, split_seed):
    root, cache = folder
    data = load_probe_data(select_caches(CacheQuery(cache)), seed=seed, test_fraction=fraction, split_seed=split_seed)
    plan = plan_splits(load_dataset("imagefolder", root=root), seed=seed, test_fraction=fraction,
                       split_seed=split_seed)
    broken = [i for i, p in enumerate(plan.test.source.paths) if p.endswith("broken.png")]
    for role, probe_rows in (("test", data.index_test), ("val", data.index_val), ("train", data.index_train)):
        planned = set(getattr(plan, role).indices.tolist()) - set(broken)
        assert planned == set(probe_rows.tolist()), role
    assert plan.describe_test()["carved"] == data.test["carved"]


def test_every_analysis_reads_the_carved_test_rows(folder, capsys, tmp_path):
    root, cache = folder
    results = tmp_path / "results"
    common = ["--cache-dir", cache, "--results-dir", results]
    run(["--head", "logreg", "--layer", "all", "--no-progress", *common], capsys)        # compare (a layer sweep)
    layers = json.loads((results / next(results.iterdir()).name / "layers.json").read_text())
    assert {r["tap"] for r in layers["rows"]} == {"layer2", "penultimate"}
    assert layers["settings"]["test_fraction"] == 0.2
    out, _ = run(["--head", "logreg", "--shots", "1,2,all", "--seeds", "2", "--no-progress", *common], capsys)
    fewshot = json.loads(next(results.glob("**/penultimate/fewshot-logreg.json")).read_text())
    assert fewshot["test"]["carved"] and fewshot["sizes"]["test"] == fewshot["test"]["rows"]
    data = load_probe_data(select_caches(CacheQuery(cache)))
    n_test = len(data.y_test)
    out, _ = run(["map", "--head", "logreg", *common], capsys)
    assert out.strip().endswith("map-tsne-logreg.png")
    out, _ = run(["samples", "--head", "logreg", "-n", "50", *common], capsys)
    from probe.analyses.predict import find_head_file
    from probe.analyses.samples import sample_grid
    grid = sample_grid(head_file=find_head_file("logreg", CacheQuery(cache), results), n=50)
    assert len(grid.rows) == n_test and set(grid.index.tolist()) == set(data.index_test.tolist())
    assert grid.split.startswith("test (20% of train carved by split seed 0")
    out, _ = run(["rank", "--no-progress", *common], capsys)
    ranking = json.loads((results / data.identity.data.label / "rank.json").read_text())
    assert ranking["rows"][0]["n"] == len(data.y_train) + len(data.y_val)
    assert ranking["rows"][0]["test_rows_left_out"] == n_test
    out, _ = run(["similarity", "--model", "cifar_resnet20.none", "--layer", "all", "--no-progress", *common], capsys)
    assert f"test rows (20% of train carved by split seed 0), {n_test} images" in out


def test_finetune_scores_on_the_carved_rows(folder, tmp_path):
    from finetune.train import finetune

    root, cache = folder
    data = load_probe_data(select_caches(CacheQuery(cache)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = finetune("cifar_resnet20", "imagefolder", root=str(root), weights="none", epochs=1, batch_size=8,
                       workers=0, results_dir=tmp_path / "results", runs_dir=tmp_path / "runs", progress=False)
    finally:
        torch.set_num_threads(threads)
    r = out.result
    assert r["test"] == {**data.test, "split": "train"} and r["sizes"]["test"] == len(data.y_test)
    assert r["sizes"]["val"] == len(data.y_val) and "only a train split" in r["validation"]
    assert np.asarray(r["metrics"]["confusion_counts"]).sum(axis=1).tolist() == np.bincount(data.y_test).tolist()


def test_a_dataset_with_its_own_test_split_is_never_carved(tmp_path, capsys):
    """Only train cached of a dataset that has a test split: refused, naming the split to extract."""
    code = extract_main(["--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic", "--option", "n=24",
                         "--split", "train", "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    capsys.readouterr()
    code = probe_main(["--head", "knn", "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "r"),
                       "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: only the train split") and "own 'test' split" in err[-1]
