"""Result JSON files and saved heads under results/<dataset>/<model>/<layer>/.

    <head>.json             metrics, hyperparameters, grid, timing, provenance (schema featprobe.result/1)
    <head>.confusion.png    confusion matrix
    <head>.skops            the refit sklearn Pipeline (see probe.output.headfile)
    <head>.skops.json       its sidecar: versions, classes, provenance, sha256
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from extract.core.atomic import write_errors, write_text_atomic

SCHEMA = "featprobe.result/1"


def library_versions() -> dict:
    import sklearn
    try:
        from importlib.metadata import version
        featprobe = version("featprobe")
    except Exception:
        featprobe = "unknown"
    out = {"featprobe": featprobe, "python": platform.python_version(), "numpy": np.__version__,
           "sklearn": sklearn.__version__}
    if "torch" in sys.modules:  # recorded when loaded; never imported just for this
        out["torch"] = sys.modules["torch"].__version__
    return out


def _safe(name: str) -> str:
    return str(name).replace("/", "_").replace("\\", "_") or "unknown"


def result_dir(result: dict, results_dir="results") -> Path:
    """<results_dir>/<data label>/<model>[/<variant>]/<layer>: decided by the result's feature identity."""
    from extract.store.identity import FeatureIdentity
    return FeatureIdentity.from_dict(result["identity"]).results_dir(results_dir, _safe(result.get("layer")))


def _default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_result(result: dict, results_dir="results", confusion_png: bool = True) -> Path:
    """Write <results_dir>/<dataset>/<model>/<layer>/<head>.json (+ <head>.confusion.png), each atomically.

    A file that cannot be written (disk full, no permission) is a UserError naming it; what was there stays.
    """
    folder = result_dir(result, results_dir)
    path = folder / f"{_safe(result['head'])}.json"
    with write_errors(path):
        write_text_atomic(path, json.dumps(result, indent=1, default=_default))
    matrix = (result.get("metrics") or {}).get("confusion_matrix")
    if confusion_png and matrix:
        from probe.output.plots import plot_confusion
        png = folder / f"{_safe(result['head'])}.confusion.png"
        title = f"{result['head']} · {result.get('dataset')} · {result.get('model')} · {result.get('layer')}"
        with write_errors(png):
            plot_confusion(matrix, result.get("classes") or [str(i) for i in range(len(matrix))], png, title=title)
    return path


def load_results(results_dir="results") -> list[dict]:
    """Every result JSON (probe and fine-tune) under results_dir, sorted by path."""
    out = []
    for path in sorted(Path(results_dir).glob("**/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            data["_path"] = str(path)
            out.append(data)
    return out
