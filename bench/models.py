"""Backbones by string name: timm and MONAI networks behind one registry.

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


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "timm" | "monai" | "plug-in"
    description: str


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


def register_model(name: str, family: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: `builder(num_classes, in_chans) -> nn.Module` becomes available as `name`."""
    return BACKBONES.register(name, family=family, description=description)


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


def list_models() -> list[str]:
    return BACKBONES.names()


def model_info(name: str) -> ModelInfo:
    meta = BACKBONES.meta(name)
    return ModelInfo(name, meta.get("family", "plug-in"), meta.get("description", ""))


def create_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """A freshly initialised classifier; `name` from `list_models()`."""
    build = BACKBONES.get(name)
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
