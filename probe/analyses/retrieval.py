"""Retrieval on cached features: each test image queries the gallery by cosine similarity.

    run = run_retrieval(load_probe_data(selection), device="auto")
    run.result["metrics"]["retrieval"]["overall"]["map@r"]

`python -m probe --head retrieval` writes it as a result JSON beside the heads' (head `retrieval`,
kind `retrieval`), so the report, the comparison pivot and `probe rank` read it like any head.

- Gallery: every non-test row (train plus validation: what the heads are finally refit on);
  queries: the test split. The validation score the comparison's winner rule reads (its grid's
  `val_top1`) is recall@1 of the validation rows against the train rows alone; test never chooses.
- Neighbours: exact cosine similarity on L2-normalised features, in bounded-memory blocks
  (probe.heads.knn.cosine_topk; `--device cuda` where present). Equal similarities are ordered as
  torch.topk leaves them.
- recall@k: the share of queries with at least one image of their class among their k nearest.
  precision@k: the mean share of the k nearest that are of the query's class. mAP@R (Musgrave et
  al. 2020, "A metric learning reality check"): with R the number of gallery images of the query's
  class, the mean over queries of (1/R) sum_{i<=R} P(i) rel(i), P(i) the precision at i.
  A query whose class has no gallery image counts as a miss and is left out of mAP@R.
- metrics.top1 is recall@1, which is the accuracy of the 1-nearest-neighbour classifier; the
  other classification metrics (balanced accuracy, macro-F1, confusion matrix) are that
  classifier's too, so the report's columns mean what they mean for every head.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
from tqdm.auto import tqdm

from extract.core.errors import UserError

from probe.heads.knn import cosine_topk, l2_normalize
from probe.protocol.data import ProbeData
from probe.protocol.metrics import classification_metrics
from probe.protocol.rows import concat, is_streamed, iter_blocks
from probe.protocol.search import ProbeRun
from probe.output.results import SCHEMA, library_versions

KS = (1, 5, 10)
NAME = "retrieval"
DESCRIPTION = "cosine retrieval: test queries against the train+val gallery (top-1 = recall@1 = 1-NN accuracy)"
_OUT_BYTES = 64 * 1024 * 1024    # neighbour lists held at once


def metrics_per_query(neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant: np.ndarray | None,
                      ks=KS) -> dict[str, np.ndarray]:
    """recall@k, precision@k and mAP@R of each query from its neighbours' labels (Q, K), nearest first.

    relevant: R of each query, the gallery images of its class (None: no mAP@R); K must be at least
    max(ks) and R (or the whole gallery). mAP@R is NaN for a query with R = 0.
    """
    rel = np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]
    K = rel.shape[1]
    out = {}
    for k in ks:
        out[f"recall@{k}"] = rel[:, :k].any(axis=1).astype(np.float64)
        out[f"precision@{k}"] = rel[:, :k].sum(axis=1) / min(k, K)
    if relevant is None:
        return out
    R = np.asarray(relevant)
    if len(R) and R.max() > K:
        raise ValueError(f"{K} neighbours cannot score mAP@R with R up to {R.max()}")
    within = np.arange(1, K + 1)[None, :] <= R[:, None]
    hits = rel & within
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, K + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["map@r"] = np.where(R > 0, (precision_at * hits).sum(axis=1) / R, np.nan)
    return out


def retrieve(gallery, gallery_labels, queries, query_labels, *, ks=KS, device="cpu", map_at_r: bool = True,
             progress: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(per-query metrics, label of each query's nearest gallery image); queries and gallery may be
    arrays or views read from the cache block by block. map_at_r=False looks only max(ks) deep."""
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    if len(gallery_labels) == 0 or len(query_labels) == 0:
        raise UserError("retrieval needs a non-empty gallery and at least one query")
    bank = gallery if is_streamed(gallery) else l2_normalize(gallery)
    counts = np.bincount(gallery_labels, minlength=int(max(gallery_labels.max(), query_labels.max())) + 1)
    relevant = counts[query_labels]
    K = int(min(len(gallery_labels), max(max(ks), relevant.max() if map_at_r else 0)))
    rows = max(1, _OUT_BYTES // (16 * K))
    parts, nearest, start = [], [], 0
    bar = tqdm(total=len(query_labels), desc="retrieval", unit="query", leave=False, disable=None if progress else True)
    for block in iter_blocks(queries, rows):
        end = start + len(block)
        _, idx = cosine_topk(bank, l2_normalize(block), K, device=device)
        labels = gallery_labels[idx]
        parts.append(metrics_per_query(labels, query_labels[start:end], relevant[start:end] if map_at_r else None, ks))
        nearest.append(labels[:, 0])
        start = end
        bar.update(len(block))
    bar.close()
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, np.concatenate(nearest)


def summarise(per_query: dict[str, np.ndarray], query_labels, classes: list[str]) -> dict:
    """Mean of every metric overall and per class (None where a class has no query or no gallery image)."""
    query_labels = np.asarray(query_labels)

    def means(mask):
        return {k: (None if not mask.any() or np.isnan(v[mask]).all() else float(np.nanmean(v[mask])))
                for k, v in per_query.items()}
    per_class = {}
    for i, name in enumerate(classes):
        mask = query_labels == i
        per_class[str(name)] = {**means(mask), "queries": int(mask.sum())}
    left_out = int(np.isnan(per_query["map@r"]).sum())
    return {"overall": {**means(np.ones(len(query_labels), bool)), "queries": int(len(query_labels))},
            "per_class": per_class, "queries_without_gallery_match": left_out}


def run_retrieval(data: ProbeData, *, device: str = "auto", ks=KS, progress: bool = True, seed: int = 0) -> ProbeRun:
    """Validation rows against train (the validation score), then test against train+val; the result
    dict has the keys a head's result has (probe.protocol.search.run_probe), plus metrics.retrieval."""
    from probe.heads.device import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    val_metrics, _ = retrieve(data.X_train, data.y_train, data.X_val, data.y_val, ks=(1,), device=dev,
                              map_at_r=False, progress=progress)
    val_seconds = time.perf_counter() - t0
    gallery, gallery_labels = concat(data.X_train, data.X_val), np.concatenate([data.y_train, data.y_val])
    t0 = time.perf_counter()
    per_query, nearest = retrieve(gallery, gallery_labels, data.X_test, data.y_test, ks=ks, device=dev,
                                  progress=progress)
    test_seconds = time.perf_counter() - t0
    metrics = classification_metrics(data.y_test, nearest, None, classes=data.classes)
    metrics["retrieval"] = {**summarise(per_query, data.y_test, data.classes), "ks": list(ks),
                            "gallery": int(len(gallery_labels)), "similarity": "cosine"}
    result = {
        "schema": SCHEMA, "kind": NAME, "head": NAME, "description": DESCRIPTION, "solver": "torch",
        "device": str(dev), "streamed": is_streamed(data.X_train), "dataset": data.dataset, "model": data.model,
        "identity": data.identity.to_dict(), "precision": data.identity.precision, "dtype": data.identity.dtype,
        "layer": data.layer, "metrics": metrics, "hyperparameters": {}, "grid_name": "none",
        "grid": [{"params": {}, "val_top1": float(np.mean(val_metrics["recall@1"])), "seconds": round(val_seconds, 4),
                  "converged": True}],
        "timing": {"search_seconds": round(val_seconds, 4), "fit_seconds": 0.0,
                   "predict_seconds": round(test_seconds, 4)},
        "sizes": {**data.sizes, "gallery": int(len(gallery_labels))},
        "validation": f"{data.validation}; validation queries against the train rows (recall@1)",
        "test_split": data.test_split, "test": data.test, "classes": data.classes, "sources": data.sources,
        "provenance": data.provenance, "versions": library_versions(), "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return ProbeRun(result, None)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def describe(result: dict) -> str:
    """'recall@1 95.1%, @5 ..., mAP@R 80.2%, precision@10 ...' of a retrieval result."""
    overall = result["metrics"]["retrieval"]["overall"]
    ks = result["metrics"]["retrieval"]["ks"]
    recall = ", ".join(f"@{k} {_pct(overall[f'recall@{k}'])}" for k in ks)
    precision = ", ".join(f"@{k} {_pct(overall[f'precision@{k}'])}" for k in ks)
    return (f"recall {recall}; mAP@R {_pct(overall['map@r'])}; precision {precision} "
            f"({overall['queries']} queries, gallery {result['metrics']['retrieval']['gallery']})")
