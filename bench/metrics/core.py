"""Metric functions with the scikit-learn signature `f(y_true, y_score, sample_weight=None)`.

Every metric is a `Metric` object: callable like a scikit-learn metric, with a `higher_is_better` attribute, and
with a *kernel* that evaluates the same metric for many weight vectors at once. The bootstrap feeds the kernel a
matrix of patient multiplicities (one row per replicate), so point estimates and bootstrap replicates go through
exactly the same arithmetic.

Conventions
-----------
- Binary metrics (`auroc`, `sensitivity`, `specificity`): `y_true` is 0/1 (or bool), `y_score` a 1-D score for the
  positive class. In an evaluation the positive class is the task's binary view (sum of the probabilities of
  `labels.binary_view.positive`; without a binary view, every class but the first).
- Multi-class metrics (`auroc_macro`, `auroc_<class>`, `balanced_accuracy`, `ece`, `brier`): `y_true` holds class
  indices 0..K-1 and `y_score` is an (n, K) probability matrix. A 1-D score is read as a two-class matrix
  `[1 - p, p]`.
- AUROC counts ties as one half (mid-ranks), as scikit-learn does.
- `auroc_macro` is the unweighted mean of one-vs-rest AUROCs over the classes that are present with both positives
  and negatives (all classes in a full test set; a subgroup lacking a class averages over the others).
- `balanced_accuracy` is the mean recall of the arg-max prediction over the classes present in `y_true`.
- `ece` is the top-label expected calibration error: confidence = largest class probability, correct = the arg-max
  class is the true class, `n_bins` equal-width bins over [0, 1] (right-closed; 15 unless the task says otherwise),
  weighted by the share of cases in each bin.
- `brier` is the mean squared distance between the probability vector and the one-hot truth, summed over classes
  for K > 2 (range 0-2) and the positive-class form for K = 2 (range 0-1), which is what scikit-learn computes.
- `sensitivity`/`specificity` call a case positive when `y_score >= threshold`; the evaluation chooses the
  threshold on validation data (`choose_threshold`) and applies it unchanged elsewhere.

A metric that is undefined for its input (one class only, no positives, no cases) returns NaN; it never raises.
`Metric.undefined_reason` says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Kernel = Callable[[np.ndarray], np.ndarray]


def _weights(sample_weight: Any, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones((1, n))
    w = np.asarray(sample_weight, dtype=float)
    return w[None, :] if w.ndim == 1 else w


def _proba_matrix(y_score: Any) -> np.ndarray:
    s = np.asarray(y_score, dtype=float)
    if s.ndim == 1:
        return np.column_stack([1.0 - s, s])
    return s


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(den > 0, out, np.nan)


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, a, 0.0).sum(axis=1)
    return _safe_div(tot, cnt.astype(float))


class AurocKernel:
    """Weighted AUROC for many weight rows after ranking once.

    For a positive case i the weighted count of negatives ranked below it (ties half) is
    (C[lo_i] + C[hi_i]) / 2, where C is the running sum of negative weights in score order and lo/hi are the
    numbers of negatives with a score strictly below / not above the case's score. lo and hi depend only on the
    scores, so they are found once; each replicate costs one cumulative sum and two gathers.
    """

    def __init__(self, y_bin: Any, score: Any):
        y = np.asarray(y_bin).astype(bool)
        s = np.asarray(score, dtype=float)
        self.pos = np.flatnonzero(y)
        neg = np.flatnonzero(~y)
        self.neg = neg[np.argsort(s[neg], kind="stable")]
        sneg = s[self.neg]
        spos = s[self.pos]
        self.lo = np.searchsorted(sneg, spos, side="left")
        self.hi = np.searchsorted(sneg, spos, side="right")

    def __call__(self, W: np.ndarray) -> np.ndarray:
        W = np.asarray(W, dtype=float)
        b = W.shape[0]
        if len(self.pos) == 0 or len(self.neg) == 0:
            return np.full(b, np.nan)
        c = np.zeros((b, len(self.neg) + 1))
        np.cumsum(W[:, self.neg], axis=1, out=c[:, 1:])
        wpos = W[:, self.pos]
        num = 0.5 * np.einsum("ij,ij->i", wpos, c[:, self.lo] + c[:, self.hi])
        return _safe_div(num, wpos.sum(axis=1) * c[:, -1])


def _auroc_kernel(y_true: Any, y_score: Any) -> Kernel:
    return AurocKernel(y_true, y_score)


def _class_auroc_kernel(y_true: Any, y_score: Any, *, k: int) -> Kernel:
    P = _proba_matrix(y_score)
    return AurocKernel(np.asarray(y_true) == k, P[:, k])


def _macro_auroc_kernel(y_true: Any, y_score: Any) -> Kernel:
    P = _proba_matrix(y_score)
    y = np.asarray(y_true)
    kernels = [AurocKernel(y == k, P[:, k]) for k in range(P.shape[1])]

    def run(W: np.ndarray) -> np.ndarray:
        return _nanmean_rows(np.column_stack([kern(W) for kern in kernels]))

    return run


def _matmul_kernel(columns: np.ndarray, combine: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    """Kernels whose sufficient statistics are weighted column sums: one matrix product per batch."""

    def run(W: np.ndarray) -> np.ndarray:
        return combine(np.asarray(W, dtype=float) @ columns)

    return run


def _balanced_accuracy_kernel(y_true: Any, y_score: Any) -> Kernel:
    P = _proba_matrix(y_score)
    y = np.asarray(y_true)
    pred = P.argmax(axis=1)
    k = P.shape[1]
    onehot = (y[:, None] == np.arange(k)[None, :]).astype(float)
    hits = onehot * (pred == y)[:, None]
    cols = np.hstack([hits, onehot])

    def combine(s: np.ndarray) -> np.ndarray:
        return _nanmean_rows(_safe_div(s[:, :k], s[:, k:]))

    return _matmul_kernel(cols, combine)


def _rate_kernel(y_true: Any, y_score: Any, *, threshold: float, positives: bool) -> Kernel:
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=float)
    if not np.isfinite(threshold):
        return lambda W: np.full(np.asarray(W).shape[0], np.nan)
    called = s >= threshold
    if positives:
        cols = np.column_stack([y & called, y]).astype(float)
    else:
        cols = np.column_stack([~y & ~called, ~y]).astype(float)
    return _matmul_kernel(cols, lambda t: _safe_div(t[:, 0], t[:, 1]))


def ece_bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width, right-closed bins over [0, 1]; a confidence of exactly 0 falls in the first bin."""
    idx = np.ceil(np.asarray(confidence, dtype=float) * n_bins).astype(int) - 1
    return np.clip(idx, 0, n_bins - 1)


def _ece_kernel(y_true: Any, y_score: Any, *, n_bins: int = 15) -> Kernel:
    P = _proba_matrix(y_score)
    y = np.asarray(y_true)
    conf = P.max(axis=1)
    correct = (P.argmax(axis=1) == y).astype(float)
    b = ece_bin_index(conf, n_bins)
    cols = np.zeros((len(y), n_bins + 1))
    cols[np.arange(len(y)), b] = correct - conf
    cols[:, n_bins] = 1.0

    def combine(s: np.ndarray) -> np.ndarray:
        return _safe_div(np.abs(s[:, :n_bins]).sum(axis=1), s[:, n_bins])

    return _matmul_kernel(cols, combine)


def _brier_kernel(y_true: Any, y_score: Any) -> Kernel:
    P = _proba_matrix(y_score)
    y = np.asarray(y_true)
    onehot = (y[:, None] == np.arange(P.shape[1])[None, :]).astype(float)
    if P.shape[1] == 2:
        loss = (P[:, 1] - onehot[:, 1]) ** 2
    else:
        loss = ((P - onehot) ** 2).sum(axis=1)
    cols = np.column_stack([loss, np.ones(len(y))])
    return _matmul_kernel(cols, lambda s: _safe_div(s[:, 0], s[:, 1]))


@dataclass(frozen=True)
class Metric:
    """A metric with the scikit-learn signature and a batched kernel for the bootstrap.

    `target` is "binary" (0/1 truth, 1-D score) or "multiclass" (class indices, (n, K) probabilities).
    `params` are bound keyword arguments (class index, threshold, number of bins).
    """

    name: str
    higher_is_better: bool
    target: str
    kernel_factory: Callable[..., Kernel] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    needs_threshold: bool = False
    description: str = ""

    @property
    def __name__(self) -> str:  # so that tools which label metrics by function name see ours
        return self.name

    def bind(self, **params: Any) -> Metric:
        return Metric(
            self.name,
            self.higher_is_better,
            self.target,
            self.kernel_factory,
            {**self.params, **params},
            self.needs_threshold,
            self.description,
        )

    def kernel(self, y_true: Any, y_score: Any, **params: Any) -> Kernel:
        return self.kernel_factory(y_true, y_score, **{**self.params, **params})

    def __call__(self, y_true: Any, y_score: Any, sample_weight: Any = None, **params: Any) -> float:
        y = np.asarray(y_true)
        if len(y) == 0:
            return float("nan")
        return float(self.kernel(y, y_score, **params)(_weights(sample_weight, len(y)))[0])

    def undefined_reason(self, y_true: Any, n_classes: int | None = None) -> str | None:
        """Why the metric has no value for this truth vector (None when it has one)."""
        y = np.asarray(y_true)
        if len(y) == 0:
            return "no cases"
        if self.target == "binary":
            yb = y.astype(bool)
            if self.name in ("auroc", "sensitivity") and not yb.any():
                return "no positive cases (binary view)"
            if self.name in ("auroc", "specificity") and yb.all():
                return "no negative cases (binary view)"
            return None
        if self.name == "auroc_macro" and len(np.unique(y)) < 2:
            return "only one class present"
        if self.name.startswith("auroc_") and self.name != "auroc_macro":
            k = self.params.get("k")
            if not (y == k).any():
                return "no cases of this class"
            if (y == k).all():
                return "only this class present"
        return None


auroc = Metric("auroc", True, "binary", _auroc_kernel, description="binary-view AUROC (ties count 1/2)")
auroc_macro = Metric(
    "auroc_macro", True, "multiclass", _macro_auroc_kernel, description="one-vs-rest macro AUROC"
)
balanced_accuracy = Metric(
    "balanced_accuracy",
    True,
    "multiclass",
    _balanced_accuracy_kernel,
    description="mean per-class recall (arg-max)",
)
sensitivity = Metric(
    "sensitivity",
    True,
    "binary",
    _rate_kernel,
    {"threshold": 0.5, "positives": True},
    needs_threshold=True,
    description="true-positive rate at the validation-chosen threshold (binary view)",
)
specificity = Metric(
    "specificity",
    True,
    "binary",
    _rate_kernel,
    {"threshold": 0.5, "positives": False},
    needs_threshold=True,
    description="true-negative rate at the validation-chosen threshold (binary view)",
)
ece = Metric(
    "ece", False, "multiclass", _ece_kernel, {"n_bins": 15}, description="top-label ECE, equal-width bins"
)
brier = Metric("brier", False, "multiclass", _brier_kernel, description="Brier score")


def auroc_class(k: int, name: str | None = None) -> Metric:
    """One-vs-rest AUROC of class index `k` (registered as `auroc_<class name>`)."""
    return Metric(
        name or f"auroc_{k}",
        True,
        "multiclass",
        _class_auroc_kernel,
        {"k": k},
        description=f"AUROC of class {k} vs rest",
    )


REGISTRY: dict[str, Metric] = {
    m.name: m for m in (auroc, auroc_macro, balanced_accuracy, sensitivity, specificity, ece, brier)
}


def metric_names(classes: Sequence[str]) -> list[str]:
    """Every metric name an evaluation reports for these classes, in table order."""
    return [
        "auroc_macro",
        "auroc",
        *[f"auroc_{c}" for c in classes],
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "ece",
        "brier",
    ]


def get_metric(name: str, classes: Sequence[str] | None = None, **params: Any) -> Metric:
    """A metric by name; `auroc_<class>` needs the task's class list. Unknown names raise KeyError."""
    if name in REGISTRY:
        m = REGISTRY[name]
    elif name.startswith("auroc_") and classes is not None and name[len("auroc_") :] in list(classes):
        m = auroc_class(list(classes).index(name[len("auroc_") :]), name)
    else:
        known = ", ".join([*REGISTRY, *(f"auroc_{c}" for c in (classes or []))])
        raise KeyError(f"unknown metric {name!r} (known: {known})")
    return m.bind(**params) if params else m


def choose_threshold(y_bin: Any, score: Any, target_specificity: float) -> float:
    """The operating point with the highest sensitivity whose specificity reaches `target_specificity`.

    A case is called positive when its score is >= the threshold. Candidates are the observed scores and +inf,
    so the chosen threshold is always an attained value. NaN when there are no negatives.
    """
    y = np.asarray(y_bin).astype(bool)
    s = np.asarray(score, dtype=float)
    neg = np.sort(s[~y])
    if len(neg) == 0:
        return float("nan")
    cand = np.append(np.unique(s), np.inf)
    spec = np.searchsorted(neg, cand, side="left") / len(neg)
    # spec is non-decreasing in the threshold; the first candidate that reaches the target keeps most positives.
    ok = np.flatnonzero(spec >= target_specificity - 1e-12)
    return float(cand[ok[0]])
