"""The HTML report fits a 1,400 px window in headless Chromium: long folder, model and layer names wrap
inside the page, and nothing (tables, pictures, captions, unfolded details) widens it."""

import html
import json
import re

import pytest
from PIL import Image

from browser import run_chromium
from probe.cli import main
from probe_helpers import toy_cache

WIDTH = 1400
DATASET = "hand-sign-photographs-of-the-alphabet-3f2a9c"
MODELS = ("timm/convnext_tiny.fb_in22k_ft_in1k", "resnet50.barlowtwins")
# Injected into a copy of the report (the report itself runs no script): after every picture is
# laid out, unfold every <details> and record what reaches beyond the page's column.
MEASURE = """<script>
addEventListener('load', () => {
  for (const d of document.querySelectorAll('details')) d.open = true;
  const root = document.documentElement, edge = document.body.getBoundingClientRect().right;
  const over = [...document.body.querySelectorAll('*')].filter(e => {
    const r = e.getBoundingClientRect(); return r.width > 0 && r.right > edge + 0.5; })
    .map(e => e.tagName.toLowerCase() + ' ' + (e.textContent || '').trim().slice(0, 60));
  document.body.dataset.width = JSON.stringify(
    {viewport: innerWidth, client: root.clientWidth, scroll: root.scrollWidth, edge: edge, over: over});
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wide")
    cache, results = tmp / "cache", tmp / "r"
    for model in MODELS:
        toy_cache(cache, dataset=DATASET, model=model, n_classes=12, image_size=96, precision="bf16",
                  precision_requested="bf16", dtype="float16")
    common = ["--cache-dir", str(cache), "--results-dir", str(results), "--no-progress"]
    assert main(["--head", "logreg,knn,retrieval", "--model", ",".join(MODELS), *common]) == 0
    assert main(["--head", "knn", "--model", MODELS[0], "--shots", "1,2,all", "--seeds", "2", *common]) == 0
    assert main(["similarity", "--model", ",".join(MODELS), *common]) == 0
    assert main(["rank", "--model", "all", *common]) == 0
    assert main(["--report", "--format", "html", "--results-dir", str(results)]) == 0
    return results / "report.html"


@pytest.mark.slow
def test_nothing_is_wider_than_a_1400_px_window(report, tmp_path):
    page = tmp_path / "measured.html"
    page.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    proc = run_chromium(page.as_uri(), f"--window-size={WIDTH},900", "--virtual-time-budget=10000", "--dump-dom",
                        profile=tmp_path / "profile")
    found = re.search(r'data-width="([^"]*)"', proc.stdout)
    assert found, proc.stderr[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["viewport"] == WIDTH
    assert seen["scroll"] <= seen["client"], json.dumps(seen)
    assert seen["over"] == [], json.dumps(seen)


@pytest.mark.slow
def test_the_report_draws_at_1400_px(report, tmp_path):
    shot = tmp_path / "page.png"
    run_chromium(report.as_uri(), f"--window-size={WIDTH},2000", f"--screenshot={shot}", profile=tmp_path / "profile")
    img = Image.open(shot).convert("L")
    assert img.size == (WIDTH, 2000) and len(set(img.tobytes())) > 10   # not a blank page
