"""Saved heads: `<head>.skops` (the refit Pipeline) and `<head>.skops.json` (sidecar: versions, classes,
provenance and the head file's sha256).

skops.io rebuilds objects from a description of their state and refuses any type outside scikit-learn's
estimators, numpy and the TRUSTED_TYPES below, so loading a head cannot run code. Heads saved by earlier
versions as `<head>.joblib` are refused with the command that refits them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from extract.core.atomic import atomic_path, write_errors
from extract.core.errors import UserError

HEAD_SCHEMA = "featprobe.head/2"
HEAD_SUFFIX = ".skops"
# Types a saved head may hold beyond skops' defaults (builtins, numpy, scikit-learn estimators).
TRUSTED_TYPES = [
    "sklearn.tree._tree.Tree",                              # inside rf's decision trees
    "probe.heads.knn.KNNClassifier",
    "probe.heads.torch_logreg.TorchLogisticRegression",
    "probe.protocol.rows.Rows", "probe.protocol.rows._Part",  # a streamed knn bank: a reference to the cache
]


class SklearnVersionWarning(UserWarning):
    """A saved head was written by a different scikit-learn version than the one loading it."""


def sidecar_path(path) -> Path:
    return Path(str(path) + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    return o.tolist() if isinstance(o, np.ndarray) else str(o)


def save_head(pipeline, result: dict, results_dir="results") -> Path:
    """Write the refit pipeline as <head>.skops beside its result JSON, with a sidecar; atomically.

    Both files are complete before either is renamed into place, the sidecar last: a crash in between
    leaves a head its sidecar does not vouch for, which load_head refuses. A write failure is a UserError.
    """
    import sklearn
    import skops.io as sio

    from probe.output.results import _safe, result_dir

    path = result_dir(result, results_dir) / f"{_safe(result['head'])}{HEAD_SUFFIX}"
    side_path = sidecar_path(path)
    sidecar = {"schema": HEAD_SCHEMA, "format": "skops", "sklearn": sklearn.__version__, "head": result["head"],
               "classes": result.get("classes"), "dataset": result.get("dataset"), "model": result.get("model"),
               "identity": result.get("identity"), "layer": result.get("layer"),
               "hyperparameters": result.get("hyperparameters"), "provenance": result.get("provenance"),
               "created": result.get("created")}
    with write_errors(path), atomic_path(side_path) as side_tmp, atomic_path(path) as head_tmp:
        sio.dump(pipeline, head_tmp)
        sidecar["sha256"] = _sha256(head_tmp)
        side_tmp.write_text(json.dumps(sidecar, indent=1, default=_default), encoding="utf-8")
        side_path.unlink(missing_ok=True)  # the old sidecar must not vouch for the new head
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _refit(path: Path) -> str:
    name = path.name.split(".")[0] or "NAME"
    return f"refit it with `python -m probe --head {name}`"


def _read_sidecar(path: Path) -> dict:
    side_path = sidecar_path(path)
    if not side_path.exists():
        raise UserError(f"{path} has no {side_path.name} sidecar; refusing to load an unverified head file")
    try:
        sidecar = json.loads(side_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"cannot read {side_path}; {_refit(path)}") from None
    if not isinstance(sidecar, dict) or sidecar.get("schema") != HEAD_SCHEMA or not sidecar.get("sha256"):
        raise UserError(f"{side_path} is not a {HEAD_SCHEMA} sidecar with the head's sha256; {_refit(path)}")
    return sidecar


def load_head(path):
    """(pipeline, sidecar) of a saved head; warns with SklearnVersionWarning on a version mismatch.

    Refused with one line: a joblib head, a head without its sidecar, a head whose sha256 is not the
    sidecar's, and a head holding any type outside the trusted ones.
    """
    import sklearn
    import skops.io as sio

    path = Path(path)
    old = path if path.suffix == ".joblib" else path.with_suffix(".joblib")
    if old.exists() and (old == path or not path.exists()):
        raise UserError(f"{old} is a joblib head, which featprobe no longer loads because loading it could run "
                        f"code; {_refit(old)}")
    if not path.is_file():
        raise UserError(f"no saved head at {path}: run `python -m probe --head ...` first")
    sidecar = _read_sidecar(path)
    if _sha256(path) != sidecar["sha256"]:
        raise UserError(f"{path} is not the file its sidecar describes (sha256 differs); {_refit(path)}")
    saved = sidecar.get("sklearn")
    if saved != sklearn.__version__:
        warnings.warn(f"{path.name} was saved with scikit-learn {saved} but this is {sklearn.__version__}; "
                      "its predictions may differ or it may fail: refit it with `python -m probe`",
                      SklearnVersionWarning, stacklevel=2)
    try:
        untrusted = sorted(set(sio.get_untrusted_types(file=path)) - set(TRUSTED_TYPES))
    except Exception as e:  # noqa: BLE001 - not a skops file, truncated, damaged
        raise UserError(f"cannot read {path}: {_first_line(e)}; {_refit(path)}") from None
    if untrusted:
        raise UserError(f"{path} holds types a featprobe head never holds ({', '.join(untrusted[:5])}); "
                        f"refusing to load it; {_refit(path)}")
    with warnings.catch_warnings():
        # sklearn's own InconsistentVersionWarning repeats ours once per estimator.
        from sklearn.exceptions import InconsistentVersionWarning
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        try:
            pipeline = sio.load(path, trusted=TRUSTED_TYPES)
        except Exception as e:  # noqa: BLE001 - incompatible versions, damaged contents
            raise UserError(f"cannot load {path}: {_first_line(e)}; {_refit(path)}") from None
    return pipeline, sidecar
