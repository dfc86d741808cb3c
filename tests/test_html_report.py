"""The HTML report: one self-contained file whose every picture decodes and whose tables hold the results."""

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

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
    for model in ("m1", "m2"):
        assert main(["--head", "logreg,knn", "--model", model, "--cache-dir", str(tmp / "cache"), "--results-dir",
                     str(tmp / "r"), "--no-progress"]) == 0
    assert main(["--report", "--format", "html", "--results-dir", str(tmp / "r")]) == 0
    return tmp / "r" / "report.html"


def test_every_embedded_picture_decodes_and_nothing_is_fetched(report):
    page = _Collect()
    page.feed(report.read_text())
    pngs = sorted(p.name for p in report.parent.glob("**/*.png") if p.name != "report.png")
    assert len(page.images) == len(pngs) >= 6   # 2 models x (2 confusion matrices + comparison)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.width > 100 and img.height > 100
    assert page.links == [] and page.scripts == 0


def test_tables_hold_every_result_and_its_provenance(report):
    text = report.read_text()
    results = [json.loads(p.read_text()) for p in report.parent.glob("**/*.json") if ".skops" not in p.name]
    assert len(results) == 4
    for r in results:
        assert f"{100 * r['metrics']['top1']:.2f}" in text
        assert f"{r['dataset']} · {r['model']} · {r['layer']} · {r['head']}" in text
    assert text.count("<details><summary>a · m") == 4


def test_report_renders_in_a_headless_browser(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no headless Chromium here")
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2000", report.as_uri()], capture_output=True, timeout=120)
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000) and len(set(img.tobytes())) > 10   # not a blank page
