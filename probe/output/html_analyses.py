"""The HTML report's sections for the analyses beyond the heads: the transferability ranking with its
correlation (rank.json), the CKA heat maps (similarity-*.json), the few-shot curves (fewshot-*.json)
and the retrieval results; each opens with a summary table.

Each picture is embedded as a data URI beside a relative link to the JSON it was drawn from.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from probe.output.htmltext import breakable


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _link(path: Path, root: Path, text: str | None = None) -> str:
    """A relative link to `path`, showing its path under `root` (or `text`)."""
    rel = path.relative_to(root).as_posix()
    shown = breakable(rel) if text is None else html.escape(text)
    return f'<a href="{html.escape(rel)}" title="{html.escape(rel)}">{shown}</a>'


def _figure(png: Path, json_path: Path, root: Path) -> str:
    """The picture embedded, captioned with a link to its JSON; nothing if it was not drawn."""
    if not png.exists():
        return ""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(png.stem)} · data: {_link(json_path, root)}</figcaption></figure>")


def _num(value, fmt: str) -> str:
    return '<td class="num">-</td>' if value is None else f'<td class="num">{format(value, fmt)}</td>'


def _pct(value):
    return None if value is None else 100 * value


def _tau(c: dict) -> str:
    if c.get("tau") is None:
        return f"- ({html.escape(str(c.get('reason', '')))})"
    return f"<b>{c['tau']:+.3f}</b> (p = {c['p']:.2g}, n = {c['n']})"


def ranking_section(path: Path, root: Path) -> tuple[str, list[Path]]:
    """A rank.json as its table, each score's Kendall's tau and the picture; (html, pictures shown)."""
    data = _load(path)
    if not data or not data.get("schema", "").startswith("featprobe.rank/"):
        return "", []
    head = html.escape(str(data.get("head")))
    out = [f"<h2>Transferability before probing: {html.escape(str(path.parent.relative_to(root)))}</h2>",
           f"<p>{html.escape(data.get('note', ''))}.</p>",
           "<table><tr><th>rank</th><th>backbone / tap</th><th>LogME</th><th>H-score</th><th>N</th>"
           f"<th>{head} test top-1 %</th></tr>"]
    for r in data.get("rows") or []:
        top1 = _pct(r.get("test_top1"))
        out.append(f"<tr><td class=\"num\">{r.get('logme_rank')}</td><td>{breakable(r['label'])} / "
                   f"{breakable(r['tap'])}</td>{_num(r.get('logme'), '.4f')}{_num(r.get('hscore'), '.3f')}"
                   f"{_num(r.get('n'), 'd')}{_num(top1, '.2f')}</tr>")
    out.append("</table><ul>")
    for score, name in (data.get("scores") or {}).items():
        out.append(f"<li>Kendall's tau, {html.escape(name)} vs {head} test top-1: "
                   f"{_tau((data.get('correlation') or {}).get(score, {}))}</li>")
    out.append("</ul>")
    png = path.with_suffix(".png")
    out.append(_figure(png, path, root))
    return "".join(out), [png]


def similarity_section(paths: list[Path], root: Path) -> tuple[str, list[Path]]:
    """Every similarity-*.json as its heat map, with what it compares."""
    parts, shown = [], []
    for path in paths:
        data = _load(path)
        if not data or not data.get("schema", "").startswith("featprobe.similarity/"):
            continue
        png = path.with_suffix(".png")
        where = data.get("rows") or f"{data.get('split', '')} split"
        parts.append(f"<p>{html.escape(data['a']['label'])} vs {html.escape(data['b']['label'])}: linear CKA "
                     f"({html.escape(data.get('estimator', ''))}) over {data.get('n')} images, "
                     f"{html.escape(where)}.</p>" + _cka_table(data) + _figure(png, path, root))
        shown.append(png)
    if not parts:
        return "", []
    return "<h2>How alike are the representations: linear CKA</h2>" + "".join(parts), shown


def _cka_table(data: dict) -> str:
    """The reported CKA matrix: rows a's taps, columns b's."""
    cols = data["b"].get("taps") or []
    out = ["<table><tr><th>" + breakable(data["a"]["label"]) + " \\ " + breakable(data["b"]["label"]) + "</th>"
           + "".join(f"<th>{breakable(t)}</th>" for t in cols) + "</tr>"]
    for tap, row in zip(data["a"].get("taps") or [], data.get("cka") or []):
        out.append(f"<tr><td>{breakable(tap)}</td>" + "".join(_num(v, ".3f") for v in row) + "</tr>")
    return "".join(out) + "</table>"


def fewshot_section(paths: list[Path], root: Path) -> tuple[str, list[Path]]:
    """Every fewshot-*.json as one row of mean test top-1 per k (95% interval half-width), with its picture."""
    rows, shown, ks = [], [], []
    found = [(p, d) for p in paths if (d := _load(p)) and str(d.get("schema", "")).startswith("featprobe.fewshot/")]
    for _, data in found:
        ks += [k for k in data.get("shots") or [] if k not in ks]
    if not found:
        return "", []
    head = "<tr><th>dataset</th><th>model / layer</th><th>head</th>" + "".join(
        f"<th>{html.escape(str(k))}-shot %</th>" if k != "all" else "<th>all %</th>" for k in ks) + "</tr>"
    for path, data in found:
        by_k = dict(zip(data.get("shots") or [], data.get("points") or []))
        cells = []
        for k in ks:
            p = by_k.get(k)
            spread = f" ± {100 * p['ci95_halfwidth']:.1f}" if p and p.get("ci95_halfwidth") is not None else ""
            cells.append('<td class="num">-</td>' if not p else f'<td class="num">{100 * p["mean"]:.1f}{spread}</td>')
        rows.append(f"<tr><td>{breakable(data.get('dataset'))}</td><td>{breakable(data.get('model'))} / "
                    f"{breakable(data.get('layer'))}</td><td>{html.escape(str(data.get('head')))}</td>"
                    f"{''.join(cells)}</tr>")
        png = path.with_suffix(".png")
        if png.exists():
            shown.append(png)
    pictures = "".join(_figure(p.with_suffix(".png"), p, root) for p, _ in found)
    return ("<h2>How many labels: few-shot curves</h2><p>Mean test top-1 over the seeded draws, ± the 95% "
            f"interval's half-width.</p><table>{head}{''.join(rows)}</table>" + pictures), shown


def retrieval_section(results: list[dict], root: Path) -> str:
    """One row per retrieval result: recall@k, mAP@R, precision@k, linked to its JSON."""
    rows = [r for r in results if r.get("kind") == "retrieval" and (r.get("metrics") or {}).get("retrieval")]
    if not rows:
        return ""
    ks = rows[0]["metrics"]["retrieval"].get("ks", [1, 5, 10])
    head = ("<tr><th>dataset</th><th>model</th><th>layer</th>" + "".join(f"<th>recall@{k} %</th>" for k in ks)
            + "<th>mAP@R %</th>" + "".join(f"<th>precision@{k} %</th>" for k in ks)
            + "<th>queries</th><th>gallery</th><th>result</th></tr>")
    body = []
    for r in rows:
        o = r["metrics"]["retrieval"]["overall"]
        cells = ([_num(_pct(o.get(f"recall@{k}")), ".2f") for k in ks] + [_num(_pct(o.get("map@r")), ".2f")]
                 + [_num(_pct(o.get(f"precision@{k}")), ".2f") for k in ks])
        link = _link(Path(r["_path"]), root, Path(r["_path"]).name) if r.get("_path") else "-"
        body.append(f"<tr><td>{breakable(r.get('dataset'))}</td><td>{breakable(r.get('model'))}</td>"
                    f"<td>{breakable(r.get('layer'))}</td>{''.join(cells)}{_num(o.get('queries'), 'd')}"
                    f"{_num(r['metrics']['retrieval'].get('gallery'), 'd')}<td>{link}</td></tr>")
    return ("<h2>Retrieval: test images as queries, the train+val images as gallery</h2>"
            "<p>Cosine similarity; top-1 in the other tables is recall@1 (the 1-nearest-neighbour accuracy).</p>"
            f'<table class="wide">{head}{"".join(body)}</table>')


def analysis_sections(root: Path, results: list[dict]) -> tuple[str, set[Path]]:
    """(the sections' html, the pictures they embedded) for every analysis under `root`."""
    parts, shown = [], set()
    for path in sorted(root.glob("**/rank.json")):
        text, pngs = ranking_section(path, root)
        parts.append(text)
        shown.update(pngs)
    text, pngs = similarity_section(sorted(root.glob("**/similarity-*.json")), root)
    parts.append(text)
    shown.update(pngs)
    text, pngs = fewshot_section(sorted(root.glob("**/fewshot-*.json")), root)
    parts.append(text)
    shown.update(pngs)
    parts.append(retrieval_section(results, root))
    return "".join(parts), shown
