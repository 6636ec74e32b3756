"""What an image-blind segmenter scores on a segmentation task: the chance level of the `mask-shuffle` control.

An image-blind prediction draws the same label map for every image. Among such maps the script searches prior maps:
the per-pixel frequency of each mask class, a pixel taking its most frequent class where that frequency reaches a
threshold t (background elsewhere), t over a grid. The frequencies come from the evaluated split's own masks (an
oracle, so the best value is an upper bound of image-blind skill) and, for comparison, from the training masks (what
an image-blind segmenter could actually learn). Dice is pooled over the split's images per mask class
(2 tp / (2 tp + fp + fn)) and averaged over the classes present, as `dice_macro`.

With `--train-steps N` it also trains the task's segmenter for N steps on the real training pairs and on their
mask-shuffled version (`bench.generators.segcontrols.shuffled_mask_sources`) and scores both on the split.

    .venv/bin/python scripts/measure_chance_dice.py                      # task phantom, 64 px, internal test split
    .venv/bin/python scripts/measure_chance_dice.py --split external --train-steps 400
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.generators.segcontrols import shuffled_mask_sources
from bench.imaging import build_cache
from bench.manifest import Manifest, write_manifest
from bench.sources import build_manifest
from bench.sources.dicom import phantom_root
from bench.tasks import load_task


def pooled_dice_macro(truth: np.ndarray, pred: np.ndarray, k: int) -> float:
    out = []
    for c in range(1, k + 1):
        t, p = truth == c, pred == c
        tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
        if tp + fp + fn:
            out.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(out)) if out else float("nan")


def best_prior_map(prior_from: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    freq = np.stack([(prior_from == c).mean(axis=0) for c in range(1, k + 1)])
    top, cls = freq.max(axis=0), freq.argmax(axis=0) + 1
    best = (0.0, 1.0)
    for t in np.linspace(0.01, 0.6, 60):
        fixed = np.where(top >= t, cls, 0).astype(np.uint8)
        d = pooled_dice_macro(truth, np.broadcast_to(fixed, truth.shape), k)
        if d > best[0]:
            best = (d, float(t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mediastinal-neoplasm-seg")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--split", default="test", help="test (internal) or external")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task = load_task(args.task)
    root = phantom_root(task.source.options["phantom"])
    df = build_manifest(task, root)
    path = root.parent / f"{task.name}-chance-manifest.parquet"
    write_manifest(df, path)
    m = Manifest(df, root, path)
    cache = build_cache(m, task, size=args.size, progress=False)
    k = len(task.mask_classes)

    def pairs(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = df.index[(df["split"] == split) & (df["site"].isin(task.all_sites))]
        idx = cache.rows(df.loc[rows, "case_id"].astype(str))
        return (
            np.asarray(cache.images[idx]),
            np.asarray(cache.masks[idx]),
            df.loc[rows, "patient_id"].to_numpy(),
        )

    x_tr, m_tr, p_tr = pairs("train")
    x_ev, m_ev, _ = pairs(args.split)
    oracle, t_oracle = best_prior_map(m_ev, m_ev, k)
    learned, t_learned = best_prior_map(m_tr, m_ev, k)
    out = {
        "task": task.name,
        "size": args.size,
        "split": args.split,
        "n_images": int(len(m_ev)),
        "empty_prediction": 0.0,
        "best_fixed_map_oracle": round(oracle, 4),
        "oracle_threshold": round(t_oracle, 3),
        "best_fixed_map_from_training_masks": round(learned, 4),
        "training_threshold": round(t_learned, 3),
    }
    if args.train_steps:
        from bench.train import FitSettings
        from bench.train_seg import fit_segmenter, predict_labelmaps

        labels = np.array(
            [task.label_from_mask(np.bincount(mk.ravel(), minlength=k + 1)[1:]) for mk in m_tr], dtype=object
        )
        src = shuffled_mask_sources(labels, p_tr, args.seed)
        for name, masks in (("real", m_tr), ("mask-shuffle", m_tr[src])):
            st = FitSettings(
                backbone=task.protocol.backbone,
                num_classes=k + 1,
                batch_size=32,
                steps=args.train_steps,
                eval_every=args.train_steps,
                aug_strength=0.5,
                seed=args.seed,
                device="cpu",
            )
            model, _ = fit_segmenter(st, x_tr, masks, x_tr[:0], masks[:0])
            out[f"segmenter_{name}"] = round(
                pooled_dice_macro(m_ev, predict_labelmaps(model, x_ev, "cpu"), k), 4
            )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
