"""Speed of the evaluation statistics against the reference implementations, measured in the same run.

1. Patient-clustered bootstrap intervals of AUROC in 8 groups (20,000 predictions, 1,000 replicates) against
   fairlearn's MetricFrame(n_boot=1000) with scikit-learn's roc_auc_score on the same data; the point estimates must
   be identical.
2. DeLong's test on 1,000,000 predictions, and its equality with the O(n^2) definition on small inputs.

Usage: .venv/bin/python scripts/perf_metrics.py [--n 20000] [--boot 1000] [--delong-n 1000000] [--skip-fairlearn]
"""

from __future__ import annotations

import argparse
import os
import time
from fractions import Fraction

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the machine is shared; keep BLAS to two threads

import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from bench.metrics.bootstrap import bootstrap_group_auroc  # noqa: E402
from bench.metrics.delong import delong_test  # noqa: E402


def make_data(n: int, groups: int, per_patient: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_pat = n // per_patient
    pid = np.repeat(np.arange(n_pat), per_patient)
    yp = rng.random(n_pat) < 0.3
    gp = rng.integers(0, groups, n_pat)
    site = rng.integers(0, 4, n_pat)
    y = yp[pid]
    s = 0.9 * y + rng.normal(0, 0.7, n_pat)[pid] + rng.normal(0, 0.5, n)
    s = np.round(s, 3)  # realistic ties
    return y.astype(int), s, pid, gp[pid], site[pid]


def bench_bootstrap(n: int, boot: int, skip_fairlearn: bool) -> None:
    y, s, pid, g, site = make_data(n, 8, 4)
    t0 = time.perf_counter()
    ours = bootstrap_group_auroc(y, s, pid, g, strata=site, n_boot=boot, seed=0)
    t_one = time.perf_counter() - t0
    # The evaluation's method: two-stage bootstrap (patients, then training seeds), here with 3 seeds, i.e. three
    # times the AUROC work of the single-model reference below.
    rng = np.random.default_rng(3)
    seeds3 = np.vstack(
        [s, np.round(s + rng.normal(0, 0.2, len(s)), 3), np.round(s + rng.normal(0, 0.2, len(s)), 3)]
    )
    t0 = time.perf_counter()
    bootstrap_group_auroc(y, seeds3, pid, g, strata=site, n_boot=boot, seed=0)
    t_ours = time.perf_counter() - t0
    print(f"[bootstrap] {n} predictions, {len(np.unique(pid))} patients, 8 groups, {boot} replicates")
    print(f"  medsynbench patient-clustered bootstrap, one model: {t_one:.2f} s")
    print(f"  medsynbench two-stage bootstrap (patients, then 3 training seeds): {t_ours:.2f} s")
    if skip_fairlearn:
        return
    from fairlearn.metrics import MetricFrame

    t0 = time.perf_counter()
    mf = MetricFrame(
        metrics=roc_auc_score,
        y_true=y,
        y_pred=s,
        sensitive_features=g.astype(str),
        n_boot=boot,
        ci_quantiles=[0.025, 0.975],
        random_state=0,
    )
    t_ref = time.perf_counter() - t0
    ref = mf.by_group
    mine = ours.set_index("group")["value"]
    diff = max(abs(mine[str(k)] - v) for k, v in ref.items())
    identical = all(mine[str(k)] == v for k, v in ref.items())
    print(f"  fairlearn MetricFrame(n_boot={boot}) + roc_auc_score (rows resampled): {t_ref:.2f} s")
    print(
        f"  speed-up, two-stage with 3 seeds: {t_ref / t_ours:.1f}x (target >= 50x); one model: {t_ref / t_one:.1f}x"
    )
    print(f"  point estimates identical: {identical} (max |difference| {diff:.2e})")
    # Which of the two is the exact value? Count pairs with integers and round the rational once.
    exact = {}
    for k in ref.index:
        m = g == int(k)
        neg = np.sort(s[m][y[m] == 0])
        sp = s[m][y[m] == 1]
        twice = int(np.searchsorted(neg, sp, "left").sum() + np.searchsorted(neg, sp, "right").sum())
        exact[k] = float(Fraction(twice, 2 * len(sp) * len(neg)))
    print(
        "  equal to the exact rational AUROC (correctly rounded): "
        f"medsynbench {all(mine[str(k)] == exact[k] for k in ref.index)}, "
        f"scikit-learn {all(ref[k] == exact[k] for k in ref.index)}"
    )
    lo = mf.by_group_ci[0] if isinstance(mf.by_group_ci, list) else None
    if lo is not None:
        w_ref = float(np.mean(mf.by_group_ci[1].to_numpy() - mf.by_group_ci[0].to_numpy()))
        w_ours = float(np.mean(ours["ci_high"] - ours["ci_low"]))
        print(f"  mean interval width: patient-clustered {w_ours:.4f} vs row bootstrap {w_ref:.4f}")


def _direct(y, s1, s2):
    y = np.asarray(y, bool)
    v10, v01, aucs = [], [], []
    for s in (s1, s2):
        K = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        aucs.append(K.mean())
        v10.append(K.mean(axis=1))
        v01.append(K.mean(axis=0))
    S10, S01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (S10[0, 0] + S10[1, 1] - 2 * S10[0, 1]) / y.sum() + (S01[0, 0] + S01[1, 1] - 2 * S01[0, 1]) / (
        ~y
    ).sum()
    z = (aucs[0] - aucs[1]) / np.sqrt(var)
    return z, 2 * norm.sf(abs(z))


def bench_delong(n: int) -> None:
    rng = np.random.default_rng(1)
    y = rng.random(n) < 0.3
    s1 = rng.normal(size=n) + 1.0 * y
    s2 = 0.6 * s1 + rng.normal(size=n) + 0.5 * y
    t0 = time.perf_counter()
    res = delong_test(y, s1, s2)
    t = time.perf_counter() - t0
    print(
        f"[delong] {n} predictions: {t:.2f} s (target < 2 s); AUROC {res.auc1:.4f} vs {res.auc2:.4f}, p={res.p_value:.3g}"
    )
    worst = 0.0
    for seed in range(20):
        r = np.random.default_rng(seed)
        m = 300
        yy = r.random(m) < 0.4
        a = np.round(r.normal(size=m) + yy, 1)
        b = np.round(0.5 * a + r.normal(size=m) + 0.7 * yy, 1)
        z, p = _direct(yy, a, b)
        got = delong_test(yy, a, b)
        worst = max(worst, abs(got.z - z), abs(got.p_value - p))
    print(f"  equal to the O(n^2) definition on 20 tied inputs of 300: max |difference| {worst:.1e}")
    pid = np.arange(n) // 4
    t0 = time.perf_counter()
    delong_test(y, s1, s2, cluster=pid)
    print(f"  clustered (Obuchowski, 4 cases per patient): {time.perf_counter() - t0:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--delong-n", type=int, default=1_000_000)
    ap.add_argument("--skip-fairlearn", action="store_true")
    a = ap.parse_args()
    bench_bootstrap(a.n, a.boot, a.skip_fairlearn)
    bench_delong(a.delong_n)


if __name__ == "__main__":
    main()
