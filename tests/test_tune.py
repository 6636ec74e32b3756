"""Equal-budget tuning: optuna studies that resume, seeded sampling, parameters recorded in every run."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from test_matrix import base_args, world  # noqa: F401 - `world` is a fixture used below

from bench.cli import main
from bench.tune import SearchRange, TuneSpec, redact, run_study


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quadratic(params, report):
    """Best at lr = 1e-3; reports three 'epochs' so the pruner has something to compare."""
    value = 1.0 - (math.log10(params["lr"]) + 3) ** 2 / 4
    for epoch in range(1, 4):
        report(epoch, value * epoch / 3)
    return value


def test_study_runs_exactly_its_budget_and_resumes(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    spec = TuneSpec(trials=4, seed=3)
    res = run_study("s", url, spec, quadratic)
    assert res["trials"] == 4 and res["n_complete"] + res["n_pruned"] == 4
    assert set(res["best_params"]) == {"lr", "weight_decay", "aug_strength"}
    assert res["best_value"] == pytest.approx(quadratic(res["best_params"], lambda e, v: None))
    # Resuming a finished study adds nothing; a larger budget adds only the difference.
    again = run_study("s", url, spec, quadratic)
    assert again["n_complete"] + again["n_pruned"] == 4
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == 4
    run_study("s", url, TuneSpec(trials=6, seed=3), quadratic)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 6


def test_seeded_sampler_repeats_its_suggestions(tmp_path):
    a = run_study("a", f"sqlite:///{tmp_path / 'a.db'}", TuneSpec(trials=3, seed=11), quadratic)
    b = run_study("b", f"sqlite:///{tmp_path / 'b.db'}", TuneSpec(trials=3, seed=11), quadratic)
    c = run_study("c", f"sqlite:///{tmp_path / 'c.db'}", TuneSpec(trials=3, seed=12), quadratic)
    assert a["best_params"] == b["best_params"]
    assert a["best_params"] != c["best_params"]


def test_search_space_is_respected(tmp_path):
    space = {"lr": SearchRange(low=0.01, high=0.02, log=True), "aug_strength": SearchRange(low=0.2, high=0.3)}
    seen = []

    def obj(params, report):
        seen.append(params)
        return params["lr"]

    run_study("r", f"sqlite:///{tmp_path / 'r.db'}", TuneSpec(trials=5, search_space=space), obj)
    assert len(seen) == 5
    for p in seen:
        assert set(p) == {"lr", "aug_strength"}
        assert 0.01 <= p["lr"] <= 0.02 and 0.2 <= p["aug_strength"] <= 0.3


def test_a_trial_left_running_by_a_killed_process_is_failed_on_resume(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    study = optuna.create_study(study_name="k", storage=url, direction="maximize")
    study.ask()  # a trial that never reports back
    res = run_study("k", url, TuneSpec(trials=2), quadratic)
    states = [t.state for t in optuna.load_study(study_name="k", storage=url).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert res["n_complete"] + res["n_pruned"] == 2


def test_bad_search_spaces_and_redaction():
    with pytest.raises(ValueError, match="low"):
        SearchRange(low=1.0, high=0.5)
    with pytest.raises(ValueError, match="log"):
        SearchRange(low=0.0, high=1.0, log=True)
    with pytest.raises(ValueError, match="momentum"):
        TuneSpec(search_space={"momentum": SearchRange(low=0, high=1)})
    assert "s3cret" not in redact("postgresql://bench:s3cret@db.example.org:5432/optuna")
    assert "db.example.org" in redact("postgresql://bench:s3cret@db.example.org:5432/optuna")


def test_matrix_tuning_records_parameters_and_budget(world, tmp_path):  # noqa: F811
    out = tmp_path / "tuned"
    args = base_args(
        world,
        out,
        "--regimes",
        "real,synthetic",
        "--synthetic",
        f"shapes={world['syn']}",
        "--seeds",
        "0,1",
        "--tune",
        "2",
        "--wandb",
        "disabled",
    )
    assert main(args) == 0
    # The synthetic-only arm has no study of its own: real validation labels would choose its parameters.
    assert sorted(p.name for p in (out / "tuning").iterdir()) == ["none__real__resnet10t.json"]
    result = json.loads((out / "tuning" / "none__real__resnet10t.json").read_text())
    assert result["trials"] == 2 and result["n_complete"] + result["n_pruned"] == 2
    study = optuna.load_study(study_name=result["study"], storage=f"sqlite:///{out / 'tuning.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2
    assert result["best_value"] == pytest.approx(study.best_value)
    for run in [
        f"{arm}__seed{seed}"
        for arm in ("none__real__resnet10t", "shapes__synthetic__resnet10t")
        for seed in (0, 1)
    ]:
        cfg = json.loads((out / run / "config.json").read_text())
        assert cfg["tuning"]["trials"] == 2
        assert cfg["tuning"]["best_params"] == study.best_params
        # The run trained with the chosen parameters.
        for k, v in study.best_params.items():
            assert cfg["train"][k] == v
        assert 1e-4 <= cfg["train"]["lr"] <= 1e-2
    # Resuming does not tune again.
    mtime = (out / "tuning.db").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "tuning.db").stat().st_mtime_ns == mtime


def test_run_specs_hold_frozen_typed_settings(world, tmp_path):  # noqa: F811
    import pydantic

    from bench.protocol import MatrixOptions, RunSettings, plan_matrix

    plan = plan_matrix(
        MatrixOptions(
            task=world["task_path"],
            real=world["real"],
            out=tmp_path / "p",
            synthetic={"shapes": world["syn"]},
            regimes=["real", "synthetic"],
            seeds=[0],
            preset="smoke",
            wandb="disabled",
            cache_dir=world["cache"],
        )
    )
    spec = plan.runs[0]
    assert isinstance(spec.settings, RunSettings) and spec.settings.budget_unit == "steps"
    with pytest.raises(pydantic.ValidationError):
        spec.settings.lr = 1.0
    tuned = spec.settings.with_params({"lr": 0.01})
    assert tuned.lr == 0.01 and spec.settings.lr != 0.01
    with pytest.raises(pydantic.ValidationError, match="lr"):
        spec.settings.with_params({"lr": -1.0})
    # Early stopping is refused by name: it would let real validation labels choose a synthetic-only model.
    with pytest.raises(pydantic.ValidationError, match="patience"):
        RunSettings.model_validate({**spec.settings.model_dump(), "patience": 3})
