"""How far apart are two equal draws of real training patients? The draw sd of the positive control.

The `real-holdout` control trains on the task's reserve patients, real-only on its training patients: the same
hospitals, as many patients, none shared. Its interval covers test patients and training seeds but not which
patients were drawn, so the ratio of the two sits off 1 by the luck of the draw alone. This script re-draws the
splits with several split seeds on one phantom and reports the ratio (synthetic-only real-holdout / real-only,
macro AUROC, headline split) for each: its mean says whether the control is centred on 1, its spread what draw sd
`bench.generators.controls.HOLDOUT_DRAW_SD` must allow.

    .venv/bin/python scripts/measure_holdout_draws.py --split-seeds 1 2 3 4 5
    .venv/bin/python scripts/measure_holdout_draws.py --patients 700 --preset configs/presets/demo.yaml --seeds 0 1 2

Each split seed costs one generate and 2 x len(--seeds) training runs (about 1.5 minutes on 2 cores at the demo's
settings).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from bench.demo import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tasks" / "mediastinal-neoplasm"


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bench", *args], check=True, stdout=subprocess.DEVNULL)


def one_draw(work: Path, phantom: Path, split_seed: int, args: argparse.Namespace) -> dict[str, float]:
    d = work / f"split{split_seed}"
    task_dir = d / "task"
    task_dir.mkdir(parents=True)
    spec = yaml.safe_load((TASK / "task.yaml").read_text())
    spec["splits"]["seed"] = int(split_seed)
    (task_dir / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    task = str(task_dir / "task.yaml")
    real = d / "manifest.parquet"
    cli("data", "manifest", "--task", task, "--root", str(phantom), "--out", str(real))
    holdout = d / "real-holdout"
    cli("generate", "--task", task, "--generator", "real-holdout", "--real", str(real), "--out", str(holdout),
        "--size", str(args.size))  # fmt: skip
    run = d / "run"
    cli("run", "--task", task, "--real", str(real), "--out", str(run), "--preset", args.preset,
        "--regimes", "real,synthetic", "--seeds", ",".join(map(str, args.seeds)),
        "--synthetic", f"real-holdout={holdout / 'manifest.parquet'}", "--wandb", "disabled",
        "--workers", str(args.workers), "--quiet")  # fmt: skip
    cli("evaluate", str(run), "--n-boot", "200")
    c = pd.read_parquet(run / "evaluation" / "comparisons.parquet")
    c = c[(c["metric"] == "auroc_macro") & (c["scope"] == "overall") & (c["generator"] == "real-holdout")]
    return {str(r.split): float(r.ratio) for r in c.itertuples()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per run (the demo's)"
    )
    cpu = PRESETS["cpu"]
    ap.add_argument("--patients", type=int, default=cpu.patients, help="phantom patients (the cpu demo's)")
    ap.add_argument("--preset", default=str(ROOT / "configs" / "presets" / "demo.yaml"))
    ap.add_argument("--size", type=int, default=32, help="image size of the control's export (the preset's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        phantom = work / "phantom"
        if not phantom.exists():
            cli("data", "phantom", "--out", str(phantom), "--patients", str(args.patients),
                "--slices", str(cpu.slices), "--size", str(cpu.phantom_size), "--seed", "0")  # fmt: skip
        rows = []
        for k in args.split_seeds:
            ratios = one_draw(work, phantom, k, args)
            rows.append({"split_seed": k, **ratios})
            print(
                f"split seed {k}: " + ", ".join(f"{s} {v:.3f}" for s, v in sorted(ratios.items())), flush=True
            )
    df = pd.DataFrame(rows).set_index("split_seed")
    print("\nreal-holdout / real-only, macro AUROC, per split seed:")
    print(df.round(3).to_string())
    for split in df.columns:
        v = df[split].dropna()
        sd = v.std(ddof=1) if len(v) > 1 else math.nan
        print(f"{split}: mean {v.mean():.3f}, sd {sd:.3f} over {len(v)} draws")


if __name__ == "__main__":
    main()
