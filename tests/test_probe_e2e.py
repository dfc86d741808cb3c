"""Real EfficientNet-Lite0 features of ants/bees: every linear head reaches 0.93 on the held-out split."""

import json

import pytest

from probe.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0_cache(lite0_hymenoptera):
    return lite0_hymenoptera


def test_linear_heads_on_ants_bees(lite0_cache, tmp_path, capsys):
    results = tmp_path / "results"
    for head in ("linear", "logreg", "svm"):
        assert main(["--head", head, "--cache-dir", str(lite0_cache), "--results-dir", str(results),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no test split" in out
    for head in ("linear", "logreg", "svm"):
        (path,) = results.glob(f"*/efficientnet_lite0/penultimate/{head}.json")
        r = json.loads(path.read_text())
        assert r["test_split"] == "val" and r["sizes"]["test"] == 153
        assert r["metrics"]["top1"] >= 0.93, (head, r["metrics"]["top1"])


def test_predict_real_images(lite0_cache, hymenoptera, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["--head", "logreg", "--cache-dir", str(lite0_cache), "--results-dir", str(results),
                 "--no-progress"]) == 0
    bees = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:3]
    ants = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:3]
    capsys.readouterr()
    code = main(["predict", "--head", "logreg", "--cache-dir", str(lite0_cache), "--results-dir", str(results),
                 *map(str, bees + ants)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 6
    labels = [line.split("\t")[1].split()[0] for line in out]
    assert sum(lab == "bees" for lab in labels[:3]) + sum(lab == "ants" for lab in labels[3:]) >= 5


def test_predict_lists_an_unreadable_image_and_labels_the_rest(lite0_cache, hymenoptera, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["--head", "logreg", "--cache-dir", str(lite0_cache), "--results-dir", str(results),
                 "--no-progress"]) == 0
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    capsys.readouterr()
    code = main(["predict", "--head", "logreg", "--cache-dir", str(lite0_cache), "--results-dir", str(results),
                 str(folder)])
    out, err = capsys.readouterr()
    assert code == 0 and len(out.strip().splitlines()) == 2 and "broken.jpg" not in out
    assert "unreadable: " in err and "broken.jpg" in err
    (folder / "only.jpg").write_bytes(b"garbage")
    for good in folder.glob("*.jpg"):
        if good.name not in ("broken.jpg", "only.jpg"):
            good.unlink()
    assert main(["predict", "--head", "logreg", "--cache-dir", str(lite0_cache), "--results-dir", str(results),
                 str(folder)]) == 2
    assert "none of the 2 images could be read" in capsys.readouterr().err
