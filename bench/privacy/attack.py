"""Membership inference: the offline likelihood-ratio attack and its metrics, vectorised over models and replicates.

The attack is offline LiRA (Carlini et al. 2022, "Membership inference attacks from first principles", IEEE S&P,
section VI-C, the offline variant). For an example x with true label y, a model's *logit-scaled confidence* is

    phi(x) = log p_y(x) - log(1 - p_y(x))   (computed from logits as  z_y - logsumexp_{k != y} z_k)

which is close to Gaussian across models trained without x. Reference models that never saw x give the mean
`mu_x` and spread `sigma_x` of phi(x) when x is OUT; the target model's phi(x) is then scored with a one-sided test
against that OUT distribution:

    score(x) = (phi_target(x) - mu_x) / sigma_x       (higher: more likely a member; p = 1 - Phi(score))

With few reference models `sigma_x` is one global spread (the paper's "fixed variance" variant), which makes the
ranking that of phi_target(x) - mu_x: per-example difficulty is calibrated away, which is what separates the attack
from a bare loss threshold. With no reference model the score is phi_target(x) itself, reported as uncalibrated.

Metrics of one attack (members = positives): AUROC, TPR at a fixed FPR (1% and 0.1%: an attack is only worrying
if it identifies some members confidently, Carlini et al. section III), and the membership advantage
max_t (TPR(t) - FPR(t)) (Yeom et al. 2018). Intervals resample *patients* with replacement (members and
non-members alike; every image of a drawn patient enters with the patient's draw count as its weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Below this many reference models one variance is pooled over all examples (Carlini et al. use 64+ per example).
MIN_PER_EXAMPLE_VARIANCE = 16
FPRS = (0.01, 0.001)
METRICS = ("auroc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "advantage")


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = z_y - logsumexp_{k != y} z_k for logits `[..., N, K]` and integer labels `[N]`, stable at any margin."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    zy = np.take_along_axis(z, np.broadcast_to(y[:, None], (*z.shape[:-1], 1)), axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(y[:, None], (*z.shape[:-1], 1)), -np.inf, axis=-1)
    m = others.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(others - m).sum(axis=-1))
    return zy - lse


def confidence_from_proba(proba: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """phi from probabilities (clipped at `eps`), for models whose logits are not at hand."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    py = np.take_along_axis(p, np.broadcast_to(y[:, None], (*p.shape[:-1], 1)), axis=-1)[..., 0]
    py = np.clip(py, eps, 1 - eps)
    return np.log(py) - np.log1p(-py)


def lira_offline(
    target: np.ndarray, reference_out: np.ndarray | None
) -> tuple[np.ndarray, dict[str, object]]:
    """Offline LiRA scores.

    target: phi of the target model(s), `[N]` or `[M, N]`; reference_out: phi of R reference models that never saw
    any of the N examples, `[R, N]` (or None / R = 0: uncalibrated). Returns scores shaped like `target` (higher =
    more likely member) and a description of the calibration used.
    """
    t = np.asarray(target, dtype=np.float64)
    if reference_out is None or len(reference_out) == 0:
        return t.copy(), {"calibrated": False, "n_reference": 0, "variance": None}
    ref = np.asarray(reference_out, dtype=np.float64)
    r = ref.shape[0]
    mu = ref.mean(axis=0)
    if r >= MIN_PER_EXAMPLE_VARIANCE:
        sd = ref.std(axis=0, ddof=1)
        # A floor keeps an example that every reference model scores identically from dominating the ranking.
        sd = np.maximum(sd, max(float(np.median(sd)) * 0.1, 1e-6))
        kind = "per-example"
    else:
        # Pooled over examples; with one model no spread is observable and any constant ranks the same.
        pooled = float(np.sqrt(np.mean(ref.var(axis=0, ddof=1)))) if r >= 2 else 1.0
        sd = np.full(ref.shape[1], max(pooled, 1e-6))
        kind = "fixed"
    return (t - mu) / sd, {"calibrated": True, "n_reference": int(r), "variance": kind}


# Above this many weight cells the replicates are summed in float32: counts stay exact (integers below 2^24) and the
# percentiles of a bootstrap do not need more than seven digits, while memory traffic halves.
_FLOAT32_CELLS = 2_000_000


def _steps(
    scores: np.ndarray, member: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative member and non-member weight at each distinct score, descending: (ctp [U, B], cfp [U, B], tp
    [U, B], fp [U, B]). Weights arrive as [B, N] and are laid out [N, B], so that reordering by score copies whole
    rows and the running sums run down contiguous columns."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    dtype = np.float32 if weights.size > _FLOAT32_CELLS else np.float64
    w = np.ascontiguousarray(weights.T, dtype=dtype)[order]
    m = member[order]
    tp = w * m[:, None]
    fp = w - tp
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    if len(starts) < len(s):  # ties step together
        tp = np.add.reduceat(tp, starts, axis=0)
        fp = np.add.reduceat(fp, starts, axis=0)
    return np.cumsum(tp, axis=0), np.cumsum(fp, axis=0), tp, fp


def attack_metrics(
    scores: np.ndarray, member: np.ndarray, weights: np.ndarray | None = None, fprs: Sequence[float] = FPRS
) -> dict[str, np.ndarray]:
    """AUROC, TPR at each FPR and advantage of scores `[N]` (members positive) under weightings `[B, N]` (default:
    one replicate, all ones). Each metric is an array `[B]`; NaN where a replicate holds no member or no
    non-member."""
    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    w = np.ones((1, len(scores))) if weights is None else np.atleast_2d(np.asarray(weights))
    b = w.shape[0]
    if len(scores) == 0:
        nan = np.full(b, np.nan)
        return {"auroc": nan, **{f"tpr_at_{_pct(a)}_fpr": nan for a in fprs}, "advantage": nan}
    ctp, cfp, tp, fp = _steps(scores, member, w)
    w1, w0 = ctp[-1].astype(np.float64), cfp[-1].astype(np.float64)
    bad = (w1 <= 0) | (w0 <= 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv1, inv0 = np.where(bad, 0.0, 1.0 / w1), np.where(bad, 0.0, 1.0 / w0)
        # P(member scores above non-member), ties half: each non-member step meets the members above it and half
        # of those tied with it.
        above = ctp - tp * 0.5
        auroc = np.einsum("ub,ub->b", fp, above, dtype=np.float64) * inv1 * inv0
        out = {"auroc": auroc}
        for a in fprs:
            # The highest TPR among thresholds whose FPR stays within a: the running sums only grow, so that is the
            # TPR at the last step within a (or the origin).
            k = np.sum(cfp <= (a + 1e-12) * w0, axis=0)
            reach = np.take_along_axis(ctp, np.maximum(k - 1, 0)[None], axis=0)[0]
            out[f"tpr_at_{_pct(a)}_fpr"] = np.where(k > 0, reach, 0.0) * inv1
        gap = ctp * inv1.astype(ctp.dtype)
        gap -= cfp * inv0.astype(cfp.dtype)
        out["advantage"] = np.maximum(gap.max(axis=0), 0)
    for k in out:
        out[k] = np.where(bad, np.nan, np.asarray(out[k], dtype=np.float64))
    return out


def _pct(a: float) -> str:
    return f"{a * 100:g}pct"


def patient_weights(
    patients: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap weights `[B, N]` for images of the given patient ids: each replicate draws as many patients as
    there are, with replacement; an image's weight is its patient's draw count. Returns (weights, unique ids)."""
    uniq, inv = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    counts = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n_boot).astype(np.float64)
    return counts[:, inv], uniq


def summarize(
    point: dict[str, np.ndarray], boot: dict[str, np.ndarray], level: float = 0.95
) -> dict[str, dict]:
    """{metric: {value, ci_low, ci_high}} from point values `[1]` (or `[]`) and replicate values `[B]`."""
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in point.items():
        b = np.asarray(boot[k], dtype=np.float64)
        b = b[np.isfinite(b)]
        val = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        lo, hi = (float(x) for x in np.percentile(b, [lo_q, hi_q])) if len(b) else (math.nan, math.nan)
        out[k] = {"value": _clean(val), "ci_low": _clean(lo), "ci_high": _clean(hi)}
    return out


def _clean(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 6)


def attack_loop_reference(
    target: np.ndarray, reference_out: np.ndarray, member: np.ndarray, fpr: float = 0.01
) -> tuple[float, float, float]:
    """Straightforward per-example loop of the same attack and metrics (AUROC, TPR at `fpr`, advantage) for one
    target model; the yardstick of `scripts/perf_model_privacy.py` and of the tests."""
    n = len(target)
    r = len(reference_out)
    scores = []
    pooled = 0.0
    for i in range(n):
        col = [reference_out[j][i] for j in range(r)]
        mu = sum(col) / r
        pooled += sum((c - mu) ** 2 for c in col) / (r - 1) if r > 1 else 0.0
    sd = math.sqrt(pooled / n) if r > 1 else 1.0
    for i in range(n):
        mu = sum(reference_out[j][i] for j in range(r)) / r
        scores.append((target[i] - mu) / max(sd, 1e-6))
    # One sweep down the sorted scores: each distinct score is a threshold (ties step together).
    pairs = sorted(zip(scores, member, strict=True), key=lambda t: -t[0])
    n1 = sum(1 for m in member if m)
    n0 = n - n1
    tp = fp = 0
    prev_tpr = prev_fpr = 0.0
    auroc = best_tpr = adv = 0.0
    k = 0
    while k < n:
        s = pairs[k][0]
        while k < n and pairs[k][0] == s:
            if pairs[k][1]:
                tp += 1
            else:
                fp += 1
            k += 1
        tpr, fpr_k = tp / n1, fp / n0
        auroc += (fpr_k - prev_fpr) * (tpr + prev_tpr) / 2
        if fpr_k <= fpr + 1e-12:
            best_tpr = max(best_tpr, tpr)
        adv = max(adv, tpr - fpr_k)
        prev_tpr, prev_fpr = tpr, fpr_k
    return auroc, best_tpr, adv
