"""`medsynbench leaderboard push`: the ranked leaderboard as a Weights & Biases Table.

Offline by default: the run is written under `DIR/wandb/offline-run-*` and `wandb sync` uploads it later, so a
push never needs network access or an API key unless `--mode online` is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.errors import BadInput
from bench.leaderboard.build import board_rows
from bench.leaderboard.config import load_config
from bench.leaderboard.record import read_records
from bench.leaderboard.render import columns

MODES = ("offline", "online")


# Leading identity columns of the table; the estimate columns follow the page's, in the page's order.
_IDENTITY = [
    ("rank", "rank"),
    ("rank_low", "rank_low"),
    ("rank_high", "rank_high"),
    ("tie_group", "tie_group"),
    ("generator", "name"),
    ("kind", "kind"),
    ("version", "version"),
    ("submitter", "submitter"),
    ("record_id", "id"),
    ("headline_regime", "headline_regime"),
]
# Page columns that are not estimates (shown above, or as text below).
_NOT_ESTIMATES = {"rank", "tie_group", "name", "contamination", "pareto"}


def estimate_keys(task_kind: str = "classification") -> list[str]:
    """The page's estimate columns (`bench.leaderboard.render.columns`: fixed ones, every metric column of the
    board's kind, the fidelity columns), so a new leaderboard metric reaches the W&B table too."""
    return [k for k, _, _ in columns(task_kind) if k not in _NOT_ESTIMATES]


def table_columns(task_kind: str = "classification") -> list[str]:
    cols = [name for name, _ in _IDENTITY]
    for k in estimate_keys(task_kind):
        cols += [k, f"{k}_ci_low", f"{k}_ci_high"]
    return [*cols, "worst_group", "gap_groups", "contamination", "pareto"]


def table_rows(rows: list[dict[str, Any]], task_kind: str = "classification") -> list[list[Any]]:
    out = []
    for r in rows:
        vals: list[Any] = [r.get(key) if key != "version" else (r.get(key) or "") for _, key in _IDENTITY]
        for k in estimate_keys(task_kind):
            e = r.get(k)
            e = e if isinstance(e, dict) else {}
            vals += [e.get("value"), e.get("ci_low"), e.get("ci_high")]
        vals += [
            (r.get("worst") or {}).get("group") or "",
            (r.get("gap") or {}).get("group") or "",
            r.get("contamination") or "",
            bool(r["pareto"]),
        ]
        out.append(vals)
    return out


def push(
    board: str | Path,
    project: str,
    *,
    mode: str = "offline",
    directory: str | Path = ".",
    entity: str | None = None,
) -> Path:
    """Log the leaderboard as a wandb.Table; returns the local run directory."""
    if mode not in MODES:
        raise BadInput(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if not project or "/" in project:
        raise BadInput(f"--wandb-project {project!r}: give a project name (no '/')")
    cfg = load_config(board)
    records = read_records(cfg.records_dir)
    if not records:
        raise BadInput(f"{cfg.records_dir}: no records to push")
    rows, facts = board_rows(cfg, records)
    import wandb  # heavy, and only a push needs it: building pages must not pay for it

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        dir=str(directory),
        job_type="leaderboard",
        name=f"leaderboard-{cfg.task.name}-{cfg.task.version}",
        config={
            "task": cfg.task.name,
            "task_version": cfg.task.version,
            "primary_metric": facts["primary_metric"],
            "split": facts["split"],
            "n_records": len(rows),
            "n_boot": facts["n_boot"],
        },
        reinit="create_new",
    )
    try:
        kind = facts.get("kind", "classification")
        run.log({"leaderboard": wandb.Table(columns=table_columns(kind), data=table_rows(rows, kind))})
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
