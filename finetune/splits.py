"""Which rows train, select and test: the same rules as probe (probe/data.py).

Validation is the dataset's own val split when it also has a test split, else a seeded
stratified fraction of train (probe.protocol.splits.validation_mask over source indices); a dataset
with only train and val uses val as its test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extract.core.errors import UserError
from probe.protocol.splits import split_roles, validation_mask


@dataclass
class Part:
    source: object          # an extract.registry.datasets.ImageSource
    indices: np.ndarray     # rows of `source` in this part

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels)[self.indices]


@dataclass
class SplitPlan:
    train: Part
    val: Part
    test: Part
    validation: str         # how validation rows were chosen (for the result file)
    test_split: str


def plan_splits(dataset, seed: int = 0, val_fraction: float = 0.2) -> SplitPlan:
    """Train / validation / test rows of `dataset` (an extract Dataset)."""
    splits = dataset.splits
    if "train" not in splits:
        raise UserError(f"dataset {dataset.name} has no train split (it has {', '.join(splits) or 'none'})")
    roles = split_roles(splits)
    if roles is None:
        raise UserError(f"dataset {dataset.name} has only a train split; fine-tuning needs a held-out "
                        "test (or val) split, e.g. train/ and val/ folders under --root")
    test_split, val_split = roles
    train = splits["train"]
    all_rows = np.arange(len(train))
    if val_split:
        train_part, val_part = Part(train, all_rows), Part(splits[val_split], np.arange(len(splits[val_split])))
        validation = f"the dataset's own '{val_split}' split"
    else:
        if not 0 < val_fraction < 1:
            raise UserError(f"validation fraction must be between 0 and 1, got {val_fraction}")
        mask = validation_mask(all_rows, train.labels, seed=seed, fraction=val_fraction)
        train_part, val_part = Part(train, all_rows[~mask]), Part(train, all_rows[mask])
        validation = f"stratified {val_fraction:.0%} of train (seed {seed})"
        if test_split == "val":
            validation += "; the dataset has no test split, so its 'val' split is the test set"
    test_part = Part(splits[test_split], np.arange(len(splits[test_split])))
    for role, part in (("train", train_part), ("validation", val_part), ("test", test_part)):
        if len(part.indices) == 0:
            raise UserError(f"the {role} rows of dataset {dataset.name} are empty ({validation})")
        if role != "test" and len(np.unique(part.labels)) < 2:
            raise UserError(f"the {role} rows of dataset {dataset.name} hold only one class ({validation})")
    return SplitPlan(train_part, val_part, test_part, validation, test_split)
