"""The Python API: `extract(model=..., data=..., ...)` and `plan(...)` take the command line's
choices as keywords, build one ExtractRequest and run it (see `extract.run.request`)."""

from __future__ import annotations

from extract.run.extraction import SplitResult, run_request, summary
from extract.run.plan import Plan
from extract.run.plan import plan as plan_request
from extract.run.request import DEFAULT_DATA, DEFAULT_MODEL, ExtractRequest


def extract(model: str = DEFAULT_MODEL, data: str = DEFAULT_DATA, **options) -> dict[str, SplitResult]:
    """Extract (or reuse) features for every split of `data` with backbone `model`; returns {split: SplitResult}.

    `options` are ExtractRequest's fields: weights, layers, root, download, dataset_options, splits,
    cache_dir, device, precision, dtype, image_size, normalize, engine, decoder, batch_size,
    workers, chunk_rows, runner, ray, compile, on_error, overwrite, allow_missing_weights, progress.
    """
    return run_request(ExtractRequest(model=model, data=data, **options))


def plan(model: str = DEFAULT_MODEL, data: str = DEFAULT_DATA, **options) -> Plan:
    """The identity (and resolved inputs) of the features a request asks for; no network is run."""
    return plan_request(ExtractRequest(model=model, data=data, **options))


__all__ = ["extract", "plan", "summary", "ExtractRequest", "SplitResult", "Plan"]
