"""Type-I error, coverage and power of the paired comparison under the engine's calibration model.

Both arms the same procedure (null) or the candidate +`--effect` AUROC above the baseline (power); seed noise
(sd `TAU` on the logit), `--seeds` seeds per arm, clustered images (each model's error shared by a patient's
images; `bench.metrics.simulate.simulate_clustered`). Prints the rejection rate of `p_boot` at 5%, the coverage
of the difference's 95% interval and its mean width.

    PYTHONPATH=$PWD .venv/bin/python scripts/measure_calibration.py --sims 400 --images 2 4
    PYTHONPATH=$PWD .venv/bin/python scripts/measure_calibration.py --sims 400 --effect 0.03
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.metrics import compare_to_baseline
from bench.metrics.simulate import clustered_auroc, signal_for_auroc, simulate_clustered, simulation_task

TASK = simulation_task()
BASE_MU = 1.2


def measure(
    sims: int,
    *,
    patients: int = 150,
    images: tuple[int, int] = (2, 4),
    seeds: int = 3,
    effect: float = 0.0,
    seed_corr: float = 0.0,
    n_boot: int = 200,
    start: int = 5000,
) -> dict[str, float]:
    """Rejection rate at 5%, coverage of the true difference and mean interval width over `sims` simulations."""
    mu_c = signal_for_auroc(clustered_auroc(BASE_MU) + effect) if effect else BASE_MU
    truth = clustered_auroc(mu_c) - clustered_auroc(BASE_MU)
    rej = cov = 0
    widths = []
    for sim in range(sims):
        rng = np.random.default_rng(start + sim)
        arms = {("none", "real"): BASE_MU, ("twin", "synthetic"): mu_c}
        preds = simulate_clustered(rng, arms, patients, images, seeds, seed_corr=seed_corr)
        r = compare_to_baseline(preds, TASK, n_boot=n_boot, seed=sim, metrics=["auroc"]).iloc[0]
        rej += bool(r["p_boot"] < 0.05)
        cov += bool(r["ci_low"] <= truth <= r["ci_high"])
        widths.append(r["ci_high"] - r["ci_low"])
    return {"reject": rej / sims, "coverage": cov / sims, "width": float(np.mean(widths)), "sims": sims}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=400)
    ap.add_argument("--patients", type=int, default=150)
    ap.add_argument("--images", type=int, nargs=2, default=(2, 4), metavar=("LOW", "HIGH"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--effect", type=float, default=0.0, help="candidate's AUROC minus the baseline's")
    ap.add_argument("--seed-corr", type=float, default=0.0, help="correlation of the arms' seed k (CRN)")
    ap.add_argument("--boot", type=int, default=200)
    a = ap.parse_args()
    out = measure(
        a.sims,
        patients=a.patients,
        images=tuple(a.images),
        seeds=a.seeds,
        effect=a.effect,
        seed_corr=a.seed_corr,
        n_boot=a.boot,
    )
    print(
        f"{a.sims} simulations, {a.patients} patients x {a.images[0]}-{a.images[1]} images, {a.seeds} seeds per "
        f"arm, effect {a.effect:+.3f}, seed correlation {a.seed_corr}: rejects {out['reject']:.3f} at 5%, "
        f"coverage {out['coverage']:.3f}, mean width {out['width']:.4f}"
    )


if __name__ == "__main__":
    main()
