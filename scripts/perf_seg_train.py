"""Throughput of the segmentation fit (`bench.train_seg.fit_segmenter`) and of label-map prediction.

Trains a segmenter on random uint8 images and label maps for a warm-up round and `--rounds` timed rounds of
`--steps` optimizer steps each (the protocol's step-budget path), then predicts label maps for the training images.
The figures size a segmentation demo: seconds per run = budget steps / steps per second.

    .venv/bin/python scripts/perf_seg_train.py                        # CPU, unet-small, 64 px, batch 32, 1 thread
    .venv/bin/python scripts/perf_seg_train.py --device cuda --backbone dynunet --size 128 --batch 64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bench.train import FitSettings, resolve_device
from bench.train_seg import fit_segmenter, predict_labelmaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="unet-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=256, help="training images")
    ap.add_argument("--classes", type=int, default=6, help="label-map classes, background included")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.n, 1, args.size, args.size), dtype=np.uint8)
    y = rng.integers(0, args.classes, (args.n, args.size, args.size)).astype(np.uint8)
    settings = FitSettings(
        backbone=args.backbone,
        num_classes=args.classes,
        batch_size=args.batch,
        steps=args.steps * (args.rounds + 1),
        eval_every=args.steps,
        aug_strength=0.5,
        seed=0,
        device=str(dev),
    )
    model, hist = fit_segmenter(settings, x, y, x[:0], y[:0])
    warm = hist[1:]  # the first round pays kernel selection and allocator warm-up
    seconds = sum(h["train_seconds"] for h in warm)
    steps_per_s = args.steps * len(warm) / seconds
    predict_labelmaps(model, x[: args.batch], dev)  # warm-up
    t0 = time.perf_counter()
    predict_labelmaps(model, x, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    pred_rate = args.n / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({args.threads} thread(s))"
    out = {
        "device": name,
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "classes": args.classes,
        "train_steps_per_second": round(steps_per_s, 2),
        "train_images_per_second": round(steps_per_s * args.batch, 1),
        "predict_images_per_second": round(pred_rate, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
