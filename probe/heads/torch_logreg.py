"""Multinomial L2 logistic regression with scikit-learn's objective, fit by full-batch L-BFGS in torch.

    minimise  sum_i CE(W x_i + b, y_i) + 0.5 / C * ||W||^2      (the intercept is not penalised)

is `LogisticRegression(solver="lbfgs")`'s objective (two classes: one weight row, the binomial loss, as
sklearn has it). Like sklearn, the solver works on it divided by n, so `tol` bounds the same max-abs
gradient. Loss and gradient are sums over row blocks: X may be an array, an h5py dataset or a
`probe.protocol.rows.Rows` view, and a cache larger than memory is read block by block on every pass. The
estimator scales its own input (`scale`), so scaling statistics are gathered block by block too.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from probe.heads.device import resolve_device, runtime_device
from probe.heads.inputs import fit_inputs, predict_inputs
from probe.protocol.rows import is_streamed, iter_blocks

BLOCK_BYTES = 128 * 1024 * 1024   # one block's features plus its logits and gradient rows
DEVICE_SHARE = 0.6                # part of free GPU memory that streamed features may occupy there


# scikit-learn's estimator checks this head does not pass, on purpose (tests/test_estimator_checks.py): none
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """L2 multinomial logistic regression on torch (see the module docstring); sklearn-compatible."""

    def __init__(self, C: float = 1.0, *, scale: str = "standard", tol: float = 1e-4, max_iter: int = 1000,
                 warm_start: bool = False, device: str = "auto", history_size: int = 10,
                 block_rows: int | None = None):
        self.C = C
        self.scale = scale
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.device = device
        self.history_size = history_size
        self.block_rows = block_rows

    # --- fitting ----------------------------------------------------------------------------------

    def fit(self, X, y):
        X, y = fit_inputs(self, X, y)
        X = _features(X)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"logistic regression needs samples of at least 2 classes; got {len(self.classes_)} class")
        if self.scale not in ("standard", "l2", "none"):
            raise ValueError(f"scale must be standard, l2 or none; got {self.scale!r}")
        n, d = X.shape
        self.n_features_in_ = d
        device = resolve_device(self.device)
        rows = self._rows(d)
        self.mean_, self.scale_ = _standard_stats(X, rows) if self.scale == "standard" else (None, None)
        batches = _Batches(X, y_enc, self._transform(device), rows, device)
        W, b = self._start(d, device)
        lam = 1.0 / (self.C * n)

        def closure():
            with torch.no_grad():
                loss, gW, gb = _loss_grad(W, b, batches, self._binary)
                loss = loss / n + 0.5 * lam * (W.double() ** 2).sum()
                W.grad, b.grad = gW / n + lam * W, gb / n
            return loss

        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, max_eval=2 * self.max_iter + 20,
                                tolerance_grad=self.tol, tolerance_change=1e-12, history_size=self.history_size,
                                line_search_fn="strong_wolfe")
        opt.step(closure)
        state = opt.state[W]
        self.n_iter_ = np.array([state.get("n_iter", 0)])
        self.objective_ = float(closure()) * n   # sklearn's objective, summed over the rows
        self.coef_ = W.detach().cpu().numpy()
        self.intercept_ = b.detach().cpu().numpy()
        if state.get("n_iter", 0) >= self.max_iter or state.get("func_evals", 0) >= opt.defaults["max_eval"]:
            warnings.warn(f"L-BFGS stopped after {state.get('n_iter', 0)} iterations without reaching tol "
                          f"{self.tol}; increase max_iter", ConvergenceWarning, stacklevel=2)
        return self

    @property
    def _binary(self) -> bool:
        return len(self.classes_) == 2

    def _rows(self, d: int) -> int:
        if self.block_rows:
            return int(self.block_rows)
        return max(256, BLOCK_BYTES // (4 * (d + 2 * len(getattr(self, "classes_", [0, 0])))))

    def _start(self, d: int, device):
        k = 1 if self._binary else len(self.classes_)
        coef, icpt = getattr(self, "coef_", None), getattr(self, "intercept_", None)
        if self.warm_start and coef is not None and np.shape(coef) == (k, d) and np.shape(icpt) == (k,):
            W, b = (torch.as_tensor(np.asarray(a), dtype=torch.float32).to(device).clone() for a in (coef, icpt))
        else:
            W, b = torch.zeros(k, d, device=device), torch.zeros(k, device=device)
        return W.requires_grad_(True), b.requires_grad_(True)

    def _transform(self, device):
        """The fitted scaling as a function of a float32 tensor on `device`."""
        if self.scale == "standard":
            mean = torch.as_tensor(self.mean_, dtype=torch.float32, device=device)
            scale = torch.as_tensor(self.scale_, dtype=torch.float32, device=device)
            return lambda x: (x - mean) / scale
        if self.scale == "l2":
            def l2(x):
                norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
                return x / torch.where(norms == 0, torch.ones_like(norms), norms)
            return l2
        return lambda x: x

    # --- predicting -------------------------------------------------------------------------------

    def _logits(self, X) -> np.ndarray:
        """(N, n_classes) float64 logits; the binary model's first column is the constant 0."""
        X = _features(predict_inputs(self, X, "coef_"))
        device = runtime_device(self.device)
        W = torch.as_tensor(self.coef_, dtype=torch.float32, device=device)
        b = torch.as_tensor(self.intercept_, dtype=torch.float32, device=device)
        transform = self._transform(device)
        out = [_logits(transform(torch.from_numpy(block).to(device)), W, b, self._binary).double().cpu().numpy()
               for block in iter_blocks(X, self._rows(X.shape[1]))]
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)))

    def decision_function(self, X) -> np.ndarray:
        z = self._logits(X)
        return z[:, 1] if self._binary else z

    def predict_proba(self, X) -> np.ndarray:
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[logits.argmax(axis=1)]


def _features(X):
    """Arrays become float32 2-D arrays; h5py datasets and Rows views stay on disk."""
    if not is_streamed(X):
        X = np.asarray(X, dtype=np.float32)
    if len(X.shape) != 2:
        raise ValueError(f"expected 2-D features, got shape {X.shape}")
    return X


def _logits(x, W, b, binary: bool):
    z = torch.addmm(b, x, W.T)
    return torch.nn.functional.pad(z, (1, 0)) if binary else z


def _loss_grad(W, b, batches, binary: bool):
    """Summed cross-entropy (float64) and its gradients with respect to W and b, block by block."""
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    for x, y in batches:
        z = _logits(x, W, b, binary)
        lse = torch.logsumexp(z, dim=1)
        loss += (lse - z.gather(1, y[:, None])[:, 0]).sum(dtype=torch.float64)
        g = torch.exp(z - lse[:, None])
        g[torch.arange(len(y), device=y.device), y] -= 1.0
        if binary:
            g = g[:, 1:]
        gW.addmm_(g.T, x)
        gb += g.sum(dim=0)
    return loss, gW, gb


class _Batches:
    """(scaled x, y) blocks on the device: held there when the features are in memory or fit the device,
    else read from disk again on every pass."""

    def __init__(self, X, y, transform, rows: int, device):
        self.X, self.transform, self.rows, self.device = X, transform, rows, device
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        self.held = None
        if not is_streamed(X) or _fits_on(device, len(X) * X.shape[1] * 4):
            self.held = list(self._read())

    def _read(self):
        for block in iter_blocks(self.X, self.rows):
            yield self.transform(torch.from_numpy(block).to(self.device))

    def __iter__(self):
        start = 0
        for x in self.held if self.held is not None else self._read():
            yield x, self.y[start:start + len(x)]
            start += len(x)


def _fits_on(device, nbytes: int) -> bool:
    if device.type != "cuda":
        return False   # streamed features on the CPU are the ones that did not fit in memory
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


def _standard_stats(X, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean_ and scale_, merged over blocks of rows by its own partial_fit."""
    scaler = StandardScaler()
    for block in iter_blocks(X, rows):
        scaler.partial_fit(block.astype(np.float64))
    return scaler.mean_, scaler.scale_
