"""Seeded batches from cached uint8 images (kept for the loader benchmark, scripts/perf_loader.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Batches for training


class CachedLoader:
    """Batches of float tensors in [0, 1] from cached uint8 images, for a training or prediction loop.

    The chosen rows are copied into memory once (uint8, a quarter of float32's size); each batch is gathered and
    converted on the fly, so an epoch costs a memory copy, not a decode. On CUDA the uint8 rows are kept on the GPU
    when they fit comfortably (`on_device=None` decides), else each batch travels pinned and asynchronously.
    Shuffling is seeded per epoch (`seed + epoch`), so a run is repeatable.
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: Sequence[int] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: Any = "cpu",
        on_device: bool | None = None,
        channels_last: bool = False,
    ):
        import torch

        rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        if labels is not None and len(labels) != len(rows):
            raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.batch_size, self.shuffle, self.seed, self.drop_last = (
            int(batch_size),
            shuffle,
            int(seed),
            drop_last,
        )
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0
        data = np.ascontiguousarray(images[np.sort(rows)] if len(rows) else images[:0])
        # `images[sorted rows]` reads the memmap sequentially; map each requested row to its place in that copy.
        order = np.argsort(rows, kind="stable")
        self._pos = np.empty(len(rows), dtype=np.int64)
        self._pos[order] = np.arange(len(rows))
        self._labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        cuda = self.device.type == "cuda"
        if cuda and on_device is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            on_device = data.nbytes < 0.25 * free
        self.on_device = bool(cuda and on_device)
        self._np = data
        self._data = torch.from_numpy(data)
        if self.on_device:
            self._data = self._data.to(self.device)
            if self._labels is not None:
                self._labels = self._labels.to(self.device)
        self._pin = cuda and not self.on_device

    def __len__(self) -> int:
        n = len(self._pos)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def n(self) -> int:
        return len(self._pos)

    def __iter__(self):
        import torch

        n = len(self._pos)
        if self.shuffle:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(n)
        else:
            perm = np.arange(n)
        self.epoch += 1
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for k in range(0, stop, self.batch_size):
            sel = perm[k : k + self.batch_size]
            pos = self._pos[sel]
            if self.device.type == "cpu":
                # numpy, single-threaded: torch's intra-op threads wait on each other at every small op, which
                # costs milliseconds per batch when the cores are busy (the training step is using them).
                x = torch.from_numpy(np.divide(self._np[pos], np.float32(255.0), dtype=np.float32))
                if self.channels_last:
                    x = x.contiguous(memory_format=fmt)
            else:
                if self.on_device:
                    x = self._data.index_select(0, torch.from_numpy(pos).to(self.device))
                else:
                    x = self._data.index_select(0, torch.from_numpy(pos))
                    if self._pin:
                        x = x.pin_memory()
                    x = x.to(self.device, non_blocking=True)
                x = x.to(dtype=torch.float32).div_(255.0).contiguous(memory_format=fmt)
            if self._labels is None:
                yield x
            else:
                y = self._labels.index_select(0, torch.from_numpy(sel).to(self._labels.device))
                yield x, y.to(self.device, non_blocking=True)
