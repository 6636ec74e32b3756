"""Training and prediction: the functional core every step that trains a network reuses.

Images arrive as one uint8 array `[N, C, S, S]` (the decoded cache). It stays uint8 in memory, on the GPU when it
fits, and batches are picked by index, converted to float and augmented on the device: no per-sample Python
Dataset between the cache and the model. On CUDA the model runs in bf16 autocast with channels-last; on a CPU the run
is deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BadInput
from bench.io import _json_default, atomic_path
from bench.metrics.core import auroc_macro
from bench.models import create_model

log = logging.getLogger(__name__)

# How `fit` picks the weights it returns: the final ones of the budget (every benchmark run), or the round with the
# best validation AUROC (only where validation data come from the model's own training distribution).
SELECTIONS = ("last", "best_val")
# Fraction of free GPU memory the uint8 training and validation arrays may take before they stay in host memory.
GPU_RESIDENT_FRACTION = 0.4


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {str(device)!r}: CUDA is not available on this machine")
    return d


# -- data on the device ------------------------------------------------------------------------------------------


class _DeviceArray:
    """A uint8 image array kept where batches are cheapest to draw from."""

    def __init__(self, x: np.ndarray, device: torch.device, resident: bool):
        x = np.ascontiguousarray(x)
        # torch wants writable memory; a read-only array (a memory-mapped cache) is copied once.
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
        self.device = device
        self.on_device = resident or device.type == "cpu"
        if device.type == "cuda":
            t = t.to(device) if resident else t.pin_memory()
        self.data = t

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.on_device:
            return self.data.index_select(0, idx.to(self.data.device))
        return self.data.index_select(0, idx.cpu()).to(self.device, non_blocking=True)


def _fits_on_gpu(device: torch.device, *arrays: np.ndarray) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(a.nbytes for a in arrays) < GPU_RESIDENT_FRACTION * free


def to_float(xb: torch.Tensor) -> torch.Tensor:
    # Fixed normalization to [-1, 1]: the cache already holds task-normalized intensities in 0..255.
    return xb.float().div_(127.5).sub_(1.0)


def augment(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, a small affine (rotation, scale, shift) and intensity jitter, batched on device.

    `strength` 0 disables augmentation; 1 means up to 15 degrees rotation, 10% scale and shift, 20% contrast and
    0.1 brightness jitter. Draws come from `gen`, so a seed fixes them.
    """
    return _augment(x, None, strength, gen)[0]


def augment_pair(
    x: torch.Tensor, mask: torch.Tensor, strength: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment` for an image batch `[B, C, H, W]` and its label maps `[B, H, W]` (integer class values).

    The flip and the affine move both alike; the mask is resampled by nearest neighbour, so it keeps only class
    values that were there, and the intensity jitter touches the image alone. The draws are those `augment` makes
    with the same generator.
    """
    if mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"augment_pair: images {tuple(x.shape)} and masks {tuple(mask.shape)} differ in size"
        )
    out, moved = _augment(x, mask, strength, gen)
    assert moved is not None
    return out, moved


def _augment(
    x: torch.Tensor, mask: torch.Tensor | None, strength: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if strength <= 0:
        return x, mask
    n = x.shape[0]
    dev = x.device

    def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1)
        return torch.rand(*shape, generator=gen, device=dev) * 2 - 1

    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    angle = u(n) * (math.pi / 12) * strength
    scale = 1 + u(n) * 0.1 * strength
    shift = u(n, 2) * 0.1 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Border padding: zero padding would paint black frames, a cue absent from unaugmented test images.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask is not None:
        # The same grid, nearest and border-padded like the image: a pixel copied from the image's edge keeps the
        # edge pixel's class. Class values are small integers, exact in float32.
        m = torch.where(flip[:, None, None], mask.flip(-1), mask)[:, None].float()
        m = F.grid_sample(m, grid.float(), mode="nearest", padding_mode="border", align_corners=False)
        mask = m[:, 0].round().to(mask.dtype)
    contrast = 1 + u(n, 1, 1, 1) * 0.2 * strength
    bright = u(n, 1, 1, 1) * 0.1 * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean + bright, mask


# -- progress ----------------------------------------------------------------------------------------------------


class _Bars:
    """Epoch and step bars on a rich Progress (ours or a caller's), or nothing."""

    def __init__(self, progress: Any, epochs: int, steps: int, label: str):
        self.own = None
        self.p = None
        if progress is True:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.own = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self.p = self.own
        elif progress not in (None, False):
            self.p = progress
        if self.p is not None:
            self.epoch_task = self.p.add_task(f"{label} epochs", total=epochs)
            self.step_task = self.p.add_task(f"{label} steps", total=steps)

    def __enter__(self) -> _Bars:
        if self.own is not None:
            self.own.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.remove_task(self.epoch_task)
            self.p.remove_task(self.step_task)
        if self.own is not None:
            self.own.stop()

    def step(self) -> None:
        if self.p is not None:
            self.p.advance(self.step_task)

    def epoch(self, desc: str) -> None:
        if self.p is not None:
            self.p.advance(self.epoch_task)
            self.p.update(self.step_task, completed=0, description=desc)


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    out = list(perm.split(batch_size))
    # BatchNorm cannot train on a single sample once the feature map is 1x1.
    if len(out) > 1 and len(out[-1]) < 2:
        out = out[:-1]
    return out


def _batch_stream(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of successive permutations, without end: a step budget may end inside a pass."""
    while True:
        yield from _batches(n, batch_size, gen)


# -- fit / predict -----------------------------------------------------------------------------------------------


def _check_xy(name: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 [N, C, S, S], got {x.dtype} {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name}: labels must be class indices in [0, {num_classes})")


@dataclass(frozen=True)
class FitSettings:
    """How `fit` trains one network: everything but the data.

    `steps`: a fixed optimizer-step budget (see `bench.regimes.training_budget`), validated every `eval_every`
    steps; batches come from successive seeded permutations of the training set, so a small set is cycled and a
    large one is seen partly. Without `steps`: `epochs` passes over the training set, validated after each.
    Either way one history record is one validation round (`epoch` counts rounds; `step` is the optimizer steps so
    far, `samples_seen` the images) and the cosine learning-rate schedule spans the whole budget.

    `select="last"` (every benchmark run) keeps the final weights; the validation rounds are recorded and choose
    nothing, so a model trained without real labels (synthetic-only, label-shuffle) reports what its own data
    taught, not which of its checkpoints the real validation labels liked best (docs/STATISTICS.md, "Which weights
    a run keeps"). `select="best_val"` keeps the round with the best validation macro AUROC and stops after
    `patience` rounds without improvement: only for a model whose validation data come from its own training
    distribution (the privacy audit's classifier).

    `seed` alone decides the initial weights, the batch order and the augmentation draws, so arms compared at one
    seed share them (common random numbers).
    """

    backbone: str
    num_classes: int
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    aug_strength: float = 0.5
    seed: int = 0
    device: str = "auto"
    steps: int | None = None
    eval_every: int | None = None
    select: str = "last"
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and (
            self.steps < 1 or (self.eval_every is not None and self.eval_every < 1)
        ):
            raise BadInput(
                f"training budget out of range: steps={self.steps} (>=1), eval_every={self.eval_every} (>=1)"
            )
        if (
            self.epochs < 1
            or self.batch_size < 2
            or self.lr <= 0
            or self.weight_decay < 0
            or self.aug_strength < 0
        ):
            raise BadInput(
                f"training settings out of range: epochs={self.epochs} (>=1), batch_size={self.batch_size} (>=2), "
                f"lr={self.lr} (>0), weight_decay={self.weight_decay} (>=0), aug_strength={self.aug_strength} (>=0)"
            )
        if self.select not in SELECTIONS:
            raise BadInput(f"checkpoint selection {self.select!r}: expected one of {list(SELECTIONS)}")
        if self.patience is not None and (self.select != "best_val" or self.patience < 1):
            raise BadInput(
                f"patience={self.patience}: early stopping chooses by validation labels; it needs "
                "select='best_val' and patience >= 1"
            )
        if self.num_classes < 2:
            raise BadInput(f"num_classes={self.num_classes}: at least 2 classes are needed")


def fit(
    settings: FitSettings,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    init: nn.Module | dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = False,
    label: str = "train",
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train as `settings` say and return the kept weights (see `FitSettings.select`) and the history.

    `x_val`/`y_val` are the validation split of the training sites, scored after every round. `init` starts from
    given weights (fine-tuning). `on_epoch(record)` is called after every round with the history record; it may
    raise (e.g. optuna pruning). `progress`: False, True (own bars) or a rich Progress to add bars to.
    """
    st = settings
    num_classes, seed = st.num_classes, st.seed
    # Labels are copied (small, and torch wants writable memory); images stay as given until moved to the device.
    x_train, y_train = np.asarray(x_train), np.array(y_train, dtype=np.int64)
    x_val, y_val = np.asarray(x_val), np.array(y_val, dtype=np.int64)
    _check_xy("x_train", x_train, y_train, num_classes)
    _check_xy("x_val", x_val, y_val, num_classes)
    if len(x_train) < 2:
        raise BadInput(f"training set has {len(x_train)} image(s); at least 2 are needed")
    dev = resolve_device(st.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    with _deterministic(not cuda):
        model = build_model(st, int(x_train.shape[1]), dev, init, kind="classification")
        resident = _fits_on_gpu(dev, x_train, x_val)
        xtr = _DeviceArray(x_train, dev, resident)
        xva = _DeviceArray(x_val, dev, resident)
        ytr = torch.from_numpy(y_train).to(dev)
        aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            xb = to_float(xtr.batch(idx))
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            xb = augment(xb, st.aug_strength, aug_gen)
            yb = ytr.index_select(0, idx.to(dev))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                return F.cross_entropy(model(xb), yb)

        def validate(epoch: int) -> tuple[dict[str, Any], tuple[Any, ...]]:
            if not len(xva):
                nan = float("nan")
                return {"val_loss": nan, "val_auroc_macro": nan}, (
                    0,
                    0.0,
                    float(epoch),
                )  # the last round wins
            prob = _predict(model, xva, dev, max(min(st.batch_size, len(xtr)), 256))
            val_loss = float(
                F.nll_loss(torch.from_numpy(np.log(np.clip(prob, 1e-12, 1))), torch.from_numpy(y_val))
            )
            auc = auroc_macro(y_val, prob)
            key = (0 if math.isnan(auc) else 1, -1.0 if math.isnan(auc) else auc, -val_loss)
            return {"val_loss": val_loss, "val_auroc_macro": auc}, key

        history = run_rounds(
            model,
            st,
            len(xtr),
            dev,
            batch_loss,
            validate,
            ("val_auroc_macro", "AUROC"),
            on_epoch=on_epoch,
            progress=progress,
            label=label,
        )
    return model, history


def build_model(
    st: FitSettings,
    in_chans: int,
    dev: torch.device,
    init: nn.Module | dict[str, torch.Tensor] | None,
    kind: str,
) -> nn.Module:
    """The network `st.backbone` for a `kind` fit, from `init`'s weights if given, on `dev`."""
    model = create_model(st.backbone, st.num_classes, in_chans, kind=kind)
    if init is not None:
        state = init.state_dict() if isinstance(init, nn.Module) else init
        model.load_state_dict(state)
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return model


def run_rounds(
    model: nn.Module,
    st: FitSettings,
    n_train: int,
    dev: torch.device,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    validate: Callable[[int], tuple[dict[str, Any], tuple[Any, ...]]],
    shown: tuple[str, str],
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = False,
    label: str = "train",
) -> list[dict[str, Any]]:
    """The optimisation every fit shares: budget, batch order, AdamW + cosine schedule, rounds and selection.

    `batch_loss(idx)` is the loss of the training images `idx`; `validate(round)` returns the round's validation
    fields and the key `select="best_val"` maximises. One loop for every kind of task keeps them under one budget
    and one selection rule. `shown` is the history field and its name for the progress bar. The model is trained
    in place and holds the kept weights on return; the history is returned.
    """
    cuda = dev.type == "cuda"
    order_gen = torch.Generator().manual_seed(st.seed)
    batch_size = min(st.batch_size, n_train)
    own_epoch = len(_batches(n_train, batch_size, torch.Generator().manual_seed(0)))
    if st.steps is None:
        total, steps_per_epoch = st.epochs * own_epoch, own_epoch
    else:
        total, steps_per_epoch = int(st.steps), int(st.eval_every or own_epoch)
    rounds = math.ceil(total / steps_per_epoch)
    stream = _batch_stream(n_train, batch_size, order_gen)
    # The fused kernel: on a CPU the per-parameter loop of the default AdamW took a quarter of each step.
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history: list[dict[str, Any]] = []
    best_key, best_state, best_epoch, stale = None, None, 0, 0
    done_steps, samples = 0, 0
    with _Bars(progress, rounds, steps_per_epoch, label) as bars:
        for epoch in range(1, rounds + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum, seen = 0.0, 0
            n_this = min(steps_per_epoch, total - done_steps)
            for _ in range(n_this):
                idx = next(stream)
                loss = batch_loss(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                bars.step()
            done_steps += n_this
            samples += seen
            if cuda:
                torch.cuda.synchronize(dev)
            train_s = time.perf_counter() - t0
            rec: dict[str, Any] = {
                "epoch": epoch,
                "step": done_steps,
                "samples_seen": samples,
                "train_loss": loss_sum / max(seen, 1),
                "lr": opt.param_groups[0]["lr"],
                "train_seconds": train_s,
                "images_per_second": seen / train_s if train_s > 0 else float("nan"),
            }
            fields, key = validate(epoch)
            rec.update(fields)
            if st.select == "last":
                best_epoch = epoch  # the final weights are kept whatever the validation rounds showed
            elif best_key is None or key > best_key:
                best_key, best_epoch, stale = key, epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                stale += 1
            rec["best_epoch"] = best_epoch
            history.append(rec)
            bars.epoch(f"{label} round {epoch}/{rounds} val {shown[1]} {rec[shown[0]]:.3f}")
            if on_epoch is not None:
                on_epoch(dict(rec))
            if st.patience is not None and stale >= st.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    for rec in history:
        rec["selected"] = rec["epoch"] == best_epoch
    return history


@torch.no_grad()
def batched_outputs(
    model: nn.Module,
    xs: _DeviceArray,
    dev: torch.device,
    batch_size: int,
    head: Callable[[torch.Tensor], torch.Tensor],
) -> list[np.ndarray]:
    """`head(logits)` per batch of `xs`, in eval mode (bf16 autocast and channels-last on CUDA): the one prediction
    loop of classifiers (softmax) and segmenters (argmax label maps)."""
    model.eval()
    cuda = dev.type == "cuda"
    out = []
    for start in range(0, len(xs), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(xs)))
        xb = to_float(xs.batch(idx))
        if cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(xb)
        out.append(head(logits.float()).cpu().numpy())
    return out


def _predict(model: nn.Module, xs: _DeviceArray, dev: torch.device, batch_size: int) -> np.ndarray:
    out = batched_outputs(model, xs, dev, batch_size, lambda logits: torch.softmax(logits, dim=1))
    if not out:
        k = getattr(model, "bench_spec", {}).get("num_classes", 0)
        return np.zeros((0, k))
    p = np.concatenate(out).astype(np.float64)
    return p / p.sum(axis=1, keepdims=True)


def predict_proba(
    model: nn.Module, x: np.ndarray, device: str | torch.device = "auto", batch_size: int = 256
) -> np.ndarray:
    """Class probabilities `[N, K]` (softmax; every row sums to 1) for uint8 images `[N, C, S, S]`."""
    x = np.asarray(x)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"predict_proba: expected uint8 [N, C, S, S], got {x.dtype} {tuple(x.shape)}")
    dev = resolve_device(device)
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return _predict(model, _DeviceArray(x, dev, _fits_on_gpu(dev, x)), dev, batch_size)


# -- checkpoints -------------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Weights + plain-data metadata, written atomically; loadable with `torch.load(weights_only=True)`."""
    spec = getattr(model, "bench_spec", None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": "medsynbench-checkpoint/1", "model": spec, "state_dict": state, "meta": _plain(meta)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _plain(obj: Any) -> Any:
    """JSON-like data only, so the checkpoint loads under `weights_only=True`."""
    return json.loads(json.dumps(obj, default=_json_default))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by `save_checkpoint` (weights only; no code is unpickled) and return its metadata."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is the file's fault
        raise BadInput(f"{path}: not a readable checkpoint: {e}") from e
    if not isinstance(payload, dict) or "state_dict" not in payload or not payload.get("model"):
        raise BadInput(f"{path}: not a medsynbench checkpoint (no model spec / state_dict)")
    spec = payload["model"]
    model = create_model(spec["name"], spec["num_classes"], spec["in_chans"])
    model.load_state_dict(payload["state_dict"])
    return model.to(resolve_device(device)).eval(), payload.get("meta") or {}
