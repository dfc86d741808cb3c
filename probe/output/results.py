"""Result JSON files and saved heads under results/<dataset>/<model>/<layer>/.

    <head>.json             metrics, hyperparameters, grid, timing, provenance (schema featprobe.result/1)
    <head>.confusion.png    confusion matrix
    <head>.joblib           the refit sklearn Pipeline
    <head>.joblib.json      sidecar: sklearn version, classes, provenance (checked before loading)
"""

from __future__ import annotations

import json
import platform
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np

from extract.core.atomic import atomic_path, write_errors, write_text_atomic
from extract.core.errors import UserError

SCHEMA = "featprobe.result/1"
HEAD_SCHEMA = "featprobe.head/1"


class SklearnVersionWarning(UserWarning):
    """A saved head was written by a different scikit-learn version than the one loading it."""


def library_versions() -> dict:
    import sklearn
    try:
        from importlib.metadata import version
        featprobe = version("featprobe")
    except Exception:
        featprobe = "unknown"
    out = {"featprobe": featprobe, "python": platform.python_version(), "numpy": np.__version__,
           "sklearn": sklearn.__version__, "joblib": joblib.__version__}
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


def save_head(pipeline, result: dict, results_dir="results") -> Path:
    """joblib-dump the refit pipeline beside its result JSON, with a version sidecar; atomically.

    Both files are complete before either is renamed into place, the sidecar last: a crash in between
    leaves a head without a sidecar, which load_head refuses. A write failure is a UserError.
    """
    import sklearn
    path = result_dir(result, results_dir) / f"{_safe(result['head'])}.joblib"
    side_path = Path(str(path) + ".json")
    sidecar = {"schema": HEAD_SCHEMA, "sklearn": sklearn.__version__, "head": result["head"],
               "classes": result.get("classes"), "dataset": result.get("dataset"), "model": result.get("model"),
               "identity": result.get("identity"), "layer": result.get("layer"),
               "hyperparameters": result.get("hyperparameters"), "provenance": result.get("provenance"),
               "created": result.get("created")}
    with write_errors(path), atomic_path(side_path) as side_tmp, atomic_path(path) as head_tmp:
        joblib.dump(pipeline, head_tmp)
        side_tmp.write_text(json.dumps(sidecar, indent=1, default=_default), encoding="utf-8")
        side_path.unlink(missing_ok=True)  # the old sidecar must not vouch for the new head
    return path


def load_head(path):
    """(pipeline, sidecar) of a saved head; warns with SklearnVersionWarning on a version mismatch.

    joblib files run code when loaded, so a file without its sidecar is refused.
    """
    import sklearn
    path = Path(path)
    side_path = Path(str(path) + ".json")
    if not path.exists():
        raise UserError(f"no saved head at {path}: run `python -m probe --head ...` first")
    if not side_path.exists():
        raise UserError(f"{path} has no {side_path.name} sidecar; refusing to load an unverified joblib file")
    try:
        sidecar = json.loads(side_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"cannot read {side_path}") from None
    saved = sidecar.get("sklearn")
    if saved != sklearn.__version__:
        warnings.warn(f"{path.name} was saved with scikit-learn {saved} but this is {sklearn.__version__}; "
                      "its predictions may differ or it may fail: refit it with `python -m probe`",
                      SklearnVersionWarning, stacklevel=2)
    with warnings.catch_warnings():
        # sklearn's own InconsistentVersionWarning repeats ours once per estimator.
        try:
            from sklearn.exceptions import InconsistentVersionWarning
            warnings.simplefilter("ignore", InconsistentVersionWarning)
        except ImportError:
            pass
        try:
            pipeline = joblib.load(path)
        except Exception as e:  # truncated file, missing module, incompatible pickle
            raise UserError(f"cannot load {path}: {type(e).__name__}: {e}; refit it with `python -m probe`") from None
    return pipeline, sidecar
