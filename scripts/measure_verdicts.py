"""Does every verdict the demo states hold across independent draws? And across 1 and 2 threads per worker?

One draw is the cpu demo's protocol on its own random world: phantom seed d, training seeds 3d, 3d+1, 3d+2, and
every generator's and control's own seed d (which labels label-shuffle permutes, which images copycat copies, what
pca-gmm and ddpm sample). Draw 0 is the demo itself. Each draw runs the stages that decide the verdicts (phantom,
manifest, generators and controls, the protocol matrix, copycat's privacy audit, the trained models' membership
audit, evaluation) and stores what it found in WORK/draw-<d>/verdicts-<threads>.json, so an interrupted measurement
resumes where it stopped (a finished stage leaves a marker; a finished draw is not run again).

The verdicts are those the demo and its slow test state: each control check PASS; pca-gmm and ddpm synthetic-only
below real-only (the paired interval's upper end below 0) on the external hospitals and on the internal test split;
real-only's external AUROC below its internal test AUROC. With `--task mediastinal-neoplasm-seg` the segmentation
demo's protocol runs instead (phantom with masks, the pair generators and controls, unet-small; macro Dice), and the
generator that must trail real-only is pca-gmm.

    .venv/bin/python scripts/measure_verdicts.py --draws 1 --preset smoke --work /tmp/verdicts-smoke
    .venv/bin/python scripts/measure_verdicts.py --draws 10 --work /tmp/verdicts            # about 1.5 h on 2 cores
    .venv/bin/python scripts/measure_verdicts.py --draws 10 --threads 1 2 --work /tmp/verdicts
    .venv/bin/python scripts/measure_verdicts.py --draws 10 --task mediastinal-neoplasm-seg --work /tmp/verdicts-seg

`--table-only --rejudge` judges every finished draw again with this code's control checks, from the metric table
and comparisons each draw stored (nothing is retrained or re-bootstrapped), and prints each draw's differences and
real-holdout's ratio with their intervals (the interval widths the task card quotes).

`--threads 1 2` repeats each draw's matrix, audit and evaluation with 1 and with 2 CPU threads per worker (the data
and synthetic sets are shared), and counts the verdicts that flip between them: float-level differences must not
decide a verdict. A cpu draw costs about what the demo's stages up to evaluation cost (8-9 minutes on a quiet
2-core machine); each extra thread setting adds its matrix and evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEEDS_PER_DRAW = 3
# The comparisons the demo asserts: generator, regime and the splits on which it must trail real-only.
TRAILING = (("pca-gmm", "synthetic"), ("ddpm", "synthetic"))
SPLITS = ("external", "test")
# What each demo states, by task kind: its headline metric and the generators that must trail real-only.
KINDS = {
    "classification": ("auroc_macro", TRAILING),
    "segmentation": ("dice_macro", (("pca-gmm", "synthetic"),)),
}


def _kind(evaluation: Path) -> str:
    """The task kind of an evaluation, from what its comparisons score (macro Dice only for segmentation)."""
    import pandas as pd

    metrics = pd.read_parquet(evaluation / "comparisons.parquet", columns=["metric"])["metric"]
    return "segmentation" if (metrics == "dice_macro").any() else "classification"


def _cli(args: list[str]) -> None:
    from bench.cli import main

    rc = main(args)
    if rc != 0:
        raise SystemExit(f"stage failed with exit code {rc}: medsynbench {' '.join(args)}")


def _stage(marker_dir: Path, name: str, args: list[str]) -> None:
    """Run one command once: a marker file says it finished, so a resumed measurement skips it."""
    marker = marker_dir / f".done-{name}"
    if marker.exists():
        return
    _cli(args)
    marker.write_text("done\n")


def verdicts_of(evaluation: Path, rejudge: bool = False) -> dict[str, bool | None]:
    """The demo's verdicts read from one evaluation folder (None: the check was not run).

    `rejudge`: make the control checks again with this code from the stored metric table and comparisons (no
    bootstrap is repeated), so a draw measured before a change of a check is judged by the current check;
    otherwise they are read from summary.json as `evaluate` made them."""
    import pandas as pd

    out: dict[str, bool | None] = {}
    comps = pd.read_parquet(evaluation / "comparisons.parquet")
    if rejudge:
        from bench.evaluation.controls import check_controls, read_privacy, run_controls
        from bench.runfolder import RunDir
        from bench.tasks import load_task

        run = evaluation.parent
        gens = run_controls(run)
        table = pd.read_parquet(evaluation / "metrics.parquet")
        task = load_task(RunDir(run).task_file)
        controls = [
            c.to_dict() for c in check_controls(table, comps, read_privacy(run, list(gens)), task, gens)
        ]
    else:
        controls = json.loads((evaluation / "summary.json").read_text())["controls"]
    for c in controls:
        name = f"control {c['control']}: {c['check']}"
        out[name] = None if c["status"] not in ("PASS", "FAIL") else c["status"] == "PASS"
    metric, trailing = KINDS[_kind(evaluation)]
    cmp = comps
    cmp = cmp[(cmp["metric"] == metric) & (cmp["scope"] == "overall")]
    for gen, regime in trailing:
        for split in SPLITS:
            row = cmp[(cmp["generator"] == gen) & (cmp["regime"] == regime) & (cmp["split"] == split)]
            name = f"{gen} {regime} below real-only ({split})"
            out[name] = None if row.empty else bool(row["ci_high"].iloc[0] < 0)
    met = pd.read_parquet(evaluation / "metrics.parquet")
    real = met[
        (met["generator"] == "none")
        & (met["regime"] == "real")
        & (met["metric"] == metric)
        & (met["scope"] == "overall")
    ].set_index("split")["value"]
    ok = all(s in real.index for s in SPLITS)
    out["real-only external below internal test"] = bool(real["external"] < real["test"]) if ok else None
    return out


def figures_of(evaluation: Path) -> list[str]:
    """Per comparison the demo states: the paired difference (or ratio) to real-only with its 95% interval."""
    import pandas as pd

    metric, trailing = KINDS[_kind(evaluation)]
    cmp = pd.read_parquet(evaluation / "comparisons.parquet")
    cmp = cmp[(cmp["metric"] == metric) & (cmp["scope"] == "overall")]
    out = []
    for gen, regime, col in (*((g, r, "diff") for g, r in trailing), ("real-holdout", "synthetic", "ratio")):
        for split in SPLITS:
            row = cmp[(cmp["generator"] == gen) & (cmp["regime"] == regime) & (cmp["split"] == split)]
            if row.empty:
                continue
            r = row.iloc[0]
            lo, hi = ("ci_low", "ci_high") if col == "diff" else ("ratio_ci_low", "ratio_ci_high")
            out.append(
                f"{gen} {regime} {col} ({split}): {r[col]:+.3f} [{r[lo]:+.3f}, {r[hi]:+.3f}], "
                f"width {r[hi] - r[lo]:.3f}"
            )
    return out


def run_draw(
    work: Path,
    draw: int,
    preset: str,
    threads: list[int | None],
    workers: int | None,
    task: str | None = None,
) -> None:
    """Run (or resume) draw `draw` for every thread setting; write its verdicts files. `task`: the demo's task
    (default the classification demo's; `mediastinal-neoplasm-seg` runs the segmentation demo's protocol)."""
    from bench import demo
    from bench.demo import _configs_dir, generate_args

    seg = task == demo.SEG_TASK
    TASK = task or demo.TASK
    p = demo.SEG_PRESETS[preset] if seg else demo.PRESETS[preset]
    GENERATORS = demo.pair_generators(demo.SEG_GENERATORS) if seg else demo.GENERATORS
    CONTROLS = demo.pair_generators(demo.SEG_CONTROLS) if seg else demo.CONTROLS
    d = work / f"draw-{draw}"
    d.mkdir(parents=True, exist_ok=True)
    data, real = d / "data", d / "data" / "manifest.parquet"
    # fmt: off
    _stage(d, "phantom", ["data", "phantom", "--out", str(data / "phantom"), "--patients", str(p.patients),
                          "--slices", str(p.slices), "--size", str(p.phantom_size), "--seed", str(draw),
                          "--overwrite", *(["--masks"] if seg else [])])
    _stage(d, "manifest", ["data", "manifest", "--task", TASK, "--root", str(data / "phantom"), "--out", str(real)])
    # fmt: on
    for g in (*GENERATORS, *CONTROLS):
        _stage(d, f"generate-{g}", generate_args(p, g, real, d / "synthetic" / g, seed=draw, task=TASK))
    seeds = [SEEDS_PER_DRAW * draw + k for k in range(SEEDS_PER_DRAW)]
    for t in threads:
        tag = f"t{t}" if t else "tdefault"
        result = d / f"verdicts-{tag}.json"
        if result.exists():
            continue
        run = d / f"run-{tag}"
        args = ["run", "--task", TASK, "--real", str(real), "--out", str(run)]
        args += ["--preset", str(_configs_dir() / "presets" / f"{p.train_preset}.yaml")]
        args += ["--protocol", str(_configs_dir() / "protocols" / f"{p.protocol}.yaml")]
        args += ["--seeds", ",".join(map(str, seeds)), "--wandb", "disabled", "--quiet"]
        args += ["--workers", str(workers or p.workers)] + (["--threads", str(t)] if t else [])
        for g in (*GENERATORS, *CONTROLS):
            args += ["--synthetic", f"{g}={d / 'synthetic' / g / 'manifest.parquet'}"]
        _stage(d, f"run-{tag}", args)
        ckpt = run / f"none__real__{_backbone(run)}__seed{seeds[0]}" / "checkpoint.pt"
        syn = d / "synthetic" / "copycat"
        # a segmenter is no feature extractor: the segmentation demo audits on pixel features
        features = [] if seg else ["--checkpoint", str(ckpt)]
        # fmt: off
        _stage(d, f"privacy-{tag}", ["privacy", "--task", TASK, "--synthetic", str(syn / "manifest.parquet"),
                                      "--train", str(syn / "train_manifest.parquet"), "--holdout", str(real),
                                      "--test", str(real), "--out", str(run / "privacy" / "copycat"),
                                      *features])
        # Membership inference against the trained models, as the demo runs it: copycat's model-leak check.
        _stage(d, f"privacy-model-{tag}", ["privacy-model", str(run), "--n-boot", str(p.n_boot)])
        _stage(d, f"evaluate-{tag}", ["evaluate", str(run), "--out", str(run / "evaluation"),
                                       "--n-boot", str(p.n_boot)])
        # fmt: on
        found = {"draw": draw, "threads": t, "seeds": seeds, "verdicts": verdicts_of(run / "evaluation")}
        result.write_text(json.dumps(found, indent=2) + "\n")


def _backbone(run: Path) -> str:
    return json.loads((run / "matrix.json").read_text())["protocol"]["backbone"]


def collect(work: Path) -> list[dict[str, Any]]:
    """Every finished draw's verdicts under `work`."""
    return [json.loads(f.read_text()) for f in sorted(work.glob("draw-*/verdicts-*.json"))]


def _setting(t: int | None) -> str:
    return f"{t} thread(s)/worker" if t else "default threads"


def verdict_table(results: Iterable[Mapping[str, Any]], need: float = 0.9) -> str:
    """A markdown table: per verdict and thread setting, in how many draws it held (k/n), and the flips.

    `need`: the share of draws a verdict must hold in (9 of 10); a verdict below it is marked. A verdict not run in
    a draw (None) counts in neither k nor n. Flips: draws run with more than one thread setting whose verdict
    differs between them.
    """
    results = list(results)
    settings = sorted({r["threads"] for r in results}, key=lambda t: (t is None, t or 0))
    names = list(dict.fromkeys(n for r in results for n in r["verdicts"]))
    by = {(r["draw"], r["threads"]): r["verdicts"] for r in results}
    draws = sorted({r["draw"] for r in results})
    header = ["verdict", *(_setting(t) for t in settings)]
    if len(settings) > 1:
        header.append("flips between settings")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for t in settings:
            vals = [by[(dr, t)].get(name) for dr in draws if (dr, t) in by]
            vals = [v for v in vals if v is not None]
            k, n = sum(vals), len(vals)
            mark = "" if n and k >= need * n else " **below**"
            cells.append(f"{k}/{n}{mark}" if n else "not run")
        if len(settings) > 1:
            flips = 0
            for dr in draws:
                vals = {by[(dr, t)].get(name) for t in settings if (dr, t) in by}
                flips += len(vals - {None}) > 1
            cells.append(str(flips))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=10, help="number of independent draws (0 .. N-1)")
    ap.add_argument("--first", type=int, default=0, help="index of the first draw")
    ap.add_argument(
        "--preset", default="cpu", choices=["smoke", "cpu"], help="the demo preset whose protocol runs"
    )
    ap.add_argument("--threads", type=int, nargs="+", help="CPU threads per worker to compare, e.g. 1 2")
    ap.add_argument(
        "--task",
        help="the demo's task: default the classification demo's; mediastinal-neoplasm-seg for segmentation",
    )
    ap.add_argument("--workers", type=int, help="worker processes of the matrix (default: the demo preset's)")
    ap.add_argument("--work", type=Path, required=True, help="working folder; run again to resume")
    ap.add_argument(
        "--table-only", action="store_true", help="print the table of what WORK holds, run nothing"
    )
    ap.add_argument(
        "--rejudge",
        action="store_true",
        help="with --table-only: judge every finished draw again from its stored tables with this code's checks",
    )
    args = ap.parse_args(argv)
    if args.draws < 1 or args.first < 0:
        ap.error("--draws must be at least 1 and --first at least 0")
    threads: list[int | None] = list(args.threads) if args.threads else [None]
    if not args.table_only:
        for draw in range(args.first, args.first + args.draws):
            print(f"draw {draw} ...", file=sys.stderr, flush=True)
            run_draw(args.work, draw, args.preset, threads, args.workers, args.task)
    if args.rejudge:
        for f in sorted(args.work.glob("draw-*/verdicts-*.json")):
            found = json.loads(f.read_text())
            tag = f.stem.removeprefix("verdicts-")
            found["verdicts"] = verdicts_of(f.parent / f"run-{tag}" / "evaluation", rejudge=True)
            f.write_text(json.dumps(found, indent=2) + "\n")
    results = collect(args.work)
    if not results:
        print("no finished draw under", args.work, file=sys.stderr)
        return 1
    print(f"{len({r['draw'] for r in results})} draw(s), preset {args.preset}, work {args.work}\n")
    print(verdict_table(results))
    print()
    for r in sorted(results, key=lambda r: (r["draw"], r["threads"] or 0)):
        ev = (
            args.work / f"draw-{r['draw']}" / f"run-{'t' + str(r['threads']) if r['threads'] else 'tdefault'}"
        )
        if (ev / "evaluation" / "comparisons.parquet").is_file():
            print(f"draw {r['draw']} ({_setting(r['threads'])}):")
            for line in figures_of(ev / "evaluation"):
                print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
