"""Seeded synthetic predictions that follow the predictions contract (for tests, benchmarks and examples).

Each run key gets its own signal strength; cases share a patient-level random effect across runs and seeds (as a
real hard case is hard for every model), and each training seed adds its own noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from bench.runfolder import BASELINE, BASELINE_REGIME
from bench.tasks import Task


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
