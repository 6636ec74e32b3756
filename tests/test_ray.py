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


@pytest.mark.slow
def test_ray_executor_trains_segmenters_like_the_local_one(tmp_path):
    from test_seg_run import FAST, TASK, write_pair_set

    from bench.labelmaps import load_labelmaps

    phantom, real = tmp_path / "phantom", tmp_path / "manifest.parquet"
    cmd = ["data", "phantom", "--out", str(phantom), "--patients", "40", "--slices", "2", "--size", "64"]
    assert main([*cmd, "--seed", "0", "--masks"]) == 0
    assert main(["data", "manifest", "--task", TASK, "--root", str(phantom), "--out", str(real)]) == 0
    syn = write_pair_set(real, tmp_path / "pairs")
    common = ["--synthetic", f"pairs={syn}", "--regimes", "real,augment:1", "--seeds", "0", *FAST]
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / executor
        args = ["run", "--task", TASK, "--real", str(real), "--out", str(outs[executor]), *common]
        args += ["--executor", executor, "--workers", "2" if executor == "ray" else "1"]
        try:
            assert main(args) == 0
        finally:
            if ray.is_initialized():
                ray.shutdown()
    runs = sorted(p.name for p in outs["local"].glob("*__seed0"))
    assert len(runs) == 2 and sorted(p.name for p in outs["ray"].glob("*__seed0")) == runs
    for r in runs:
        # Same seed, one thread each: a Ray worker's segmenter predicts the same label maps and counts.
        local, remote = (
            load_labelmaps(outs["local"] / r / "labelmaps.npz"),
            load_labelmaps(outs["ray"] / r / "labelmaps.npz"),
        )
        assert local.case_ids == remote.case_ids and (local.maps == remote.maps).all()
        pd.testing.assert_frame_equal(
            pd.read_parquet(outs["local"] / r / "seg_predictions.parquet"),
            pd.read_parquet(outs["ray"] / r / "seg_predictions.parquet"),
            check_exact=True,
        )
