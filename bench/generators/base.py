"""The generator interface and registry: `Generator`, `register_generator`, `get_generator`, controls.

Kept apart from the package's `__init__` so that the pipeline and the built-in generators import it without
importing the package's re-exports back (no import cycle)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.errors import BadInput
from bench.registry import Registry

CHECK_KINDS = ("gain_contains_zero", "privacy_flagged", "chance", "ratio_near_one", "dice_at_chance")
TASK_KINDS = ("classification", "segmentation")


@dataclass(frozen=True)
class ControlCheck:
    """One expected outcome of a control, checked by `bench.evaluation.controls`.

    `kind`: `gain_contains_zero` (the 95% interval of `regime` minus real-only on the primary metric contains 0),
    `privacy_flagged` (the privacy audit flags the set), `chance` (the 95% interval of `regime`'s macro AUROC
    contains 0.5), `ratio_near_one` (the interval of `regime` / real-only reaches 1 +/- `margin`) or
    `dice_at_chance` (segmentation: the interval of `regime`'s macro Dice reaches down to `margin`, the most an
    image-blind segmenter gets; `bench.generators.segcontrols.dice_at_chance`).

    `margin` widens the target to a fixed band. `draw_sd` is for a control whose training images are not the
    real-only run's: the interval covers test patients and training seeds, not which patients happened to be drawn
    for training, and two disjoint draws of the same size differ by that alone. It is the standard deviation of that
    draw effect on the checked quantity, added to the interval's half-widths in quadrature at the check's level
    (the sum of two independent errors), so the band grows with the check's confidence instead of being fixed.
    """

    kind: str
    regime: str | None
    expected: str
    margin: float = 0.0
    draw_sd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "regime": self.regime, "expected": self.expected}
        if self.margin:
            out["margin"] = self.margin
        if self.draw_sd:
            out["draw_sd"] = self.draw_sd
        return out


@dataclass(frozen=True)
class Control:
    """A generator whose right answer is known: `role` is `negative` or `positive`; `checks` its outcomes."""

    role: str
    purpose: str
    checks: tuple[ControlCheck, ...]

    @property
    def regimes(self) -> list[str]:
        """The regimes its checks need (besides the real-only baseline)."""
        return list(dict.fromkeys(c.regime for c in self.checks if c.regime))

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "purpose": self.purpose, "checks": [c.to_dict() for c in self.checks]}


class Generator:
    """Base class. Subclasses set `name`, `version`, `presets` and implement `fit` and `sample`.

    `config` is a preset name from `presets` or a mapping that overrides preset values (`preset` key picks the
    base). The resolved configuration is what the card records.

    Image–mask pairs (segmentation tasks): a generator that sets `task_kinds` to include `"segmentation"` also
    implements `fit_pairs` and `sample_pairs`. It learns from images with their label maps (uint8 `[N, S, S]`,
    0 = background, k = the task's k-th mask class) and samples pairs, one per requested class index; the pipeline
    then sets each synthetic image's label from its mask (the task's `label_from_mask`), so a pair whose mask drifted
    to another class is labelled by what it shows. Separate methods rather than optional arguments keep every
    classification generator, a user's included, exactly as it was.
    """

    name: str = ""
    version: str = "1.0"
    presets: dict[str, dict[str, Any]] = {"tiny": {}, "full": {}}
    default_preset: str = "tiny"
    # A control declares what it must show; None for a generator under test.
    control: Control | None = None
    # The real split it learns from: `train` for every generator, `reserve` for the positive control (patients of
    # the training sites that no run trains on).
    source_split: str = "train"
    # Whether fit/sample run torch ops: `generate` then sets torch's CPU thread count for them (`--threads`).
    uses_torch: bool = False
    # The task kinds it serves: `classification` (images per class) and/or `segmentation` (image–mask pairs via
    # fit_pairs / sample_pairs). A control that makes sense for one kind only lists that kind.
    task_kinds: tuple[str, ...] = ("classification",)
    # The patient of each training image, set by `generate` before fitting, for a generator that must keep images of
    # one patient apart (mask-shuffle); None when fitted outside the pipeline.
    patients: np.ndarray | None = None

    def __init__(self, config: str | dict[str, Any] | None = None, seed: int = 0, device: str | None = None):
        self.config = self.resolve_config(config)
        self.seed = int(seed)
        self.device = device or ("cuda" if _cuda() else "cpu")

    @classmethod
    def resolve_config(cls, config: str | dict[str, Any] | None) -> dict[str, Any]:
        if config is None:
            config = cls.default_preset
        if isinstance(config, str):
            if config not in cls.presets:
                raise BadInput(
                    f"--config {config!r}: unknown preset for generator {cls.name!r} (known: {', '.join(cls.presets)})"
                )
            return {"preset": config, **cls.presets[config]}
        preset = str(config.get("preset", cls.default_preset))
        if preset not in cls.presets:
            raise BadInput(f"config 'preset' {preset!r}: unknown for generator {cls.name!r}")
        base = dict(cls.presets[preset])
        unknown = sorted(set(config) - set(base) - {"preset"})
        if unknown:
            raise BadInput(
                f"config: unknown key(s) {unknown} for generator {cls.name!r} (known: {sorted(base)})"
            )
        return {"preset": preset, **base, **{k: v for k, v in config.items() if k != "preset"}}

    def default_size(self, task_size: int) -> int:
        """Image side the generator works at when neither --size nor --preset is given."""
        return int(task_size)

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        raise NotImplementedError

    def sample(self, labels: np.ndarray) -> np.ndarray:
        """uint8 `[len(labels), C, S, S]`, one image per requested class index, deterministic for the seed."""
        raise NotImplementedError

    @classmethod
    def supports(cls, kind: str) -> bool:
        """Whether it serves tasks of this kind (`classification` or `segmentation`)."""
        return kind in cls.task_kinds

    def fit_pairs(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        num_mask_classes: int,
    ) -> None:
        """Learn from images `[N, C, S, S]` and their label maps `[N, S, S]` (values 0..num_mask_classes)."""
        raise NotImplementedError(f"generator {self.name!r} does not produce image–mask pairs")

    def sample_pairs(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images `[len(labels), C, S, S]` and label maps `[len(labels), S, S]`, deterministic for the seed."""
        raise NotImplementedError(f"generator {self.name!r} does not produce image–mask pairs")


def _as_generator(name: str, obj: object) -> type[Generator]:
    if not (isinstance(obj, type) and issubclass(obj, Generator)):
        raise TypeError(f"generator {name!r} must be a subclass of bench.generators.Generator, got {obj!r}")
    # The registered name is the one cards and manifests record.
    obj.name = name
    return obj


# Built-ins are imported on first use; third-party generators come through the `medsynbench.generators`
# entry-point group (a Generator subclass, or a module that uses `register_generator` on import).
GENERATORS: Registry[type[Generator]] = Registry(
    "generator",
    group="medsynbench.generators",
    builtins=(
        "bench.generators.copycat",
        "bench.generators.controls",
        "bench.generators.segcontrols",
        "bench.generators.pca_gmm",
        "bench.generators.ddpm",
    ),
    coerce=_as_generator,
)


def register_generator(name: str) -> Callable[[type[Generator]], type[Generator]]:
    """Class decorator: the generator becomes available to `medsynbench generate --generator NAME`."""
    return GENERATORS.register(name)


def list_generators() -> list[str]:
    return GENERATORS.names()


def get_generator(name: str) -> type[Generator]:
    """The generator class registered as `name`; an unknown name is bad input with the closest known names."""
    return GENERATORS.get(name, what="--generator")


def control_of(name: str | None) -> Control | None:
    """The control a registered generator name declares; None for other generators and unknown names."""
    if not name or name not in GENERATORS.names():
        return None
    return GENERATORS.get(name).control


def list_controls(kind: str = "classification") -> list[str]:
    """The controls that apply to tasks of `kind` (classification by default, so that classification reports list
    exactly the controls they always did; pass the task's kind)."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind {kind!r}: expected one of {TASK_KINDS}")
    return [
        n
        for n in GENERATORS.names()
        if GENERATORS.get(n).control is not None and GENERATORS.get(n).supports(kind)
    ]


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch build with CUDA: CPU it is
        return False
