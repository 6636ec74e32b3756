from __future__ import annotations

import argparse
from pathlib import Path

from bench.phantom import DEFAULTS


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = groups["data"].add_parser(
        "phantom",
        help="write the built-in mediastinal chest CT phantom as a DICOM export + labels.csv",
        description=(
            "Write a hospital-export-like folder: PA<n>/ST<n>/SE<n>/IM<k>.dcm CT series (one per patient, five "
            "hospitals, six mediastinal classes) and labels.csv (patient_id,label,site,sex,age,contrast). "
            "Deterministic for a seed; written atomically."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument(
        "--patients", type=int, default=DEFAULTS["patients"], help="number of patients (default %(default)s)"
    )
    p.add_argument(
        "--slices",
        type=int,
        default=DEFAULTS["slices"],
        help="adjacent slices per patient (default %(default)s)",
    )
    p.add_argument(
        "--size", type=int, default=DEFAULTS["size"], help="image matrix in pixels (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (default %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--masks",
        action="store_true",
        help="also write each lesion's mask as a DICOM SEG per series (for segmentation tasks)",
    )
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(args: argparse.Namespace) -> int:
    from bench.phantom import write_phantom

    s = write_phantom(
        args.out,
        patients=args.patients,
        slices=args.slices,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        masks=args.masks,
    )
    labels = ", ".join(f"{k} {v}" for k, v in sorted(s["label"].items()))
    sites = ", ".join(f"{k} {v}" for k, v in sorted(s["site"].items()))
    masks = f", {s['masks']} DICOM SEG masks" if args.masks else ""
    print(
        f"wrote {s['out']}: {s['patients']} patients, {s['images']} DICOM images{masks} in {s['seconds']:.1f} s "
        f"({s['workers']} worker(s))\n  classes: {labels}\n  sites: {sites}"
    )
    return 0
