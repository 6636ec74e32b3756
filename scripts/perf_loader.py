"""Loader performance, measured against the references in the same run.

(a) epochs over the image cache (whole uint8 array in memory -> float batches) vs
(b) a plain MONAI Dataset decoding every epoch (LoadImage, EnsureChannelFirst, Resize, ScaleIntensity);
(c) training throughput of a small timm resnet18 fed by the cached loader vs the same model fed random tensors
    already in memory (the model's own limit).

    python scripts/perf_loader.py --n 500 --size 64 --epochs 3 --device cpu

Targets: (a)/(b) >= 10x images per second; (c) >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TASK = {
    "name": "perf",
    "version": "1.0",
    "modality": "synthetic",
    "image": {"size": 64, "channels": 1, "intensity": {"kind": "uint8"}},
    "labels": {"classes": ["a", "b", "c"]},
    "sites": {"train": ["s1"]},
    "source": {"kind": "folder"},
}


def make_dataset(root: Path, n: int, side: int, seed: int = 0) -> Path:
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    rows = []
    for i in range(n):
        img = rng.normal(90, 20, (side, side))
        cy, cx = rng.integers(side // 4, 3 * side // 4, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (side // 8) ** 2] += 80
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.png")
        rows.append(
            dict(
                case_id=f"c{i}",
                patient_id=f"p{i}",
                image=f"{i:05d}.png",
                label="abc"[i % 3],
                site="s1",
                origin="real",
                split="train",
            )
        )
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_epochs(cache, epochs: int, batch: int, device) -> float:
    from bench.imaging import CachedLoader

    for _ in CachedLoader(cache.images, batch_size=batch, device=device):  # warm-up, as for (b)
        pass
    sync(device)
    t = time.perf_counter()
    loader = CachedLoader(cache.images, batch_size=batch, shuffle=True, device=device)
    seen = 0
    for _ in range(epochs):
        for x in loader:
            seen += x.shape[0]
    sync(device)
    return seen / (time.perf_counter() - t)


def monai_epochs(paths: list[str], size: int, epochs: int, batch: int, workers: int) -> float:
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    tf = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Resize((size, size)), ScaleIntensity()])
    dl = DataLoader(
        Dataset(data=paths, transform=tf),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    for _ in dl:  # warm-up epoch, untimed: worker start-up is not what is compared
        pass
    seen = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for x in dl:
            seen += x.shape[0]
    return seen / (time.perf_counter() - t)


def train_steps(batches, model, opt, steps: int, device, amp: bool) -> float:
    """Images per second over `steps` optimizer steps drawing batches from the iterator factory `batches`."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    it = iter(batches())
    seen = 0
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches())
            x, y = next(it)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.shape[0]
    sync(device)
    return seen / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="images")
    ap.add_argument("--size", type=int, default=64, help="side after resizing")
    ap.add_argument("--source-size", type=int, default=256, help="side of the PNG files written")
    ap.add_argument("--epochs", type=int, default=3, help="epochs over the cache")
    ap.add_argument(
        "--monai-epochs",
        type=int,
        default=1,
        help="timed epochs of the MONAI reference (after one warm-up epoch)",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the MONAI reference")
    ap.add_argument(
        "--steps", type=int, default=16, help="timed training steps per feed in (c) (x10 on CUDA)"
    )
    ap.add_argument(
        "--block", type=int, default=0, help="steps per timed block in (c) (default: 1 CPU, 20 CUDA)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import timm
    import torch

    from bench.imaging import CachedLoader, build_cache
    from bench.manifest import read_manifest
    from bench.tasks import Task

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, {args.threads} torch threads)"
    )
    print(f"device: {name}; torch {torch.__version__}; n={args.n}, {args.source_size}px PNG -> {args.size}px")

    task = Task(**TASK)
    with tempfile.TemporaryDirectory(prefix="perf_loader_") as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        m = read_manifest(make_dataset(tmp / "data", args.n, args.source_size))

        t = time.perf_counter()
        cache = build_cache(m, task, size=args.size, cache_dir=tmp / "cache", progress=False)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        build_cache(m, task, size=args.size, cache_dir=tmp / "cache", progress=False)
        hit_s = time.perf_counter() - t
        print(
            f"cache build (one decode pass, {args.n} images): {build_s:.2f} s ({args.n / build_s:.0f} img/s); "
            f"cache hit: {hit_s * 1000:.0f} ms"
        )

        cached = cached_epochs(cache, args.epochs, args.batch, device)
        monai = monai_epochs(
            [str(p) for p in m.image_paths()], args.size, args.monai_epochs, args.batch, args.workers
        )
        amortized = args.epochs * args.n / (build_s + args.epochs * args.n / cached)
        print(f"(a) cached loader: {cached:,.0f} img/s over {args.epochs} epochs")
        print(
            f"(b) MONAI LoadImage Dataset ({args.workers} workers): {monai:,.0f} img/s over {args.monai_epochs} epoch(s)"
        )
        print(
            f"    ratio (a)/(b): {cached / monai:,.1f}x  (target >= 10x); including the one-off build, "
            f"{args.epochs} epochs: {amortized / monai:,.1f}x"
        )

        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        labels = np.asarray([task.classes.index(v) for v in m.df["label"]])
        loader = CachedLoader(
            cache.images,
            labels=labels,
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            device=device,
            channels_last=cuda,
        )
        fmt = torch.channels_last if cuda else torch.contiguous_format
        xr = torch.rand(args.batch, 1, args.size, args.size, device=device).contiguous(memory_format=fmt)
        yr = torch.randint(0, 3, (args.batch,), device=device)

        def random_feed():
            while True:
                yield xr, yr

        block = args.block or (20 if cuda else 1)
        blocks = max(1, args.steps // block) * (10 if cuda else 1)
        train_steps(random_feed, model, opt, 3, device, cuda)  # warm-up: allocator, kernels, autotuning
        rates: dict[str, list[float]] = {"cached": [], "random": []}
        # The two feeds alternate block by block and each keeps its median block: on a shared machine other load
        # then hits both alike instead of whichever ran during a busy spell.
        feeds = {"random": random_feed, "cached": lambda: loader}
        for _ in range(blocks):
            for name, feed in feeds.items():
                rates[name].append(train_steps(feed, model, opt, block, device, cuda))
        real, rnd = float(np.median(rates["cached"])), float(np.median(rates["random"]))
        print(
            f"(c) resnet18 training at {args.size}px, batch {args.batch}, {blocks} alternating blocks of {block} "
            f"step(s): cached loader {real:,.0f} img/s, random in-memory tensors {rnd:,.0f} img/s, "
            f"ratio {real / rnd:.2f}  (target >= 0.9)"
        )
        # Load-independent view of the same question: what share of a training step goes to making its batch.
        print(
            f"    loader time per batch {1000 * args.batch / cached:.2f} ms = "
            f"{100 * rnd / cached:.3f}% of a training step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
