"""How heads are fit: one frozen value passed whole from the command line to every analysis."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from extract.core.errors import UserError

from probe.protocol.splits import check_fraction


@dataclass(frozen=True)
class FitOptions:
    """The search grid, scaling, seeds, threads, solver and where results go (see `python -m probe --help`).

    test_fraction and split_seed carve the test rows of a dataset that has only a train split.
    """

    grid: str = "fast"
    scale: str | None = None
    seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    n_jobs: int | None = None
    max_search_samples: int | None = None
    solver: str = "auto"                 # logreg: auto | sklearn | torch
    device: str = "auto"                 # the torch heads' device
    max_memory: float | None = None      # GB the features may take before they are streamed
    progress: bool = True
    save: bool = True                    # keep the refit head beside its result
    results_dir: str | Path = "results"

    def __post_init__(self):
        if self.max_search_samples is not None and self.max_search_samples < 2:
            raise UserError("--max-search-samples must be at least 2")
        check_fraction(self.test_fraction, "--test-fraction")
        if self.n_jobs is not None and self.n_jobs == 0:
            raise UserError("--n-jobs takes a positive number (or -1 for every core)")
        if self.n_jobs is not None and self.n_jobs < -1:
            raise UserError("--n-jobs takes a positive number (or -1 for every core)")

    def replace(self, **changes) -> "FitOptions":
        return dataclasses.replace(self, **changes)


def fit_options(options: FitOptions | None = None, **keywords) -> FitOptions:
    """`options` with `keywords` changed (the Python API's keyword spelling of a FitOptions)."""
    return (options or FitOptions()).replace(**keywords) if keywords else (options or FitOptions())
