"""`evaluate(...)`: the probe as a Python call: pick the features, fit every head, write results.

The command line (`python -m probe`) and bench/ both call it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from extract.core.errors import UserError
from extract.store.catalog import CacheQuery, one_dataset, select

from probe.protocol.data import ProbeData, Selection, load_probe_data, select_caches, selection_from_paths
from probe.heads.catalog import OPT_IN, get_head, list_heads
from probe.heads.placement import check_solver, memory_for, place
from probe.protocol.options import FitOptions
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
    """'all', 'logreg', 'logreg,knn' or a list -> registered head names (UserError for unknown ones);
    opt-in evaluations (retrieval) only when named."""
    if isinstance(heads, str):
        heads = [h for h in heads.split(",") if h]
    if list(heads) == ["all"]:
        return list_heads()
    return list(dict.fromkeys(h if h in OPT_IN else get_head(h).name for h in heads))


def split_keywords(query: CacheQuery | None, options: FitOptions | None, keywords: dict):
    """(CacheQuery, FitOptions) with each keyword applied to the value that has that field."""
    query_fields = {f.name for f in dataclasses.fields(CacheQuery)}
    option_fields = {f.name for f in dataclasses.fields(FitOptions)}
    unknown = set(keywords) - query_fields - option_fields
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    query = (query or CacheQuery()).replace(**{k: v for k, v in keywords.items() if k in query_fields})
    options = (options or FitOptions()).replace(**{k: v for k, v in keywords.items() if k in option_fields})
    return query, options


def choose_features(query: CacheQuery) -> Selection:
    """Explicit cache files, or the newest complete extraction matching the query's filters; says which."""
    if query.features:
        sel = selection_from_paths(query.features, query.test_features, query.val_features, query.layer)
        log.info("using " + ", ".join(f"{s}: {p}" for s, p in sel.files.items()))
        return sel
    if query.test_features or query.val_features:
        raise UserError("--test-features/--val-features need --features TRAIN_H5 as well")
    sel = select_caches(query)
    chosen = "" if query.filtered else "the newest complete extraction, "
    folder = Path(next(iter(sel.files.values()))).parent
    log.info(f"using {folder} ({chosen}splits: {', '.join(sel.files)})")
    return sel


def choose_for_saved_head(query: CacheQuery) -> Selection:
    """choose_features for commands that read one saved head (predict, map, samples): without --data,
    a cache holding several datasets is refused, naming them, instead of taking the newest."""
    if not query.features and query.data is None:
        one_dataset([(0, g) for g in select(query)], query.cache_dir)
    return choose_features(query)


def evaluate(heads: str | Sequence[str] = "logreg", query: CacheQuery | None = None,
             options: FitOptions | None = None, **keywords) -> Evaluation:
    """Fit each head on cached features (select on validation, refit, test once) and write its results.

    `query` picks the features (default: the newest extraction under ./cache); `options` how heads
    are fit; `keywords` change single fields of either (``cache_dir=..., model=..., seed=...``).
    `retrieval` (probe.analyses.retrieval) is scored beside the heads when named and fits nothing.
    Features whose in-memory path needs more than the available RAM (or `max_memory` GB) are
    streamed from the cache, which only logreg on torch and knn can fit (probe.heads.placement).
    """
    from probe.analyses.retrieval import NAME as RETRIEVAL, run_retrieval
    from probe.output.plots import plot_comparison
    from probe.output.headfile import save_head
    from probe.output.results import result_dir, write_result

    query, options = split_keywords(query, options, keywords)
    names = head_names(heads)
    check_solver(names, options.solver)
    selection = choose_features(query)
    memory = memory_for(selection.files, selection.layer, options.max_memory)
    placed = [name if name in OPT_IN else place(name, solver=options.solver, device=options.device,
                                                scale=options.scale, streamed=not memory.fits, memory=memory)
              for name in names]
    if not memory.fits:
        log.info(f"the features would need {memory.describe()} in memory: streaming them from the cache")
    probe_data = load_probe_data(selection, seed=options.seed, lazy=not memory.fits,
                                 test_fraction=options.test_fraction, split_seed=options.split_seed)
    out = Evaluation(probe_data, [])
    for head in placed:
        if head == RETRIEVAL:
            run = run_retrieval(probe_data, device=options.device, progress=options.progress, seed=options.seed)
        else:
            run = run_probe(head, probe_data, options)
        out.runs.append(run)
        out.result_paths.append(write_result(run.result, options.results_dir))
        if options.save and run.pipeline is not None:
            out.head_paths.append(save_head(run.pipeline, run.result, options.results_dir))
    if len(names) > 1:
        rows = [{"label": r.result["head"], "top1": r.result["metrics"]["top1"],
                 "seconds": r.result["timing"]["search_seconds"] + r.result["timing"]["fit_seconds"]}
                for r in out.runs]
        out.comparison = plot_comparison(rows, result_dir(out.runs[0].result, options.results_dir) /
                                         "comparison.png",
                                         title=f"{probe_data.dataset} · {probe_data.model} · {probe_data.layer}")
    return out
