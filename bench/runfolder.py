"""The run folder: the one module that knows its layout.

```
RUN/task.yaml                        the resolved task the matrix ran
RUN/matrix.json                      protocol, settings, manifests (path + sha256), generators and cards, run names
RUN/generators/<name>/card.json      each generator's card
RUN/tuning.db, RUN/tuning/<key>.json optuna studies and each study's chosen parameters
RUN/wandb/                           offline Weights & Biases runs
RUN/<generator>__<regime>__<backbone>__seed<k>/
    config.json composition.json predictions.parquet metrics.json checkpoint.pt history.csv DONE
    (a segmentation task: seg_predictions.parquet and labelmaps.npz instead of predictions.parquet)
RUN/evaluation/                      `medsynbench evaluate RUN`
RUN/privacy/<generator>/privacy.json `medsynbench privacy ... --out RUN/privacy/<generator>`
RUN/fidelity/<generator>/fidelity.json, fidelity.parquet   `medsynbench fidelity --run RUN`
RUN/model-privacy/model_privacy.json, scores.parquet       `medsynbench privacy-model RUN`
```

A run folder is complete when it holds `DONE`; it is built under a temporary name (`.<name>.*`) and renamed into
place with `DONE` inside. Every other module builds and parses names, finds files and lists finished runs through
this module, so a change of layout is a change here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.errors import BadInput
from bench.io import read_json
from bench.schema import pydantic_problems

# The real-only baseline: the generator name of runs that use no synthetic data, and its reference regime.
BASELINE = "none"
BASELINE_REGIME = "real"
# Splits a run predicts (validation for thresholds, then the held-out ones) and the splits that are scored.
PREDICTED_SPLITS: tuple[str, ...] = ("val", "test", "external")
SCORED_SPLITS: tuple[str, ...] = ("test", "external")
# Columns that identify one run inside a predictions file, and the ones that identify a training procedure.
RUN_KEYS: tuple[str, ...] = ("generator", "regime", "seed", "backbone")
ARM_KEYS: tuple[str, ...] = ("generator", "regime", "backbone")

TASK_FILE = "task.yaml"
MATRIX_FILE = "matrix.json"
DONE = "DONE"
CONFIG_FILE = "config.json"
COMPOSITION_FILE = "composition.json"
PREDICTIONS_FILE = "predictions.parquet"
# A segmentation run's counterpart of the predictions file: the per-case count table (`bench.metrics.count_table`,
# with the predictions contract's case and run-key columns) and the label maps it was counted from.
SEG_PREDICTIONS_FILE = "seg_predictions.parquet"
LABELMAPS_FILE = "labelmaps.npz"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
GENERATORS_DIR = "generators"
CARD_FILE = "card.json"
TUNING_DIR = "tuning"
TUNING_DB = "tuning.db"
WANDB_DIR = "wandb"
EVALUATION_DIR = "evaluation"
PRIVACY_DIR = "privacy"
PRIVACY_FILE = "privacy.json"
FIDELITY_DIR = "fidelity"
FIDELITY_FILE = "fidelity.json"
FIDELITY_TABLE = "fidelity.parquet"
MODEL_PRIVACY_DIR = "model-privacy"
MODEL_PRIVACY_FILE = "model_privacy.json"

SCHEMA_VERSION = 1
SEP = "__"
GENERATOR_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]|_(?!_))*$")
_SEED = re.compile(r"^seed(-?\d+)$")


def check_generator_name(name: str, what: str = "generator name") -> str:
    """Generator names become folder names: letters, digits, '.', '-', single '_', never the baseline's."""
    if not isinstance(name, str) or not GENERATOR_NAME.match(name) or SEP in name:
        raise BadInput(
            f"{what} {name!r}: use letters, digits, '.', '-' and single '_' (it names folders; '__' separates "
            "the parts of a run folder's name)"
        )
    if name == BASELINE:
        raise BadInput(f"{what} {name!r}: reserved for the real-only baseline")
    return name


@dataclass(frozen=True, order=True)
class RunName:
    """`<generator>__<regime slug>__<backbone>__seed<k>`: what a run folder holds, in its name."""

    generator: str
    regime_slug: str
    backbone: str
    seed: int

    def __str__(self) -> str:
        return SEP.join([self.generator, self.regime_slug, self.backbone, f"seed{self.seed}"])

    @property
    def arm(self) -> str:
        """The training procedure without its seed (also the optuna study key)."""
        return SEP.join([self.generator, self.regime_slug, self.backbone])

    @property
    def is_baseline(self) -> bool:
        return self.generator == BASELINE

    @classmethod
    def parse(cls, name: str) -> RunName:
        parts = name.split(SEP)
        m = _SEED.match(parts[-1]) if len(parts) == 4 else None
        if m is None or not all(parts[:3]):
            raise ValueError(
                f"{name!r} is not a run folder name (<generator>__<regime>__<backbone>__seed<k>)"
            )
        return cls(parts[0], parts[1], parts[2], int(m.group(1)))

    @classmethod
    def try_parse(cls, name: str) -> RunName | None:
        try:
            return cls.parse(name)
        except ValueError:
            return None


def run_name(generator: str, regime_slug: str, backbone: str, seed: int) -> str:
    return str(RunName(generator, regime_slug, backbone, int(seed)))


def study_key(generator: str, regime_slug: str, backbone: str) -> str:
    return RunName(generator, regime_slug, backbone, 0).arm


class _Lenient(BaseModel):
    """Typed view of a file we wrote: known fields are checked, fields added by later versions are kept."""

    model_config = ConfigDict(extra="allow")


class ManifestRef(_Lenient):
    path: str | None = None
    sha256: str | None = None
    file_sha256: str | None = None


class Manifests(_Lenient):
    real: ManifestRef | None = None
    synthetic: dict[str, ManifestRef] = Field(default_factory=dict)


class GeneratorEntry(_Lenient):
    manifest: ManifestRef | None = None
    card_path: str | None = None
    card: dict[str, Any] | None = None


class MatrixProtocol(_Lenient):
    name: str = ""
    path: str | None = None
    regimes: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    backbone: str | None = None
    balance: str | None = None
    preset: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any] | None = None
    controls: dict[str, list[str]] = Field(default_factory=dict)
    tune: dict[str, Any] = Field(default_factory=dict)


class MatrixInfo(_Lenient):
    """`RUN/matrix.json`."""

    schema_version: int = SCHEMA_VERSION
    task: dict[str, Any] = Field(default_factory=dict)
    protocol: MatrixProtocol = Field(default_factory=MatrixProtocol)
    manifests: Manifests = Field(default_factory=Manifests)
    generators: dict[str, GeneratorEntry] = Field(default_factory=dict)
    runs: list[str] = Field(default_factory=list)
    updated: str | None = None
    environment: dict[str, Any] = Field(default_factory=dict)

    def real_manifest(self) -> ManifestRef | None:
        return self.manifests.real

    def synthetic_manifest(self, generator: str) -> ManifestRef | None:
        if generator in self.manifests.synthetic:
            return self.manifests.synthetic[generator]
        g = self.generators.get(generator)
        return g.manifest if g is not None else None


class RunConfig(_Lenient):
    """`RUN/<run>/config.json`: everything that decided how one run trained."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    identity: str | None = None
    task: dict[str, Any] = Field(default_factory=dict)
    generator: str
    regime: str
    seed: int
    backbone: str
    manifests: dict[str, Any] = Field(default_factory=dict)
    preset: dict[str, Any] = Field(default_factory=dict)
    protocol: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    tuning: dict[str, Any] | None = None
    environment: dict[str, Any] = Field(default_factory=dict)


def _read_model(path: Path, model: type[BaseModel]) -> Any:
    try:
        raw = read_json(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise BadInput(f"{path}: invalid {model.__name__}", pydantic_problems(e)) from None


@dataclass(frozen=True)
class RunFolder:
    """One run of the matrix: `RUN/<generator>__<regime>__<backbone>__seed<k>/`."""

    path: Path
    name: RunName

    @property
    def done(self) -> bool:
        return (self.path / DONE).is_file()

    @property
    def finished(self) -> bool:
        """DONE and predictions (or a segmentation run's count table) present: what evaluation and submission read."""
        return self.done and (self.predictions.is_file() or self.seg_predictions.is_file())

    @property
    def done_marker(self) -> Path:
        """Written last into a run folder that is still under its temporary name."""
        return self.path / DONE

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def seg_predictions(self) -> Path:
        return self.path / SEG_PREDICTIONS_FILE

    @property
    def labelmaps(self) -> Path:
        return self.path / LABELMAPS_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def composition(self) -> Path:
        return self.path / COMPOSITION_FILE

    def config(self) -> RunConfig:
        return _read_model(self.config_path, RunConfig)


class RunDir:
    """A RUN folder: the matrix header and its run folders."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def task_file(self) -> Path:
        return self.path / TASK_FILE

    @property
    def matrix_file(self) -> Path:
        return self.path / MATRIX_FILE

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION_DIR

    @property
    def tuning_dir(self) -> Path:
        return self.path / TUNING_DIR

    @property
    def tuning_db(self) -> Path:
        return self.path / TUNING_DB

    @property
    def wandb_dir(self) -> Path:
        return self.path / WANDB_DIR

    def tuning_file(self, key: str) -> Path:
        return self.tuning_dir / f"{key}.json"

    def card_file(self, generator: str) -> Path:
        return self.path / GENERATORS_DIR / generator / CARD_FILE

    def privacy_dir(self, generator: str) -> Path:
        return self.path / PRIVACY_DIR / generator

    def privacy_file(self, generator: str) -> Path:
        return self.privacy_dir(generator) / PRIVACY_FILE

    @property
    def model_privacy_dir(self) -> Path:
        return self.path / MODEL_PRIVACY_DIR

    @property
    def model_privacy_file(self) -> Path:
        return self.model_privacy_dir / MODEL_PRIVACY_FILE

    def fidelity_dir(self, generator: str) -> Path:
        return self.path / FIDELITY_DIR / generator

    def fidelity_file(self, generator: str) -> Path:
        return self.fidelity_dir(generator) / FIDELITY_FILE

    def fidelity_files(self) -> dict[str, Path]:
        """Every generator's `fidelity.json` present in the run, by generator name."""
        root = self.path / FIDELITY_DIR
        if not root.is_dir():
            return {}
        return {d.name: d / FIDELITY_FILE for d in sorted(root.iterdir()) if (d / FIDELITY_FILE).is_file()}

    def run(self, name: RunName | str) -> RunFolder:
        rn = name if isinstance(name, RunName) else RunName.parse(name)
        return RunFolder(self.path / str(rn), rn)

    def partials(self, name: RunName | str) -> list[Path]:
        """Temporary folders a killed run left behind (`.<name>.*`)."""
        prefix = f".{name}."
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name.startswith(prefix))

    def iter_runs(self) -> Iterator[RunFolder]:
        """Every sub-folder whose name parses as a run, finished or not, sorted by name."""
        if not self.path.is_dir():
            return
        for d in sorted(self.path.iterdir()):
            rn = RunName.try_parse(d.name) if d.is_dir() else None
            if rn is not None:
                yield RunFolder(d, rn)

    def finished_runs(self) -> list[RunFolder]:
        """Run folders with DONE and a predictions file (or count table), sorted by name."""
        return [r for r in self.iter_runs() if r.finished]

    def baseline_runs(self, seed: int | None = None) -> list[RunFolder]:
        return [
            r
            for r in self.finished_runs()
            if r.name.is_baseline
            and r.name.regime_slug == BASELINE_REGIME
            and (seed is None or r.name.seed == seed)
        ]

    def matrix(self) -> MatrixInfo:
        return _read_model(self.matrix_file, MatrixInfo)

    def require(self) -> RunDir:
        """Bad input unless this is a run folder holding its task."""
        if not self.path.is_dir():
            raise BadInput(f"{self.path}: not a run folder")
        if not self.task_file.is_file():
            raise BadInput(f"{self.path}: no {TASK_FILE} (a run folder holds the task it ran)")
        return self
