from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli.show import estimate


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from bench.metrics.fidelity import K_NN, KID_SUBSET_SIZE, KID_SUBSETS

    p = sub.add_parser(
        "fidelity",
        help="fidelity, diversity and label fidelity of a synthetic set",
        description=(
            "In a stated feature space (default: the penultimate layer of the run's real-only classifier; or a timm "
            "backbone with weights from a local file): Fréchet distance and unbiased KID overall, per class and per "
            "training site; precision, recall, density and coverage (k-NN manifolds) overall and per class; "
            "within-class spread and near-duplicate share; label fidelity (the real-only classifier's accuracy and "
            "macro AUROC on each synthetic image's conditioning label). Either --run RUN (every generator of the "
            "run, written to RUN/fidelity/<generator>/) or --task/--synthetic/--real/--out for one set. Writes "
            "fidelity.json and fidelity.parquet."
        ),
    )
    p.add_argument("--run", type=Path, help="run folder: every generator of its matrix.json")
    p.add_argument("--generator", action="append", help="with --run: only this generator (repeatable)")
    p.add_argument("--task", help="task name, folder or task.yaml")
    p.add_argument("--synthetic", type=Path, help="synthetic manifest")
    p.add_argument(
        "--real", type=Path, help="real manifest (its training-site rows of --real-split are the reference)"
    )
    p.add_argument("--out", type=Path, help="output folder (replaced atomically)")
    p.add_argument("--checkpoint", type=Path, help="the real-only classifier (a run's checkpoint.pt)")
    p.add_argument("--features", default="classifier", help="classifier (default) or timm:<model name>")
    p.add_argument("--weights", type=Path, help="with --features timm:<model>: a local weight file")
    p.add_argument("--image-size", type=int, help="image side for the features (default: the classifier's)")
    p.add_argument(
        "--real-split", default="train", help="comma-separated real splits of the reference (default train)"
    )
    p.add_argument(
        "--k", type=int, default=K_NN, help=f"nearest neighbours of the PRDC balls (default {K_NN})"
    )
    p.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help=f"default {KID_SUBSETS}")
    p.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE, help=f"default {KID_SUBSET_SIZE}")
    p.add_argument(
        "--n-boot", type=int, default=200, help="bootstrap replicates of the intervals (default 200)"
    )
    p.add_argument(
        "--fd-boot", type=int, default=50, help="bootstrap replicates of the Fréchet distance (default 50)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument(
        "--cache-dir", type=Path, help="feature and image cache (default $MEDSYNBENCH_CACHE or ~/.cache)"
    )
    p.set_defaults(func=cmd_fidelity, loads_torch=True)


def _line(g: str, r: dict) -> str:
    m = r["metrics"]

    def e(name: str, d: int = 3) -> str:
        return f"{name} {estimate(m.get(name), d)}"

    parts = [e("frechet_distance", 2), e("kid", 4), e("precision"), e("recall"), e("label_auroc")]
    return f"{g} ({r['feature_space']['label']}): " + "; ".join(parts)


def cmd_fidelity(args: argparse.Namespace) -> int:
    from bench.errors import BadInput
    from bench.fidelity import compute_fidelity, fidelity_run

    for name in ("k", "kid_subsets", "kid_subset_size"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("n_boot", "fd_boot"):
        if getattr(args, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    opts = dict(
        features=args.features,
        checkpoint=args.checkpoint,
        weights=args.weights,
        image_size=args.image_size,
        real_splits=tuple(s.strip() for s in args.real_split.split(",") if s.strip()),
        k=args.k,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        n_boot=args.n_boot,
        fd_boot=args.fd_boot,
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    if args.run is not None:
        single = [n for n in ("task", "synthetic", "real", "out") if getattr(args, n) is not None]
        if single:
            raise BadInput(f"--run reads the run's manifests; drop --{', --'.join(single)}")
        results = fidelity_run(args.run, args.generator, **opts)
        for g, r in results.items():
            print(_line(g, r))
        print(f"wrote {args.run / 'fidelity'}")
        return 0
    missing = [n for n in ("task", "synthetic", "real", "out") if getattr(args, n) is None]
    if missing:
        raise BadInput(
            f"fidelity: pass --run RUN, or all of --task, --synthetic, --real, --out (missing --{', --'.join(missing)})"
        )
    r = compute_fidelity(args.task, args.synthetic, args.real, args.out, **opts)
    print(_line(r["generator"], r))
    print(f"wrote {args.out}/fidelity.json")
    return 0
