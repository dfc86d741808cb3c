"""Collate result JSON files (probe heads and fine-tune runs) into one table, CSV, Markdown and PNG."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from extract.core.atomic import write_errors, write_text_atomic

from probe.output.plots import plot_comparison
from probe.output.results import load_results


def _metric(name: str):
    return lambda r: (r.get("metrics") or {}).get(name)


def _fit_seconds(r: dict):
    t = r.get("timing") or {}
    return (t.get("search_seconds") or 0) + (t.get("fit_seconds") or 0) if t else None


def _variant(r: dict) -> str:
    """The identity's readable choices beyond the defaults (input size, normalisation, ...), or '-'."""
    if not r.get("identity"):
        return "-"
    from extract.store.identity import FeatureIdentity
    return FeatureIdentity.from_dict(r["identity"]).variant or "-"


# Report column -> its value in a result JSON. A column added here reaches every format.
FIELDS = {
    "kind": lambda r: r.get("kind", "probe"),
    "head": lambda r: r.get("head", ""),
    "dataset": lambda r: r.get("dataset", ""),
    "model": lambda r: r.get("model", ""),
    "layer": lambda r: r.get("layer", ""),
    "precision": lambda r: r.get("precision", ""),
    "dtype": lambda r: r.get("dtype", ""),
    "variant": lambda r: _variant(r),
    "top1": _metric("top1"),
    "balanced_acc": _metric("balanced_accuracy"),
    "macro_f1": _metric("macro_f1"),
    "fit_s": _fit_seconds,
}
COLUMNS = tuple(FIELDS)
PERCENT = ("top1", "balanced_acc", "macro_f1")  # fractions, shown as percentages
NUMERIC = (*PERCENT, "fit_s")  # right-aligned in Markdown
FORMATS = ("table", "csv", "markdown")


def result_row(result: dict) -> dict:
    """One report row of a result: identity, headline metrics and seconds spent fitting."""
    return {column: get(result) for column, get in FIELDS.items()}


def collect_rows(results_dir="results") -> list[dict]:
    rows = [result_row(r) for r in load_results(results_dir)]
    return sorted(rows, key=lambda r: (r["dataset"], r["model"], r["layer"], r["precision"], r["dtype"],
                                       r["kind"] != "probe",
                                       -(r["top1"] or 0)))


def cell_text(value, column: str) -> str:
    if value is None:
        return "-"
    if column in PERCENT:
        return f"{100 * value:.2f}"
    if column == "fit_s":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def format_rows(rows: list[dict], fmt: str = "table", columns=COLUMNS) -> str:
    """Rows as an aligned terminal table, CSV (raw values) or a Markdown table (percentages)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    cells = [[cell_text(r.get(c), c) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---:" if c in NUMERIC else "---" for c in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out) + "\n"


def write_report(results_dir="results") -> tuple[list[dict], dict[str, Path]]:
    """Write report.csv, report.md and report.png in results_dir, each atomically; returns (rows, paths).

    A file that cannot be written is a UserError naming it.
    """
    rows = collect_rows(results_dir)
    folder = Path(results_dir)
    paths = {"csv": folder / "report.csv", "markdown": folder / "report.md", "png": folder / "report.png"}
    for fmt in ("csv", "markdown"):
        with write_errors(paths[fmt]):
            write_text_atomic(paths[fmt], format_rows(rows, fmt))
    with write_errors(paths["png"]):
        plot_comparison([{"label": f"{r['dataset']}/{r['model']}/{r['layer']} · {r['head']}", "top1": r["top1"],
                          "seconds": r["fit_s"]} for r in rows], paths["png"], title="featprobe results")
    return rows, paths
