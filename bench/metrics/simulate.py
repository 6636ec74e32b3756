"""Seeded synthetic predictions that follow the predictions contract (for tests, benchmarks and examples).

Each run key gets its own signal strength; cases share a patient-level random effect across runs and seeds (as a
real hard case is hard for every model), and each training seed adds its own noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.stats import norm

from bench.runfolder import BASELINE, BASELINE_REGIME
from bench.tasks import Task


def simulation_task(**fields: object) -> Task:
    """The two-class task the engine's simulations score (sites a and b, subgroup sex, small-group floors low
    enough for simulated cohorts); `fields` replace top-level task fields (e.g. `splits` with a reserve)."""
    spec: dict[str, object] = {
        "name": "sim",
        "version": "1.0.0",
        "modality": "sim",
        "labels": {"classes": ["neg", "pos"]},
        "sites": {"train": ["a", "b"], "external": []},
        "subgroups": {"columns": ["sex"]},
        "metrics": {"primary": "auroc", "min_patients": 5, "min_positives": 3, "min_negatives": 3},
        "source": {"kind": "folder", "options": {}},
    }
    return Task.model_validate({**spec, **fields})


def simulate_predictions(
    task: Task,
    *,
    runs: Mapping[tuple[str, str], float] | None = None,
    seeds: Sequence[int] = (0, 1),
    patients_per_site: int = 40,
    images_per_patient: int = 2,
    backbone: str = "resnet18",
    seed: int = 0,
) -> pd.DataFrame:
    """A predictions table: `runs` maps (generator, regime) to a signal strength (0 = chance)."""
    runs = dict(
        runs
        or {(BASELINE, BASELINE_REGIME): 2.0, ("copycat", "synthetic"): 1.2, ("copycat", "augment:1"): 2.2}
    )
    rng = np.random.default_rng(seed)
    k = len(task.classes)
    cases = []
    for site in task.all_sites:
        external = site in task.sites.external
        for p in range(patients_per_site):
            pid = f"{site}-p{p:04d}"
            split = "external" if external else ("val" if p % 2 == 0 else "test")
            label = int(rng.integers(k))
            sex = str(rng.choice(["F", "M"]))
            age = int(rng.integers(20, 90))
            effect = rng.normal(0, 0.7, k)
            for i in range(images_per_patient):
                cases.append(
                    (f"{pid}-{i}", pid, site, split, sex, age, label, effect + rng.normal(0, 0.5, k))
                )
    base = pd.DataFrame(cases, columns=["case_id", "patient_id", "site", "split", "sex", "age", "_y", "_z"])
    base["y_true"] = np.asarray(task.classes, dtype=object)[base["_y"].to_numpy()]
    base["age_group"] = task.age_group(base["age"])
    onehot = np.eye(k)[base["_y"].to_numpy()]
    z = np.vstack(base["_z"].to_numpy())
    frames = []
    for (gen, reg), strength in runs.items():
        for s in seeds:
            noise = np.random.default_rng([seed, s, zlib.crc32(f"{gen}|{reg}".encode())]).normal(
                0, 0.6, z.shape
            )
            logits = strength * onehot + z + noise
            P = np.exp(logits - logits.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            f = base.drop(columns=["_y", "_z"]).copy()
            for j, c in enumerate(task.classes):
                f[f"prob_{c}"] = P[:, j]
            f["generator"], f["regime"], f["seed"], f["backbone"] = gen, reg, int(s), backbone
            frames.append(f)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------- engine checks

# The engine's calibration model (tests/test_simulation.py, scripts/measure_calibration.py, the planner's check).
# Patient label y ~ Bernoulli(0.4); a patient effect u ~ N(0, SU^2) and image noise e ~ N(0, SE^2) shared by
# every model (a hard case is hard for all); a training seed draws its signal mu_s ~ N(mu, TAU^2) (seed noise on
# the logit) and its own error per patient, N(0, SN^2), shared by that patient's images.
SU, SE, SN, TAU = 0.7, 0.5, 0.4, 0.15


def clustered_auroc(mu: float, tau: float = TAU) -> float:
    """The procedure's expected AUROC under the calibration model: mean over mu_s of Phi(mu_s / sigma)."""
    sig = np.sqrt(2 * (SU**2 + SE**2 + SN**2))
    x, w = np.polynomial.hermite_e.hermegauss(40)
    return float(np.sum(w * norm.cdf((mu + tau * x) / sig)) / np.sum(w))


def signal_for_auroc(target: float, tau: float = TAU) -> float:
    """The signal mu whose expected AUROC (`clustered_auroc`) is `target`."""
    return float(brentq(lambda m: clustered_auroc(m, tau) - target, -5.0, 8.0))


def simulate_clustered(
    rng: np.random.Generator,
    arms: Mapping[tuple[str, str], float],
    n_patients: int,
    images: int | tuple[int, int],
    n_seeds: int,
    *,
    tau: float = TAU,
    sn: float = SN,
    seed_corr: float = 0.0,
    split: str = "test",
) -> pd.DataFrame:
    """Predictions of binary arms (generator, regime) -> signal mu under the calibration model above.

    `images`: per patient, fixed or drawn uniformly from (low, high). `seed_corr`: correlation between the arms'
    seed k (signal draw and per-patient errors), as common random numbers (shared initialisation and batch
    order) would make it; 0 for independent training runs.
    """
    y = rng.random(n_patients) < 0.4
    site = np.where(np.arange(n_patients) % 2 == 0, "a", "b")
    sex = np.where(rng.random(n_patients) < 0.5, "F", "M")
    u = rng.normal(0, SU, n_patients)
    per = (
        np.full(n_patients, images)
        if isinstance(images, int)
        else rng.integers(images[0], images[1] + 1, n_patients)
    )
    pid = np.repeat(np.arange(n_patients), per)
    e = rng.normal(0, SE, len(pid))
    base = pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(len(pid))],
            "patient_id": [f"p{p}" for p in pid],
            "site": site[pid],
            "split": split,
            "sex": sex[pid],
            "y_true": np.where(y[pid], "pos", "neg"),
        }
    )
    shared_sig = rng.normal(0, 1, n_seeds)
    shared_err = rng.normal(0, 1, (n_seeds, n_patients))
    r, q = np.sqrt(seed_corr), np.sqrt(1 - seed_corr)
    frames = []
    for (gen, reg), mu in arms.items():
        for s in range(n_seeds):
            mu_s = mu + tau * (r * shared_sig[s] + q * rng.normal())
            err = sn * (r * shared_err[s] + q * rng.normal(0, 1, n_patients))
            z = mu_s * y[pid] + u[pid] + e + err[pid]
            p = 1 / (1 + np.exp(-z))
            frames.append(
                base.assign(prob_neg=1 - p, prob_pos=p, generator=gen, regime=reg, seed=s, backbone="m")
            )
    return pd.concat(frames, ignore_index=True)
