"""Collate result JSON files (probe heads and fine-tune runs) into one table, CSV, Markdown and PNG."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .plots import plot_comparison
from .results import load_results

COLUMNS = ("kind", "head", "dataset", "model", "layer", "top1", "balanced_acc", "macro_f1", "fit_s")
FORMATS = ("table", "csv", "markdown")


def result_row(result: dict) -> dict:
    """One report row of a result: identity, headline metrics and seconds spent fitting."""
    m = result.get("metrics") or {}
    t = result.get("timing") or {}
    return {"kind": result.get("kind", "probe"), "head": result.get("head", ""),
            "dataset": result.get("dataset", ""), "model": result.get("model_dir") or result.get("model", ""),
            "layer": result.get("layer", ""), "top1": m.get("top1"), "balanced_acc": m.get("balanced_accuracy"),
            "macro_f1": m.get("macro_f1"),
            "fit_s": (t.get("search_seconds") or 0) + (t.get("fit_seconds") or 0) if t else None}


def collect_rows(results_dir="results") -> list[dict]:
    rows = [result_row(r) for r in load_results(results_dir)]
    return sorted(rows, key=lambda r: (r["dataset"], r["model"], r["layer"], r["kind"] != "probe",
                                       -(r["top1"] or 0)))


def _cell(value, column: str) -> str:
    if value is None:
        return "-"
    if column in ("top1", "balanced_acc", "macro_f1"):
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
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---:" if c in ("top1", "balanced_acc", "macro_f1", "fit_s") else "---"
                                for c in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out) + "\n"


def write_report(results_dir="results") -> tuple[list[dict], dict[str, Path]]:
    """Write report.csv, report.md and report.png in results_dir; returns (rows, paths)."""
    rows = collect_rows(results_dir)
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "report.csv", "markdown": folder / "report.md", "png": folder / "report.png"}
    paths["csv"].write_text(format_rows(rows, "csv"))
    paths["markdown"].write_text(format_rows(rows, "markdown"))
    plot_comparison([{"label": f"{r['dataset']}/{r['model']}/{r['layer']} · {r['head']}", "top1": r["top1"],
                      "seconds": r["fit_s"]} for r in rows], paths["png"], title="featprobe results")
    return rows, paths
