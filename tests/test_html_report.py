"""The HTML report: one self-contained file whose every picture decodes and whose tables hold the results."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from browser import run_chromium
from probe.cli import main
from probe_helpers import toy_cache


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.cells, self.scripts = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.cells.append(data.strip())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    toy_cache(tmp / "cache", dataset="a", model="m1")
    toy_cache(tmp / "cache", dataset="a", model="m2", seed=3)
    assert main(["--head", "logreg,knn", "--model", "m1,m2", "--cache-dir", str(tmp / "cache"), "--results-dir",
                 str(tmp / "r"), "--no-progress"]) == 0
    assert main(["--head", "knn", "--model", "m1", "--shots", "1,2,all", "--seeds", "2", "--cache-dir",
                 str(tmp / "cache"), "--results-dir", str(tmp / "r"), "--no-progress"]) == 0
    assert main(["similarity", "--model", "m1", "--cache-dir", str(tmp / "cache"), "--results-dir",
                 str(tmp / "r"), "--no-progress"]) == 0
    assert main(["--report", "--format", "html", "--results-dir", str(tmp / "r")]) == 0
    return tmp / "r" / "report.html"


def test_every_embedded_picture_decodes_and_nothing_is_fetched(report):
    page = _Collect()
    page.feed(report.read_text())
    pngs = sorted(p.name for p in report.parent.glob("**/*.png") if p.name != "report.png")
    assert len(page.images) == len(pngs) >= 8   # 2 x (2 confusion matrices + comparison), few-shot, CKA
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.width > 100 and img.height > 100
    # links only to the page's own sections and to JSON files beside it: nothing to fetch
    assert all(link.startswith("#") or (link.endswith(".json") and ":" not in link) for link in page.links)
    assert page.scripts == 0


def test_contents_link_every_section_and_confusion_matrices_are_folded(report):
    text = report.read_text()
    ids = re.findall(r'<h2 id="(s\d+)">', text)
    toc = text[text.index("<nav>"):text.index("</nav>")]
    assert len(ids) >= 6 and re.findall(r'href="#(s\d+)"', toc) == ids and text.index("<nav>") < text.index("<h2")
    folded = re.findall(r"<details><summary>(\d+) confusion matri(?:x|ces)</summary>(.*?)</details>", text, re.S)
    assert sorted(int(n) for n, _ in folded) == [2, 2] and all(body.count("<img") == 2 for _, body in folded)
    assert all("confusion" not in m for m in re.findall(r"<figcaption>([^<]*)</figcaption>",
                                                         re.sub(r"<details>.*?</details>", "", text, flags=re.S)))


def test_each_analysis_has_a_summary_table(report):
    text = report.read_text()
    fewshot = text[text.index("few-shot curves"):]
    assert "<th>1-shot %</th><th>2-shot %</th><th>all %</th>" in fewshot
    result = json.loads(next(report.parent.glob("**/fewshot-knn.json")).read_text())
    assert f"{100 * result['points'][-1]['mean']:.1f}" in fewshot
    cka = json.loads(next(report.parent.glob("**/similarity-*.json")).read_text())
    assert f"<td class=\"num\">{cka['cka'][0][0]:.3f}</td>" in text[text.index("linear CKA"):]
    assert "<table><tr><th>backbone / tap</th>" in text[text.index("Which backbone"):]


def test_tables_hold_every_result_and_its_provenance(report):
    text = report.read_text()
    results = [r for p in report.parent.glob("**/*.json")
               if (r := json.loads(p.read_text())).get("schema") == "featprobe.result/1"]
    assert len(results) == 4
    for r in results:
        assert f"{100 * r['metrics']['top1']:.2f}" in text
        assert f"{r['dataset']} · {r['model']} · {r['layer']} · {r['head']}" in text
    assert text.count("<details><summary>a · m") == 4


def test_report_renders_in_a_headless_browser(report, tmp_path):
    shot = tmp_path / "page.png"
    run_chromium(report.as_uri(), f"--screenshot={shot}", "--window-size=1200,2000", profile=tmp_path / "profile")
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000) and len(set(img.tobytes())) > 10   # not a blank page
