"""Regenerate the seeded records of leaderboards/mediastinal-neoplasm with the suite's own commands.

    medsynbench demo --preset P (phantom -> manifest -> generators and controls -> run -> fidelity -> privacy ->
    evaluate with controls) -> leaderboard key -> submit the demo's run -> leaderboard build

Usage:
    python scripts/seed_leaderboard.py [--work DIR] [--preset cpu|gpu|smoke] [--pin] [--replace]
    python scripts/seed_leaderboard.py --migrate [--board DIR]

The board holds what `medsynbench demo` measures at the preset (default: gpu with CUDA, else cpu): the same
phantom, protocol, reference generators and controls, so its page and the demo's agree. `submit` refuses the
run if a control of its reference fails. The answer key (answer_key.parquet, its sha256 in leaderboard.yaml) is
written from the demo's real manifest with `medsynbench leaderboard key`; it holds the evaluation labels and is
committed because the phantom is public. `--migrate` converts a board seeded before answer keys existed, without
re-running anything: the key is taken from the real-only reference record's stored predictions (the host's own
run), every record's predictions are joined to it and re-scored, and a record whose numbers change (beyond the
fields older records lack) stops it.

`--replace` removes the current records and predictions first (put back if anything fails), so the folder holds
exactly the reference generators and the real-only reference afterwards. `--pin` writes the reference run's task
version and definition, real manifest and evaluation case set into leaderboard.yaml, so later submissions must
match them. Every step is a `medsynbench` command; a step that fails stops the script with that command's exit
code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "leaderboards" / "mediastinal-neoplasm"
COMMANDS = [
    ["demo"],
    ["submit"],
    ["leaderboard", "key"],
    ["leaderboard", "build"],
]


def sh(*args: str) -> None:
    cmd = [sys.executable, "-m", "bench", *args]
    print("+ medsynbench " + " ".join(args), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(rc)


def missing_commands() -> list[str]:
    """Commands of the pipeline this installation lacks (each answers --help with exit 0 when present)."""
    out = []
    for c in COMMANDS:
        p = subprocess.run([sys.executable, "-m", "bench", *c, "--help"], cwd=ROOT, capture_output=True)
        if p.returncode != 0:
            out.append(" ".join(c))
    return out


def pin(board: Path, run: Path) -> None:
    """Write the reference run's identities into leaderboard.yaml, keeping its comments."""
    import pandas as pd

    from bench.leaderboard.submit import eval_cases_sha256, task_spec_sha256
    from bench.runfolder import SCORED_SPLITS, RunDir
    from bench.tasks import load_task

    run_dir = RunDir(run)
    task = load_task(run_dir.task_file)
    spec = task_spec_sha256(task)
    real_ref = run_dir.matrix().real_manifest()
    real = real_ref.sha256 if real_ref is not None else None
    ids: set[str] = set()
    for r in run_dir.baseline_runs():
        df = pd.read_parquet(r.predictions, columns=["case_id", "split"])
        ids |= set(df.loc[df["split"].isin(SCORED_SPLITS), "case_id"].astype(str))
    path = board / "leaderboard.yaml"
    text = path.read_text()
    text = re.sub(r"(?m)^(  version:).*$", rf'\1 "{task.version}"', text, count=1)
    text = re.sub(r"(?m)^(  spec_sha256:).*$", rf"\1 {spec}", text)
    text = re.sub(r"(?m)^(    real:).*$", rf"\1 {real}", text)
    text = re.sub(r"(?m)^(  eval_cases_sha256:).*$", rf"\1 {eval_cases_sha256(sorted(ids))}", text)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(
        f"pinned task {task.version}, spec {spec[:12]}..., real manifest {real[:12]}..., {len(ids)} evaluation cases"
    )


def migrate(board: Path) -> None:
    """Give a board from before answer keys its key, keyed predictions and re-scored, path-free records."""
    import pandas as pd

    from bench.io import sha256_file, write_json, write_table
    from bench.leaderboard.build import differences
    from bench.leaderboard.config import load_board_task, load_config, set_answer_key
    from bench.leaderboard.key import AnswerKey
    from bench.leaderboard.record import PUBLISHED_MODE, check_record, read_records, scrub_local_paths
    from bench.leaderboard.score import score_submission
    from bench.leaderboard.submit import _stored_predictions
    from bench.runfolder import SCORED_SPLITS

    cfg = load_config(board)
    task = load_board_task(cfg)
    records = read_records(cfg.records_dir)
    ref = [r for r in records if r["kind"] == "reference"]
    if len(ref) != 1:
        raise SystemExit(
            f"{board}: --migrate needs exactly one real-only reference record (found {len(ref)})"
        )
    df = pd.read_parquet(cfg.folder / ref[0]["predictions"]["file"])
    ev = df[df["split"].astype(str).isin(SCORED_SPLITS)].drop_duplicates("case_id")
    key = AnswerKey.from_frame(ev.rename(columns={"y_true": "label"}), list(task.subgroups.columns))
    set_answer_key(board, key)
    cfg = load_config(board)
    primary = cfg.primary_metric or task.metrics.primary
    for r in records:
        pred = cfg.folder / r["predictions"]["file"]
        stored = _stored_predictions(key.join(pd.read_parquet(pred), source=str(pred)), task)
        metrics, split = score_submission(
            stored,
            task,
            generator=r["generator"]["name"],
            primary=primary,
            n_boot=cfg.bootstrap.n,
            seed=cfg.bootstrap.seed,
        )
        metrics = json.loads(json.dumps(metrics))
        diffs = [d for d in differences(r["metrics"], metrics) if not d.endswith("missing from the record")]
        if diffs or split != r["evaluation"]["split"]:
            raise SystemExit(f"record {r['id']}: re-scoring changes its numbers: {diffs[:5]}")
        write_table(pred, stored, PUBLISHED_MODE)
        # Local file locations go; their content hash stays unknown (the files may have changed since).
        new = scrub_local_paths({**r, "metrics": metrics})
        new["predictions_sha256"] = sha256_file(pred)
        new["predictions"] = {**r["predictions"], "n_rows": len(stored)}
        check_record(new, r["id"])
        write_json(cfg.records_dir / f"{r['id']}.json", new, PUBLISHED_MODE)
        print(f"migrated record {r['id']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", type=Path, default=BOARD)
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--preset", default=None, help="demo preset: cpu, gpu or smoke (default: gpu with CUDA)")
    ap.add_argument("--pin", action="store_true", help="pin the reference run's hashes in leaderboard.yaml")
    ap.add_argument("--replace", action="store_true", help="replace the current records")
    ap.add_argument("--submitter", default="medsynbench reference")
    ap.add_argument(
        "--migrate", action="store_true", help="give an older board its answer key (no re-running)"
    )
    args = ap.parse_args(argv)
    if args.migrate:
        migrate(args.board.resolve())
        sh("leaderboard", "build", str(args.board.resolve()))
        return 0

    missing = missing_commands()
    if missing:
        print(f"cannot seed yet: missing command(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="medsynbench-seed-"))
    work.mkdir(parents=True, exist_ok=True)
    board = args.board.resolve()
    demo = work / "demo"
    real = demo / "data" / "manifest.parquet"
    run = demo / "run"
    try:
        if not (demo / "demo.json").is_file():
            sh("demo", "--out", str(demo), *(["--preset", args.preset] if args.preset else []))
        if args.pin:
            pin(board, run)
        sh("leaderboard", "key", str(board), "--real", str(real))
        aside = None
        if args.replace:
            aside = Path(tempfile.mkdtemp(prefix="records-aside-", dir=board))
            for sub in ("records", "predictions"):
                if (board / sub).exists():
                    os.replace(board / sub, aside / sub)
        try:
            sh("submit", str(run), "--leaderboard", str(board), "--submitter", args.submitter)
        except SystemExit:
            if aside:
                for sub in ("records", "predictions"):
                    shutil.rmtree(board / sub, ignore_errors=True)
                    if (aside / sub).exists():
                        os.replace(aside / sub, board / sub)
            raise
        finally:
            if aside:
                shutil.rmtree(aside, ignore_errors=True)
        sh("leaderboard", "build", str(board))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"seeded {board}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
