"""The class map (t-SNE of the test features, mistakes marked) and the sample grid (test images with
true / predicted labels) show the right rows, labels and images, on real caches: in-memory datasets
(digits, synthetic) and an image folder, extracted with a random-init CIFAR ResNet-20 in fp32."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.api import extract
from extract.store.cache import load_features
from extract.registry.datasets import load_dataset
from extract.core.errors import UserError
from probe.api import evaluate
from probe.analyses.maps import class_map, embed_2d, map_figure, stratified_rows, subsample, write_map
from probe.output.headfile import load_head
from probe.analyses.samples import choose_rows, dataset_source, plot_samples, sample_grid, write_samples

FOLDER_CLASSES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def _run(tmp, **extract_kw) -> dict:
    """Extract (fp32 on the CPU: the same on every machine) and fit logreg; paths of what was made."""
    cache, results = tmp / "cache", tmp / "results"
    splits = extract(model="cifar_resnet20", weights="none", cache_dir=cache, progress=False, precision="fp32",
                     device="cpu", **extract_kw)
    ev = evaluate("logreg", cache_dir=cache, results_dir=results, progress=False)
    test = splits["test"].path if "test" in splits else splits["val"].path
    return {"test": test, "head": ev.head_paths[0], "results": results, "splits": splits}


def _predict(run: dict):
    X, y, meta = load_features(run["test"])
    pipeline, _ = load_head(run["head"])
    return X, y, meta, pipeline.predict(X)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("digits"), data="digits")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("synthetic"), data="synthetic",
                dataset_options={"n": 48, "size": 16, "classes": 3, "seed": 1})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """train/<colour>/ (8 PNGs each) and val/<colour>/ (4 each): val is the test split."""
    tmp = tmp_path_factory.mktemp("folder")
    root = tmp / "colours"
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for name, rgb in FOLDER_CLASSES.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = np.clip(np.array(rgb) + rng.normal(0, 40, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return {**_run(tmp, data="imagefolder", root=str(root)), "root": root}


def _decoded(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _red_pixels(rgb: np.ndarray) -> int:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((r > 180) & (g < 80) & (b < 80)).sum())


# --- the map ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_map_has_one_point_per_test_row_and_marks_what_the_head_gets_wrong(digits):
    X, y, meta, pred = _predict(digits)
    m = class_map(digits["test"], head_file=digits["head"])
    assert m["xy"].shape == (len(y), 2) and np.isfinite(m["xy"]).all()
    assert np.array_equal(m["rows"], np.arange(len(y)))
    assert np.array_equal(m["y"], y) and np.array_equal(m["index"], meta["index"])
    assert np.array_equal(m["wrong"], pred != y)
    assert 0 < m["wrong"].sum() < len(y)          # random-init features: some mistakes, mostly right
    assert m["classes"] == meta["classes"] == [str(i) for i in range(10)]
    assert m["head"] == "logreg" and m["layer"] == "penultimate" and m["split"] == "test"
    assert m["identity"] == meta["identity"]


def test_map_without_head_has_no_mistakes_and_names_no_head(synthetic):
    m = class_map(synthetic["test"])
    assert m["wrong"] is None and m["head"] is None and len(m["xy"]) == 48


def test_map_is_deterministic_for_a_seed(synthetic):
    feats = load_features(synthetic["test"])
    a = embed_2d(feats.X, feats.y, seed=0)
    b = embed_2d(feats.X, feats.y, seed=0)
    assert np.array_equal(a.xy, b.xy) and np.array_equal(a.rows, b.rows)
    sub0, sub1 = (embed_2d(feats.X, feats.y, seed=s, max_points=30) for s in (0, 1))
    assert not np.array_equal(sub0.rows, sub1.rows)          # the seed picks the subsample
    from_features = class_map(feats, seed=0)     # Features in, same as the file
    assert np.array_equal(from_features["xy"], a.xy)


def test_subsample_is_stratified_seeded_and_exact():
    y = np.repeat([0, 1, 2, 3], [500, 300, 30, 3])
    rows = stratified_rows(y, 100, seed=0)
    counts = np.bincount(y[rows], minlength=4)
    assert len(rows) == 100 and len(np.unique(rows)) == 100 and np.all(np.diff(rows) > 0)
    assert np.all(counts >= 1)                                 # the 3-row class keeps a point
    assert np.all(np.abs(counts - 100 * np.bincount(y) / len(y)) <= 1.0)
    assert np.array_equal(rows, stratified_rows(y, 100, seed=0))
    assert not np.array_equal(rows, stratified_rows(y, 100, seed=1))
    assert np.array_equal(subsample(50, y[:50], max_points=80), np.arange(50))   # under the cap: all rows


def test_map_subsamples_stratified_above_max_points(digits):
    X, y, _, _ = _predict(digits)
    emb = embed_2d(X, y, seed=0, max_points=60)
    assert emb.xy.shape == (60, 2) and len(emb.rows) == 60
    assert np.all(np.abs(np.bincount(y[emb.rows], minlength=10) - 60 * np.bincount(y) / len(y)) <= 1.0)
    m = class_map(digits["test"], head_file=digits["head"], max_points=60)
    assert np.array_equal(m["rows"], emb.rows) and np.array_equal(m["xy"], emb.xy)
    assert np.array_equal(m["y"], y[emb.rows])


def test_map_figure_marks_exactly_the_wrong_points():
    rng = np.random.default_rng(0)
    xy, y = rng.normal(size=(30, 2)), np.arange(30) % 3
    wrong = np.zeros(30, bool)
    wrong[[2, 7, 11]] = True
    fig = map_figure(xy, y, ["a", "b", "c"], wrong=wrong)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c", "misclassified (3 of 30)"]
    marks = ax.collections[-1]
    assert np.allclose(marks.get_offsets(), xy[wrong])
    assert len(fig.axes) == 1                     # a legend, no colour bar


def test_map_figure_uses_a_colour_bar_beyond_twenty_classes():
    rng = np.random.default_rng(1)
    xy, y = rng.normal(size=(100, 2)), np.arange(100) % 25
    fig = map_figure(xy, y, [f"c{i}" for i in range(25)])
    assert len(fig.axes) == 2 and fig.axes[0].get_legend() is None


def test_write_map_goes_beside_the_head_and_decodes(digits):
    path = write_map(digits["test"], head_file=digits["head"], results_root=digits["results"], max_points=120)
    assert path == Path(digits["head"]).parent / "map-tsne-logreg.png"
    rgb = _decoded(path)
    assert rgb.shape[0] > 400 and rgb.shape[1] > 500 and rgb.std() > 5
    plain = write_map(head_file=None, test_features=digits["test"], results_root=digits["results"], max_points=40)
    assert plain.name == "map-tsne.png" and plain.parent == path.parent


def test_map_finds_the_test_features_from_the_head(folder):
    m = class_map(head_file=folder["head"])       # the head's result JSON names its test split (val here)
    _, y, meta, pred = _predict(folder)
    assert m["split"] == "val" and np.array_equal(m["wrong"], pred != y) and len(m["xy"]) == len(y) == 12


def test_umap_when_missing_is_a_user_error_naming_the_package():
    X = np.random.default_rng(0).normal(size=(20, 8))
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(UserError, match="pip install umap-learn"):
            embed_2d(X, method="umap")
    with pytest.raises(UserError, match="unknown map method"):
        embed_2d(X, method="pca")


def test_a_head_from_other_features_is_refused(digits, synthetic):
    with pytest.raises(UserError, match="other features"):
        class_map(synthetic["test"], head_file=digits["head"])
    with pytest.raises(UserError, match="other features"):
        sample_grid(synthetic["test"], digits["head"])


# --- the sample grid --------------------------------------------------------------------------

def test_sample_grid_in_memory_shows_n_images_with_cache_labels_and_head_mistakes(digits):
    X, y, meta, pred = _predict(digits)
    g = sample_grid(digits["test"], digits["head"], n=12, seed=0)
    assert len(g.images) == len(g.rows) == 12 and len(np.unique(g.rows)) == 12
    assert np.array_equal(g.true, y[g.rows]) and np.array_equal(g.index, meta["index"][g.rows])
    assert g.true_labels == [meta["classes"][c] for c in y[g.rows]]
    assert np.array_equal(g.pred, pred[g.rows]) and np.array_equal(g.wrong, pred[g.rows] != y[g.rows])
    assert 0 < g.wrong.sum() < 12                 # a mix of right and wrong
    assert g.split_wrong == int((pred != y).sum()) and g.split_rows == len(y)
    source = load_dataset("digits").splits["test"]
    for img, i in zip(g.images, g.index):         # the very images those rows were extracted from
        assert np.array_equal(img, source.arrays[i])
    again = sample_grid(digits["test"], digits["head"], n=12, seed=0)
    assert np.array_equal(again.rows, g.rows)
    assert not np.array_equal(sample_grid(digits["test"], digits["head"], n=12, seed=1).rows, g.rows)


def test_sample_grid_only_mistakes(digits):
    g = sample_grid(digits["test"], digits["head"], n=6, seed=0, only_mistakes=True)
    assert len(g.rows) == 6 and g.wrong.all()


def test_sample_grid_rebuilds_a_dataset_with_options(synthetic):
    _, y, meta, pred = _predict(synthetic)
    g = sample_grid(synthetic["test"], synthetic["head"], n=5, seed=3)
    assert len(g.images) == 5 and np.array_equal(g.true, y[g.rows]) and np.array_equal(g.pred, pred[g.rows])
    source = load_dataset("synthetic", n=48, size=16, classes=3, seed=1).splits["test"]
    assert all(np.array_equal(img, source.arrays[i]) for img, i in zip(g.images, g.index))


def test_sample_grid_from_an_image_folder_shows_the_files(folder):
    _, y, meta, pred = _predict(folder)
    g = sample_grid(None, folder["head"], n=5, seed=0)          # test features found from the head
    assert len(g.images) == 5 and g.split == "val"
    assert np.array_equal(g.true, y[g.rows]) and np.array_equal(g.wrong, pred[g.rows] != y[g.rows])
    for img, row, label in zip(g.images, g.rows, g.true_labels):
        path = Path(meta["paths"][row])
        assert path.parent.name == label and path.parent.parent.name == "val"
        assert np.array_equal(img, _decoded(path))
    assert len(sample_grid(None, folder["head"], n=50).images) == len(y) == 12   # n capped at the split


def test_changed_in_memory_images_are_refused(synthetic):
    meta = {**load_features(synthetic["test"]).meta, "fingerprint": "0" * 64}
    with pytest.raises(UserError, match="changed since"):
        dataset_source(meta)


def test_choose_rows_mixes_and_caps():
    wrong = np.zeros(40, bool)
    wrong[[3, 9]] = True
    rows = choose_rows(wrong, 10, seed=0)
    assert len(rows) == 10 and wrong[rows].sum() == 2               # every mistake there is, the rest right
    many = np.ones(40, bool)
    many[[0, 1]] = False
    assert choose_rows(many, 10, seed=0).size == 10 and (~many[choose_rows(many, 10, seed=0)]).sum() == 2
    with pytest.raises(UserError, match="no mistakes"):
        choose_rows(np.zeros(5, bool), 3, only_mistakes=True)


def test_plot_samples_highlights_only_mistakes_in_red(tmp_path):
    grey = [np.full((8, 8, 3), v, np.uint8) for v in (30, 90, 150, 210)]
    right = plot_samples(grey, ["1", "2", "3", "4"], ["1", "2", "3", "4"], tmp_path / "right.png")
    one_wrong = plot_samples(grey, ["1", "2", "3", "4"], ["1", "7", "3", "4"], tmp_path / "wrong.png")
    assert _red_pixels(_decoded(right)) == 0 and _red_pixels(_decoded(one_wrong)) > 50
    big = plot_samples(grey * 4, list("abcdefghijklmnop"), list("abcdefghijklmnop"), tmp_path / "big.png")
    assert _decoded(big).shape[0] > _decoded(right).shape[0]
    with pytest.raises(ValueError):
        plot_samples(grey, ["1"], ["1"], tmp_path / "bad.png")


def test_write_samples_goes_beside_the_head_and_decodes(digits):
    path = write_samples(digits["test"], digits["head"], results_root=digits["results"], n=9, seed=0)
    assert path == Path(digits["head"]).parent / "samples-logreg.png"
    rgb = _decoded(path)
    assert rgb.shape[0] > 300 and rgb.shape[1] > 300
    assert _red_pixels(rgb) > 50                  # digits are grey: red is the mistakes' highlight


def test_a_file_gone_since_extraction_is_a_grey_tile_and_a_warning(tmp_path, caplog):
    from probe.analyses.samples import file_images

    good = tmp_path / "ok.png"
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(good)
    with caplog.at_level("WARNING", logger="probe.analyses.samples"):
        shown = file_images([str(good), str(tmp_path / "gone.png")])
    assert shown[0].shape == (10, 12, 3) and (shown[0] == 7).all()
    assert (shown[1] == 200).all() and "gone.png" in caplog.text


@pytest.mark.slow
def test_probe_map_and_samples_subcommands(tmp_path, capsys):
    from extract.api import extract
    from probe.cli import main as probe_main

    extract(model="cifar_resnet20", weights="none", data="digits", cache_dir=tmp_path / "c", precision="fp32",
            image_size=8, progress=False)
    common = ["--cache-dir", str(tmp_path / "c"), "--results-dir", str(tmp_path / "r")]
    assert probe_main(["--head", "logreg", *common, "--no-progress"]) == 0
    capsys.readouterr()
    assert probe_main(["map", "--head", "logreg", *common]) == 0
    png = Path(capsys.readouterr().out.strip())
    assert png.name == "map-tsne-logreg.png" and Image.open(png).size[0] > 300
    assert probe_main(["samples", "--head", "logreg", "-n", "9", *common]) == 0
    png = Path(capsys.readouterr().out.strip())
    assert png.name == "samples-logreg.png" and Image.open(png).size[0] > 300
