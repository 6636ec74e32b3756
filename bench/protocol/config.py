"""Training presets (`configs/presets/*.yaml`) and protocols (`configs/protocols/*.yaml`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from bench.errors import BadInput
from bench.schema import Strict, load_yaml_model
from bench.tune import TuneSpec


def _refuse_patience(v: int | None) -> None:
    if v is not None:
        raise ValueError(
            f"got {v}; early stopping is not offered: the real validation labels would choose when a synthetic-only "
            "model stops. Every run trains its whole step budget and keeps its final weights; set it to null"
        )
    return None


class TrainSettings(Strict):
    """Everything that decides how one run trains (besides data, regime and seed)."""

    backbone: str | None = Field(None, description="model name; None = the task protocol's backbone")
    image_size: int | None = Field(None, ge=8, le=2048, description="None = the task's size for this preset")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    aug_strength: float = Field(0.5, ge=0)
    patience: int | None = Field(
        None,
        description="must be null: early stopping on real validation labels would let them choose a synthetic-only "
        "model's weights; every run trains its whole budget and keeps its final weights (docs/STATISTICS.md)",
    )
    pretrain_epochs: int | None = Field(
        None, ge=1, description="synthetic stage of `pretrain`; None = epochs"
    )
    device: str = "auto"

    @field_validator("patience")
    @classmethod
    def _no_early_stopping(cls, v: int | None) -> None:
        return _refuse_patience(v)


class RunSettings(TrainSettings):
    """The settings every run of a matrix trains with: a preset under the protocol's overrides and the command
    line's, with the backbone and image size resolved and the budget's unit. Frozen; `config.json`'s `train` is its
    `model_dump()`, and a tuned run's is `with_params(best_params)`."""

    backbone: str
    image_size: int = Field(..., ge=8, le=2048)
    budget_unit: Literal["steps", "epochs"] = "steps"

    def with_params(self, params: Mapping[str, float]) -> RunSettings:
        """These settings with tuned parameters in place (validated like the rest)."""
        return RunSettings.model_validate({**self.model_dump(), **params})


class Preset(TrainSettings):
    name: str = ""
    description: str = ""


class TrainOverrides(Strict):
    backbone: str | None = None
    image_size: int | None = Field(None, ge=8, le=2048)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    aug_strength: float | None = Field(None, ge=0)
    patience: int | None = None
    pretrain_epochs: int | None = Field(None, ge=1)

    @field_validator("patience")
    @classmethod
    def _no_early_stopping(cls, v: int | None) -> None:
        return _refuse_patience(v)


class Budget(Strict):
    """How long every run of the protocol trains (see `bench.regimes.training_budget`)."""

    unit: Literal["steps", "epochs"] = Field(
        "steps",
        description="steps: every regime trains epochs x ceil(n_real_train / batch_size) optimizer steps, where "
        "n_real_train is the real training split of the training sites; epochs: the legacy behaviour, each regime "
        "`epochs` passes over its own training set (augmented runs train longer)",
    )


class Protocol(Strict):
    """A protocol YAML (`configs/protocols/*.yaml`); anything left out falls back to the task's `protocol`."""

    name: str = ""
    description: str = ""
    regimes: list[str] | None = None
    ratios: list[float] | None = Field(None, description="expand a bare `augment` regime into augment:R")
    seeds: list[int] | None = None
    backbone: str | None = None
    preset: str | None = None
    balance: Literal["real", "synthetic"] = Field("real", description="class balance of the synthetic draw")
    train: TrainOverrides = TrainOverrides()
    budget: Budget = Budget()
    controls: dict[str, list[str]] = Field(
        default_factory=dict,
        description="control generators (by --synthetic name) and the only regimes they run; a generator not "
        "listed runs every regime. Missing controls are reported NOT RUN by `evaluate`.",
    )
    tune: TuneSpec = TuneSpec()


def _config_roots() -> list[Path]:
    # The checkout's configs/ first, then the copy shipped inside the package.
    bench_dir = Path(__file__).resolve().parent.parent
    return [d for d in (bench_dir.parent / "configs", bench_dir / "_configs") if d.is_dir()]


def _find_config(kind: str, ref: str | Path) -> Path:
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise BadInput(f"{kind} {str(ref)!r}: file not found")
        return p
    for root in _config_roots():
        for suffix in (".yaml", ".yml"):
            q = root / f"{kind}s" / f"{ref}{suffix}"
            if q.is_file():
                return q
    known = sorted({q.stem for root in _config_roots() for q in (root / f"{kind}s").glob("*.y*ml")})
    raise BadInput(
        f"{kind} {str(ref)!r}: not a file and not a known {kind} (known: {', '.join(known) or 'none'})"
    )


def load_preset(ref: str | Path) -> tuple[Preset, Path]:
    """A preset by name (`smoke`, `cpu`, `gpu`) or path; its name defaults to the file's stem."""
    path = _find_config("preset", ref)
    preset = load_yaml_model(path, Preset, "training preset")
    if not preset.name:
        preset = preset.model_copy(update={"name": path.stem})
    return preset, path


def load_protocol(ref: str | Path) -> tuple[Protocol, Path]:
    """A protocol by name (`default`, `demo`) or path; its name defaults to the file's stem."""
    path = _find_config("protocol", ref)
    proto = load_yaml_model(path, Protocol, "protocol")
    if not proto.name:
        proto = proto.model_copy(update={"name": path.stem})
    return proto, path


def default_preset_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"
