"""How long `leaderboard build` takes per record, with a cold and a warm score cache, on a board of many records.

The board is the committed mediastinal-neoplasm board (real record and prediction sizes) with its generator records
cloned until it holds `--records` records. A clone is its original under a new record id, with its own copy of the
predictions file: the board is valid, every clone is verified, joined to the answer key and ranked on its own row.
(Clones keep the generator's name: the bootstrap's random streams are keyed by it, so a renamed clone would score
differently from its original.)

- first build after the submits: the caches hold what each record's `submit` left (its scores and its ranking
  replicates); the build hashes and checks the records, validates their files against the schema, reads the
  scores and replicates, ranks and writes the pages.
- warm: the same board built again: the record files are hashed and their checks run, but scores, ranking
  replicates and schema validation come from the cache (`bench.leaderboard.rank.ReplicateCache`).
- cold: no cache; the build re-scores every record. Re-scoring costs the same for every record, so it is measured on
  `--cold-records` records (default 8) and reported per record.

    PYTHONPATH=. python scripts/perf_leaderboard.py --records 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "leaderboards" / "mediastinal-neoplasm"


def make_board(dest: Path, n_records: int) -> Path:
    """A copy of the committed board grown to `n_records` records by cloning its generator records."""
    from bench.io import write_json
    from bench.leaderboard.record import read_records

    shutil.copytree(BOARD, dest)
    records = read_records(dest / "records")
    generators = [r for r in records if r["kind"] == "generator"]
    i = 0
    while len(records) < n_records:
        src = generators[i % len(generators)]
        rid = f"{src['id']}-clone{i:05d}"
        pred_file = f"predictions/{rid}.parquet"
        shutil.copyfile(dest / src["predictions"]["file"], dest / pred_file)
        rec = json.loads(json.dumps(src))
        rec["id"] = rid
        rec["predictions"] = {**rec["predictions"], "file": pred_file, "submitted_sha256": f"{i:064x}"}
        write_json(dest / "records" / f"{rid}.json", rec)
        records.append(rec)
        i += 1
    return dest


def fill_cache(board: Path) -> None:
    """What each record's `submit` leaves behind: its scores under its cache key, its ranking replicates."""
    from bench.io import sha256_file
    from bench.leaderboard.checks import cacheable_checks
    from bench.leaderboard.config import board_spec, load_config, load_key
    from bench.leaderboard.key import key_path
    from bench.leaderboard.rank import prime_replicates
    from bench.leaderboard.record import read_records
    from bench.leaderboard.spec import remember_scores
    from bench.tasks import load_task

    cfg = load_config(board)
    records = read_records(cfg.records_dir)
    _, spec = board_spec(cfg, records)
    assert cfg.answer_key is not None
    key = load_key(cfg)
    task = load_task(cfg.task.name)
    positive = list(task.labels.binary_view.positive) if task.labels.binary_view else None
    joined = set()
    for r in records:
        stored = pd.read_parquet(cfg.folder / r["predictions"]["file"])
        if key.join(stored).equals(stored):
            joined.add(r["id"])
            prime_replicates(
                stored, r, list(task.classes), n_boot=cfg.bootstrap.n, seed=cfg.bootstrap.seed,
                binary_positive=positive,
            )  # fmt: skip
    remember_scores(
        spec,
        sha256_file(key_path(cfg.folder, cfg.answer_key.path)),
        records,
        passed=cacheable_checks(),
        stored_is_joined=joined,
    )


def timed_build(board: Path) -> float:
    from bench.leaderboard.build import build

    t0 = time.perf_counter()
    build(board)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1000, help="records on the warm board (default 1000)")
    ap.add_argument("--cold-records", type=int, default=8, help="records on the cold board (default 8)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where to build the boards (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="perf-leaderboard-", dir=args.workdir))
    os.environ["MEDSYNBENCH_CACHE"] = str(work / "cache")
    from bench.leaderboard.spec import cache_file

    try:
        print(f"cores: {len(os.sched_getaffinity(0))}", flush=True)
        cold = make_board(work / "cold", args.cold_records)
        cache_file().unlink(missing_ok=True)
        s = timed_build(cold)
        print(
            f"cold build, {args.cold_records} records: {s:.1f} s, {s / args.cold_records:.3f} s per record",
            flush=True,
        )

        t0 = time.perf_counter()
        warm = make_board(work / "warm", args.records)
        print(f"(made {args.records} records in {time.perf_counter() - t0:.1f} s)", flush=True)
        fill_cache(warm)
        s = timed_build(warm)
        print(
            f"first build after the submits, {args.records} records: {s:.1f} s, {s / args.records:.4f} s per "
            "record (scores and ranking replicates cached by submit)",
            flush=True,
        )
        s = timed_build(warm)
        print(
            f"warm build, {args.records} records: {s:.1f} s, {s / args.records:.4f} s per record (scores, "
            "ranking replicates and validated records cached)",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
