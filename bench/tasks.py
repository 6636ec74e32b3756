"""Task definitions: versioned YAML files parsed into validated objects.

A task names everything that decides its numbers (classes, sites, splits, image handling, metrics, protocol), so a
result is only comparable with results of the same task name *and* version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from bench.errors import BadInput
from bench.schema import Strict, read_yaml_mapping, validate_model

TASK_FILE = "task.yaml"


class Intensity(Strict):
    """How raw pixel values become [0, 1]. `ct_window` works on Hounsfield units; `minmax` on anything;
    `uint8` divides 8-bit images by 255."""

    kind: Literal["ct_window", "minmax", "uint8"] = "uint8"
    center: float | None = None
    width: float | None = None

    @model_validator(mode="after")
    def _window_needs_center_width(self) -> Intensity:
        if self.kind == "ct_window" and (self.center is None or self.width is None or self.width <= 0):
            raise ValueError("ct_window needs center and a positive width (in HU)")
        return self


class ImageSpec(Strict):
    size: int = Field(64, ge=8, le=2048, description="square side in pixels after resizing")
    channels: Literal[1, 3] = 1
    presets: dict[str, int] = Field(default_factory=dict, description="named sizes, e.g. cpu: 64, gpu: 224")
    intensity: Intensity = Intensity()
    crop_mm: float | None = Field(
        None,
        gt=0,
        le=2000,
        description="centre crop of this many mm on a side (from the pixel spacing) before resizing; applies to "
        "images in modality units (DICOM, NPZ in HU), which must then carry their pixel spacing",
    )

    def size_for(self, preset: str | None) -> int:
        if preset and preset in self.presets:
            return self.presets[preset]
        return self.size


class BinaryView(Strict):
    name: str
    positive: list[str] = Field(min_length=1)


class Labels(Strict):
    classes: list[str] = Field(min_length=2)
    binary_view: BinaryView | None = None

    @model_validator(mode="after")
    def _check(self) -> Labels:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be unique")
        if self.binary_view:
            unknown = sorted(set(self.binary_view.positive) - set(self.classes))
            if unknown:
                raise ValueError(f"binary_view.positive names unknown classes {unknown}")
        return self


class Masks(Strict):
    """How a segmentation task's masks are read and how an image's label follows from its mask."""

    classes: list[str] = Field(
        min_length=1,
        description="mask classes in label-map order: value k in a label map is the k-th class (1-based), 0 is "
        "background; each is also a label class, and a SEG segment is matched to one by its label",
    )
    label_from_mask: Literal["largest"] = Field(
        "largest", description="`largest`: an image's label is the mask class with the largest area"
    )
    empty_label: str = Field(description="the label of an image whose mask is empty (or that has none)")

    @model_validator(mode="after")
    def _check(self) -> Masks:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be unique")
        if self.empty_label in self.classes:
            raise ValueError(f"empty_label {self.empty_label!r} cannot also be a mask class")
        if len(self.classes) > 254:
            raise ValueError("at most 254 mask classes (label maps are 8-bit)")
        return self


class Sites(Strict):
    train: list[str] = Field(min_length=1)
    external: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _disjoint(self) -> Sites:
        both = sorted(set(self.train) & set(self.external))
        if both:
            raise ValueError(f"sites {both} are listed as both train and external")
        return self


class Splits(Strict):
    unit: str = Field("patient", description="the manifest column that is never split across train/val/test")
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    reserve: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="patients of the training sites set aside in split `reserve`, never trained on or evaluated: "
        "the pool of the positive control `real-holdout`; 0 = no positive control for this task",
    )
    seed: int = 0
    from_column: str | None = Field(
        None,
        description="take each training-site row's split (train/val/test) from this column of the source, e.g. "
        "a release's official split; fractions and seed are then unused. External sites stay external.",
    )

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        total = self.train + self.val + self.test + self.reserve
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test + reserve must be 1, got {total:g}")
        return self


class Subgroups(Strict):
    columns: list[str] = Field(default_factory=lambda: ["sex", "age_group"])
    age_bins: list[float] = Field(default_factory=lambda: [40, 60], description="inner edges, ascending")
    exclude_from_gaps: dict[str, list[str]] = Field(default_factory=lambda: {"sex": ["unknown"]})
    intersections: list[list[str]] = Field(default_factory=list)

    @field_validator("age_bins")
    @classmethod
    def _ascending(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("age_bins must be strictly ascending")
        return v

    def age_labels(self) -> list[str]:
        edges = [_fmt(b) for b in self.age_bins]
        if not edges:
            return ["all"]
        labels = [f"<{edges[0]}"]
        labels += [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)]
        labels.append(f">={edges[-1]}")
        return labels


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class Metrics(Strict):
    primary: str = "auroc_macro"
    target_specificity: float = Field(0.9, gt=0, lt=1)
    min_patients: int = Field(10, ge=1, description="groups with fewer patients are `insufficient`")
    min_positives: int = Field(5, ge=1, description="groups with fewer positive patients are `insufficient`")
    min_negatives: int = Field(
        5, ge=1, description="groups with fewer patients with a negative case are `insufficient`"
    )
    permutations: int = Field(
        500, ge=0, description="group-label permutations for the p-value of 'no gap' (0: not computed)"
    )
    patient_aggregation: Literal["none", "mean"] = Field(
        "none",
        description="`mean`: also score patients (scope `patient`), each with the mean of its cases' class "
        "probabilities and the most frequent class of its cases",
    )
    bootstrap: int = Field(1000, ge=10)
    ece_bins: int = Field(15, ge=2)


class Protocol(Strict):
    regimes: list[str] = Field(default_factory=lambda: ["real"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    backbone: str = "resnet18"
    ratios: list[float] = Field(default_factory=list, description="synthetic ratios for augment:R sweeps")


class Source(Strict):
    kind: str = Field(description="registered source name: dicom, ham10000, folder or a plug-in's")
    options: dict[str, Any] = Field(default_factory=dict)


class Task(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(pattern=r"^\d+(\.\d+){0,2}$")
    kind: Literal["classification", "segmentation"] = Field(
        "classification",
        description="what the downstream model does: classify images, or segment them (needs `masks`)",
    )
    modality: str
    description: str = ""
    image: ImageSpec = ImageSpec()
    labels: Labels
    masks: Masks | None = None
    sites: Sites
    splits: Splits = Splits()
    subgroups: Subgroups = Subgroups()
    metrics: Metrics = Metrics()
    protocol: Protocol = Protocol()
    source: Source
    # Where the task was loaded from; not part of the YAML.
    path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _masks_match_kind(self) -> Task:
        if self.kind == "segmentation":
            if self.masks is None:
                raise ValueError("masks: a segmentation task needs a `masks` section (classes, empty_label)")
            labels = set(self.labels.classes)
            unknown = [c for c in self.masks.classes if c not in labels]
            if unknown:
                raise ValueError(f"masks.classes: {unknown} are not label classes {self.labels.classes}")
            if self.masks.empty_label not in labels:
                raise ValueError(
                    f"masks.empty_label: {self.masks.empty_label!r} is not a label class {self.labels.classes}"
                )
            uncovered = sorted(labels - set(self.masks.classes) - {self.masks.empty_label})
            if uncovered:
                raise ValueError(
                    f"masks: label classes {uncovered} can follow from no mask (neither a mask class nor "
                    "empty_label)"
                )
        elif self.masks is not None:
            raise ValueError("masks: only a task of kind `segmentation` has masks")
        return self

    @property
    def classes(self) -> list[str]:
        return list(self.labels.classes)

    @property
    def is_segmentation(self) -> bool:
        return self.kind == "segmentation"

    @property
    def mask_classes(self) -> list[str]:
        """Label-map order: value k is `mask_classes[k - 1]`; empty for a classification task."""
        return list(self.masks.classes) if self.masks else []

    def label_from_mask(self, areas: Any) -> str:
        """The image label a mask implies, from its per-class pixel counts (index k-1 for class value k):
        the class of the largest area, the empty label if there is none (ties: the first class)."""
        if self.masks is None:
            raise ValueError(f"task {self.name!r} has no masks")
        a = np.asarray(areas, dtype=np.int64)
        if a.size == 0 or a.max() <= 0:
            return self.masks.empty_label
        return self.masks.classes[int(np.argmax(a))]

    @property
    def all_sites(self) -> list[str]:
        return list(self.sites.train) + list(self.sites.external)

    @property
    def folder(self) -> Path | None:
        return self.path.parent if self.path else None

    def spec(self) -> dict[str, Any]:
        """The task as plain data (what a result record pins). A classification task's spec leaves out `kind` and
        `masks`, so its hash is what it was before tasks had kinds."""
        spec = self.model_dump(mode="json", exclude={"path"})
        if self.kind == "classification":
            spec.pop("kind", None)
            spec.pop("masks", None)
        return spec

    def age_group(self, age: pd.Series) -> pd.Series:
        """Bin ages with the task's edges; missing or unparsable ages become `unknown`."""
        a = pd.to_numeric(age, errors="coerce")
        labels = self.subgroups.age_labels()
        if not self.subgroups.age_bins:
            out = pd.Series(np.where(a.isna(), "unknown", "all"), index=age.index)
        else:
            idx = np.searchsorted(
                np.asarray(self.subgroups.age_bins, dtype=float), a.to_numpy(float), side="right"
            )
            out = pd.Series(
                np.asarray(labels, dtype=object)[np.clip(idx, 0, len(labels) - 1)], index=age.index
            )
            out[a.isna()] = "unknown"
        return out.astype(object)

    def add_subgroup_columns(self, df: pd.DataFrame) -> pd.DataFrame:
        """Derive `age_group` (and keep raw columns) so every subgroup column of the task exists."""
        out = df.copy()
        if "age_group" in self.subgroups.columns and "age_group" not in out.columns and "age" in out.columns:
            out["age_group"] = self.age_group(out["age"])
        for col in self.subgroups.columns:
            if col in out.columns:
                out[col] = out[col].astype(object).where(out[col].notna(), "unknown").astype(str)
        return out


def _roots() -> list[Path]:
    roots = []
    if env := os.environ.get("MEDSYNBENCH_TASKS"):
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    roots += [here.parent / "tasks", here / "_tasks"]
    return [r for r in roots if r.is_dir()]


def task_dirs() -> dict[str, Path]:
    """Built-in (and MEDSYNBENCH_TASKS) task folders by name; the first root wins."""
    found: dict[str, Path] = {}
    for root in _roots():
        for d in sorted(root.iterdir()):
            if (d / TASK_FILE).is_file() and d.name not in found:
                found[d.name] = d
    return found


def resolve_task_path(ref: str | Path) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    if p.is_dir() and (p / TASK_FILE).is_file():
        return p / TASK_FILE
    dirs = task_dirs()
    if str(ref) in dirs:
        return dirs[str(ref)] / TASK_FILE
    known = ", ".join(sorted(dirs)) or "none"
    raise BadInput(
        f"task {str(ref)!r}: not a task.yaml, a task folder, or a known task name (known: {known})"
    )


def load_task(ref: str | Path | Task) -> Task:
    """Load a task by name, folder or file. Exit-2 errors name the file and the field."""
    if isinstance(ref, Task):
        return ref
    path = resolve_task_path(ref)
    raw = read_yaml_mapping(path, "task file")
    # `version: 1.0` is a float to YAML; the task's identity is the string the author wrote.
    if "version" in raw and not isinstance(raw["version"], str):
        raw["version"] = str(raw["version"])
    task = validate_model(Task, raw, path, "task")
    return task.model_copy(update={"path": path.resolve()})


def list_tasks() -> list[Task]:
    return [load_task(d / TASK_FILE) for d in task_dirs().values()]
