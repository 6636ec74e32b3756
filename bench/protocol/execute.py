"""One run and one tuning study: compose the regime's data, train, predict, write the run folder atomically.

`execute_run` and `execute_study` are top-level functions of plain arguments so the process-pool and Ray executors
can ship them. Nothing is kept between calls in module state: each call opens the images it needs through its own
`DataStore` (the on-disk image cache makes opening cheap), so a run's result never depends on what ran before it
in the same process.
"""

from __future__ import annotations

import datetime as _dt
import functools
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.imaging import build_cache
from bench.io import atomic_dir, read_json, write_json, write_table, write_text
from bench.labelmaps import save_labelmaps
from bench.manifest import read_manifest
from bench.metrics.core import auroc_macro
from bench.protocol.config import RunSettings
from bench.protocol.plan import MatrixContext, RunSpec, StudySpec, environment
from bench.protocol.segment import case_frame, seg_predictions_frame, seg_run_metrics
from bench.regimes import compose, training_budget
from bench.runfolder import PREDICTED_SPLITS, SCHEMA_VERSION, RunFolder
from bench.tasks import Task, load_task
from bench.threads import torch_threads
from bench.tracking import Tracker
from bench.tune import run_study

# What the validation rounds of a run report, per task kind; they choose no weights (`SELECTION`), only tuning and
# tracking read them.
VALIDATION_METRIC = "val_auroc_macro"
VALIDATION_METRICS = {"classification": VALIDATION_METRIC, "segmentation": "val_dice_macro"}
# Every arm of a comparison keeps the final weights of the same step budget: real validation labels must not choose
# among the checkpoints of a model that never saw a real label (docs/STATISTICS.md, "Which weights a run keeps").
SELECTION = {
    "rule": "last",
    "weights": "the final weights of the step budget",
    "validation": "val split of the training sites, scored every round for the history; it chooses nothing",
}


class ManifestImages:
    """A manifest and its decoded images (rows of images that could not be decoded are left out)."""

    def __init__(self, path: str, task: Task, size: int, cache_dir: str | None, skip_corrupt: bool):
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
        self.masks = self.cache.masks

    def take(self, case_ids: pd.Series) -> np.ndarray:
        return np.asarray(self.images[self.cache.rows(case_ids.astype(str))])

    def take_masks(self, case_ids: pd.Series) -> np.ndarray:
        """The cached label maps of `case_ids` (a segmentation task's manifest)."""
        if self.masks is None:
            raise BadInput(f"{self.m.path}: no masks for a segmentation task (manifest column mask_path)")
        return np.asarray(self.masks[self.cache.rows(case_ids.astype(str))])


class DataStore:
    """The manifests one executor call trains on, each opened once for that call (e.g. every trial of a study)."""

    def __init__(self, ctx: MatrixContext, task: Task):
        self.ctx = ctx
        self.task = task
        self._open: dict[tuple[str, int], ManifestImages] = {}

    def _get(self, path: str, size: int) -> ManifestImages:
        key = (path, size)
        if key not in self._open:
            self._open[key] = ManifestImages(path, self.task, size, self.ctx.cache_dir, self.ctx.skip_corrupt)
        return self._open[key]

    def real(self, size: int) -> ManifestImages:
        return self._get(str(self.ctx.real.path), size)

    def synthetic(self, generator: str, size: int) -> ManifestImages | None:
        ref = self.ctx.manifest(generator)
        return None if ref is None else self._get(str(ref.path), size)


def _images_for(
    rows: pd.DataFrame, real: ManifestImages, syn: ManifestImages | None, *, masks: bool = False
) -> np.ndarray:
    """The images (or, with `masks`, the label maps) of composed rows, each from its own manifest's cache."""
    is_syn = (rows["origin"] == "synthetic").to_numpy()
    shape = (real.masks if masks and real.masks is not None else real.images).shape[1:]
    x = np.empty((len(rows), *shape), dtype=np.uint8)
    for sel, src in ((~is_syn, real), (is_syn, syn)):
        if sel.any():
            assert src is not None
            ids = rows.loc[sel, "case_id"]
            x[sel] = src.take_masks(ids) if masks else src.take(ids)
    return x


def _labels(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return rows["label"].astype(str).map(index).to_numpy(dtype=np.int64)


def train_regime(
    data: DataStore,
    generator: str,
    regime: str,
    seed: int,
    settings: RunSettings,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Any = False,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any], ManifestImages]:
    """Compose the regime's training set and train on it; returns (model, history rows, composition, real data)."""
    # torch (bench.train, bench.train_seg): only in the process that trains
    from bench.train import FitSettings, fit
    from bench.train_seg import fit_segmenter

    task = data.task
    seg = task.is_segmentation
    real = data.real(settings.image_size)
    syn = data.synthetic(generator, settings.image_size)
    classes = task.classes
    train_df = real.df[(real.df["split"] == "train") & real.df["site"].isin(task.sites.train)]
    val_df = real.df[(real.df["split"] == "val") & real.df["site"].isin(task.sites.train)]
    rows, comp = compose(
        regime, train_df, syn.df if syn else None, seed, classes=classes, balance=data.ctx.balance
    )
    x_val = real.take(val_df["case_id"])
    y_val = real.take_masks(val_df["case_id"]) if seg else _labels(val_df, classes)
    # A segmenter's classes are the background and the mask classes, in label-map order.
    n_out = len(task.mask_classes) + 1 if seg else len(classes)
    train_fn = fit_segmenter if seg else fit
    # The budget comes from the real training split, the same for every regime of the protocol.
    budget = training_budget(
        len(train_df),
        settings.epochs,
        settings.batch_size,
        unit=settings.budget_unit,
        pretrain_epochs=settings.pretrain_epochs,
    )
    comp["budget"] = budget
    history: list[dict[str, Any]] = []
    init = None
    stages = ["pretrain", "finetune"] if (rows["stage"] == "pretrain").any() else ["train"]
    model = None
    for stage in stages:
        part = rows[rows["stage"] == stage]
        steps = budget["steps"]
        if steps is not None and len(stages) > 1:
            steps = budget["pretrain_split"][stage]
        fit_settings = FitSettings(
            backbone=settings.backbone,
            num_classes=n_out,
            epochs=(settings.pretrain_epochs or settings.epochs) if stage == "pretrain" else settings.epochs,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            batch_size=settings.batch_size,
            aug_strength=settings.aug_strength,
            seed=seed,
            device=settings.device,
            steps=steps,
            eval_every=budget["steps_per_real_epoch"] if steps is not None else None,
            select=SELECTION["rule"],
        )

        def cb(rec: dict[str, Any], stage: str = stage) -> None:
            if on_epoch is not None:
                on_epoch({**rec, "stage": stage})

        model, hist = train_fn(
            fit_settings,
            _images_for(part, real, syn),
            _images_for(part, real, syn, masks=True) if seg else _labels(part, classes),
            x_val,
            y_val,
            init=init,
            on_epoch=cb,
            progress=progress,
            label=stage,
        )
        history += [{"stage": stage, **h} for h in hist]
        init = model
    return model, history, comp, real


def _stage_ends(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last history record of each stage (its `step` is the stage's optimizer steps)."""
    last: dict[str, dict[str, Any]] = {}
    for h in history:
        last[h["stage"]] = h
    return list(last.values())


def run_metrics(preds: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """The quick per-run numbers of metrics.json: macro AUROC per split and per external site, no intervals."""
    prob_cols = [f"prob_{c}" for c in classes]
    index = {c: i for i, c in enumerate(classes)}

    def score(df: pd.DataFrame) -> dict[str, Any]:
        auc = auroc_macro(df["y_true"].map(index).to_numpy(), df[prob_cols].to_numpy())
        return {
            "auroc_macro": None if np.isnan(auc) else auc,
            "n_cases": int(len(df)),
            "n_patients": int(df["patient_id"].nunique()),
        }

    splits = {s: score(preds[preds["split"] == s]) for s in PREDICTED_SPLITS if (preds["split"] == s).any()}
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


def _with_threads(fn):
    """Run `fn` with the matrix's CPU thread count, restoring the caller's afterwards (runs may be in-process)."""

    @functools.wraps(fn)
    def wrapper(ctx: MatrixContext, *args: Any, **kwargs: Any) -> Any:
        with torch_threads(int(ctx.threads or 1)):
            return fn(ctx, *args, **kwargs)

    return wrapper


def _run_config(ctx: MatrixContext, task: Task, spec: RunSpec, settings: RunSettings) -> dict[str, Any]:
    syn = ctx.manifest(spec.generator)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": spec.run_id,
        "identity": spec.identity,
        "task": {"name": ctx.task.name, "version": ctx.task.version, "sha256": ctx.task.sha256},
        "generator": spec.generator,
        "regime": spec.regime,
        "seed": spec.seed,
        "backbone": spec.backbone,
        "manifests": {"real": ctx.real.model_dump(), "synthetic": syn.model_dump() if syn else None},
        "preset": {"name": ctx.preset.name, "path": ctx.preset.path},
        "protocol": {"name": ctx.protocol.name, "path": ctx.protocol.path},
        "balance": ctx.balance,
        "image": {"size": settings.image_size, "channels": task.image.channels},
        "train": settings.model_dump(),
        "tuning": spec.tuning,
        "selection": {**SELECTION, "sites": list(task.sites.train)},
        "environment": environment(settings.device if settings.device != "auto" else None),
    }


@_with_threads
def execute_run(ctx: MatrixContext, spec: RunSpec, progress: Any = False) -> dict[str, Any]:
    """Train, predict and write one run folder (atomically, DONE inside)."""
    import torch

    # torch (bench.train, bench.train_seg): only in the process that trains
    from bench.train import predict_proba, save_checkpoint
    from bench.train_seg import predict_labelmaps

    t0 = time.perf_counter()
    run_dir = ctx.run_dir
    rid = spec.run_id
    run = run_dir.run(rid)
    if run.done:
        return {"run_id": rid, "skipped": True}
    for p in run_dir.partials(rid):
        shutil.rmtree(p, ignore_errors=True)
    task = load_task(ctx.task_path)
    data = DataStore(ctx, task)
    settings = spec.settings.with_params(spec.tuning["best_params"]) if spec.tuning else spec.settings
    gen = spec.generator
    config = _run_config(ctx, task, spec, settings)
    tracker = Tracker(
        ctx.wandb,
        run_dir.wandb_dir,
        name=rid,
        group=f"{task.name}/{gen}",
        config=config,
        tags=[spec.regime, f"seed{spec.seed}", spec.backbone],
    )
    try:
        model, history, comp, real = train_regime(
            data,
            gen,
            spec.regime,
            int(spec.seed),
            settings,
            on_epoch=lambda rec: tracker.log_epoch(rec),
            progress=progress,
        )
        eval_df = real.df[real.df["split"].isin(PREDICTED_SPLITS)]
        order = {s: i for i, s in enumerate(PREDICTED_SPLITS)}
        eval_df = eval_df.iloc[np.argsort(eval_df["split"].map(order).to_numpy(), kind="stable")]
        keys = dict(generator=gen, regime=spec.regime, seed=int(spec.seed), backbone=spec.backbone)
        maps = None
        if task.is_segmentation:
            maps = predict_labelmaps(model, real.take(eval_df["case_id"]), settings.device)
            cases = case_frame(task, eval_df, **keys)
            preds = seg_predictions_frame(task, cases, real.take_masks(eval_df["case_id"]), maps)
            metrics = seg_run_metrics(preds, task.mask_classes)
        else:
            prob = predict_proba(model, real.take(eval_df["case_id"]), settings.device)
            preds = predictions_frame(task, eval_df, prob, **keys)
            metrics = run_metrics(preds, task.classes)
        config["budget"] = {
            **comp["budget"],
            "steps_run": int(sum(h["step"] for h in _stage_ends(history))),
        }
        best = next((h for h in reversed(history) if h.get("selected")), history[-1])
        train_s = sum(h["train_seconds"] for h in history)
        n_img = sum(h["images_per_second"] * h["train_seconds"] for h in history)
        metrics.update(
            run_id=rid,
            generator=gen,
            regime=spec.regime,
            seed=int(spec.seed),
            backbone=spec.backbone,
            best_epoch=int(best["epoch"]),
            epochs_run=len(history),
            steps_run=config["budget"]["steps_run"],
            timing={
                "train_seconds": train_s,
                "train_images_per_second": n_img / train_s if train_s > 0 else None,
                "total_seconds": time.perf_counter() - t0,
            },
        )
        config["environment"]["torch_threads"] = torch.get_num_threads()
        with atomic_dir(run.path, overwrite=True) as tmp:
            staged = RunFolder(Path(tmp), run.name)
            write_json(staged.config_path, config)
            write_json(staged.composition, comp)
            if maps is None:
                write_table(staged.predictions, preds)
            else:
                write_table(staged.seg_predictions, preds)
                save_labelmaps(
                    staged.labelmaps, preds["case_id"], maps, num_classes=len(task.mask_classes) + 1
                )
            write_table(staged.history, pd.DataFrame(history))
            save_checkpoint(
                staged.checkpoint,
                model,
                {
                    "run_id": rid,
                    "task": config["task"],
                    "classes": task.classes,
                    **({"mask_classes": task.mask_classes} if task.is_segmentation else {}),
                    "image": config["image"],
                    "generator": gen,
                    "regime": spec.regime,
                    "seed": int(spec.seed),
                },
            )
            write_json(staged.metrics_path, metrics)
            # Written last, inside the temporary folder, so the folder appears complete and DONE together.
            write_text(staged.done_marker, _dt.datetime.now(_dt.timezone.utc).isoformat() + "\n")
        tracker.finish(metrics)
    except BaseException:
        tracker.abort()
        raise
    return {"run_id": rid, "skipped": False, "metrics": metrics, "seconds": time.perf_counter() - t0}


@_with_threads
def execute_study(ctx: MatrixContext, study: StudySpec, progress: Any = False) -> dict[str, Any]:
    """Run (or resume) one tuning study and store its result in RUN/tuning/<key>.json."""
    path = ctx.run_dir.tuning_file(study.key)
    if path.is_file():
        return read_json(path)
    spec = ctx.tune
    assert spec is not None, "a study is planned only when tuning is on"
    task = load_task(ctx.task_path)
    data = DataStore(ctx, task)
    val_metric = VALIDATION_METRICS[task.kind]

    def objective(params: dict[str, float], report) -> float:
        settings = study.settings.with_params(params)
        _, history, _, _ = train_regime(
            data,
            study.generator,
            study.regime,
            spec.seed,
            settings,
            on_epoch=lambda rec: report(
                int(rec["epoch"]) + (0 if rec["stage"] != "finetune" else 10_000),
                float(rec[val_metric]),
            ),
            progress=progress,
        )
        # The weights a run keeps are the final ones, so a trial is scored by them, not by its best round.
        return float(history[-1][val_metric])

    name = f"{ctx.task.name}-{ctx.task.version}__{study.key}"
    result = run_study(name, ctx.storage, spec, objective, objective_name=val_metric)
    write_json(path, result)
    return result
