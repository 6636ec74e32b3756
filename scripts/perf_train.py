"""Training throughput of `bench.train.fit` against the model's own limit, measured in the same run.

The limit is a bare loop feeding the same model random float tensors already on the device (same batch size,
optimizer, autocast and memory format). The ratio says how much the uint8-on-device loader and the on-device
augmentation cost: 1.0 means none.

    .venv/bin/python scripts/perf_train.py                      # CPU, resnet10t, 32 px
    .venv/bin/python scripts/perf_train.py --device cuda --size 224 --backbone resnet18 --n 4096 --batch 128
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.models import create_model
from bench.train import FitSettings, fit, resolve_device


def model_limit(backbone: str, n: int, size: int, batch: int, epochs: int, dev: torch.device) -> float:
    """Images per second of the bare training step on random tensors resident on the device."""
    torch.manual_seed(0)
    model = create_model(backbone, 3, 1).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=dev)
    steps = max(1, n // batch)

    def epoch() -> None:
        model.train()
        for _ in range(steps):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize(dev)

    epoch()  # warm-up (kernel selection, allocator)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return steps * batch * epochs / (time.perf_counter() - t0)


def loader_rate(backbone: str, n: int, size: int, batch: int, epochs: int, dev: torch.device) -> float:
    """Images per second of `fit` (uint8 array -> device batches -> augmentation -> step), warm epochs only."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
    y = rng.integers(0, 3, n)
    xv, yv = x[: min(64, n)], y[: min(64, n)]
    settings = FitSettings(
        backbone=backbone,
        num_classes=3,
        epochs=epochs + 1,
        lr=1e-3,
        weight_decay=1e-4,
        batch_size=batch,
        aug_strength=0.5,
        seed=0,
        device=str(dev),
    )
    _, hist = fit(settings, x, y, xv, yv)
    warm = hist[1:]  # the first epoch pays the same warm-up as the reference's
    return sum(h["images_per_second"] * h["train_seconds"] for h in warm) / sum(
        h["train_seconds"] for h in warm
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n", type=int, default=512, help="training images per epoch")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    limit = model_limit(args.backbone, args.n, args.size, args.batch, args.epochs, dev)
    real = loader_rate(args.backbone, args.n, args.size, args.batch, args.epochs, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({args.threads} thread(s))"
    out = {
        "device": name,
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "fit_images_per_second": round(real, 1),
        "random_tensor_images_per_second": round(limit, 1),
        "ratio": round(real / limit, 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
