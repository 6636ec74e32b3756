"""Training and prediction for segmentation tasks: image-mask pairs in, label maps out.

The same protocol as `bench.train.fit`, through its shared loop (`run_rounds`): the same step budget, seeded batch
order, AdamW with a cosine schedule, validation rounds and checkpoint-selection rule, the same device handling
(uint8 arrays resident on the GPU when they fit, bf16 autocast there, deterministic on a CPU). What differs is the
data: masks are uint8 label maps `[N, H, W]` (0 background, k the k-th mask class), augmented with their images
(`bench.train.augment_pair`), and the loss is MONAI's `DiceCELoss`.

Loss: softmax Dice + cross-entropy with the Dice term over the lesion classes only (`include_background=False`)
and pooled over the batch (`batch=True`), as nnU-Net's default loss does. Background covers most of every slice,
so its Dice is near 1 whatever the network does and would dilute the lesion terms; the cross-entropy still scores
every pixel, background included. Pooling over the batch keeps a class absent from one image (a normal slice has
an empty mask) from contributing a 0-or-1 Dice of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.errors import BadInput
from bench.models import model_info
from bench.train import (
    FitSettings,
    _deterministic,
    _DeviceArray,
    _fits_on_gpu,
    augment_pair,
    batched_outputs,
    build_model,
    resolve_device,
    run_rounds,
    to_float,
)

KIND = "segmentation"


def seg_loss() -> nn.Module:
    """The segmentation loss (see the module docstring for the choice of terms)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)


def _check_pairs(name: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 images [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 3 or y.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 label maps [N, H, W], got {y.dtype} {tuple(y.shape)}")
    if len(x) != len(y) or x.shape[2:] != y.shape[1:]:
        raise ValueError(f"{name}: images {tuple(x.shape)} and label maps {tuple(y.shape)} do not pair up")
    if y.size and int(y.max()) >= num_classes:
        raise ValueError(
            f"{name}: label maps hold class {int(y.max())}; expected 0..{num_classes - 1} "
            f"(background + {num_classes - 1} mask classes)"
        )


def _check_size(backbone: str, shape: tuple[int, ...]) -> None:
    m = model_info(backbone).size_multiple
    h, w = shape[-2:]
    if h % m or w % m:
        raise BadInput(
            f"backbone {backbone!r}: image size {h}x{w} must be a multiple of {m} in each dimension"
        )


def dice_per_class(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each mask class 1..num_classes-1, pooled over all pixels of all images; NaN where a class is absent
    from both truth and prediction. (Validation only; the reported metrics live in the metric library.)"""
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    k = int(num_classes)
    # One pass: the joint histogram of (truth, prediction) pairs.
    joint = np.bincount(t.astype(np.int64) * k + p.astype(np.int64), minlength=k * k).reshape(k, k)
    inter = np.diag(joint)[1:].astype(np.float64)
    size = joint.sum(axis=1)[1:] + joint.sum(axis=0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, 2 * inter / size, np.nan)


def dice_macro(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean of `dice_per_class` over the classes present in truth or prediction; NaN if none is."""
    d = dice_per_class(y_true, y_pred, num_classes)
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def fit_segmenter(
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
    """Train the segmenter `settings.backbone` on images `[N, C, H, W]` and label maps `[N, H, W]` (both uint8).

    `settings.num_classes` counts the background: mask classes + 1. Every round records `val_dice_macro` on
    `x_val`/`y_val`. Which weights are kept follows `settings.select` exactly as for a classifier: `last` (every
    benchmark run) keeps the final weights, so real validation masks choose nothing for an arm that trained on
    synthetic pairs; `best_val` keeps the round with the best validation Dice, only for validation data from the
    model's own training distribution. Returns the model and the history.
    """
    st = settings
    x_train, y_train = np.asarray(x_train), np.asarray(y_train)
    x_val, y_val = np.asarray(x_val), np.asarray(y_val)
    _check_pairs("x_train/y_train", x_train, y_train, st.num_classes)
    _check_pairs("x_val/y_val", x_val, y_val, st.num_classes)
    if len(x_train) < 2:
        raise BadInput(f"training set has {len(x_train)} image(s); at least 2 are needed")
    _check_size(st.backbone, x_train.shape)
    dev = resolve_device(st.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(st.seed)
    np.random.seed(st.seed % (2**32))
    with _deterministic(not cuda):
        model = build_model(st, int(x_train.shape[1]), dev, init, kind=KIND)
        resident = _fits_on_gpu(dev, x_train, y_train, x_val, y_val)
        xtr, ytr = _DeviceArray(x_train, dev, resident), _DeviceArray(y_train, dev, resident)
        xva = _DeviceArray(x_val, dev, resident)
        aug_gen = torch.Generator(device=dev).manual_seed(st.seed + 1)
        loss_fn = seg_loss()

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            xb = to_float(xtr.batch(idx))
            yb = ytr.batch(idx).long()
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            xb, yb = augment_pair(xb, yb, st.aug_strength, aug_gen)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(xb)
            # The loss in float32: Dice sums over many pixels.
            return loss_fn(logits.float(), yb[:, None])

        def validate(epoch: int) -> tuple[dict[str, Any], tuple[Any, ...]]:
            if not len(xva):
                return {"val_dice_macro": float("nan")}, (0, 0.0, float(epoch))  # the last round wins
            pred = _predict_maps(model, xva, dev, max(min(st.batch_size, len(xtr)), 64))
            d = dice_macro(y_val, pred, st.num_classes)
            return {"val_dice_macro": d}, (0 if math.isnan(d) else 1, -1.0 if math.isnan(d) else d)

        history = run_rounds(
            model,
            st,
            len(xtr),
            dev,
            batch_loss,
            validate,
            ("val_dice_macro", "Dice"),
            on_epoch=on_epoch,
            progress=progress,
            label=label,
        )
    return model, history


def _predict_maps(model: nn.Module, xs: _DeviceArray, dev: torch.device, batch_size: int) -> np.ndarray:
    out = batched_outputs(model, xs, dev, batch_size, lambda logits: logits.argmax(dim=1).to(torch.uint8))
    if not out:
        return np.zeros((0, *xs.data.shape[2:]), dtype=np.uint8)
    return np.concatenate(out)


def predict_labelmaps(
    model: nn.Module, x: np.ndarray, device: str | torch.device = "auto", batch_size: int = 64
) -> np.ndarray:
    """Label maps `[N, H, W]` (uint8, the argmax class of every pixel) for uint8 images `[N, C, H, W]`."""
    x = np.asarray(x)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"predict_labelmaps: expected uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    spec = getattr(model, "bench_spec", None)
    if spec:
        _check_size(spec["name"], x.shape)
    dev = resolve_device(device)
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return _predict_maps(model, _DeviceArray(x, dev, _fits_on_gpu(dev, x)), dev, batch_size)
