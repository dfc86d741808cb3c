"""Linear CKA (Kornblith et al. 2019) between every tap of one feature set and every tap of another,
accumulated over row blocks, with the biased and the debiased HSIC estimator.

With X (N, Dx) and Y (N, Dy) centred column-wise, linear CKA is

    CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)),   HSIC(X, Y) ~ ||Y^T X||_F^2  (biased).

The debiased estimator (Song et al. 2012, the unbiased HSIC on the linear kernels K = X X^T,
L = Y Y^T) needs only a few more sums. With a_i = |x_i|^2 and b_i = |y_i|^2 (centred rows), the
diagonal-free K~, L~ of Song et al. give, since K 1 = L 1 = 0 after centring,

    tr(K~ L~) = ||Y^T X||^2 - a.b,   1^T K~ 1 = -sum(a),   1^T K~ L~ 1 = a.b,

so n(n-3) HSIC_1 = ||Y^T X||^2 - n/(n-2) a.b + sum(a) sum(b) / ((n-1)(n-2)), the form of
Kornblith et al.'s feature-space code. Every term is a sum over rows, so the debiased estimator is
exact in blocks too (no threshold on N is needed for correctness). Two passes: column means first,
then X^T X, Y^T Y, Y^T X and the row-norm sums of the centred rows, in float64.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from extract.core.errors import UserError

PairBlocks = Callable[[], Iterable[tuple[dict, dict]]]   # a fresh pass of ({tap: X block}, {tap: Y block})


class CKASums:
    """Centred products of matched rows, for every (x tap, y tap) pair."""

    def __init__(self, means_x: dict[str, np.ndarray], means_y: dict[str, np.ndarray]):
        self.means = {"x": means_x, "y": means_y}
        self.n = 0
        self.gram = {side: {t: np.zeros((len(m), len(m))) for t, m in means.items()}
                     for side, means in self.means.items()}
        self.norms = {side: {t: 0.0 for t in means} for side, means in self.means.items()}       # sum a_i
        self.norms2 = {side: {t: 0.0 for t in means} for side, means in self.means.items()}      # sum a_i^2
        self.cross = {(tx, ty): np.zeros((len(my), len(mx))) for tx, mx in means_x.items()
                      for ty, my in means_y.items()}
        self.norm_products = {pair: 0.0 for pair in self.cross}                                  # sum a_i b_i

    def add(self, xs: dict[str, np.ndarray], ys: dict[str, np.ndarray]) -> None:
        centred, rows = {}, {}
        for side, blocks in (("x", xs), ("y", ys)):
            for t, block in blocks.items():
                Z = np.asarray(block, np.float64) - self.means[side][t]
                centred[side, t] = Z
                rows[side, t] = np.einsum("ij,ij->i", Z, Z)
                self.gram[side][t] += Z.T @ Z
                self.norms[side][t] += float(rows[side, t].sum())
                self.norms2[side][t] += float(rows[side, t] @ rows[side, t])
        for tx, ty in self.cross:
            self.cross[tx, ty] += centred["y", ty].T @ centred["x", tx]
            self.norm_products[tx, ty] += float(rows["x", tx] @ rows["y", ty])
        self.n += len(next(iter(rows.values())))

    def _hsic(self, squared: float, products: float, sum_a: float, sum_b: float, debiased: bool) -> float:
        if not debiased:
            return squared
        n = self.n
        return squared - n / (n - 2.0) * products + sum_a * sum_b / ((n - 1.0) * (n - 2.0))

    def _self_hsic(self, side: str, tap: str, debiased: bool) -> float:
        g = self.gram[side][tap]
        a = self.norms[side][tap]
        return self._hsic(float(np.sum(g * g)), self.norms2[side][tap], a, a, debiased)

    def matrix(self, debiased: bool = False) -> np.ndarray:
        """CKA of every x tap (rows) against every y tap (columns); NaN where a tap has no variance."""
        if debiased and self.n < 4:
            raise UserError(f"the debiased CKA estimator needs at least 4 matched rows, not {self.n}")
        taps_x, taps_y = list(self.means["x"]), list(self.means["y"])
        out = np.full((len(taps_x), len(taps_y)), np.nan)
        for i, tx in enumerate(taps_x):
            hx = self._self_hsic("x", tx, debiased)
            for j, ty in enumerate(taps_y):
                hy = self._self_hsic("y", ty, debiased)
                c = self.cross[tx, ty]
                hxy = self._hsic(float(np.sum(c * c)), self.norm_products[tx, ty], self.norms["x"][tx],
                                 self.norms["y"][ty], debiased)
                if hx > 0 and hy > 0:
                    out[i, j] = hxy / np.sqrt(hx * hy)
        return out


def column_means(blocks: PairBlocks) -> tuple[dict, dict, int]:
    """(means of every x tap, of every y tap, row count) in one pass."""
    sums, n = {"x": {}, "y": {}}, 0
    for xs, ys in blocks():
        for side, block_set in (("x", xs), ("y", ys)):
            for t, block in block_set.items():
                block = np.asarray(block, np.float64)
                if not np.isfinite(block).all():
                    raise UserError(f"the features of tap {t!r} contain NaN or inf values")
                sums[side][t] = sums[side].get(t, 0.0) + block.sum(axis=0)
        n += len(next(iter(xs.values())))
    if n == 0:
        raise UserError("no matched rows to compare")
    return ({t: s / n for t, s in sums["x"].items()}, {t: s / n for t, s in sums["y"].items()}, n)


def cka_sums(blocks: PairBlocks, *, progress: bool = False, total: int | None = None) -> CKASums:
    """Both passes over `blocks()`; the result gives either estimator's matrix."""
    means_x, means_y, _ = column_means(blocks)
    sums = CKASums(means_x, means_y)
    for xs, ys in tqdm(blocks(), desc="CKA", unit="block", total=total, leave=False,
                       disable=None if progress else True):
        sums.add(xs, ys)
    return sums


def linear_cka(X, Y, debiased: bool = False, rows: int = 4096) -> float:
    """Linear CKA of two in-memory arrays with matched rows, computed in blocks of `rows`."""
    X, Y = np.asarray(X), np.asarray(Y)
    if len(X) != len(Y):
        raise UserError(f"CKA needs matched rows: {len(X)} vs {len(Y)}")

    def blocks():
        return (({"x": X[s:s + rows]}, {"y": Y[s:s + rows]}) for s in range(0, len(X), rows))
    return float(cka_sums(blocks).matrix(debiased)[0, 0])
