"""The HTML report shows the transferability ranking, the CKA heat maps and the retrieval rows, each
picture once and linked to the JSON it was drawn from."""

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.store.cache import write_features
from probe.cli import main
from probe_helpers import toy_cache, toy_identity


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.captions, self._in_caption = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append((a.get("alt"), a.get("src", "")))
        if tag == "a":
            self.links.append(a.get("href"))
        self._in_caption = self._in_caption or tag == "figcaption"

    def handle_endtag(self, tag):
        self._in_caption = self._in_caption and tag != "figcaption"

    def handle_data(self, data):
        if self._in_caption and data.strip():
            self.captions.append(data.strip())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyses")
    cache, results = tmp / "cache", tmp / "r"
    toy_cache(cache, dataset="a", model="m1")
    toy_cache(cache, dataset="a", model="m2", seed=3)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):        # a third backbone with two taps, for the heat map
        n = 120 if split == "train" else 60
        feats = {"early": rng.normal(size=(n, 6)), "penultimate": rng.normal(size=(n, 4))}
        write_features(toy_identity(dataset="a", model="m3"), cache, split, feats, np.arange(n) % 3, None,
                       {"classes": ["c0", "c1", "c2"], "layers": list(feats)})
    common = ["--cache-dir", str(cache), "--results-dir", str(results), "--no-progress"]
    assert main(["--head", "logreg,retrieval", "--model", "all", *common, "--no-save"]) == 0
    assert main(["rank", "--model", "all", *common]) == 0
    assert main(["similarity", "--model", "m3", "--layer", "all", *common]) == 0
    assert main(["--report", "--format", "html", "--results-dir", str(results)]) == 0
    return results / "report.html"


def test_each_analysis_has_its_section_and_numbers(report):
    text = report.read_text()
    rank = json.loads((report.parent / "a" / "rank.json").read_text())
    assert "Transferability before probing: a" in text and "train split only" in text
    for r in rank["rows"]:
        assert f"{r['logme']:.4f}" in text and f"{100 * r['test_top1']:.2f}" in text
    assert f"{rank['correlation']['logme']['tau']:+.3f}" in text
    assert "How alike are the representations: linear CKA" in text and "m3 vs m3" in text
    assert "Retrieval: test images as queries" in text
    for path in report.parent.glob("**/retrieval.json"):
        overall = json.loads(path.read_text())["metrics"]["retrieval"]["overall"]
        assert f"{100 * overall['map@r']:.2f}" in text


def test_every_picture_is_embedded_once_and_linked_to_its_json(report):
    page = _Page()
    page.feed(report.read_text())
    alts = [alt for alt, _ in page.images]
    pngs = [p for p in report.parent.glob("**/*.png") if p.name != "report.png"]
    assert len(alts) == len(pngs)                     # none left out, none twice
    assert alts.count("rank") == 1 and alts.count("similarity-m3") == 1
    for _, src in page.images:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.width > 100 and img.height > 100
    assert "a/rank.json" in page.links and "a/similarity-m3.json" in page.links
    assert sum(link.endswith("retrieval.json") for link in page.links) == 3
    for link in page.links:                            # the page's own sections, or files beside it
        assert link.startswith("#s") or (not Path(link).is_absolute() and (report.parent / link).is_file())
