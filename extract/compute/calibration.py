"""The images an int8 network is calibrated on: a seeded sample of the train split, and its fingerprint.

Post-training quantization measures each layer's activation range on a few hundred of the user's own
images. Which images is part of what the features are, so the sample is fixed by a rule (the first
`CALIBRATION_IMAGES` of a seeded permutation of the train split, or of the first split when there is
no train split) and its fingerprint (the sampled images' own fingerprint: relative paths, sizes,
mtimes and labels, or the array bytes) is recorded in the cache identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CALIBRATION_IMAGES = 300
CALIBRATION_SEED = 0
CALIBRATION_SPLIT = "train"


@dataclass(frozen=True)
class Calibration:
    """A split and the positions of it an int8 network is calibrated on."""

    source: object                  # extract.registry.datasets.ImageSource
    positions: tuple[int, ...]

    @classmethod
    def of(cls, splits: dict, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> "Calibration":
        """The calibration sample of a dataset's splits (train, else the first one)."""
        source = splits.get(CALIBRATION_SPLIT) or next(iter(splits.values()))
        order = np.random.default_rng(seed).permutation(len(source))[:n]
        return cls(source, tuple(int(i) for i in np.sort(order)))

    @property
    def fingerprint(self) -> str:
        """'<split>:<count>:<12 hex digits>', what the identity records."""
        digest = self.source.subset(list(self.positions)).fingerprint()
        return f"{self.source.name}:{len(self.positions)}:{digest[:12]}"

    def batches(self, preprocess, decoder: str, batch_size: int = 32):
        """The sample as uint8 (B, 3, crop, crop) batches, decoded as extraction decodes (unreadable files left out)."""
        from extract.compute.pipeline import SourceBatches

        rows = [list(self.positions[a:a + batch_size]) for a in range(0, len(self.positions), batch_size)]
        for x, _, reasons in SourceBatches(self.source, preprocess, rows, decoder=decoder):
            keep = torch.tensor([not r for r in reasons])
            if keep.any():
                yield x[keep]
