"""Equal-budget hyperparameter tuning with optuna.

Every (generator, regime) gets a study with the same number of finished trials, a seeded TPE sampler and a median
pruner, scored on the validation split of the training sites only. Studies live in SQLite inside the run folder by
default (so an interrupted study resumes), or in a shared RDB (`--storage postgresql://...`) so several processes or
machines work on one study.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from bench.errors import BadInput
from bench.runfolder import RunDir
from bench.schema import Strict

log = logging.getLogger(__name__)

TUNABLE = ("lr", "weight_decay", "aug_strength")
FINISHED_STATES = ("COMPLETE", "PRUNED")


class SearchRange(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


def default_search_space() -> dict[str, SearchRange]:
    return {
        "lr": SearchRange(low=1e-4, high=1e-2, log=True),
        "weight_decay": SearchRange(low=1e-6, high=1e-2, log=True),
        "aug_strength": SearchRange(low=0.0, high=1.0),
    }


class TuneSpec(Strict):
    """The `tune:` block of a protocol YAML."""

    trials: int = Field(0, ge=0, description="finished trials per (generator, regime); 0 = no tuning")
    seed: int = Field(0, description="sampler seed and the training seed of every trial")
    search_space: dict[str, SearchRange] = Field(default_factory=default_search_space)
    pruner_startup_trials: int = Field(2, ge=0)
    pruner_warmup_epochs: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _known(self) -> TuneSpec:
        unknown = sorted(set(self.search_space) - set(TUNABLE))
        if unknown:
            raise ValueError(f"search_space: unknown parameter(s) {unknown} (tunable: {list(TUNABLE)})")
        return self


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{RunDir(run_dir).tuning_db.resolve()}"


def redact(url: str) -> str:
    """The storage URL without its password (what goes into config.json)."""
    try:
        # sqlalchemy (optuna's storage) is slow to import; only a storage URL needs it
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: keep only the scheme
        return url.split("://", 1)[0] + "://..."


def _storage(url: str):
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local workers may write to the one SQLite file: wait for the lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    else:
        # Heartbeats let a resumed study fail the trials of a killed worker instead of waiting on them forever.
        kwargs["heartbeat_interval"] = 60
        kwargs["grace_period"] = 180
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as e:  # noqa: BLE001 - a bad URL or unreachable database is the user's to fix
        raise BadInput(f"--storage {redact(url)!r}: cannot open the optuna storage: {e}") from e


def suggest(trial: Any, space: dict[str, SearchRange]) -> dict[str, float]:
    return {k: trial.suggest_float(k, r.low, r.high, log=r.log) for k, r in sorted(space.items())}


Objective = Callable[[dict[str, float], Callable[[int, float], None]], float]


def run_study(
    name: str,
    storage: str,
    spec: TuneSpec,
    objective: Objective,
    *,
    objective_name: str = "val_auroc_macro",
) -> dict[str, Any]:
    """Run (or resume) study `name` until it holds `spec.trials` finished trials; return the summary.

    `objective(params, report)` trains with `params` and returns the validation score `objective_name`
    (macro AUROC for a classifier, macro Dice for a segmenter; higher is better); it calls
    `report(epoch, value)` after each epoch so the pruner can stop a hopeless trial.
    """
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stor = _storage(storage)
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_epochs
    )
    study = optuna.create_study(
        study_name=name,
        storage=stor,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    if storage.startswith("sqlite"):
        # A study in the run folder's SQLite file has no other live worker: a RUNNING trial is left over from a
        # killed process and would otherwise count against nothing and block nothing, but clutter the study.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            stor.set_trial_state_values(t._trial_id, TrialState.FAIL)
    else:
        optuna.storages.fail_stale_trials(study)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)

    def n_done() -> int:
        return len(study.get_trials(deepcopy=False, states=finished))

    def obj(trial: optuna.Trial) -> float:
        params = suggest(trial, spec.search_space)

        def report(epoch: int, value: float) -> None:
            trial.report(0.0 if math.isnan(value) else value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        value = objective(params, report)
        return 0.0 if math.isnan(value) else float(value)

    remaining = spec.trials - n_done()
    if remaining > 0:
        study.optimize(
            obj,
            n_trials=remaining,
            callbacks=[MaxTrialsCallback(spec.trials, states=finished)],
            catch=(),
            gc_after_trial=True,
        )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {name!r}: no trial completed")
    best = study.best_trial
    return {
        "study": name,
        "storage": redact(storage),
        "trials": spec.trials,
        "n_complete": len(complete),
        "n_pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        "best_params": dict(best.params),
        "best_value": float(best.value),
        "best_trial": int(best.number),
        "sampler": f"TPESampler(seed={spec.seed})",
        "pruner": (
            f"MedianPruner(n_startup_trials={spec.pruner_startup_trials}, "
            f"n_warmup_steps={spec.pruner_warmup_epochs})"
        ),
        "search_space": {k: v.model_dump() for k, v in sorted(spec.search_space.items())},
        "objective": objective_name,
    }
