"""One self-contained HTML report of every result: a table of contents, tables, pictures embedded as
data URIs (confusion matrices folded), provenance.

Opens offline in any browser: no scripts, no external stylesheets, fonts or images; its only links
are to its own sections and to the JSON files beside it.
"""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from extract.core.atomic import write_errors, write_text_atomic

from probe.output.html_analyses import analysis_sections
from probe.output.htmltext import breakable
from probe.output.report import COLUMNS, NUMERIC, cell_text, collect_rows, format_rows
from probe.output.results import load_results

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; } th, td { padding: .25em .6em; border: 1px solid #ddd; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
h2, h3, p, li, figcaption { overflow-wrap: anywhere; }   /* long names and paths wrap inside the page */
tr.best td { font-weight: 600; background: #eef7ee; } table.wide { font-size: .9em; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: .85em; color: #555; }
nav ol { columns: 2; } details { margin: .3em 0; } pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: .8em; }
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _cell(value, column: str) -> str:
    """A report cell as the table shows it, numbers right-aligned (names may wrap, numbers never)."""
    if column in NUMERIC:
        return f'<td class="num">{html.escape(cell_text(value, column))}</td>'
    return f"<td>{breakable(cell_text(value, column))}</td>"


def _results_table(rows: list[dict]) -> str:
    """Every result, the best test top-1 of each dataset in bold."""
    best = {}
    for r in rows:
        if r["top1"] is not None and r["top1"] > best.get(r["dataset"], -1):
            best[r["dataset"]] = r["top1"]
    head = "".join(f"<th>{breakable(c)}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cls = ' class="best"' if r["top1"] is not None and r["top1"] == best.get(r["dataset"]) else ""
        body.append(f"<tr{cls}>" + "".join(_cell(r.get(c), c) for c in COLUMNS) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _comparison(path: Path) -> str:
    """A compare.json or layers.json (probe --model all / --layer all) as its pivot table."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    rows = data.get("rows") or []
    heads = sorted({r["head"] for r in rows})
    def label(r):
        return f"{r.get('label') or r['backbone']} / {r['tap']}"

    labels = list(dict.fromkeys(map(label, rows)))
    value = {(label(r), r["head"]): r.get("test_top1") for r in rows}
    winner = data.get("winner") or {}
    win = (label(winner), winner.get("head")) if winner else (None, None)
    out = ["<table><tr><th>backbone / tap</th>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>"]
    for label in labels:
        cells = []
        for h in heads:
            v = value.get((label, h))
            mark = " *" if (label, h) == win else ""
            cells.append("<td>-</td>" if v is None else f'<td class="num">{100 * v:.2f}{mark}</td>')
        out.append(f"<tr><td>{breakable(label)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    if winner:
        out.append(f"<p>Chosen on validation: <b>{html.escape(win[0])}</b> with <b>{html.escape(str(win[1]))}</b>"
                   f" (validation {100 * (winner.get('val_top1') or 0):.2f}%, test "
                   f"{100 * (winner.get('test_top1') or 0):.2f}%). * marks it.</p>")
    return "".join(out)


def _provenance(results: list[dict]) -> str:
    out = []
    for r in results:
        summary = f"{r.get('dataset')} · {r.get('model')} · {r.get('layer')} · {r.get('head')} ({r.get('kind', 'probe')})"
        detail = {k: r.get(k) for k in ("identity", "provenance", "versions", "hyperparameters", "validation",
                                        "sizes", "created") if r.get(k) is not None}
        out.append(f"<details><summary>{html.escape(summary)}</summary>"
                   f"<pre>{html.escape(json.dumps(detail, indent=1, default=str))}</pre></details>")
    return "".join(out)


def _pictures(root: Path, shown=frozenset()) -> str:
    """Every PNG under the results folder (confusion matrices, comparisons, curves, maps, samples),
    grouped by the folder it belongs to; those in `shown` are already on the page."""
    groups: dict[Path, list[Path]] = {}
    for png in sorted(root.glob("**/*.png")):
        if (png.parent == root and png.name == "report.png") or png in shown:
            continue
        groups.setdefault(png.parent, []).append(png)
    out = []
    for folder, pngs in groups.items():
        title = str(folder.relative_to(root)) if folder != root else "all results"
        confusion = [p for p in pngs if p.name.endswith(".confusion.png")]
        out.append(f"<h3>{html.escape(title)}</h3>" + "".join(_img(p, p.stem) for p in pngs if p not in confusion))
        if confusion:
            out.append(f"<details><summary>{len(confusion)} confusion matri{'x' if len(confusion) == 1 else 'ces'}"
                       "</summary>" + "".join(_img(p, p.stem) for p in confusion) + "</details>")
    return "".join(out)


def with_contents(body: str) -> str:
    """`body` with an id on every <h2> and, before the first, a table of contents linking to them."""
    titles = []

    def anchor(match):
        titles.append(match.group(1))
        return f'<h2 id="s{len(titles)}">{match.group(1)}</h2>'
    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    if not titles:
        return body
    items = "".join(f'<li><a href="#s{i}">{t}</a></li>' for i, t in enumerate(titles, 1))
    nav = f"<nav><b>Contents</b><ol>{items}</ol></nav>"
    first = body.index('<h2 id="s1">')
    return body[:first] + nav + body[first:]


def write_html_report(results_dir="results") -> Path:
    """Write results/report.html: comparisons, the transferability ranking, CKA heat maps and retrieval
    rows (each picture linked to its JSON), every result, every picture, each row's provenance."""
    root = Path(results_dir)
    rows = collect_rows(root)
    results = load_results(root)
    head = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>featprobe report</title>"
            f"<style>{STYLE}</style></head><body><h1>featprobe report</h1>"
            f"<p>{len(rows)} results under {html.escape(str(root.resolve()))}, written "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.</p>")
    parts = []
    for name, question in (("compare.json", "Which backbone"), ("layers.json", "Which layer")):
        for found in sorted(root.glob(f"**/{name}")):
            parts.append(f"<h2>{question}: {html.escape(str(found.parent.relative_to(root)))}</h2>"
                         + _comparison(found))
    analyses, shown = analysis_sections(root, results)
    parts.append(analyses)
    parts.append("<h2>Every result</h2>" + _results_table(rows))
    parts.append("<h2>Pictures</h2>" + _pictures(root, shown))
    parts.append("<h2>Provenance</h2>" + _provenance(results))
    parts.append(f"<details><summary>Markdown of the table</summary><pre>{html.escape(format_rows(rows, 'markdown'))}"
                 "</pre></details>")
    path = root / "report.html"
    with write_errors(path):
        write_text_atomic(path, head + with_contents("\n".join(parts)) + "</body></html>")
    return path
