"""Membership inference against every diagnostic model of a RUN folder (`medsynbench privacy-model RUN`).

Who is a member. A real patient is a *member* of a run when their data reached its model: the real patients of
its training rows (all of the real training split for `real`/`augment`, the run's seeded subset for `scarce`,
recomputed with `bench.regimes.compose` exactly as training drew it), plus, when the regime uses synthetic images,
the patients the generator was trained on (the hashed ids of its card's `training.patients`; for `synthetic`-only
runs these are the only members). The real-holdout control's generator learns from the reserve split, so its
models' members are reserve patients.

Who is a non-member. Real patients of the training sites, in the train, test or reserve split (never val: it
selected the checkpoint), that neither the target model, nor its generator, nor any of its reference models saw;
subsampled by patient to the members' class mix, so the attack cannot win by recognising the class.

Reference models. Offline LiRA (`bench.privacy.attack`) needs models that never saw the examples it scores. The
matrix already trains them: every finished run whose members are disjoint from the target's members is OUT for
all of the target's members and non-members (e.g. for the real-only model, the real-holdout control's models,
trained on reserve patients only; for the real-holdout control, every model trained on the training split). Runs
of the label-shuffle and mask-shuffle controls are never references (their confidences carry no label or mask
information). Without any reference model the attack is the uncalibrated confidence threshold and is reported as
such.

Per run key (generator, regime, backbone) the metrics of its seeds are averaged; intervals come from one patient
bootstrap shared by the seeds (the patient is the unit), conditional on the trained models.

Segmenters. For a `kind: segmentation` task the per-image score is the mean over the image's pixels of the
logit-scaled confidence of each pixel's true class (its mask value, background included), from the segmenter's
logits on the cached image and mask. Unlike per-image Dice it is defined on slices without a lesion, and unlike a
thresholded count it is continuous, so LiRA's Gaussian fit of the reference models' scores applies as it does to a
classifier's. Members, non-members (matched on the image label the mask gives), references and every metric are
the classifier's; the run's checkpoints are all the audit reads of a run, so a segmentation run stores nothing more.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.generators.card import hash_id
from bench.imaging import build_cache
from bench.io import atomic_dir, read_json, write_json, write_table
from bench.manifest import read_manifest
from bench.privacy.attack import (
    METRICS,
    attack_metrics,
    logit_confidence,
    patient_weights,
    summarize,
)
from bench.privacy.attack import (
    lira_offline as _lira,
)
from bench.regimes import compose, parse_regime
from bench.runfolder import BASELINE, MODEL_PRIVACY_FILE, RunDir, RunFolder
from bench.tasks import Task, load_task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ATTACK = "lira-offline"
REFERENCE = (
    "Carlini, Chien, Nasr, Song, Terzis, Tramèr (2022), Membership inference attacks from first principles, "
    "IEEE S&P, offline variant"
)
SCORES_FILE = "scores.parquet"
NON_MEMBER_SPLITS = ("train", "test", "reserve")
# Controls whose models say nothing about the true labels (classifiers) or masks (segmenters).
NOT_REFERENCE = ("label-shuffle", "mask-shuffle")
MIN_GROUP = 10  # members and non-members (patients) a subgroup needs to be reported
HEADLINE = "auroc"
SCORE = "logit-scaled confidence of the true class, z_y - logsumexp(z_other)"
SEG_SCORE = "mean over the image's pixels of the logit-scaled confidence of the pixel's mask class"


OUT_FILE = MODEL_PRIVACY_FILE


def out_dir(run: str | Path) -> Path:
    return RunDir(run).model_privacy_dir


def out_file(run: str | Path) -> Path:
    return RunDir(run).model_privacy_file


@dataclass
class ModelRun:
    """One trained run of the matrix and the real patients it saw."""

    folder: RunFolder
    generator: str
    regime: str
    backbone: str
    seed: int
    size: int
    seen: set[str] = field(default_factory=set)  # patient ids (members)
    member_source: str = ""


def _patient_label(df: pd.DataFrame) -> pd.Series:
    """Each patient's most frequent label (ties: the first class name), indexed by patient id."""
    counts = df.groupby(["patient_id", "label"], sort=True).size().reset_index(name="n")
    counts = counts.sort_values(["patient_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"].astype(str)


def match_class_mix(
    members: list[str], candidates: list[str], label_of: pd.Series, rng: np.random.Generator
) -> list[str]:
    """The largest subset of `candidates` (patients) whose class proportions equal the members' (rounded)."""
    m = label_of.reindex(members).value_counts()
    c = label_of.reindex(candidates)
    avail = c.value_counts()
    q = m / m.sum()
    n = min((avail.get(k, 0) / q[k] for k in q.index), default=0.0)
    n = min(n, float(len(candidates)))
    chosen: list[str] = []
    for k in sorted(q.index):
        take = min(int(math.floor(n * q[k] + 1e-9)), int(avail.get(k, 0)))
        pool = np.array(sorted(c.index[c == k]))
        if take > 0:
            chosen += list(rng.choice(pool, size=take, replace=False))
    return sorted(chosen)


def _real_members(
    regime: str, train_df: pd.DataFrame, seed: int, classes: list[str], balance: str
) -> tuple[set[str], dict[str, int]]:
    """Real patients of a run's training rows, drawn as training drew them. The real training rows stand in for
    the synthetic manifest: compose picks the real rows before drawing any synthetic one and only the real rows
    are kept, so the draw is the same without reading the generator's images."""
    reg = parse_regime(regime)
    rows, comp = compose(
        reg, train_df, train_df if reg.uses_synthetic else None, seed, classes=classes, balance=balance
    )
    real = rows[rows["origin"] == "real"]
    by_class = {k: int(v["real"]) for k, v in comp.get("by_class", {}).items()}
    return set(real["patient_id"].astype(str)), by_class


def load_runs(rd: RunDir, task: Task, real: pd.DataFrame) -> list[ModelRun]:
    """Every finished run with a checkpoint, with its members; checks the recomputed real rows against the
    composition the run recorded."""
    matrix = rd.matrix()
    balance = str(matrix.protocol.balance or "real")
    train_df = real[(real["split"] == "train") & real["site"].isin(task.sites.train)]
    by_hash = {hash_id(p): str(p) for p in real["patient_id"].astype(str).unique()}
    gen_patients: dict[str, set[str]] = {}
    runs = []
    for r in rd.finished_runs():
        if not r.checkpoint.is_file():
            log.warning("%s: no %s; not audited", r.path, r.checkpoint.name)
            continue
        cfg = r.config()
        size = int(cfg.train.get("image_size") or task.image.size)
        reg = parse_regime(cfg.regime)
        mr = ModelRun(r, cfg.generator, reg.name, cfg.backbone, int(cfg.seed), size)
        if reg.kind not in ("synthetic",):
            seen, by_class = _real_members(reg.name, train_df, mr.seed, task.classes, balance)
            recorded = _recorded_real(r)
            if recorded is not None and recorded != {k: v for k, v in by_class.items() if v or k in recorded}:
                raise BadInput(
                    f"{r.composition}: the real training rows recomputed from the manifest ({by_class}) differ "
                    f"from those the run recorded ({recorded}); was the real manifest changed after the run?"
                )
            mr.seen |= seen
            mr.member_source = "real training"
        if reg.uses_synthetic and cfg.generator != BASELINE:
            if cfg.generator not in gen_patients:
                gen_patients[cfg.generator] = _generator_patients(rd, cfg.generator, by_hash)
            mr.seen |= gen_patients[cfg.generator]
            mr.member_source = "generator training" if not mr.member_source else "real + generator training"
        runs.append(mr)
    return runs


def _recorded_real(r: RunFolder) -> dict[str, int] | None:
    if not r.composition.is_file():
        return None
    comp = read_json(r.composition)
    bc = comp.get("by_class") or {}
    if "stages" in comp:  # two-stage regimes: the fine-tuning stage holds the real rows
        bc = (comp["stages"].get("finetune") or {}).get("by_class") or bc
    return {k: int(v.get("real", 0)) for k, v in bc.items()}


def _generator_patients(rd: RunDir, generator: str, by_hash: dict[str, str]) -> set[str]:
    path = rd.card_file(generator)
    card = None
    if path.is_file():
        card = read_json(path)
    else:
        entry = rd.matrix().generators.get(generator)
        card = entry.card if entry is not None else None
    if not card:
        raise BadInput(
            f"{path}: no generator card for {generator!r}; its training patients (the members of its "
            "synthetic-only models) are unknown"
        )
    hashes = (card.get("training") or {}).get("patients") or []
    if not hashes:
        # A card that names no patient (e.g. a team's generator audited on a host's data it never saw): its
        # synthetic images carry no known member, and its synthetic-only models are reported without members.
        log.warning(
            "%s: field 'training.patients' is empty; %s's models have no known generator members",
            path,
            generator,
        )
    return {by_hash[h] for h in hashes if h in by_hash}


def score_models(
    runs: list[ModelRun],
    manifest: Any,
    pool: pd.DataFrame,
    task: Task,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """phi (logit-scaled confidence of the true class) of every run's checkpoint on every pool image, `[R, N]`.

    Images come from the real manifest's image cache at each run's size (the cache training filled, so nothing is
    decoded again); logits, not probabilities, so that a confident model's phi does not saturate."""
    # torch (bench.train): only when models are scored
    from bench.train import load_checkpoint

    seg = task.is_segmentation
    labels = pool["label"].astype(str).map({c: i for i, c in enumerate(task.classes)}).to_numpy(np.int64)
    images: dict[int, np.ndarray] = {}
    masks: dict[int, np.ndarray] = {}
    phi = np.empty((len(runs), len(pool)))
    for i, r in enumerate(runs):
        if r.size not in images:
            cache = build_cache(
                manifest, task, size=r.size, cache_dir=cache_dir, skip_corrupt=True, progress=False
            )
            rows = cache.rows(pool["case_id"].astype(str))
            images[r.size] = np.asarray(cache.images[rows])
            if seg:
                if cache.masks is None:
                    raise BadInput(
                        f"{manifest.path}: task {task.name!r} is a segmentation task but the manifest's images "
                        "carry no masks (column 'mask_path'); the segmenters cannot be scored"
                    )
                masks[r.size] = np.asarray(cache.masks[rows])
        model, _ = load_checkpoint(r.folder.checkpoint, device=device)
        if seg:
            phi[i] = segmenter_confidence(
                model,
                images[r.size],
                masks[r.size],
                device,
                num_classes=len(task.mask_classes) + 1,
                source=r.folder.checkpoint,
            )
        else:
            phi[i] = model_confidence(model, images[r.size], labels, device)
    return phi


def segmenter_confidence(
    model: Any,
    images: np.ndarray,
    masks: np.ndarray,
    device: str = "cpu",
    *,
    num_classes: int,
    source: str | Path = "model",
) -> np.ndarray:
    """phi of one segmenter per image: the mean over pixels of z_y - logsumexp(z_other), y the pixel's mask value,
    for uint8 images `[N, C, S, S]` and label maps `[N, S, S]` with values below `num_classes` (background + mask
    classes). A model whose output is not `num_classes` logit maps of the masks' size (e.g. a classifier's, or
    another task's segmenter, in a segmentation run) is BadInput naming `source`."""
    import torch

    # torch (bench.train): only when models are scored
    from bench.train import to_float

    model = model.to(device).eval()
    out = np.zeros(len(images))
    with torch.no_grad():
        for k in range(0, len(images), 64):
            xb = to_float(torch.from_numpy(np.ascontiguousarray(images[k : k + 64])).to(device))
            z = model(xb).float().cpu().numpy()
            y = np.asarray(masks[k : k + 64], dtype=np.int64)
            if z.ndim != 4 or z.shape[1] != num_classes or z.shape[2:] != y.shape[1:]:
                raise BadInput(
                    f"{source}: the model outputs {tuple(z.shape)} for masks {tuple(y.shape)}; a segmenter of "
                    f"this task outputs {num_classes} logit maps (background + mask classes) of the masks' size"
                )
            n, c = z.shape[:2]
            flat = np.moveaxis(z, 1, -1).reshape(-1, c)
            out[k : k + n] = logit_confidence(flat, y.reshape(-1)).reshape(n, -1).mean(axis=1)
    return out


def model_confidence(model: Any, images: np.ndarray, labels: np.ndarray, device: str = "cpu") -> np.ndarray:
    """phi of one trained model on uint8 images `[N, C, S, S]` with integer labels `[N]` (the training code's
    input normalization; logits, not probabilities, so that a confident model's phi does not saturate)."""
    import torch

    # torch (bench.train): only when models are scored
    from bench.train import to_float

    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(images), 256):
            xb = to_float(torch.from_numpy(np.ascontiguousarray(images[k : k + 256])).to(device))
            out.append(model(xb).float().cpu().numpy())
    y = np.asarray(labels, dtype=np.int64)
    if not out:
        return np.zeros(0)
    return logit_confidence(np.concatenate(out), y)


def membership_attack(
    target: np.ndarray,
    references: np.ndarray | None,
    member: np.ndarray,
    patients: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """One target model's attack: offline LiRA scores from its phi `[N]` and the reference models' `[R, N]`, then
    every metric with its patient-bootstrap interval (the per-seed step of `audit_run`)."""
    scores, info = _lira(target, references)
    weights, _ = patient_weights(np.asarray(patients), n_boot, np.random.default_rng([seed, 15485863]))
    member = np.asarray(member, dtype=bool)
    return {
        **info,
        "metrics": summarize(attack_metrics(scores, member), attack_metrics(scores, member, weights)),
    }


def _arm_key(r: ModelRun) -> tuple[str, str, str]:
    return (r.generator, r.regime, r.backbone)


@dataclass
class _SeedAttack:
    run: ModelRun
    ex: np.ndarray  # pool image indices scored
    member: np.ndarray  # per scored image
    scores: np.ndarray
    info: dict[str, Any]
    members: list[str]
    nonmembers: list[str]
    references: list[str]


def _attack_one(
    i: int, runs: list[ModelRun], phi: np.ndarray, patients: np.ndarray, label_of: pd.Series, seed: int
) -> _SeedAttack:
    t = runs[i]
    in_pool = set(label_of.index)
    members = sorted(t.seen & in_pool)
    refs = [
        j for j, r in enumerate(runs) if j != i and r.generator not in NOT_REFERENCE and not (r.seen & t.seen)
    ]
    ref_seen = set().union(*(runs[j].seen for j in refs)) if refs else set()
    cand = sorted(in_pool - t.seen - ref_seen)
    if refs and len(cand) < MIN_GROUP:
        # The references would leave too few non-members: report the uncalibrated attack rather than none.
        refs, cand = [], sorted(in_pool - t.seen)
    rng = np.random.default_rng([seed, t.seed, 104729])
    nonmembers = match_class_mix(members, cand, label_of, rng)
    ex = np.flatnonzero(np.isin(patients, members + nonmembers))
    member = np.isin(patients[ex], members)
    scores, info = _lira(phi[i, ex], phi[refs][:, ex] if refs else None)
    return _SeedAttack(
        t, ex, member, scores, info, members, nonmembers, [runs[j].folder.path.name for j in refs]
    )


def _metrics(
    attacks: list[_SeedAttack], weights: np.ndarray, keep: np.ndarray | None = None
) -> tuple[dict, dict]:
    """Point values and bootstrap replicates of each metric, averaged over the seeds (NaN-aware)."""
    points, boots = [], []
    for a in attacks:
        sel = np.ones(len(a.ex), bool) if keep is None else keep[a.ex]
        points.append(attack_metrics(a.scores[sel], a.member[sel]))
        boots.append(attack_metrics(a.scores[sel], a.member[sel], weights[:, a.ex[sel]]))
    with np.errstate(invalid="ignore"), _quiet():
        point = {k: np.nanmean(np.stack([p[k] for p in points]), axis=0) for k in METRICS}
        boot = {k: np.nanmean(np.stack([b[k] for b in boots]), axis=0) for k in METRICS}
    return point, boot


class _quiet:
    """Silences numpy's mean-of-empty-slice warning: a replicate without members is NaN on purpose."""

    def __enter__(self) -> None:
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._w.__exit__(*exc)


def audit_run(
    run: str | Path,
    *,
    out: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Attack every finished run of RUN; write OUT (default RUN/model-privacy)/model_privacy.json and scores.parquet
    atomically and return the result."""
    t0 = time.perf_counter()
    rd = RunDir(run).require()
    task = load_task(rd.task_file)
    ref = rd.matrix().real_manifest()
    if ref is None or not ref.path:
        raise BadInput(
            f"{rd.matrix_file}: field 'manifests.real.path' is missing; the real patients are unknown"
        )
    if not Path(ref.path).is_file():
        raise BadInput(f"{rd.matrix_file}: field 'manifests.real.path': {ref.path} not found")
    if n_boot < 1:
        raise BadInput(f"--n-boot {n_boot}: must be at least 1")
    manifest = read_manifest(ref.path)
    df = manifest.df
    if "age_group" in task.subgroups.columns and "age_group" not in df.columns and "age" in df.columns:
        df = df.assign(age_group=task.age_group(df["age"]))
    finished = rd.finished_runs()
    if not finished:
        raise BadInput(f"{rd.path}: no finished run to attack")

    # Training left out images the cache could not decode; so does the recomputation of its rows, and the pool.
    size = int(finished[0].config().train.get("image_size") or task.image.size)
    cache = build_cache(manifest, task, size=size, cache_dir=cache_dir, skip_corrupt=True, progress=False)
    df = df[cache.contains(df["case_id"].astype(str))].reset_index(drop=True)
    runs = load_runs(rd, task, df[df["origin"] == "real"])
    if not runs:
        raise BadInput(f"{rd.path}: no finished run with a checkpoint to attack")
    pool = df[
        (df["origin"] == "real") & df["site"].isin(task.sites.train) & df["split"].isin(NON_MEMBER_SPLITS)
    ].reset_index(drop=True)
    pool["patient_id"] = pool["patient_id"].astype(str)
    t1 = time.perf_counter()
    phi = score_models(runs, manifest, pool, task, cache_dir, device)
    t2 = time.perf_counter()
    patients = pool["patient_id"].to_numpy()
    label_of = _patient_label(pool)
    weights, _ = patient_weights(patients, n_boot, np.random.default_rng([seed, 15485863]))
    arms: dict[tuple[str, str, str], list[int]] = {}
    for i, r in enumerate(runs):
        arms.setdefault(_arm_key(r), []).append(i)
    group_cols = [c for c in task.subgroups.columns if c in pool.columns]
    patient_group = pool.groupby("patient_id", sort=True)[group_cols].first() if group_cols else None
    min_group = max(int(task.metrics.min_patients), MIN_GROUP)
    results, boots, score_rows = [], {}, []
    for key, idxs in sorted(arms.items()):
        attacks = [
            _attack_one(i, runs, phi, patients, label_of, seed)
            for i in sorted(idxs, key=lambda i: runs[i].seed)
        ]
        point, boot = _metrics(attacks, weights)
        boots[key] = boot
        entry: dict[str, Any] = {
            "generator": key[0],
            "regime": key[1],
            "backbone": key[2],
            "seeds": [a.run.seed for a in attacks],
            "member_source": attacks[0].run.member_source,
            "n_members": int(round(np.mean([len(a.members) for a in attacks]))),
            "n_nonmembers": int(round(np.mean([len(a.nonmembers) for a in attacks]))),
            "n_reference_models": int(round(np.mean([len(a.references) for a in attacks]))),
            "calibrated": all(a.info["calibrated"] for a in attacks),
            "variance": attacks[0].info["variance"],
            "metrics": summarize(point, boot),
            "per_seed": [
                {
                    "seed": a.run.seed,
                    "run": a.run.folder.path.name,
                    "n_members": len(a.members),
                    "n_nonmembers": len(a.nonmembers),
                    "references": a.references,
                    "auroc": summarize(*_single(a, weights))["auroc"]["value"],
                }
                for a in attacks
            ],
            "subgroups": _subgroups(attacks, weights, pool, patient_group, group_cols, min_group),
        }
        results.append(entry)
        for a in attacks:
            score_rows.append(
                pd.DataFrame(
                    {
                        "run": a.run.folder.path.name,
                        "patient": [hash_id(p)[:16] for p in patients[a.ex]],
                        "case": [hash_id(c)[:16] for c in pool["case_id"].to_numpy()[a.ex]],
                        "member": a.member,
                        "phi": phi[runs.index(a.run), a.ex],
                        "score": a.scores,
                    }
                )
            )
    _differences(results, boots)
    t3 = time.perf_counter()
    result = {
        "schema_version": SCHEMA_VERSION,
        "task": {"name": task.name, "version": task.version},
        "attack": {
            "name": ATTACK,
            "reference": REFERENCE,
            "score": SEG_SCORE if task.is_segmentation else SCORE,
            "non_member_splits": list(NON_MEMBER_SPLITS),
            "not_references": list(NOT_REFERENCE),
        },
        "n_boot": int(n_boot),
        "seed": int(seed),
        "level": 0.95,
        "interval": "percentile bootstrap over patients (members and non-members), shared by every run key",
        "min_group_patients": min_group,
        "pool": {"n_patients": int(pool["patient_id"].nunique()), "n_images": int(len(pool))},
        "n_models": len(runs),
        "seconds": {
            "read": round(t1 - t0, 2),
            "scoring": round(t2 - t1, 2),
            "attack": round(t3 - t2, 2),
        },
        "arms": results,
    }
    dest = Path(out) if out else out_dir(rd.path)
    with atomic_dir(dest, overwrite=True) as tmp:
        write_json(tmp / OUT_FILE, result)
        write_table(tmp / SCORES_FILE, pd.concat(score_rows, ignore_index=True))
    log.info("wrote %s", dest)
    return result


def _single(a: _SeedAttack, weights: np.ndarray) -> tuple[dict, dict]:
    return attack_metrics(a.scores, a.member), attack_metrics(a.scores, a.member, weights[:, a.ex])


def _subgroups(
    attacks: list[_SeedAttack],
    weights: np.ndarray,
    pool: pd.DataFrame,
    patient_group: pd.DataFrame | None,
    cols: list[str],
    min_group: int,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if patient_group is None:
        return out
    for col in cols:
        values = pool[col]
        for g in sorted(values.dropna().astype(str).unique()):
            in_group = set(patient_group.index[patient_group[col].astype(str) == g])
            n_m = min(len(in_group.intersection(a.members)) for a in attacks)
            n_n = min(len(in_group.intersection(a.nonmembers)) for a in attacks)
            row: dict[str, Any] = {"group_by": col, "group": g, "n_members": n_m, "n_nonmembers": n_n}
            if n_m < min_group or n_n < min_group:
                row["status"] = "insufficient"
            else:
                keep = (values.astype(str) == g).to_numpy()
                row["status"] = "ok"
                row["metrics"] = summarize(*_metrics(attacks, weights, keep))
            out.append(row)
    return out


def _differences(results: list[dict[str, Any]], boots: dict[tuple[str, str, str], dict]) -> None:
    """AUROC of each run key minus the real-only baseline's (same backbone), paired on the shared replicates."""
    for r in results:
        base = (BASELINE, "real", r["backbone"])
        key = (r["generator"], r["regime"], r["backbone"])
        if key == base or base not in boots:
            continue
        b = next(x for x in results if (x["generator"], x["regime"], x["backbone"]) == base)
        va, vb = r["metrics"][HEADLINE]["value"], b["metrics"][HEADLINE]["value"]
        point = {HEADLINE: np.array([math.nan if va is None or vb is None else va - vb])}
        diff = {HEADLINE: boots[key][HEADLINE] - boots[base][HEADLINE]}
        r["auroc_diff_vs_real"] = summarize(point, diff)[HEADLINE]


def read_result(run: str | Path) -> dict[str, Any] | None:
    """RUN/model-privacy/model_privacy.json, or None when the model audit has not been run."""
    path = out_file(run)
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not readable JSON: {e}") from None


def aggregate_figures(run: str | Path, **kwargs: Any) -> dict[str, Any]:
    """What a hosted evaluation may show a team after its protocol ran on the host's data: per run key the attack's
    metrics with their intervals (overall and per subgroup), no patient, case or per-seed detail. Runs the audit
    unless RUN already holds its result."""
    res = read_result(run) or audit_run(run, **kwargs)
    keep = ("generator", "regime", "backbone", "n_members", "n_nonmembers", "calibrated", "metrics")
    return {
        "schema_version": res["schema_version"],
        "attack": res["attack"]["name"],
        "reference": res["attack"]["reference"],
        "n_boot": res["n_boot"],
        "arms": [
            {
                **{k: a[k] for k in keep},
                **({"auroc_diff_vs_real": a["auroc_diff_vs_real"]} if "auroc_diff_vs_real" in a else {}),
                "subgroups": [
                    {k: s[k] for k in ("group_by", "group", "status", "metrics") if k in s}
                    for s in a["subgroups"]
                ],
            }
            for a in res["arms"]
        ],
    }
