"""Leaderboards: versioned result records, validated and re-scored submissions, ranks with uncertainty, a static
page and a W&B Table.

    submit(run, board, submitter=...)   run folder or bundle -> records/<id>.json + predictions/<id>.parquet
                                         (a segmentation run: + predictions/<id>.labelmaps.npz, recounted
                                         against the answer key's masks)
    build(board)                         records -> README.md + index.html
    push(board, project)                 records -> wandb.Table (offline run directory by default)
"""

from __future__ import annotations

from bench.leaderboard.build import board_rows, build
from bench.leaderboard.config import LeaderboardConfig, load_config
from bench.leaderboard.push import push
from bench.leaderboard.record import SCHEMA_VERSION, read_record, read_records, record_schema, validate_record
from bench.leaderboard.submit import submit

__all__ = [
    "SCHEMA_VERSION",
    "LeaderboardConfig",
    "board_rows",
    "build",
    "load_config",
    "push",
    "read_record",
    "read_records",
    "record_schema",
    "submit",
    "validate_record",
]
