"""The matrix driver: plan, check what RUN already holds, write its header, tune, run what is not DONE yet.

A run folder is built in a temporary folder beside it and renamed into place with `DONE` already inside, so a run
killed at any moment leaves either a complete, DONE-marked folder or none. Re-running the same command skips DONE
runs; each run depends only on its own seed, so a resumed matrix gives the predictions an uninterrupted one would.
Every run keeps the final weights of its step budget; the validation split of the training sites is scored for the
history (and tuning) only, and the internal test split and the external sites are predicted once, at the end.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BadInput
from bench.executors import check_executor, make_executor
from bench.imaging import build_cache
from bench.io import write_json, write_text
from bench.manifest import read_manifest
from bench.protocol.execute import execute_run, execute_study
from bench.protocol.plan import MatrixOptions, MatrixPlan, environment, plan_matrix, with_tuning
from bench.protocol.progress import RunProgress
from bench.runfolder import MATRIX_FILE, RunDir


@dataclass
class MatrixResult:
    out: Path
    total: int
    done: int
    skipped: int
    seconds: float
    runs: list[dict[str, Any]]


def _check_existing(plan: MatrixPlan, resume: bool) -> None:
    """Refuse to mix runs made from other inputs into RUN, and to resume where there is no matrix."""
    out = plan.out
    run_dir = RunDir(out)
    if resume and not run_dir.matrix_file.is_file():
        raise BadInput(f"--resume {out}: no matrix to resume there ({MATRIX_FILE} missing)")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    conflicts = []
    for r in plan.runs:
        run = run_dir.run(r.run_id)
        if run.done and run.config_path.is_file() and run.config().identity != r.identity:
            conflicts.append(r.run_id)
    if conflicts:
        raise BadInput(
            f"--out {out}: {len(conflicts)} finished run(s) were made with other inputs or settings (task, "
            "manifests, preset, epochs, tuning budget ...); use a new --out folder or delete them",
            conflicts[:20],
        )


def _write_header(plan: MatrixPlan) -> None:
    run_dir = RunDir(plan.out)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.task_file, yaml.safe_dump(plan.task.spec(), sort_keys=False, allow_unicode=True))
    matrix = dict(plan.matrix)
    if run_dir.matrix_file.is_file():
        # The same RUN folder may grow (another generator, more seeds): keep what earlier invocations recorded.
        old = run_dir.matrix()
        gens = {k: v.model_dump() for k, v in old.generators.items()}
        gens.update(matrix["generators"])
        matrix["generators"] = gens
        matrix["manifests"] = {
            "real": matrix["manifests"]["real"],
            "synthetic": {
                **{k: v.model_dump() for k, v in old.manifests.synthetic.items()},
                **matrix["manifests"]["synthetic"],
            },
        }
        matrix["runs"] = list(dict.fromkeys(old.runs + matrix["runs"]))
    matrix["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    matrix["environment"] = environment()
    write_json(run_dir.matrix_file, matrix)
    for name, (card, _path) in plan.cards.items():
        if card is not None:
            write_json(run_dir.card_file(name), card)


def _prepare_caches(plan: MatrixPlan, progress: bool) -> None:
    """Decode every manifest once in this process, so workers only open the finished caches."""
    size = plan.runs[0].settings.image_size
    ctx = plan.ctx
    cache_dir = Path(ctx.cache_dir) if ctx.cache_dir else None
    for ref in [ctx.real, *ctx.synthetic.values()]:
        build_cache(
            read_manifest(ref.path),
            plan.task,
            size=size,
            cache_dir=cache_dir,
            skip_corrupt=ctx.skip_corrupt,
            progress=progress,
        )


def run_matrix(options: MatrixOptions) -> MatrixResult:
    """Plan, tune (if asked) and run every run of the matrix that is not DONE yet."""
    from rich.console import Console

    t0 = time.perf_counter()
    plan = plan_matrix(options)
    check_executor(options.executor, options.workers, options.ray_address)
    _check_existing(plan, options.resume)
    # Caches first: a corrupt image must fail the command before anything is written into RUN.
    _prepare_caches(plan, options.progress)
    _write_header(plan)
    ex = make_executor(options.executor, workers=options.workers, ray_address=options.ray_address)

    run_dir = RunDir(plan.out)
    pending = [r for r in plan.runs if not run_dir.run(r.run_id).done]
    n_skip = len(plan.runs) - len(pending)
    console = Console(stderr=True, quiet=not options.progress)
    console.print(
        f"matrix {plan.out}: {len(plan.runs)} runs ({n_skip} already done, {len(pending)} to run), "
        f"preset {plan.ctx.preset.name}, backbone {plan.runs[0].backbone}, executor {options.executor}"
    )
    results: list[dict[str, Any]] = []
    with RunProgress(options.progress, len(plan.runs), n_skip, console) as bar:
        # Tuning first, only for studies whose runs are still pending: every run of a (generator, regime) then uses
        # the same chosen parameters.
        needed = {r.tuning_key for r in pending if r.tuning_key}
        studies = [plan.studies[k] for k in plan.studies if k in needed]
        tuned: dict[str, dict[str, Any]] = {}
        if studies:
            assert plan.ctx.tune is not None
            bar.note(f"tuning {len(studies)} studies x {plan.ctx.tune.trials} trials")
            for study, res in ex.map(execute_study, plan.ctx, studies, progress=bar.inner):
                tuned[study.key] = res
                bar.note(
                    f"tuned {study.key}: {res['best_params']} ({res.get('objective', 'val')} {res['best_value']:.3f})"
                )
        specs = [with_tuning(r, tuned[r.tuning_key]) if r.tuning_key else r for r in pending]
        try:
            for spec, res in ex.map(execute_run, plan.ctx, specs, progress=bar.inner):
                results.append(res)
                bar.run_done(spec.run_id, res)
        finally:
            ex.shutdown()
    done = sum(run_dir.run(r.run_id).done for r in plan.runs)
    return MatrixResult(plan.out, len(plan.runs), done, n_skip, time.perf_counter() - t0, results)
