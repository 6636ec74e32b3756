"""Shared fixtures: a tiny task and a tiny multi-site image dataset that tests make themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

POSTGRES_ENV = "MEDSYNBENCH_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    """A service test on SQLite and on the PostgreSQL server `.ci/run` starts (skipped without one)."""
    if request.param == "sqlite":
        return None
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (`.ci/run` starts one on 127.0.0.1)")
    return url


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep caches and phantoms that tests build out of the user's ~/.cache."""
    old = {k: os.environ.get(k) for k in ("MEDSYNBENCH_CACHE", "MEDSYNBENCH_DATA")}
    base = tmp_path_factory.mktemp("medsynbench-cache")
    os.environ["MEDSYNBENCH_CACHE"] = str(base / "cache")
    os.environ["MEDSYNBENCH_DATA"] = str(base / "data")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


TINY_TASK = {
    "name": "tiny",
    "version": "1.0",
    "modality": "synthetic-shapes",
    "description": "Three shape classes on noisy backgrounds; a test fixture.",
    "image": {"size": 32, "channels": 1, "presets": {"smoke": 16}, "intensity": {"kind": "uint8"}},
    "labels": {
        "classes": ["blank", "disc", "bar"],
        "binary_view": {"name": "shape", "positive": ["disc", "bar"]},
    },
    "sites": {"train": ["s1", "s2", "s3"], "external": ["x1"]},
    "splits": {"unit": "patient_id", "train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
    "subgroups": {"columns": ["sex", "age_group"], "age_bins": [50]},
    "metrics": {
        "primary": "auroc_macro",
        "target_specificity": 0.8,
        "min_patients": 3,
        "min_positives": 2,
        "min_negatives": 2,
        "permutations": 100,
        "bootstrap": 50,
    },
    "protocol": {"regimes": ["real"], "seeds": [0], "backbone": "resnet18"},
    "source": {"kind": "folder", "options": {}},
}


def draw_shape(label: str, rng: np.random.Generator, size: int = 32, site_shift: float = 0.0) -> np.ndarray:
    img = rng.normal(90 + site_shift, 18, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    r = rng.integers(size // 8, size // 4)
    if label == "disc":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 90
    elif label == "bar":
        img[max(cy - r, 0) : cy + r, max(cx - 2, 0) : cx + 2] += 90
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiny_task(root: Path) -> Path:
    """Write the tiny task as ROOT/tasks/tiny/task.yaml and return the file."""
    d = root / "tasks" / "tiny"
    d.mkdir(parents=True)
    (d / "task.yaml").write_text(yaml.safe_dump(TINY_TASK, sort_keys=False))
    return d / "task.yaml"


@pytest.fixture
def tiny_task_path(tmp_path: Path) -> Path:
    return write_tiny_task(tmp_path)


@pytest.fixture
def tiny_task(tiny_task_path):
    from bench.tasks import load_task

    return load_task(tiny_task_path)


def make_tiny_dataset(
    root: Path, task, patients_per_site: int = 12, images_per_patient: int = 2, seed: int = 0
):
    """PNG images + a valid manifest at root/manifest.parquet; returns the manifest path."""
    from PIL import Image

    from bench.manifest import write_manifest
    from bench.splits import assign_splits

    rng = np.random.default_rng(seed)
    rows = []
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for s_i, site in enumerate(task.all_sites):
        for p in range(patients_per_site):
            pid = f"{site}-p{p:03d}"
            label = task.classes[p % len(task.classes)]
            sex = "M" if rng.random() < 0.5 else "F"
            age = int(rng.integers(20, 85))
            for k in range(images_per_patient):
                arr = draw_shape(label, rng, site_shift=8.0 * s_i)
                rel = f"images/{pid}_{k}.png"
                Image.fromarray(arr).save(root / rel)
                rows.append(
                    dict(
                        case_id=f"{pid}_{k}",
                        patient_id=pid,
                        image=rel,
                        label=label,
                        site=site,
                        sex=sex,
                        age=age,
                        origin="real",
                        generator=None,
                    )
                )
    df = pd.DataFrame(rows)
    df = task.add_subgroup_columns(df)
    df = assign_splits(df, task)
    path = root / "manifest.parquet"
    write_manifest(df, path, image_root=root)
    return path


@pytest.fixture
def tiny_manifest(tmp_path: Path, tiny_task) -> Path:
    return make_tiny_dataset(tmp_path / "data", tiny_task)
