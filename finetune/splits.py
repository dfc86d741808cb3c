"""Which rows train, select and test: the same rules as probe (probe/data.py).

Validation is the dataset's own val split when it also has a test split, else a seeded
stratified fraction of train (probe.protocol.splits.validation_mask over source indices); a dataset
with only train and val uses val as its test split; a dataset with only train gets its test rows
carved first (probe.protocol.splits.carve: test_fraction, split_seed), as probe carves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extract.core.errors import UserError
from probe.protocol.splits import carve, check_fraction, describe_carve, split_roles


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
    test_carve: dict | None = None   # {fraction, split_seed} when the test rows came from train

    def describe_test(self, unreadable: int = 0) -> dict:
        """Which rows are test, as probe's result files say it (rows: the readable ones)."""
        n = len(self.test.indices) - unreadable
        if self.test_carve:
            what = describe_carve(self.test_carve["fraction"], self.test_carve["split_seed"], n)
        else:
            what = f"the dataset's {'own ' if self.test_split == 'test' else ''}'{self.test_split}' split, {n} rows"
        return {"split": self.test_split, "rows": n, "carved": self.test_carve, "description": what}


def plan_splits(dataset, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                split_seed: int = 0) -> SplitPlan:
    """Train / validation / test rows of `dataset` (an extract Dataset); a train split alone gives up
    a seeded stratified `test_fraction` of its rows as test (`split_seed`), as probe does."""
    splits = dataset.splits
    if "train" not in splits:
        raise UserError(f"dataset {dataset.name} has no train split (it has {', '.join(splits) or 'none'})")
    test_split, val_split = split_roles(splits) or ("train", None)
    carved = test_split == "train"
    train = splits["train"]
    all_rows = np.arange(len(train))
    if not val_split and not 0 < val_fraction < 1:
        raise UserError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    test_rows, val_rows = carve(all_rows, train.labels, seed=seed, val_fraction=val_fraction,
                                test_fraction=check_fraction(test_fraction, "--test-fraction") if carved else None,
                                split_seed=split_seed) if carved or not val_split else (None, None)
    if val_split:
        train_part, val_part = Part(train, all_rows), Part(splits[val_split], np.arange(len(splits[val_split])))
        validation = f"the dataset's own '{val_split}' split"
    else:
        train_part, val_part = Part(train, all_rows[~(test_rows | val_rows)]), Part(train, all_rows[val_rows])
        validation = f"stratified {val_fraction:.0%} of {'the rest of ' if carved else ''}train (seed {seed})"
        if test_split == "val":
            validation += "; the dataset has no test split, so its 'val' split is the test set"
        if carved:
            validation += (f"; the dataset has only a train split, so its test rows are "
                           f"{describe_carve(test_fraction, split_seed)}")
    test_part = Part(train, all_rows[test_rows]) if carved else \
        Part(splits[test_split], np.arange(len(splits[test_split])))
    for role, part in (("train", train_part), ("validation", val_part), ("test", test_part)):
        if len(part.indices) == 0:
            raise UserError(f"the {role} rows of dataset {dataset.name} are empty ({validation})")
        if role != "test" and len(np.unique(part.labels)) < 2:
            raise UserError(f"the {role} rows of dataset {dataset.name} hold only one class ({validation})")
    return SplitPlan(train_part, val_part, test_part, validation, test_split,
                     {"fraction": float(test_fraction), "split_seed": int(split_seed)} if carved else None)
