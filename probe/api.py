"""`evaluate(...)`: the probe as a Python call: pick the features, fit every head, write results.

The command line (`python -m probe`) and bench/ both call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from extract.core.errors import UserError

from probe.protocol.data import ProbeData, Selection, load_probe_data, select_caches, selection_from_paths
from probe.heads.catalog import get_head, list_heads
from probe.heads.placement import check_solver, memory_for, place
from probe.protocol.search import ProbeRun, run_probe

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one evaluate() call did: the data it used, one run per head, and the files it wrote."""

    data: ProbeData
    runs: list[ProbeRun]
    result_paths: list[Path] = field(default_factory=list)
    head_paths: list[Path] = field(default_factory=list)
    comparison: Path | None = None


def head_names(heads: str | Sequence[str]) -> list[str]:
    """'all', 'logreg', 'logreg,knn' or a list -> registered head names (UserError for unknown ones)."""
    if isinstance(heads, str):
        heads = [h for h in heads.split(",") if h]
    if list(heads) == ["all"]:
        return list_heads()
    return list(dict.fromkeys(get_head(h).name for h in heads))


def choose_features(*, cache_dir="cache", data: str | None = None, model: str | None = None,
                    layer: str | None = None, precision: str | None = None, dtype: str | None = None,
                    image_size: int | None = None, normalize: str | None = None, features=None,
                    test_features=None, val_features=None) -> Selection:
    """Explicit cache files, or the newest complete extraction matching the filters; says which."""
    if features:
        sel = selection_from_paths(features, test_features, val_features, layer)
        log.info("using " + ", ".join(f"{s}: {p}" for s, p in sel.files.items()))
        return sel
    if test_features or val_features:
        raise UserError("--test-features/--val-features need --features TRAIN_H5 as well")
    sel = select_caches(cache_dir, model=model, data=data, layer=layer, precision=precision, dtype=dtype,
                        image_size=image_size, normalize=normalize)
    chosen = "" if any((model, data, layer, precision, dtype, image_size, normalize)) else \
        "the newest complete extraction, "
    folder = Path(next(iter(sel.files.values()))).parent
    log.info(f"using {folder} ({chosen}splits: {', '.join(sel.files)})")
    return sel


def evaluate(heads: str | Sequence[str] = "logreg", *, cache_dir="cache", data: str | None = None,
             model: str | None = None, layer: str | None = None, precision: str | None = None,
             dtype: str | None = None, image_size: int | None = None, normalize: str | None = None,
             features=None, test_features=None, val_features=None, results_dir="results", grid: str = "fast", scale: str | None = None, seed: int = 0,
             n_jobs: int | None = None, max_search_samples: int | None = None, save: bool = True,
             progress: bool = True, solver: str = "auto", device: str = "auto",
             max_memory: float | None = None) -> Evaluation:
    """Fit each head on cached features (select on validation, refit, test once) and write its results.

    solver: logreg's, auto|sklearn|torch; device: the torch heads', auto|cpu|cuda. Features whose in-memory
    path needs more than the available RAM (or `max_memory` GB) are streamed from the cache, which only
    logreg on torch and knn can fit (probe.heads.placement).
    """
    from probe.output.plots import plot_comparison
    from probe.output.headfile import save_head
    from probe.output.results import result_dir, write_result

    names = head_names(heads)
    check_solver(names, solver)
    if max_search_samples is not None and max_search_samples < 2:
        raise UserError("--max-search-samples must be at least 2")
    selection = choose_features(cache_dir=cache_dir, data=data, model=model, layer=layer, precision=precision,
                                dtype=dtype, image_size=image_size, normalize=normalize, features=features,
                                test_features=test_features, val_features=val_features)
    memory = memory_for(selection.files, selection.layer, max_memory)
    placed = [place(name, solver=solver, device=device, scale=scale, streamed=not memory.fits, memory=memory)
              for name in names]
    if not memory.fits:
        log.info(f"the features would need {memory.describe()} in memory: streaming them from the cache")
    probe_data = load_probe_data(selection, seed=seed, lazy=not memory.fits)
    out = Evaluation(probe_data, [])
    for head in placed:
        run = run_probe(head, probe_data, grid=grid, scale=scale, seed=seed, n_jobs=n_jobs,
                        max_search_samples=max_search_samples, progress=progress)
        out.runs.append(run)
        out.result_paths.append(write_result(run.result, results_dir))
        if save:
            out.head_paths.append(save_head(run.pipeline, run.result, results_dir))
    if len(names) > 1:
        rows = [{"label": r.result["head"], "top1": r.result["metrics"]["top1"],
                 "seconds": r.result["timing"]["search_seconds"] + r.result["timing"]["fit_seconds"]}
                for r in out.runs]
        out.comparison = plot_comparison(rows, result_dir(out.runs[0].result, results_dir) / "comparison.png",
                                         title=f"{probe_data.dataset} · {probe_data.model} · {probe_data.layer}")
    return out
