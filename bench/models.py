"""Backbones by string name: timm and MONAI networks behind one registry.

A backbone is of one kind: a `classification` network maps an image to class logits `[N, K]`; a `segmentation`
network maps it to per-pixel logits `[N, K, H, W]` (K = mask classes + background). A task of one kind cannot train
a network of the other (`create_model(..., kind=...)`, `check_kind`).

Every network is built from scratch (`pretrained=False`): a benchmark of what synthetic data is worth must not mix
in what an ImageNet checkpoint already knows, and nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.errors import BadInput
from bench.registry import Registry

KINDS = ("classification", "segmentation")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "timm" | "monai" | "plug-in"
    description: str
    kind: str = "classification"
    # Height and width must be multiples of this (a segmenter's total downsampling); 1 = any size.
    size_multiple: int = 1


Builder = Callable[[int, int], nn.Module]


def _as_builder(name: str, obj: object) -> Builder:
    if not callable(obj):
        raise TypeError(
            f"backbone {name!r} must be a callable (num_classes, in_chans) -> nn.Module, got {obj!r}"
        )
    return obj  # type: ignore[return-value]


# Third-party packages add backbones through the `medsynbench.backbones` entry-point group: a builder
# `(num_classes, in_chans) -> nn.Module`, or a module that calls `register_model` on import.
BACKBONES: Registry[Builder] = Registry("backbone", group="medsynbench.backbones", coerce=_as_builder)


def register_model(
    name: str,
    family: str,
    description: str = "",
    *,
    kind: str = "classification",
    size_multiple: int = 1,
) -> Callable[[Builder], Builder]:
    """Decorator: `builder(num_classes, in_chans) -> nn.Module` becomes available as `name`.

    `kind` says what the network outputs (see the module docstring); a plug-in without one is a classifier.
    """
    if kind not in KINDS:
        raise ValueError(f"backbone {name!r}: kind {kind!r} is not one of {list(KINDS)}")
    return BACKBONES.register(
        name, family=family, description=description, kind=kind, size_multiple=int(size_multiple)
    )


def _timm(name: str, description: str) -> None:
    def build(num_classes: int, in_chans: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)

    register_model(name, "timm", description)(build)


_timm("resnet18", "timm ResNet-18 (11M parameters); the default GPU backbone")
_timm("resnet10t", "timm ResNet-10-T (5M); light enough for CPU presets")
_timm("efficientnet_b0", "timm EfficientNet-B0 (4M)")
_timm("convnext_atto", "timm ConvNeXt-Atto (3.4M)")
_timm("mobilenetv3_small_050", "timm MobileNetV3-Small 0.5x (0.6M); the smoke-test backbone")


@register_model("densenet121", "monai", "MONAI DenseNet-121 (2D, 7M)")
def _densenet121(num_classes: int, in_chans: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_chans, out_channels=num_classes)


# Segmenters, 2-D. Channel widths are kept small: the cpu preset trains them on 64 px images on two cores.


@register_model(
    "unet-small",
    "monai",
    "MONAI UNet, 2D, channels 16-32-64-128, one residual unit per level (0.2M); the CPU segmenter",
    kind="segmentation",
    size_multiple=8,
)
def _unet_small(num_classes: int, in_chans: int) -> nn.Module:
    from monai.networks.nets import UNet

    # Instance norm (MONAI's default) rather than batch norm: as accurate here and 15% faster per CPU step at 64 px.
    return UNet(
        spatial_dims=2,
        in_channels=in_chans,
        out_channels=num_classes,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=1,
    )


@register_model(
    "dynunet",
    "monai",
    "MONAI DynUNet (nnU-Net layout), 2D, five levels, filters 32-512, residual blocks (8M); the GPU segmenter",
    kind="segmentation",
    size_multiple=16,
)
def _dynunet(num_classes: int, in_chans: int) -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(
        spatial_dims=2,
        in_channels=in_chans,
        out_channels=num_classes,
        kernel_size=[3, 3, 3, 3, 3],
        strides=[1, 2, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2, 2],
        filters=[32, 64, 128, 256, 512],
        norm_name="instance",
        res_block=True,
    )


def list_models(kind: str | None = None) -> list[str]:
    """Registered backbone names, all or those of one `kind`."""
    names = BACKBONES.names()
    return names if kind is None else [n for n in names if model_info(n).kind == kind]


def model_info(name: str) -> ModelInfo:
    meta = BACKBONES.meta(name)
    return ModelInfo(
        name,
        meta.get("family", "plug-in"),
        meta.get("description", ""),
        meta.get("kind", "classification"),
        int(meta.get("size_multiple", 1)),
    )


def check_kind(name: str, kind: str) -> ModelInfo:
    """`name`'s info if it is a `kind` network; otherwise BadInput naming the backbone, both kinds and the choices."""
    if kind not in KINDS:
        raise BadInput(f"task kind {kind!r}: expected one of {list(KINDS)}")
    info = model_info(name)
    if info.kind != kind:
        raise BadInput(
            f"backbone {name!r} is a {info.kind} network; a {kind} task needs one of: "
            + ", ".join(list_models(kind))
        )
    return info


def create_model(name: str, num_classes: int, in_chans: int, *, kind: str | None = None) -> nn.Module:
    """A freshly initialised network; `name` from `list_models()`. With `kind`, a network of another kind is
    BadInput (a classification fit handed a segmenter, or the reverse)."""
    build = BACKBONES.get(name)
    if kind is not None:
        check_kind(name, kind)
    if num_classes < 2:
        raise BadInput(f"backbone {name!r}: num_classes must be at least 2, got {num_classes}")
    if in_chans not in (1, 3):
        raise BadInput(f"backbone {name!r}: in_chans must be 1 or 3, got {in_chans}")
    model = build(num_classes, in_chans)
    # Remember how the model was made so a checkpoint can rebuild it.
    model.bench_spec = {"name": name, "num_classes": int(num_classes), "in_chans": int(in_chans)}
    return model


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate (pre-logits) features `[N, D]` for any registered network (no gradient)."""
    with torch.no_grad():
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            feats = model.forward_features(x)
            return model.forward_head(feats, pre_logits=True).flatten(1)
        if hasattr(model, "features") and hasattr(model, "class_layers"):
            h = model.features(x)
            for name, layer in model.class_layers.named_children():
                if name == "out":
                    break
                h = layer(h)
            return h.flatten(1)
    raise TypeError(f"embed: no pre-logits path for {type(model).__name__}")
