from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "privacy-model",
        help="membership-inference attack against every trained model of a run",
        description=(
            "Offline LiRA (Carlini et al. 2022) against each finished run of RUN: members are the real patients "
            "whose data reached the model (its real training patients, and for regimes with synthetic images its "
            "generator's training patients), non-members unseen training-site patients with the members' class "
            "mix; reference models are the run's other models that never saw the members. Per run key: attack "
            "AUROC, TPR at 1%% and 0.1%% FPR and membership advantage, with patient-bootstrap intervals. Writes "
            "RUN/model-privacy/model_privacy.json (read by `evaluate`) and scores.parquet (hashed ids)."
        ),
    )
    p.add_argument("run", type=Path, help="RUN folder written by `medsynbench run`")
    p.add_argument("--out", type=Path, help="output folder (default RUN/model-privacy)")
    p.add_argument("--n-boot", type=int, default=1000, help="patient-bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--cache-dir", type=Path, help="image cache the run used (default: the user cache)")
    p.set_defaults(func=cmd_privacy_model, loads_torch=True)


def cmd_privacy_model(args: argparse.Namespace) -> int:
    from bench.privacy.model import audit_run, out_dir

    r = audit_run(
        args.run,
        out=args.out,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    for a in r["arms"]:
        m = a["metrics"]["auroc"]
        t = a["metrics"]["tpr_at_1pct_fpr"]

        def f(x: float | None) -> str:
            return "nan" if x is None else f"{x:.3f}"

        cal = "" if a["calibrated"] else " (uncalibrated: no reference model)"
        print(
            f"{a['generator']:>14} {a['regime']:<22} attack AUROC {f(m['value'])} [{f(m['ci_low'])}, "
            f"{f(m['ci_high'])}]  TPR@1%FPR {f(t['value'])}  members {a['n_members']} non-members "
            f"{a['n_nonmembers']} references {a['n_reference_models']}{cal}"
        )
    s = r["seconds"]
    print(f"{r['n_models']} models scored in {s['scoring']:.1f} s, attack {s['attack']:.1f} s")
    print(f"wrote {args.out or out_dir(args.run)}/model_privacy.json")
    return 0
