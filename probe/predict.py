"""`python -m probe predict`: the cache's backbone + a saved head on new image files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from extract.errors import UserError


def image_files(items) -> list[str]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    from extract.images import is_image_file
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f.name))
            if not found:
                raise UserError(f"no image files in folder {p}")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise UserError(f"no such image or folder: {p}")
    return out


def head_file_for(args, notify) -> Path:
    """<results>/<dataset>/<model>/<layer>/<head>.joblib for the selected cache."""
    from extract.cache import load_features

    from .cli import _selection
    from .data import cache_names
    from .heads import get_head
    from .results import result_dir

    if args.head_file:
        return Path(args.head_file)
    head = get_head(args.head).name
    sel = _selection(args, notify)
    train = sel.files["train"]
    meta = load_features(train, sel.layer, lazy=True).meta
    meta.pop("file").close()
    dataset, model_dir = cache_names(Path(train), meta["dataset"], meta["model"], meta["weights"])
    ident = {"dataset": dataset, "layer": meta["layer"], "model_dir": model_dir}
    return result_dir(ident, args.results_dir) / f"{head}.joblib"


def backbone_weights(prov: dict) -> str:
    """The weights argument that rebuilds the backbone a cache was extracted with."""
    wfile, wid = prov.get("weights_file"), prov.get("weights") or "default"
    if wfile and Path(wfile).name.split(".")[0] == wid:  # a local checkpoint file, not a registry tag
        if not os.path.isfile(wfile):
            raise UserError(f"the cache was extracted with weights file {wfile}, which no longer exists")
        return wfile
    return wid


def predict_images(pipeline, sidecar: dict, paths: list[str], *, device="auto", batch_size=32, top=1) -> list[dict]:
    """[{path, labels: [(class, probability or None)]}] for each image."""
    from extract.datasets import ImageSource
    from extract.engine import embed
    from extract.models import load_backbone
    from extract.preprocess import Preprocess

    prov = sidecar.get("provenance") or {}
    name = prov.get("model") or prov.get("name") or sidecar.get("model")
    if not name:
        raise UserError("the saved head records no backbone; refit it with `python -m probe`")
    layer = sidecar.get("layer") or "penultimate"
    backbone = load_backbone(name, weights=backbone_weights(prov), layers=[layer])
    if prov.get("preprocess"):  # what the cache actually applied (e.g. no crop for small in-memory images)
        recorded = prov["preprocess"]
        backbone.preprocess = Preprocess(**{**recorded, "mean": tuple(recorded["mean"]), "std": tuple(recorded["std"])})
    if prov.get("weights_sha256") and backbone.weights_sha256 and prov["weights_sha256"] != backbone.weights_sha256:
        warnings.warn(f"the {name} weights file differs from the one the features were extracted with")
    classes = sidecar.get("classes") or []
    source = ImageSource("predict", classes, np.zeros(len(paths), np.int64), paths=paths)
    X = embed(backbone, source, batch_size=batch_size, device=device)[layer]
    est_classes = np.asarray(pipeline.classes_)
    proba = pipeline.predict_proba(X) if hasattr(pipeline, "predict_proba") else None
    if proba is None and hasattr(pipeline, "decision_function"):
        scores = pipeline.decision_function(X)
        scores = np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores
    else:
        scores = proba
    out = []
    for i, path in enumerate(paths):
        order = np.argsort(-scores[i])[:top] if scores is not None else [0]
        labels = []
        for j in order:
            cid = int(est_classes[j]) if scores is not None else int(pipeline.predict(X[i:i + 1])[0])
            label = classes[cid] if cid < len(classes) else str(cid)
            labels.append((label, float(proba[i, j]) if proba is not None else None))
        out.append({"path": path, "labels": labels})
    return out


def run_predict(args, notify=print) -> int:
    from .results import load_head

    if args.top < 1:
        raise UserError("--top must be at least 1")
    paths = image_files(args.images)
    head_file = head_file_for(args, notify)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline, sidecar = load_head(head_file)
    for w in caught:
        notify(f"warning: {w.message}")
    notify(f"head {head_file} ({sidecar.get('head')}, {sidecar.get('model')} / {sidecar.get('layer')})")
    for row in predict_images(pipeline, sidecar, paths, device=args.device, batch_size=args.batch_size, top=args.top):
        shown = ", ".join(f"{lab} {p:.3f}" if p is not None else lab for lab, p in row["labels"])
        print(f"{row['path']}\t{shown}")
    return 0
