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
- `auroc_macro` is the unweighted mean of one-vs-rest AUROCs over the task's fixed class set (the columns of
  `y_score`); it is undefined (NaN) where a class has no cases or is the only class, so that groups and bootstrap
  replicates never average over different sets of classes.
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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bench.registry import Registry

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

    # Over the fixed class set: a replicate (or group) in which a class has no cases has no macro AUROC, rather
    # than a mean over a different set of classes.
    def run(W: np.ndarray) -> np.ndarray:
        return np.column_stack([kern(W) for kern in kernels]).mean(axis=1)

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


# What a metric needs of its input to have a value, and the reason given when it has none.
_REQUIREMENTS: dict[str, tuple[Callable[[np.ndarray, Any], bool], str]] = {
    "positives": (lambda y, k: bool(y.astype(bool).any()), "no positive cases (binary view)"),
    "negatives": (lambda y, k: not bool(y.astype(bool).all()), "no negative cases (binary view)"),
    "two classes": (lambda y, k: len(np.unique(y)) >= 2, "only one class present"),
    "class cases": (lambda y, k: bool((y == k).any()), "no cases of this class"),
    "other cases": (lambda y, k: not bool((y == k).all()), "only this class present"),
}
KINDS = ("binary", "threshold", "multiclass", "per-class", "segmentation")
TASK_KINDS = ("classification", "segmentation")
CLASS_PLACEHOLDER = "<class>"


@dataclass(frozen=True)
class Metric:
    """A metric with the scikit-learn signature, a batched kernel for the bootstrap, and where it is reported.

    `target` is "binary" (0/1 truth, 1-D score), "multiclass" (class indices, (n, K) probabilities) or
    "segmentation" (truth: a per-case count matrix, `bench.metrics.segmentation`; no score). The target decides the
    kind of task the metric applies to (`task_kind`): segmentation metrics are reported for segmentation tasks only.
    `params` are bound keyword arguments (class index, threshold, number of bins); `task_params` names kernel
    arguments read from the task's `metrics` section (e.g. `n_bins` from `ece_bins`). `requires` lists what the
    input must hold for a value (keys of `_REQUIREMENTS`); the first unmet one is the reason for NaN.

    Reporting, declared here once and read by every consumer:
    - every registered metric is a row of the metric table, in `order`;
    - `fairness`: `<name>_worst` and `<name>_gap` rows over each family of groups; `report_worst`: its worst
      group is shown in the report's fairness section;
    - `comparisons`: compared with the real-only baseline (the task's primary metric always is);
    - `headline`: a headline number of summary.json and of the report (overall, headline split);
    - `leaderboard`: a leaderboard column with this header (the record's headline regime and split);
    - `label` and `digits`: how reports print it.
    A per-class family (`per_class`) is registered once as `<prefix><class>` and stands for one metric per class.
    """

    name: str
    higher_is_better: bool
    target: str
    kernel_factory: Callable[..., Kernel] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    needs_threshold: bool = False
    description: str = ""
    requires: tuple[str, ...] = ()
    task_params: dict[str, str] = field(default_factory=dict)
    per_class: bool = False
    order: int = 1000
    label: str = ""
    digits: int = 3
    fairness: bool = True
    report_worst: bool = False
    comparisons: bool = False
    headline: bool = False
    leaderboard: str | None = None
    leaderboard_help: str = ""

    @property
    def __name__(self) -> str:  # so that tools which label metrics by function name see ours
        return self.name

    @property
    def kind(self) -> str:
        """One of KINDS: binary (binary view), threshold (binary view at the operating point), multiclass,
        per-class (one-vs-rest family)."""
        if self.per_class:
            return "per-class"
        return "threshold" if self.needs_threshold else self.target

    @property
    def task_kind(self) -> str:
        """The kind of task (TASK_KINDS) whose evaluations report this metric."""
        return "segmentation" if self.target == "segmentation" else "classification"

    @property
    def display(self) -> str:
        return self.label or self.name

    def bind(self, **params: Any) -> Metric:
        return replace(self, params={**self.params, **params})

    def for_class(self, k: int, cls: str) -> Metric:
        """The member of a per-class family for class index `k` named after class `cls`."""
        return replace(
            self,
            name=self.name.replace(CLASS_PLACEHOLDER, str(cls)),
            params={**self.params, "k": k},
            per_class=False,
            description=self.description.replace(CLASS_PLACEHOLDER, str(cls)),
            label=self.label.replace(CLASS_PLACEHOLDER, str(cls)),
        )

    def for_task(self, metrics_settings: Any) -> Metric:
        """Bound to the task's settings (`task.metrics`) named by `task_params`."""
        if not self.task_params:
            return self
        return self.bind(**{k: getattr(metrics_settings, v) for k, v in self.task_params.items()})

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
        for need in self.requires:
            ok, why = _REQUIREMENTS[need]
            if not ok(y, self.params.get("k")):
                return why
        return None


METRICS: Registry[Metric] = Registry("metric", group="medsynbench.metrics")
REGISTRY = METRICS  # the name earlier releases exported


def register_metric(metric: Metric) -> Metric:
    """Add a metric to the registry (the one place that declares it); returns it, so it can be assigned."""
    if metric.per_class and CLASS_PLACEHOLDER not in metric.name:
        raise ValueError(f"per-class metric {metric.name!r}: its name must contain {CLASS_PLACEHOLDER!r}")
    METRICS.register(metric.name, metric)
    return metric


auroc_macro = register_metric(
    Metric(
        "auroc_macro",
        True,
        "multiclass",
        _macro_auroc_kernel,
        description="one-vs-rest macro AUROC over the task's classes",
        requires=("two classes",),
        order=10,
        label="macro AUROC",
    )
)
auroc = register_metric(
    Metric(
        "auroc",
        True,
        "binary",
        _auroc_kernel,
        description="binary-view AUROC (ties count 1/2)",
        requires=("positives", "negatives"),
        order=20,
        label="AUROC",
        comparisons=True,
    )
)
auroc_per_class = register_metric(
    Metric(
        "auroc_<class>",
        True,
        "multiclass",
        _class_auroc_kernel,
        description="AUROC of class <class> vs rest",
        requires=("class cases", "other cases"),
        per_class=True,
        order=30,
        label="AUROC <class>",
    )
)
balanced_accuracy = register_metric(
    Metric(
        "balanced_accuracy",
        True,
        "multiclass",
        _balanced_accuracy_kernel,
        description="mean per-class recall (arg-max)",
        order=40,
        label="balanced accuracy",
        comparisons=True,
    )
)
sensitivity = register_metric(
    Metric(
        "sensitivity",
        True,
        "binary",
        _rate_kernel,
        {"threshold": 0.5, "positives": True},
        needs_threshold=True,
        description="true-positive rate at the validation-chosen threshold (binary view)",
        requires=("positives",),
        order=50,
        label="sensitivity",
        comparisons=True,
        report_worst=True,
    )
)
specificity = register_metric(
    Metric(
        "specificity",
        True,
        "binary",
        _rate_kernel,
        {"threshold": 0.5, "positives": False},
        needs_threshold=True,
        description="true-negative rate at the validation-chosen threshold (binary view)",
        requires=("negatives",),
        order=60,
        label="specificity",
        comparisons=True,
    )
)
ece = register_metric(
    Metric(
        "ece",
        False,
        "multiclass",
        _ece_kernel,
        {"n_bins": 15},
        description="top-label ECE, equal-width bins",
        task_params={"n_bins": "ece_bins"},
        order=70,
        label="ECE",
        comparisons=True,
        report_worst=True,
        headline=True,
        leaderboard="Calibration error",
        leaderboard_help="top-label ECE",
    )
)
brier = register_metric(
    Metric(
        "brier",
        False,
        "multiclass",
        _brier_kernel,
        description="Brier score",
        order=80,
        label="Brier score",
        comparisons=True,
    )
)


def auroc_class(k: int, name: str | None = None) -> Metric:
    """One-vs-rest AUROC of class index `k` (registered as `auroc_<class name>`)."""
    m = auroc_per_class.for_class(k, str(k))
    return replace(m, name=name) if name else m


def metric_specs(task_kind: str | None = "classification") -> list[Metric]:
    """Every registered metric of a kind of task (None: of every kind; per-class families unexpanded), in table
    order."""
    if task_kind is not None and task_kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {task_kind!r} (known: {', '.join(TASK_KINDS)})")
    ms = (m for _, m in METRICS.items() if task_kind is None or m.task_kind == task_kind)
    return sorted(ms, key=lambda m: (m.order, m.name))


def metric_names(classes: Sequence[str], task_kind: str = "classification") -> list[str]:
    """Every metric name an evaluation of this kind of task reports for these classes (a segmentation task's mask
    classes), in table order."""
    out: list[str] = []
    for m in metric_specs(task_kind):
        if m.per_class:
            out += [m.name.replace(CLASS_PLACEHOLDER, str(c)) for c in classes]
        else:
            out.append(m.name)
    return out


def reported(where: str, task_kind: str = "classification") -> list[Metric]:
    """The registered metrics of a kind of task flagged `where` (headline, comparisons, leaderboard, fairness,
    report_worst)."""
    if where not in ("headline", "comparisons", "leaderboard", "fairness", "report_worst"):
        raise ValueError(f"unknown report place {where!r}")
    return [m for m in metric_specs(task_kind) if getattr(m, where)]


def get_metric(name: str, classes: Sequence[str] | None = None, **params: Any) -> Metric:
    """A metric by name; `auroc_<class>` needs the task's class list. Unknown names raise KeyError."""
    m = _lookup(name, classes)
    if m is None:
        known = ", ".join(metric_names(classes or []) if classes else [s.name for s in metric_specs(None)])
        raise KeyError(f"unknown metric {name!r} (known: {known})")
    return m.bind(**params) if params else m


def _lookup(name: str, classes: Sequence[str] | None) -> Metric | None:
    if name in METRICS and not METRICS.get(name).per_class:
        return METRICS.get(name)
    for fam in metric_specs(None):
        if not fam.per_class or classes is None:
            continue
        head, _, tail = fam.name.partition(CLASS_PLACEHOLDER)
        if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
            cls = name[len(head) : len(name) - len(tail)]
            if cls in list(classes):
                return fam.for_class(list(classes).index(cls), cls)
    return None


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
