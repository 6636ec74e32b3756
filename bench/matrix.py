"""The protocol matrix: task x generators x regimes x seeds x backbone, one folder per run, resumable.

```
RUN/task.yaml                 the resolved task (bench.tasks.load_task reads it)
RUN/matrix.json               protocol, settings, manifests (path + sha256), generators and their cards, run ids
RUN/generators/<name>/card.json
RUN/tuning.db, RUN/tuning/    optuna studies (SQLite by default) and each study's chosen parameters
RUN/wandb/                    offline Weights & Biases runs
RUN/<generator>__<regime>__<backbone>__seed<k>/
    config.json composition.json predictions.parquet metrics.json checkpoint.pt history.csv DONE
```

A run folder is built in a temporary folder beside it and renamed into place with `DONE` already inside, so a run
killed at any moment leaves either a complete, DONE-marked folder or none. Re-running the same command skips DONE
runs; each run depends only on its own seed, so a resumed matrix gives the predictions an uninterrupted one would.
Model selection and early stopping see the validation split of the training sites only; the internal test split
and the external sites are predicted once, at the end.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.errors import BadInput
from bench.io import atomic_dir, read_json, sha256_file, write_json, write_table, write_text
from bench.manifest import Manifest, read_manifest, validate_manifest
from bench.regimes import Regime, compose, expand_regimes
from bench.tasks import Task, load_task
from bench.tune import TuneSpec, default_storage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BASELINE = "none"
EVAL_SPLITS = ("val", "test", "external")
DONE = "DONE"
GENERATOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# -- presets and protocols ---------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSettings(_Strict):
    """Everything that decides how one run trains (besides data, regime and seed)."""

    backbone: str | None = Field(None, description="model name; None = the task protocol's backbone")
    image_size: int | None = Field(None, ge=8, le=2048, description="None = the task's size for this preset")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    aug_strength: float = Field(0.5, ge=0)
    patience: int | None = Field(None, ge=1, description="early stopping on validation AUROC; None = off")
    pretrain_epochs: int | None = Field(
        None, ge=1, description="synthetic stage of `pretrain`; None = epochs"
    )
    device: str = "auto"


class Preset(TrainSettings):
    name: str = ""
    description: str = ""


class TrainOverrides(_Strict):
    backbone: str | None = None
    image_size: int | None = Field(None, ge=8, le=2048)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    aug_strength: float | None = Field(None, ge=0)
    patience: int | None = Field(None, ge=1)
    pretrain_epochs: int | None = Field(None, ge=1)


class Protocol(_Strict):
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
    tune: TuneSpec = TuneSpec()


def _config_roots() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [d for d in (here.parent / "configs", here / "_configs") if d.is_dir()]


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


def _load_yaml_model(path: Path, model: type[BaseModel], what: str) -> Any:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: a {what} must be a mapping of fields, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        from bench.tasks import _pydantic_problems

        raise BadInput(f"{path}: invalid {what}", problems=_pydantic_problems(e)) from e


def load_preset(ref: str | Path) -> tuple[Preset, Path]:
    path = _find_config("preset", ref)
    preset = _load_yaml_model(path, Preset, "training preset")
    if not preset.name:
        preset = preset.model_copy(update={"name": path.stem})
    return preset, path


def load_protocol(ref: str | Path) -> tuple[Protocol, Path]:
    path = _find_config("protocol", ref)
    proto = _load_yaml_model(path, Protocol, "protocol")
    if not proto.name:
        proto = proto.model_copy(update={"name": path.stem})
    return proto, path


def default_preset_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


# -- inputs ------------------------------------------------------------------------------------------------------


def parse_synthetic_args(items: list[str] | None) -> dict[str, Path]:
    """`NAME=MANIFEST` items -> {name: path}; names become folder names, so they are kept file-system safe."""
    out: dict[str, Path] = {}
    for item in items or []:
        if "=" not in item:
            raise BadInput(f"--synthetic {item!r}: expected NAME=MANIFEST")
        name, path = (s.strip() for s in item.split("=", 1))
        if not GENERATOR_NAME.match(name) or name == BASELINE:
            raise BadInput(
                f"--synthetic {item!r}: generator name {name!r} must match {GENERATOR_NAME.pattern} and not be "
                f"{BASELINE!r} (the real-only baseline)"
            )
        if name in out:
            raise BadInput(f"--synthetic {item!r}: generator name {name!r} given twice")
        out[name] = Path(path)
    return out


def load_real(path: str | Path, task: Task) -> Manifest:
    from bench.manifest import load_valid_manifest

    m = load_valid_manifest(path, task, check_images=False)
    df = m.df
    syn = df.index[df["origin"] != "real"]
    if len(syn):
        raise BadInput(
            f"{path}: the real manifest holds {len(syn)} row(s) of origin other than 'real' (rows "
            f"{', '.join(map(str, syn[:10]))}); pass synthetic images with --synthetic NAME=MANIFEST"
        )
    for split in ("train", "val"):
        if not (df["split"] == split).any():
            raise BadInput(f"{path}: the real manifest has no rows in the {split!r} split (column 'split')")
    return m


def find_card_file(manifest: Path) -> Path | None:
    from bench.generators.card import card_path_for

    cands = list(card_path_for(manifest)) + [manifest.with_name("card.json"), manifest.with_name("card.yml")]
    return next((p for p in cands if p.is_file()), None)


def load_synthetic(
    name: str, path: str | Path, task: Task, real: Manifest
) -> tuple[Manifest, dict | None, Path | None]:
    """Read and check one synthetic manifest and its card; every problem found is bad input (exit 2)."""
    from bench.generators.card import hash_id, read_card

    path = Path(path)
    m = read_manifest(path)
    df = m.df
    problems: list[str] = []
    if "origin" in df.columns:
        bad = df.index[df["origin"].astype(str) == "real"]
        if len(bad):
            problems.append(
                f"column 'origin': {len(bad)} row(s) of origin 'real' in a synthetic manifest (rows "
                f"{', '.join(map(str, bad[:20]))}{', ...' if len(bad) > 20 else ''})"
            )
    problems += [
        p
        for p in validate_manifest(m, task, check_images=False, allow_origins=("synthetic",))
        if not p.startswith("column 'origin': must be one of")
    ]
    if problems:
        raise BadInput(
            f"{path}: synthetic manifest for generator {name!r}: {len(problems)} problem(s)", problems
        )

    card_path = find_card_file(path)
    card: dict | None = None
    if card_path is None:
        log.warning(
            "%s: no generator card beside the synthetic manifest; its provenance is not checked", path
        )
        return m, None, None
    card = read_card(card_path).to_dict()
    training = card.get("training") or {}
    ext = sorted(set(map(str, training.get("sites") or [])) & set(task.sites.external))
    if ext:
        problems.append(
            f"field 'training.sites': the generator was trained on data from external site(s) {ext}; external "
            "sites must stay unseen"
        )
    bad_splits = sorted(set(map(str, training.get("splits") or [])) - {"train"})
    if bad_splits:
        problems.append(
            f"field 'training.splits': the generator was trained on split(s) {bad_splits}; only 'train'"
        )
    hashed = set(map(str, training.get("patients") or []))
    if hashed:
        rdf = real.df
        held = rdf[rdf["split"].isin(EVAL_SPLITS)]
        leaked = held[held["patient_id"].map(hash_id).isin(hashed)]
        if len(leaked):
            by_split = leaked.groupby("split")["patient_id"].nunique().to_dict()
            problems.append(
                f"field 'training.patients': the generator was trained on {leaked['patient_id'].nunique()} patient(s) "
                f"of the real manifest's held-out splits {by_split}; its synthetic images would leak them"
            )
    if problems:
        raise BadInput(f"{card_path}: generator card of {name!r} shows contamination", problems)
    return m, card, card_path


# -- planning ----------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    run_id: str
    generator: str
    regime: str
    seed: int
    backbone: str
    settings: dict[str, Any]
    identity: str
    tuning_key: str | None = None
    tuning: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_id(generator: str, regime: Regime, backbone: str, seed: int) -> str:
    return f"{generator}__{regime.slug}__{backbone}__seed{seed}"


def study_key(generator: str, regime: Regime, backbone: str) -> str:
    return f"{generator}__{regime.slug}__{backbone}"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _git_hash() -> str | None:
    """The source tree's commit, read from .git without running git."""
    here = Path(__file__).resolve().parent.parent
    git = here / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


def environment(device: str | None = None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    pkgs = {}
    for p in (
        "medsynbench",
        "torch",
        "torchvision",
        "timm",
        "monai",
        "numpy",
        "pandas",
        "scikit-learn",
        "optuna",
        "wandb",
        "pydicom",
    ):
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pkgs[p] = None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "git": _git_hash(),
    }
    if str(dev).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def default_threads(workers: int) -> int:
    """CPU threads per run: 1 unless each worker has more than two cores to itself.

    Measured on a 2-core machine shared with other jobs: two intra-op threads per run made training about five
    times slower than one, because the threads wait on each other whenever another process takes a core. Use
    `--workers` to fill the cores with runs instead.
    """
    per = (os.cpu_count() or 1) // max(1, workers)
    return per if per > 2 else 1


@dataclass
class MatrixPlan:
    task: Task
    out: Path
    ctx: dict[str, Any]
    runs: list[RunSpec]
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    matrix: dict[str, Any] = field(default_factory=dict)
    cards: dict[str, tuple[dict | None, Path | None]] = field(default_factory=dict)


def plan_matrix(
    task: str | Path | Task,
    real: str | Path,
    out: str | Path,
    *,
    synthetic: dict[str, str | Path] | None = None,
    protocol: str | Path | None = None,
    regimes: list[str] | None = None,
    seeds: list[int] | None = None,
    backbone: str | None = None,
    preset: str | Path | None = None,
    epochs: int | None = None,
    tune: int | None = None,
    storage: str | None = None,
    wandb: str = "offline",
    cache_dir: str | Path | None = None,
    skip_corrupt: bool = False,
    workers: int = 1,
    threads: int | None = None,
    device: str | None = None,
) -> MatrixPlan:
    """Resolve every input and setting into the list of runs (nothing is trained or written)."""
    from bench.models import model_info
    from bench.tracking import check_mode

    check_mode(wandb)
    task = load_task(task)
    out = Path(out).resolve()
    proto, proto_path = load_protocol(protocol) if protocol else (Protocol(), None)
    preset_ref = preset or proto.preset or default_preset_name()
    pre, preset_path = load_preset(preset_ref)

    regime_list = expand_regimes(
        list(regimes or proto.regimes or task.protocol.regimes), proto.ratios or task.protocol.ratios
    )
    seed_list = [int(s) for s in (seeds if seeds is not None else proto.seeds or task.protocol.seeds)]
    if not regime_list:
        raise BadInput("no regimes to run (give --regimes or a protocol with `regimes`)")
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise BadInput(f"seeds {seed_list}: give at least one seed, each once")

    base = pre.model_dump(exclude={"name", "description"})
    base.update({k: v for k, v in proto.train.model_dump().items() if v is not None})
    if epochs is not None:
        if epochs < 1:
            raise BadInput(f"--epochs {epochs}: must be at least 1")
        base["epochs"] = int(epochs)
    if device is not None:
        base["device"] = device
    bb = backbone or proto.backbone or proto.train.backbone or pre.backbone or task.protocol.backbone
    model_info(bb)
    base["backbone"] = bb
    # An explicit size in the protocol wins; otherwise the task's own size for this preset, then the preset's.
    if proto.train.image_size is not None:
        size = proto.train.image_size
    elif pre.name in task.image.presets:
        size = task.image.presets[pre.name]
    else:
        size = pre.image_size or task.image.size
    base["image_size"] = int(size)
    settings = TrainSettings.model_validate(base).model_dump()

    tune_spec = proto.tune
    if tune is not None:
        if tune < 0:
            raise BadInput(f"--tune {tune}: must be 0 or more trials")
        tune_spec = tune_spec.model_copy(update={"trials": int(tune)})
    tuning_on = tune_spec.trials > 0
    storage_url = storage or default_storage(out)

    real_m = load_real(real, task)
    syn_paths = {k: Path(v) for k, v in (synthetic or {}).items()}
    needs = [r.name for r in regime_list if r.uses_synthetic]
    if needs and not syn_paths:
        raise BadInput(f"regime(s) {needs} need synthetic data: give --synthetic NAME=MANIFEST")
    syn_m: dict[str, Manifest] = {}
    cards: dict[str, tuple[dict | None, Path | None]] = {}
    for name, p in syn_paths.items():
        m, card, cpath = load_synthetic(name, p, task, real_m)
        syn_m[name] = m
        cards[name] = (card, cpath)

    task_spec = task.spec()
    manifests = {
        "real": {
            "path": str(Path(real).resolve()),
            "sha256": real_m.sha256,
            "file_sha256": sha256_file(real),
        },
        "synthetic": {
            n: {"path": str(p.resolve()), "sha256": syn_m[n].sha256, "file_sha256": sha256_file(p)}
            for n, p in syn_paths.items()
        },
    }
    n_workers = max(1, int(workers))
    if threads is not None and threads < 1:
        raise BadInput(f"--threads {threads}: must be at least 1")
    ctx = {
        "out": str(out),
        "task_path": str(out / "task.yaml"),
        "task": {"name": task.name, "version": task.version, "sha256": _hash(task_spec)},
        "manifests": manifests,
        "preset": {"name": pre.name, "path": str(preset_path)},
        "protocol": {"name": proto.name, "path": str(proto_path) if proto_path else None},
        "balance": proto.balance,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "skip_corrupt": bool(skip_corrupt),
        "wandb": wandb,
        "threads": int(threads) if threads else default_threads(n_workers),
        "storage": storage_url,
        "tune": tune_spec.model_dump() if tuning_on else None,
    }

    runs: list[RunSpec] = []
    studies: dict[str, dict[str, Any]] = {}
    for seed in seed_list:
        for reg in regime_list:
            gens = list(syn_paths) if reg.uses_synthetic else [BASELINE]
            for gen in gens:
                ident = _hash(
                    {
                        "schema": SCHEMA_VERSION,
                        "task": task_spec,
                        "real": real_m.sha256,
                        "synthetic": syn_m[gen].sha256 if gen != BASELINE else None,
                        "settings": settings,
                        "balance": proto.balance,
                        "regime": reg.name,
                        "seed": seed,
                        "generator": gen,
                        "tune": ctx["tune"],
                    }
                )
                skey = study_key(gen, reg, bb) if tuning_on else None
                if skey and skey not in studies:
                    studies[skey] = {
                        "key": skey,
                        "generator": gen,
                        "regime": reg.name,
                        "backbone": bb,
                        "settings": settings,
                    }
                runs.append(
                    RunSpec(run_id(gen, reg, bb, seed), gen, reg.name, seed, bb, settings, ident, skey)
                )

    matrix = {
        "schema_version": SCHEMA_VERSION,
        "task": {"name": task.name, "version": task.version, "file": "task.yaml"},
        "protocol": {
            "name": proto.name,
            "path": str(proto_path) if proto_path else None,
            "regimes": [r.name for r in regime_list],
            "seeds": seed_list,
            "backbone": bb,
            "balance": proto.balance,
            "preset": pre.name,
            "settings": settings,
            "tune": {"trials": tune_spec.trials, **(ctx["tune"] or {})} if tuning_on else {"trials": 0},
        },
        "manifests": manifests,
        "generators": {
            n: {
                "manifest": manifests["synthetic"][n],
                "card_path": str(cards[n][1]) if cards[n][1] else None,
                "card": cards[n][0],
            }
            for n in syn_paths
        },
        "runs": [r.run_id for r in runs],
    }
    return MatrixPlan(task, out, ctx, runs, studies, matrix, cards)


# -- one run -----------------------------------------------------------------------------------------------------

_DATA: dict[tuple, Any] = {}


class _Data:
    """A manifest and its decoded images; loaded once per process and reused by every run in it."""

    def __init__(self, path: str, task: Task, size: int, cache_dir: str | None, skip_corrupt: bool):
        from bench.imaging import build_cache

        self.m = read_manifest(path)
        self.cache = build_cache(
            self.m,
            task,
            size=size,
            cache_dir=Path(cache_dir) if cache_dir else None,
            skip_corrupt=skip_corrupt,
            progress=False,
        )
        df = self.m.df
        if self.cache.skipped:
            df = df[self.cache.contains(df["case_id"])]
        self.df = df.reset_index(drop=True)
        self.images = self.cache.images

    def take(self, case_ids: pd.Series) -> np.ndarray:
        return np.asarray(self.images[self.cache.rows(case_ids.astype(str))])


def _data(path: str, task: Task, size: int, ctx: dict[str, Any]) -> _Data:
    key = (path, task.name, task.version, size, ctx.get("cache_dir"), ctx.get("skip_corrupt"))
    if key not in _DATA:
        _DATA[key] = _Data(path, task, size, ctx.get("cache_dir"), bool(ctx.get("skip_corrupt")))
    return _DATA[key]


def _images_for(rows: pd.DataFrame, real: _Data, syn: _Data | None) -> np.ndarray:
    is_syn = (rows["origin"] == "synthetic").to_numpy()
    x = np.empty((len(rows), *real.images.shape[1:]), dtype=np.uint8)
    if (~is_syn).any():
        x[~is_syn] = real.take(rows.loc[~is_syn, "case_id"])
    if is_syn.any():
        assert syn is not None
        x[is_syn] = syn.take(rows.loc[is_syn, "case_id"])
    return x


def _labels(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return rows["label"].astype(str).map(index).to_numpy(dtype=np.int64)


def train_regime(
    ctx: dict[str, Any],
    task: Task,
    generator: str,
    regime: str,
    seed: int,
    settings: dict[str, Any],
    *,
    on_epoch=None,
    progress: Any = False,
):
    """Compose the regime's training set and train on it; returns (model, history rows, composition, data)."""
    from bench.train import fit

    size = int(settings["image_size"])
    real = _data(ctx["manifests"]["real"]["path"], task, size, ctx)
    syn = (
        _data(ctx["manifests"]["synthetic"][generator]["path"], task, size, ctx)
        if generator != BASELINE
        else None
    )
    classes = task.classes
    train_df = real.df[(real.df["split"] == "train") & real.df["site"].isin(task.sites.train)]
    val_df = real.df[(real.df["split"] == "val") & real.df["site"].isin(task.sites.train)]
    rows, comp = compose(
        regime, train_df, syn.df if syn else None, seed, classes=classes, balance=ctx["balance"]
    )
    x_val, y_val = real.take(val_df["case_id"]), _labels(val_df, classes)
    common = dict(
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        batch_size=settings["batch_size"],
        aug_strength=settings["aug_strength"],
        seed=seed,
        device=settings["device"],
        num_classes=len(classes),
        patience=settings["patience"],
        progress=progress,
    )
    history: list[dict[str, Any]] = []
    init = None
    stages = ["pretrain", "finetune"] if (rows["stage"] == "pretrain").any() else ["train"]
    model = None
    for stage in stages:
        part = rows[rows["stage"] == stage]
        epochs = (
            (settings["pretrain_epochs"] or settings["epochs"]) if stage == "pretrain" else settings["epochs"]
        )

        def cb(rec: dict[str, Any], stage: str = stage) -> None:
            if on_epoch is not None:
                on_epoch({**rec, "stage": stage})

        model, hist = fit(
            settings["backbone"],
            _images_for(part, real, syn),
            _labels(part, classes),
            x_val,
            y_val,
            epochs=int(epochs),
            init=init,
            on_epoch=cb,
            label=stage,
            **common,
        )
        history += [{"stage": stage, **h} for h in hist]
        init = model
    return model, history, comp, real


def _metrics(preds: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    from bench.train import macro_auroc

    prob_cols = [f"prob_{c}" for c in classes]
    index = {c: i for i, c in enumerate(classes)}

    def score(df: pd.DataFrame) -> dict[str, Any]:
        y = df["y_true"].map(index).to_numpy()
        auc = macro_auroc(y, df[prob_cols].to_numpy()) if len(df) else float("nan")
        return {
            "auroc_macro": None if np.isnan(auc) else auc,
            "n_cases": int(len(df)),
            "n_patients": int(df["patient_id"].nunique()),
        }

    splits = {s: score(preds[preds["split"] == s]) for s in EVAL_SPLITS if (preds["split"] == s).any()}
    ext = preds[preds["split"] == "external"]
    sites = {str(s): score(g) for s, g in ext.groupby("site", sort=True)}
    return {
        "primary": "auroc_macro",
        "auroc_macro": {s: v["auroc_macro"] for s, v in splits.items()},
        "splits": splits,
        "external_sites": sites,
    }


def predictions_frame(
    task: Task,
    eval_df: pd.DataFrame,
    prob: np.ndarray,
    *,
    generator: str,
    regime: str,
    seed: int,
    backbone: str,
) -> pd.DataFrame:
    """The predictions contract: one row per case, subgroup columns, y_true, prob_<class>, run keys."""
    df = task.add_subgroup_columns(eval_df.reset_index(drop=True))
    cols = ["case_id", "patient_id", "site", "split"]
    subgroup = [c for c in ["sex", "age", "age_group", *task.subgroups.columns] if c in df.columns]
    subgroup = list(dict.fromkeys(subgroup))
    out = df[cols + subgroup].copy()
    for c in cols:
        out[c] = out[c].astype(str)
    out["y_true"] = df["label"].astype(str)
    for k, c in enumerate(task.classes):
        out[f"prob_{c}"] = prob[:, k]
    out["generator"] = generator
    out["regime"] = regime
    out["seed"] = np.int64(seed)
    out["backbone"] = backbone
    return out


def _clean_partial(out: Path, rid: str) -> None:
    for p in glob.glob(str(out / f".{glob.escape(rid)}.*")):
        shutil.rmtree(p, ignore_errors=True)


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


def _with_threads(fn):
    """Run `fn` with the matrix's CPU thread count, restoring the caller's afterwards (runs may be in-process)."""
    import functools

    @functools.wraps(fn)
    def wrapper(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(int(ctx.get("threads") or 1))
        try:
            return fn(ctx, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


@_with_threads
def execute_run(ctx: dict[str, Any], spec: dict[str, Any], progress: Any = False) -> dict[str, Any]:
    """Train, predict and write one run folder (atomically, DONE inside). Top-level so executors can ship it."""
    import torch

    from bench.tracking import Tracker
    from bench.train import predict_proba, save_checkpoint

    t0 = time.perf_counter()
    out = Path(ctx["out"])
    rid = spec["run_id"]
    final = out / rid
    if is_done(final):
        return {"run_id": rid, "skipped": True}
    _clean_partial(out, rid)
    task = load_task(ctx["task_path"])
    settings = dict(spec["settings"])
    if spec.get("tuning"):
        settings.update(spec["tuning"]["best_params"])
    gen = spec["generator"]
    config = {
        "schema_version": SCHEMA_VERSION,
        "run_id": rid,
        "identity": spec["identity"],
        "task": ctx["task"],
        "generator": gen,
        "regime": spec["regime"],
        "seed": spec["seed"],
        "backbone": spec["backbone"],
        "manifests": {
            "real": ctx["manifests"]["real"],
            "synthetic": ctx["manifests"]["synthetic"].get(gen) if gen != BASELINE else None,
        },
        "preset": ctx["preset"],
        "protocol": ctx["protocol"],
        "balance": ctx["balance"],
        "image": {"size": settings["image_size"], "channels": task.image.channels},
        "train": settings,
        "tuning": spec.get("tuning"),
        "selection": {"metric": "val_auroc_macro", "split": "val", "sites": list(task.sites.train)},
        "environment": environment(str(settings["device"]) if settings["device"] != "auto" else None),
    }
    tracker = Tracker(
        ctx["wandb"],
        out / "wandb",
        name=rid,
        group=f"{task.name}/{gen}",
        config=config,
        tags=[spec["regime"], f"seed{spec['seed']}", spec["backbone"]],
    )
    try:
        model, history, comp, real = train_regime(
            ctx,
            task,
            gen,
            spec["regime"],
            int(spec["seed"]),
            settings,
            on_epoch=lambda rec: tracker.log_epoch(rec),
            progress=progress,
        )
        eval_df = real.df[real.df["split"].isin(EVAL_SPLITS)]
        order = {s: i for i, s in enumerate(EVAL_SPLITS)}
        eval_df = eval_df.iloc[np.argsort(eval_df["split"].map(order).to_numpy(), kind="stable")]
        prob = predict_proba(model, real.take(eval_df["case_id"]), settings["device"])
        preds = predictions_frame(
            task,
            eval_df,
            prob,
            generator=gen,
            regime=spec["regime"],
            seed=int(spec["seed"]),
            backbone=spec["backbone"],
        )
        metrics = _metrics(preds, task.classes)
        best = next((h for h in reversed(history) if h.get("selected")), history[-1])
        train_s = sum(h["train_seconds"] for h in history)
        n_img = sum(h["images_per_second"] * h["train_seconds"] for h in history)
        metrics.update(
            run_id=rid,
            generator=gen,
            regime=spec["regime"],
            seed=int(spec["seed"]),
            backbone=spec["backbone"],
            best_epoch=int(best["epoch"]),
            epochs_run=len(history),
            timing={
                "train_seconds": train_s,
                "train_images_per_second": n_img / train_s if train_s > 0 else None,
                "total_seconds": time.perf_counter() - t0,
            },
        )
        config["environment"]["torch_threads"] = torch.get_num_threads()
        with atomic_dir(final, overwrite=True) as tmp:
            write_json(tmp / "config.json", config)
            write_json(tmp / "composition.json", comp)
            write_table(tmp / "predictions.parquet", preds)
            write_table(tmp / "history.csv", pd.DataFrame(history))
            save_checkpoint(
                tmp / "checkpoint.pt",
                model,
                {
                    "run_id": rid,
                    "task": ctx["task"],
                    "classes": task.classes,
                    "image": config["image"],
                    "generator": gen,
                    "regime": spec["regime"],
                    "seed": int(spec["seed"]),
                },
            )
            write_json(tmp / "metrics.json", metrics)
            # Written last, inside the temporary folder, so the folder appears complete and DONE together.
            write_text(tmp / DONE, _dt.datetime.now(_dt.timezone.utc).isoformat() + "\n")
        tracker.finish(metrics)
    except BaseException:
        tracker.abort()
        raise
    return {"run_id": rid, "skipped": False, "metrics": metrics, "seconds": time.perf_counter() - t0}


@_with_threads
def execute_study(ctx: dict[str, Any], study: dict[str, Any], progress: Any = False) -> dict[str, Any]:
    """Run (or resume) one tuning study and store its result in RUN/tuning/<key>.json."""
    from bench.tune import run_study

    out = Path(ctx["out"])
    path = out / "tuning" / f"{study['key']}.json"
    if path.is_file():
        return read_json(path)
    spec = TuneSpec.model_validate(ctx["tune"])
    task = load_task(ctx["task_path"])

    def objective(params: dict[str, float], report) -> float:
        settings = {**study["settings"], **params}
        _, history, _, _ = train_regime(
            ctx,
            task,
            study["generator"],
            study["regime"],
            spec.seed,
            settings,
            on_epoch=lambda rec: report(
                int(rec["epoch"]) + (0 if rec["stage"] != "finetune" else 10_000),
                float(rec["val_auroc_macro"]),
            ),
            progress=progress,
        )
        last = [h for h in history if h["stage"] != "pretrain"]
        best = max(
            (h["val_auroc_macro"] for h in last if not np.isnan(h["val_auroc_macro"])), default=float("nan")
        )
        return best

    name = f"{ctx['task']['name']}-{ctx['task']['version']}__{study['key']}"
    result = run_study(name, ctx["storage"], spec, objective)
    write_json(path, result)
    return result


# -- the matrix --------------------------------------------------------------------------------------------------


@dataclass
class MatrixResult:
    out: Path
    total: int
    done: int
    skipped: int
    seconds: float
    runs: list[dict[str, Any]]


def _check_existing(plan: MatrixPlan, resume: bool) -> None:
    out = plan.out
    if resume and not (out / "matrix.json").is_file():
        raise BadInput(f"--resume {out}: no matrix to resume there (matrix.json missing)")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    conflicts = []
    for r in plan.runs:
        cfg = out / r.run_id / "config.json"
        if is_done(out / r.run_id) and cfg.is_file():
            old = read_json(cfg).get("identity")
            if old != r.identity:
                conflicts.append(r.run_id)
    if conflicts:
        raise BadInput(
            f"--out {out}: {len(conflicts)} finished run(s) were made with other inputs or settings (task, "
            "manifests, preset, epochs, tuning budget ...); use a new --out folder or delete them",
            conflicts[:20],
        )


def _write_header(plan: MatrixPlan) -> None:
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "task.yaml", yaml.safe_dump(plan.task.spec(), sort_keys=False, allow_unicode=True))
    matrix = dict(plan.matrix)
    old_path = out / "matrix.json"
    if old_path.is_file():
        # The same RUN folder may grow (another generator, more seeds): keep what earlier invocations recorded.
        old = read_json(old_path)
        gens = dict(old.get("generators") or {})
        gens.update(matrix["generators"])
        matrix["generators"] = gens
        matrix["manifests"] = {
            "real": matrix["manifests"]["real"],
            "synthetic": {
                **(old.get("manifests", {}).get("synthetic") or {}),
                **matrix["manifests"]["synthetic"],
            },
        }
        matrix["runs"] = list(dict.fromkeys(list(old.get("runs") or []) + matrix["runs"]))
    matrix["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    matrix["environment"] = environment()
    write_json(old_path, matrix)
    for name, (card, _path) in plan.cards.items():
        if card is not None:
            write_json(out / "generators" / name / "card.json", card)


def _prepare_caches(plan: MatrixPlan, progress: bool) -> None:
    """Decode every manifest once in this process, so workers only open the finished caches."""
    from bench.imaging import build_cache

    size = int(plan.runs[0].settings["image_size"])
    cache_dir = Path(plan.ctx["cache_dir"]) if plan.ctx["cache_dir"] else None
    for m in [
        plan.ctx["manifests"]["real"]["path"],
        *[v["path"] for v in plan.ctx["manifests"]["synthetic"].values()],
    ]:
        build_cache(
            read_manifest(m),
            plan.task,
            size=size,
            cache_dir=cache_dir,
            skip_corrupt=plan.ctx["skip_corrupt"],
            progress=progress,
        )


def run_matrix(
    task: str | Path | Task,
    real: str | Path,
    out: str | Path,
    *,
    synthetic: dict[str, str | Path] | None = None,
    protocol: str | Path | None = None,
    regimes: list[str] | None = None,
    seeds: list[int] | None = None,
    backbone: str | None = None,
    preset: str | Path | None = None,
    epochs: int | None = None,
    tune: int | None = None,
    storage: str | None = None,
    executor: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    wandb: str = "offline",
    resume: bool = False,
    cache_dir: str | Path | None = None,
    skip_corrupt: bool = False,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> MatrixResult:
    """Plan, tune (if asked) and run every run of the matrix that is not DONE yet."""
    from bench.executors import check_executor, make_executor

    t0 = time.perf_counter()
    plan = plan_matrix(
        task,
        real,
        out,
        synthetic=synthetic,
        protocol=protocol,
        regimes=regimes,
        seeds=seeds,
        backbone=backbone,
        preset=preset,
        epochs=epochs,
        tune=tune,
        storage=storage,
        wandb=wandb,
        cache_dir=cache_dir,
        skip_corrupt=skip_corrupt,
        workers=workers,
        threads=threads,
        device=device,
    )
    check_executor(executor, workers, ray_address)
    _check_existing(plan, resume)
    # Caches first: a corrupt image must fail the command before anything is written into RUN.
    _prepare_caches(plan, progress)
    _write_header(plan)
    ex = make_executor(executor, workers=workers, ray_address=ray_address)

    pending = [r for r in plan.runs if not is_done(plan.out / r.run_id)]
    n_skip = len(plan.runs) - len(pending)
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    console.print(
        f"matrix {plan.out}: {len(plan.runs)} runs ({n_skip} already done, {len(pending)} to run), "
        f"preset {plan.ctx['preset']['name']}, backbone {plan.runs[0].backbone}, executor {executor}"
    )
    results: list[dict[str, Any]] = []
    with _RunProgress(progress, len(plan.runs), n_skip, console) as bar:
        # Tuning first, only for studies whose runs are still pending: every run of a (generator, regime) then uses
        # the same chosen parameters.
        needed = {r.tuning_key for r in pending if r.tuning_key}
        studies = [plan.studies[k] for k in plan.studies if k in needed]
        tuned: dict[str, dict[str, Any]] = {}
        if studies:
            bar.note(f"tuning {len(studies)} studies x {plan.ctx['tune']['trials']} trials")
            for study, res in ex.map(execute_study, plan.ctx, studies, progress=bar.inner):
                tuned[study["key"]] = res
                bar.note(f"tuned {study['key']}: {res['best_params']} (val AUROC {res['best_value']:.3f})")
        specs = []
        for r in pending:
            d = r.to_dict()
            if r.tuning_key:
                d["tuning"] = tuned[r.tuning_key]
            specs.append(d)
        try:
            for spec, res in ex.map(execute_run, plan.ctx, specs, progress=bar.inner):
                results.append(res)
                bar.run_done(spec["run_id"], res)
        finally:
            ex.shutdown()
    done = sum(is_done(plan.out / r.run_id) for r in plan.runs)
    return MatrixResult(plan.out, len(plan.runs), done, n_skip, time.perf_counter() - t0, results)


class _RunProgress:
    """Runs done / total with an ETA; epoch bars of in-process runs nest inside."""

    def __init__(self, enabled: bool, total: int, done: int, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.p = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            if enabled
            else None
        )
        if self.p is not None:
            self.task = self.p.add_task("runs", total=total, completed=done)

    @property
    def inner(self):
        return self.p if self.p is not None else False

    def __enter__(self) -> _RunProgress:
        if self.p is not None:
            self.p.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.stop()

    def note(self, text: str) -> None:
        self.console.print(text)

    def run_done(self, rid: str, res: dict[str, Any]) -> None:
        if self.p is not None:
            self.p.advance(self.task)
        m = res.get("metrics") or {}
        auc = m.get("auroc_macro") or {}
        parts = " ".join(f"{k} {v:.3f}" for k, v in auc.items() if v is not None)
        self.console.print(f"done {rid} {res.get('seconds', 0):.1f}s AUROC {parts}", soft_wrap=True)
