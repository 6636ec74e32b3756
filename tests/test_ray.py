"""A tiny matrix through the Ray executor on a local Ray instance (skipped when Ray is not installed)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_matrix import RUNS, base_args, matrix, world  # noqa: F401 - fixtures used below

from bench.cli import main

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_executor_runs_the_matrix_like_the_local_one(world, matrix, tmp_path):  # noqa: F811
    out = tmp_path / "ray"
    args = base_args(
        world,
        out,
        "--synthetic",
        f"shapes={world['syn']}",
        "--regimes",
        "real,augment:1",
        "--seeds",
        "0",
        "--wandb",
        "disabled",
        "--executor",
        "ray",
        "--workers",
        "2",
    )
    try:
        assert main(args) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    for r in RUNS[:2]:
        assert (out / r / "DONE").is_file()
        cfg = json.loads((out / r / "config.json").read_text())
        assert cfg["environment"]["torch_threads"] == 1
        # Same seed, same thread count: the Ray worker reproduces the in-process run exactly.
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / r / "predictions.parquet"),
            pd.read_parquet(matrix / r / "predictions.parquet"),
            check_exact=True,
        )


def test_ray_address_without_ray_executor_is_bad_input(world, tmp_path, capsys):  # noqa: F811
    rc = main(base_args(world, tmp_path / "o", "--regimes", "real", "--ray-address", "127.0.0.1:6379"))
    assert rc == 2
    assert "--ray-address" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
