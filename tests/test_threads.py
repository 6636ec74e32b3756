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


def _policy_in_fresh_process(env: dict[str, str], busy: str) -> list[str]:
    """OMP_WAIT_POLICY and the recorded choice in a process that has not loaded torch, with a faked load."""
    code = (
        "import os, bench.threads as t; "
        f"t.busy_cores = lambda window_s=0.2: {busy}; "
        "chosen = t.choose_wait_policy(); "
        "print(os.environ.get('OMP_WAIT_POLICY', '-'), '|', chosen, '|', t.wait_policy())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [part.strip() for part in out.stdout.split("|")]


@pytest.mark.parametrize(
    ("busy", "env_policy", "chosen"),
    [
        ("1.5", "PASSIVE", "PASSIVE (1.5 cores busy elsewhere)"),  # a competitor: threads sleep
        ("0.5", "PASSIVE", "PASSIVE (0.5 cores busy elsewhere)"),  # the threshold itself counts as busy
        (
            "0.1",
            "-",
            "default (0.1 cores busy elsewhere)",
        ),  # quiet: OpenMP's spinning default is twice as fast
        ("None", "PASSIVE", "PASSIVE (load unknown)"),  # no /proc/stat: the choice that never collapses
    ],
)
def test_wait_policy_follows_the_load_when_the_command_starts(busy, env_policy, chosen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_in_fresh_process(env, busy) == [env_policy, chosen, chosen]


def test_wait_policy_never_overrides_the_user():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert _policy_in_fresh_process(env, "1.5") == ["ACTIVE"] + ["ACTIVE (from the environment)"] * 2


def test_wait_policy_is_left_alone_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "_chosen", {})
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.2: 1.5)
    assert "torch" in sys.modules  # imported at the top of this file
    assert threads.choose_wait_policy() == "default (OpenMP already started)"
    assert "OMP_WAIT_POLICY" not in os.environ


def test_only_commands_that_compute_with_torch_sample_the_load(tmp_path, monkeypatch, capsys):
    import bench.cli as cli

    calls = []
    monkeypatch.setattr(cli, "choose_wait_policy", lambda: calls.append(1) or "default")
    missing = str(tmp_path / "missing.parquet")
    for argv in (
        ["tasks"],
        ["data", "validate", missing, "--task", "mediastinal-neoplasm"],
        ["evaluate", str(tmp_path / "no-run")],
        ["leaderboard", "build", str(tmp_path / "no-board")],
    ):
        cli.main(argv)
    assert calls == []
    for argv in (
        ["run", "--task", "no-such-task", "--real", missing, "--out", str(tmp_path / "r")],
        [
            "generate",
            "--task",
            "no-such-task",
            "--generator",
            "copycat",
            "--real",
            missing,
            "--out",
            str(tmp_path / "g"),
        ],
        ["demo", "--preset", "smoke", "--out", str(tmp_path / "precious")],
    ):
        (tmp_path / "precious").mkdir(exist_ok=True)
        (tmp_path / "precious" / "keep.txt").write_text("not a demo folder")
        assert cli.main(argv) == 2
    assert len(calls) == 3
    capsys.readouterr()


def test_busy_cores_reads_this_machine():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this platform")
    busy = threads.busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_generate_rejects_zero_threads(tmp_path):
    from bench.errors import BadInput
    from bench.generators.pipeline import generate

    with pytest.raises(BadInput, match="--threads 0"):
        generate("mediastinal-neoplasm", "pca-gmm", tmp_path / "missing.parquet", tmp_path / "out", threads=0)
