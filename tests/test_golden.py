"""Golden test: a fixed small matrix must reproduce committed predictions and metric table (to 1e-5: see ATOL).

The files in tests/golden/ were written by this module (`MEDSYNBENCH_WRITE_GOLDEN=1 pytest tests/test_golden.py`)
from code whose numbers are the reference. Tables may gain columns (compared: the golden columns, in their order);
none may lose one or change a value. A change that moves any reported number fails here; such a change
must bump the task or protocol version, regenerate these files and say why in CHANGELOG.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TASK, make_tiny_dataset
from test_matrix import card_for, make_synthetic

from bench.cli import main
from bench.tasks import load_task

GOLDEN = Path(__file__).resolve().parent / "golden"
WRITE = os.environ.get("MEDSYNBENCH_WRITE_GOLDEN") == "1"
REGIMES = "real,synthetic,augment:1,scarce:0.5+synthetic"
RUN_KEYS = ["generator", "regime", "seed", "backbone"]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("golden")
    (root / "tasks" / "tiny").mkdir(parents=True)
    task_path = root / "tasks" / "tiny" / "task.yaml"
    task_path.write_text(yaml.safe_dump(TINY_TASK, sort_keys=False))
    task = load_task(task_path)
    real = make_tiny_dataset(root / "data", task)
    syn = make_synthetic(root / "syn", card=card_for(real))
    out = root / "run"
    args = ["run", "--task", str(task_path), "--real", str(real), "--out", str(out)]
    args += ["--synthetic", f"shapes={syn}", "--regimes", REGIMES, "--seeds", "0,1"]
    args += ["--preset", "smoke", "--backbone", "resnet10t", "--epochs", "2", "--threads", "1"]
    args += ["--cache-dir", str(root / "cache"), "--wandb", "disabled", "--quiet"]
    try:
        assert main(args) == 0
        assert main(["evaluate", str(out), "--n-boot", "40"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _predictions(run: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(run.glob("*/predictions.parquet"))]
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values([*RUN_KEYS, "case_id"]).reset_index(drop=True)


def _table(run: Path, stem: str) -> pd.DataFrame:
    t = pd.read_parquet(run / "evaluation" / f"{stem}.parquet")
    t = t.drop(columns=[c for c in ("source",) if c in t.columns])
    return _sorted(t)


def _sorted(t: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in t.columns if c not in ("value", "ci_low", "ci_high", "seed_sd")]
    return t.sort_values(keys, key=lambda s: s.astype(str)).reset_index(drop=True)


# float32 kernels are not bitwise the same on every CPU (oneDNN picks them by instruction set): predictions of the
# same code agree to about 1e-7 between machines, while any change of what is computed moves them by far more.
ATOL = 1e-5


def _compare(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    # Columns added after the golden files were written are allowed; every golden column must keep its values.
    missing = [c for c in want.columns if c not in got.columns]
    assert not missing, f"{what}: columns {missing} disappeared"
    got = got[list(want.columns)]
    if what != "predictions":  # tables are sorted on their columns: sort on the golden ones
        got = _sorted(got)
    assert len(got) == len(want), f"{what}: {len(got)} rows, golden has {len(want)}"
    for c in want.columns:
        if pd.api.types.is_float_dtype(want[c]):
            np.testing.assert_allclose(
                got[c].to_numpy(float),
                want[c].to_numpy(float),
                rtol=0,
                atol=ATOL,
                err_msg=f"{what}: {c}",
            )
        else:
            assert got[c].astype(str).tolist() == want[c].astype(str).tolist(), f"{what}: column {c} changed"


def test_matrix_reproduces_golden_predictions_and_metrics(golden_run):
    got = {
        "predictions": _predictions(golden_run),
        "metrics": _table(golden_run, "metrics"),
        "comparisons": _table(golden_run, "comparisons"),
    }
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        for name, df in got.items():
            df.to_parquet(GOLDEN / f"{name}.parquet", index=False)
        pytest.skip("golden files written")
    for name, df in got.items():
        assert len(df) > 0, name
        _compare(df, pd.read_parquet(GOLDEN / f"{name}.parquet"), name)
