"""Membership-inference attack: the vectorised attack of `bench.privacy.attack` against a straightforward loop.

Simulates logit-scaled confidences of `--models` target models and `--refs` reference models on `--n` examples
(half members), then times, in the same process and on the same numbers:

- vectorised: offline-LiRA scores and AUROC, TPR at 1% / 0.1% FPR and advantage for every target model, plus the
  same metrics on `--n-boot` patient-bootstrap replicates (what `medsynbench privacy-model` computes);
- loop: `attack_loop_reference` (per-example Python loops for the calibration, one sweep for the metrics), point
  metrics only, on `--loop-models` targets and scaled to all targets (it grows linearly with the models).

The two must agree on every point metric. Prints seconds and the ratio.

    python scripts/perf_model_privacy.py                       # 20,000 examples, 20 models
    python scripts/perf_model_privacy.py --n 2000 --models 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.privacy.attack import attack_loop_reference, attack_metrics, lira_offline, patient_weights


def simulate(
    n: int, models: int, refs: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(target phi [M, N], reference phi [R, N], member [N], patient [N]): two images per patient; members gain a
    little confidence in every target model."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 2, n)
    member = np.repeat(rng.random(n // 2 + 1) < 0.5, 2)[:n]
    patient = np.repeat(np.arange(n // 2 + 1), 2)[:n]
    ref = difficulty + rng.normal(0, 0.5, (refs, n))
    target = difficulty + rng.normal(0, 0.5, (models, n)) + 0.4 * member
    return target, ref, member, patient


def vectorised(target, ref, member, patient, n_boot: int, seed: int) -> tuple[float, list[tuple[float, ...]]]:
    t0 = time.perf_counter()
    weights, _ = patient_weights(patient, n_boot, np.random.default_rng(seed))
    out = []
    for t in target:
        scores, _ = lira_offline(t, ref)
        m = attack_metrics(scores, member)
        attack_metrics(scores, member, weights)
        out.append((m["auroc"][0], m["tpr_at_1pct_fpr"][0], m["advantage"][0]))
    return time.perf_counter() - t0, out


def loop(target, ref, member, k: int) -> tuple[float, list[tuple[float, ...]]]:
    t0 = time.perf_counter()
    ref_l, mem_l = ref.tolist(), member.tolist()
    out = [attack_loop_reference(t.tolist(), ref_l, mem_l) for t in target[:k]]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="members + non-members (default 20000)")
    ap.add_argument("--models", type=int, default=20, help="target models (default 20)")
    ap.add_argument("--refs", type=int, default=8, help="reference models (default 8)")
    ap.add_argument(
        "--n-boot", type=int, default=200, help="bootstrap replicates, vectorised side (default 200)"
    )
    ap.add_argument("--loop-models", type=int, default=2, help="targets timed with the loop (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    target, ref, member, patient = simulate(a.n, a.models, a.refs, a.seed)
    tv, got = vectorised(target, ref, member, patient, a.n_boot, a.seed)
    k = min(a.loop_models, a.models)
    tl, want = loop(target, ref, member, k)
    np.testing.assert_allclose(np.array(got[:k]), np.array(want), atol=1e-9)
    tv0, _ = vectorised(target, ref, member, patient, 0 + 1, a.seed)  # point metrics (one replicate) only
    loop_all = tl / k * a.models
    res = {
        "n": a.n,
        "models": a.models,
        "refs": a.refs,
        "n_boot": a.n_boot,
        "vectorised_s_with_bootstrap": round(tv, 3),
        "vectorised_s_point": round(tv0, 3),
        "loop_s_point_measured": round(tl, 3),
        "loop_models_measured": k,
        "loop_s_point_all_models": round(loop_all, 2),
        "ratio_point": round(loop_all / tv0, 1),
        "ratio_loop_point_vs_vectorised_with_bootstrap": round(loop_all / tv, 1),
    }
    print(
        f"{a.n} examples x {a.models} target models, {a.refs} reference models:\n"
        f"  vectorised, point metrics:              {tv0:8.3f} s\n"
        f"  vectorised, point + {a.n_boot} bootstrap replicates: {tv:8.3f} s\n"
        f"  loop reference, point metrics:          {loop_all:8.2f} s ({tl:.2f} s measured on {k} models)\n"
        f"  ratio (loop / vectorised, point):       {res['ratio_point']:8.1f}x\n"
        f"  ratio (loop point / vectorised with bootstrap): {res['ratio_loop_point_vs_vectorised_with_bootstrap']:.1f}x"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
