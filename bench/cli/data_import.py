from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = groups["data"].add_parser(
        "import-synthetic",
        help="a folder of generated images + labels CSV + generator card -> a validated synthetic manifest",
        description=(
            "Turn your own generator's output into a synthetic manifest. --labels is a CSV with columns image "
            "(path relative to --root) and label, optionally sex, age and case_id. Images may be PNG, JPEG, NPZ or "
            "DICOM; all must share one size and the task's channel count. The card is validated and written beside "
            "the manifest as <name>.card.yaml. A segmentation task takes image–mask pairs: a column mask names each "
            "image's label map (PNG/NPY/NPZ, 0 = background, k = the k-th mask class; the image's height x width); "
            "label may then be left out (it follows from the mask)."
        ),
    )
    p.add_argument("--task", required=True, help="task name, folder or task.yaml")
    p.add_argument("--root", required=True, type=Path, help="folder the CSV's image paths are relative to")
    p.add_argument("--labels", required=True, type=Path, help="CSV: image,label[,mask,sex,age,case_id]")
    p.add_argument("--card", required=True, type=Path, help="generator card (YAML or JSON)")
    p.add_argument("--out", required=True, type=Path, help="synthetic manifest to write (.parquet or .csv)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from bench.generators.importer import import_synthetic
    from bench.manifest import read_manifest, summary

    out = import_synthetic(args.task, args.root, args.labels, args.card, args.out, overwrite=args.overwrite)
    print(f"wrote {out} and {out.with_name(out.stem + '.card.yaml')}: {summary(read_manifest(out))}")
    return 0
