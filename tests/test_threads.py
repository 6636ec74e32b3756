"""CPU threads per process: every core for one worker, an even share for several, restored after a block."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench import threads
from bench.protocol import default_threads


@pytest.mark.parametrize(
    ("cores", "workers", "expected"), [(2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 3, 5), (1, 1, 1)]
)
def test_threads_share_the_cores_between_workers(monkeypatch, cores, workers, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    assert threads.threads_per_process(workers) == expected
    assert default_threads(workers) == expected


def test_available_cores_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert threads.available_cores() == len(os.sched_getaffinity(0))


def test_torch_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    with threads.torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_passive_wait_is_set_before_torch_and_never_overrides_the_user():
    code = (
        "import os, bench.threads as t; ok = t.prefer_passive_wait(); "
        "print(os.environ.get('OMP_WAIT_POLICY'), ok)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "True"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "False"]


def test_generate_rejects_zero_threads(tmp_path):
    from bench.errors import BadInput
    from bench.generators.pipeline import generate

    with pytest.raises(BadInput, match="--threads 0"):
        generate("mediastinal-neoplasm", "pca-gmm", tmp_path / "missing.parquet", tmp_path / "out", threads=0)
