"""How hard is the built-in phantom? Train a real-only classifier on the training hospitals and report macro AUROC
on the internal test split and on each external hospital.

    .venv/bin/python scripts/measure_phantom_difficulty.py                   # default phantom, `medsynbench run`, cpu preset
    .venv/bin/python scripts/measure_phantom_difficulty.py --classifier logreg   # quick linear proxy
    .venv/bin/python scripts/measure_phantom_difficulty.py --seeds 0 1 2 --json out.json

The task asks for an internal-test macro AUROC between 0.80 and 0.97 (neither trivial nor hopeless) and for
external hospitals that are measurably harder. The default path runs `medsynbench run --regimes real` with the
training preset (cpu: resnet10t, 64 px), so the figures are the ones the benchmark itself reports; AUROC is given
per image (slice) and per patient (mean slice probabilities).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

TASK = "mediastinal-neoplasm"


def _auroc(y: np.ndarray, prob: np.ndarray) -> float:
    from bench.metrics.core import auroc_macro

    return auroc_macro(y, prob)


def _patient_level(df: pd.DataFrame, prob: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean slice probability per patient (the slices of a patient share its label)."""
    p = pd.DataFrame(prob, columns=range(k))
    p["patient_id"] = df["patient_id"].to_numpy()
    p["y"] = df["y"].to_numpy()
    g = p.groupby("patient_id", sort=True)
    return g["y"].first().to_numpy(), g[list(range(k))].mean().to_numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, help="an existing phantom export (default: write one with the task's settings)"
    )
    ap.add_argument("--patients", type=int, help="override the task's phantom patient count")
    ap.add_argument("--classifier", choices=["run", "logreg"], default="run", help="run: `medsynbench run`")
    ap.add_argument("--preset", default="cpu", help="training preset / image size preset (default cpu)")
    ap.add_argument("--backbone", help="default: the task's protocol backbone")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    import torch

    torch.set_num_threads(args.threads)
    from bench.imaging import build_cache
    from bench.manifest import Manifest, write_manifest
    from bench.phantom import DEFAULTS, write_phantom
    from bench.runfolder import RunDir
    from bench.sources import build_manifest
    from bench.tasks import load_task

    task = load_task(TASK)
    params = {**DEFAULTS, **task.source.options.get("phantom", {})}
    if args.patients:
        params["patients"] = args.patients
    tmp = tempfile.TemporaryDirectory(prefix="phantom-difficulty-")
    root = args.data
    if root is None:
        root = Path(tmp.name) / "phantom"
        t0 = time.perf_counter()
        write_phantom(root, **params)
        print(f"phantom {params} written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    df = build_manifest(task, root)
    work = Path(tmp.name)
    manifest_path = work / "real.parquet"
    write_manifest(df, manifest_path)
    classes = task.classes
    index = {c: i for i, c in enumerate(classes)}
    y = df["label"].map(index).to_numpy()
    results = []
    run_seconds = None
    if args.classifier == "run":
        from bench.cli import main as cli

        argv = ["run", "--task", TASK, "--real", str(manifest_path), "--out", str(work / "run")]
        argv += ["--regimes", "real", "--seeds", ",".join(map(str, args.seeds)), "--preset", args.preset]
        argv += ["--wandb", "disabled", "--quiet", "--cache-dir", str(work / "cache")]
        if args.backbone:
            argv += ["--backbone", args.backbone]
        if args.epochs:
            argv += ["--epochs", str(args.epochs)]
        print("medsynbench " + " ".join(argv), file=sys.stderr)
        t0 = time.perf_counter()
        rc = cli(argv)
        if rc != 0:
            print(f"medsynbench run failed with exit code {rc}", file=sys.stderr)
            return rc
        run_seconds = round(time.perf_counter() - t0, 1)
    for seed in args.seeds:
        t0 = time.perf_counter()
        if args.classifier == "logreg":
            from sklearn.linear_model import LogisticRegression

            cache = build_cache(
                Manifest(df, "/"), task, size=args.preset, cache_dir=work / "cache", progress=False
            )
            x = cache.images[cache.rows(df["case_id"])].reshape(len(df), -1).astype(np.float32) / 255.0
            train = (df["split"] == "train").to_numpy()
            clf = LogisticRegression(C=0.05, max_iter=2000, random_state=seed)
            clf.fit(x[train], y[train])
            preds = df.assign(**{f"prob_{c}": clf.predict_proba(x)[:, i] for i, c in enumerate(classes)})
        else:
            found = RunDir(work / "run").baseline_runs(seed)
            preds = pd.read_parquet(found[0].predictions).rename(columns={"y_true": "label"})
        preds["y"] = preds["label"].map(index).to_numpy()
        prob = preds[[f"prob_{c}" for c in classes]].to_numpy()
        yy = preds["y"].to_numpy()
        secs = run_seconds if run_seconds is not None else round(time.perf_counter() - t0, 1)
        row = {"seed": seed, "classifier": args.classifier, "seconds": secs}
        scopes = {"internal_test": (preds["split"] == "test").to_numpy()}
        scopes.update({f"external:{s}": (preds["site"] == s).to_numpy() for s in task.sites.external})
        scopes["external_all"] = (preds["split"] == "external").to_numpy()
        for name, mask in scopes.items():
            sub = preds[mask]
            row[f"{name}_auroc_image"] = round(_auroc(yy[mask], prob[mask]), 4)
            yp, pp = _patient_level(sub, prob[mask], len(classes))
            row[f"{name}_auroc_patient"] = round(_auroc(yp, pp), 4)
            row[f"{name}_patients"] = int(sub["patient_id"].nunique())
        results.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "task": task.name,
        "task_version": task.version,
        "phantom": params,
        "preset": args.preset,
        "image_size": task.image.size_for(args.preset),
        "results": results,
    }
    if len(results) > 1:
        keys = [k for k in results[0] if k.endswith(("_image", "_patient"))]
        out["mean"] = {k: round(float(np.mean([r[k] for r in results])), 4) for k in keys}
        print(json.dumps(out["mean"]), flush=True)
    if args.json:
        from bench.io import write_json

        write_json(args.json, out)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
