"""`python -m probe predict`: the cache's backbone + a saved head on new image files."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.store.cache import load_features
from extract.core.errors import UserError
from extract.store.catalog import CacheQuery
from extract.store.identity import FeatureIdentity

log = logging.getLogger(__name__)


def image_files(items) -> list[str]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    from extract.registry.images import is_image_file
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


def find_head_file(head: str, query: CacheQuery, results_dir="results") -> Path:
    """<results>/<identity>/<layer>/<head>.skops of the features a query picks (see probe.api;
    several cached datasets and no --data: refused, naming them)."""
    from probe.api import choose_for_saved_head
    from probe.heads.catalog import get_head
    from probe.output.headfile import HEAD_SUFFIX

    name = get_head(head).name
    sel = choose_for_saved_head(query)
    meta = load_features(sel.files["train"], sel.layer, lazy=True).meta
    meta.pop("file").close()
    return meta["identity"].results_dir(results_dir, meta["layer"]) / f"{name}{HEAD_SUFFIX}"


def backbone_for(identity: FeatureIdentity, provenance: dict, layer: str):
    """The frozen backbone that computed a feature set; refuses weights whose content changed."""
    from extract.registry.models import get_spec, load_backbone

    spec, tag = get_spec(identity.arch), identity.model.partition(".")[2]
    from_registry = tag in ("", "none") or tag in spec.weights or tag.upper() in spec.aliases
    if from_registry:
        model, weights = identity.model, "default"
    else:   # a local checkpoint file, found where the extraction read it
        model, weights = identity.arch, provenance.get("weights_file") or ""
        if not os.path.isfile(weights):
            raise UserError(f"the features were extracted with weights file {weights}, which no longer exists")
    import torch

    with torch.random.fork_rng(devices=[]):   # random init ('none') seeded as extraction seeds it (Plan.load_backbone)
        torch.manual_seed(0)
        backbone = load_backbone(model, weights=weights, layers=[layer],
                                 allow_missing=bool(provenance.get("allow_missing_weights")))
    if backbone.weights_sha256 != identity.weights_sha256:
        raise UserError(f"the {identity.model} weights file changed since the features were extracted "
                        f"(sha256 {str(backbone.weights_sha256)[:12]} vs {str(identity.weights_sha256)[:12]}); "
                        "re-extract and refit the head")
    return backbone


@dataclass
class Predictions:
    rows: list[dict]                        # [{path, labels: [(class, probability or None)]}]
    unreadable: list[tuple[str, str]]       # (path, reason)


def _decoder(recorded: str | None, device) -> str:
    """The cache's decoder; features made with the GPU's (cuda) are predicted with the CPU's tensor
    decoder where the backbone does not run on a GPU (within a few levels of the same pixels), and
    torchvision's (tensor) and TorchCodec's JPEG decoders (the same libjpeg-turbo pixels) stand in for
    each other where only one is installed."""
    from extract.compute.engine import resolve_device
    from extract.registry.images import tensor_decoder_available, torchcodec_available

    if recorded == "cuda" and resolve_device(device).type != "cuda":
        recorded = "tensor"
    if recorded == "tensor" and not tensor_decoder_available() and torchcodec_available():
        return "torchcodec"
    if recorded == "torchcodec" and not torchcodec_available() and tensor_decoder_available():
        return "tensor"
    return recorded or "auto"


def predict_images(pipeline, sidecar: dict, paths: list[str], *, device="auto", batch_size=32, top=1) -> Predictions:
    """Label readable images with the saved head; unreadable ones are listed, not fatal."""
    from extract.registry.datasets import ImageSource
    from extract.compute.engine import embed

    if not sidecar.get("identity"):
        raise UserError("the saved head records no feature identity; refit it with `python -m probe`")
    identity = FeatureIdentity.from_dict(sidecar["identity"])
    layer = sidecar.get("layer") or identity.taps[0]
    backbone = backbone_for(identity, sidecar.get("provenance") or {}, layer)
    classes = sidecar.get("classes") or []
    source = ImageSource("predict", classes, np.zeros(len(paths), np.int64), paths=paths)
    out = embed(backbone, source, preprocess=identity.preprocess, precision=identity.precision,
                batch_size=batch_size, device=device, decoder=_decoder(identity.decoder, device))
    X = out.features[layer]
    kept = [paths[i] for i in out.index]
    unreadable = [(p, r) for _, p, r in out.skipped]
    if not len(X):
        return Predictions([], unreadable)
    est_classes = np.asarray(pipeline.classes_)
    proba = pipeline.predict_proba(X) if hasattr(pipeline, "predict_proba") else None
    if proba is None and hasattr(pipeline, "decision_function"):
        scores = pipeline.decision_function(X)
        scores = np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores
    else:
        scores = proba
    rows = []
    for i, path in enumerate(kept):
        order = np.argsort(-scores[i])[:top] if scores is not None else [0]
        labels = []
        for j in order:
            cid = int(est_classes[j]) if scores is not None else int(pipeline.predict(X[i:i + 1])[0])
            label = classes[cid] if cid < len(classes) else str(cid)
            labels.append((label, float(proba[i, j]) if proba is not None else None))
        rows.append({"path": path, "labels": labels})
    return Predictions(rows, unreadable)


def predict_files(head_file, images, *, device="auto", batch_size=32, top=1) -> Predictions:
    """Load a saved head (with its version check) and label the image files and folders given."""
    from probe.output.headfile import load_head

    if top < 1:
        raise UserError("--top must be at least 1")
    paths = image_files(images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline, sidecar = load_head(head_file)
    for w in caught:
        log.warning(f"warning: {w.message}")
    log.info(f"head {head_file} ({sidecar.get('head')}, {sidecar.get('model')} / {sidecar.get('layer')})")
    return predict_images(pipeline, sidecar, paths, device=device, batch_size=batch_size, top=top)
