"""Weights & Biases tracking of training runs: resolved config, per-epoch curves, final metrics.

Offline by default: the run is written under `RUN/wandb/` and can be uploaded later with `wandb sync`; `online`
needs the user's key; `disabled` turns tracking off. A tracking failure never fails a benchmark run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from bench.errors import BadInput

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
PROJECT = "medsynbench"
METRICS_FILE = "medsynbench-metrics.json"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BadInput(f"--wandb {mode!r}: expected one of {list(MODES)}")
    return mode


class Tracker:
    """One tracked run. Every method is a no-op when disabled or when wandb could not start."""

    def __init__(
        self,
        mode: str,
        directory: Path,
        *,
        name: str,
        group: str,
        config: dict[str, Any],
        job_type: str = "train",
        tags: list[str] | None = None,
    ):
        self.run = None
        self.mode = check_mode(mode)
        if mode == "disabled":
            return
        try:
            import wandb

            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                mode=mode,
                dir=str(directory),
                project=os.environ.get("WANDB_PROJECT", PROJECT),
                group=group,
                name=name,
                job_type=job_type,
                tags=tags,
                config=config,
                reinit="create_new",
                settings=wandb.Settings(
                    console="off",
                    silent=True,
                    save_code=False,
                    x_disable_stats=True,
                    x_save_requirements=False,
                ),
            )
        except Exception as e:  # noqa: BLE001 - tracking is a side channel; the benchmark goes on without it
            log.warning("wandb tracking is off for %s: %s", name, e)
            self.run = None

    @property
    def dir(self) -> Path | None:
        """The run's files folder (inside its offline run directory)."""
        return Path(self.run.dir) if self.run is not None else None

    def log_epoch(self, record: dict[str, Any], prefix: str = "") -> None:
        if self.run is None:
            return
        data = {f"{prefix}{k}": v for k, v in record.items() if isinstance(v, (int, float, bool))}
        self.run.log(data)

    def finish(self, metrics: dict[str, Any]) -> None:
        """Final metrics into the run summary and, as JSON, into the run's files (uploaded by `wandb sync`)."""
        if self.run is None:
            return
        try:
            self.run.summary.update(flatten(metrics))
            if self.dir is not None:
                (self.dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("wandb: could not finish run: %s", e)
        finally:
            self.run = None

    def abort(self) -> None:
        if self.run is not None:
            with contextlib.suppress(Exception):
                self.run.finish(exit_code=1)
            self.run = None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> `a/b/c` keys with scalar values (what a wandb summary shows as columns)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out
