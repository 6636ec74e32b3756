"""Fidelity of one synthetic set against the real images it imitates, and the protocol step over a RUN folder.

The real reference set is the real manifest's rows of the task's training sites in `real_splits` (default
`train`: the images the generators learned from). Synthetic images carry the site `synthetic`, so the per-site
rows compare every synthetic image with the real images of one training site. See `bench.metrics.fidelity` for
the statistics and `bench.fidelity.features` for the feature spaces.

Outputs (written atomically): `OUT/fidelity.json` (settings, feature space, overall numbers) and
`OUT/fidelity.parquet`, one row per (metric, scope, group): metric, scope (overall | class | site), group, value,
ci_low, ci_high, n_real, n_synthetic, feature_space, status (ok | insufficient | unavailable).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput
from bench.fidelity.features import embed_manifest, open_embedder
from bench.io import atomic_dir, portable_path, write_json, write_table
from bench.manifest import Manifest, load_valid_manifest, read_manifest
from bench.metrics import fidelity as F
from bench.metrics.table import MetricTable
from bench.runfolder import FIDELITY_FILE, FIDELITY_TABLE, RunDir
from bench.tasks import Task, load_task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLE_COLUMNS = [
    "metric",
    "scope",
    "group",
    "value",
    "ci_low",
    "ci_high",
    "n_real",
    "n_synthetic",
    "feature_space",
    "status",
]
# Higher is better for all but the distances and the duplicate share; spread ratio is best at 1.
METRICS: dict[str, dict[str, Any]] = {
    "frechet_distance": {"label": "Fréchet distance", "higher_is_better": False},
    "kid": {"label": "KID", "higher_is_better": False},
    "precision": {"label": "Precision", "higher_is_better": True},
    "recall": {"label": "Recall", "higher_is_better": True},
    "density": {"label": "Density", "higher_is_better": True},
    "coverage": {"label": "Coverage", "higher_is_better": True},
    "spread_ratio": {"label": "Within-class spread ratio", "higher_is_better": None},
    "near_duplicate_rate": {"label": "Near-duplicate share", "higher_is_better": False},
    "label_accuracy": {"label": "Label accuracy", "higher_is_better": True},
    "label_auroc": {"label": "Label AUROC", "higher_is_better": True},
}


def _real_reference(real: Manifest, task: Task, splits: tuple[str, ...], path: Path) -> Manifest:
    df = real.df
    keep = (df["origin"] == "real") & df["site"].isin(task.sites.train) & df["split"].isin(splits)
    if not keep.any():
        raise BadInput(
            f"--real {path}: no real rows of the training sites {task.sites.train} in split(s) {list(splits)}"
        )
    return real.subset(keep.to_numpy())


def _synthetic_rows(syn: Manifest, path: Path) -> Manifest:
    keep = (syn.df["origin"] == "synthetic").to_numpy()
    if not keep.any():
        raise BadInput(f"--synthetic {path}: no rows with origin 'synthetic'")
    return syn.subset(keep)


class _Table:
    def __init__(self, space: str):
        self.rows: list[dict[str, Any]] = []
        self.space = space

    def add(
        self, metric: str, scope: str, group: str, est: F.Estimate, n_real: int, n_syn: int, status: str = ""
    ) -> None:
        value = est.value
        self.rows.append(
            {
                "metric": metric,
                "scope": scope,
                "group": group,
                "value": float(value),
                "ci_low": float(est.ci_low),
                "ci_high": float(est.ci_high),
                "n_real": int(n_real),
                "n_synthetic": int(n_syn),
                "feature_space": self.space,
                "status": status or ("ok" if math.isfinite(value) else "insufficient"),
            }
        )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TABLE_COLUMNS)


def fidelity_stats(
    real_f: np.ndarray,
    real_y: np.ndarray,
    real_site: np.ndarray,
    syn_f: np.ndarray,
    syn_y: np.ndarray,
    syn_proba: np.ndarray | None,
    classes: list[str],
    sites: list[str],
    *,
    space: str,
    k: int = F.K_NN,
    kid_subsets: int = F.KID_SUBSETS,
    kid_subset_size: int = F.KID_SUBSET_SIZE,
    n_boot: int = 200,
    fd_boot: int = 50,
    seed: int = 0,
    device: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every fidelity number from features already computed: (tidy table, extra facts for fidelity.json)."""
    t = _Table(space)
    extra: dict[str, Any] = {}

    def distances(scope: str, group: str, r: np.ndarray, s: np.ndarray) -> None:
        t.add(
            "frechet_distance",
            scope,
            group,
            F.frechet_features(r, s, n_boot=fd_boot, seed=seed),
            len(r),
            len(s),
        )
        est, sd, size = F.kid(
            r, s, n_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, device=device
        )
        t.add("kid", scope, group, est, len(r), len(s))
        extra.setdefault("kid", {})[f"{scope}:{group}"] = {"sd": F._none_if_nan(sd), "subset_size": size}

    def manifold(scope: str, group: str, r: np.ndarray, s: np.ndarray) -> None:
        for name, est in F.prdc(r, s, k, n_boot=n_boot, seed=seed, device=device).items():
            t.add(name, scope, group, est, len(r), len(s))

    distances("overall", "all", real_f, syn_f)
    manifold("overall", "all", real_f, syn_f)
    est, sr, ss = F.spread_ratio(
        F.class_centred(real_f, real_y), F.class_centred(syn_f, syn_y), n_boot=n_boot, seed=seed
    )
    t.add("spread_ratio", "overall", "all", est, len(real_f), len(syn_f))
    extra["spread"] = {"real": F._none_if_nan(sr), "synthetic": F._none_if_nan(ss)}
    dup, thr, size = F.near_duplicate_rate(real_f, syn_f, n_boot=n_boot, seed=seed, device=device)
    t.add("near_duplicate_rate", "overall", "all", dup, size, size)
    extra["near_duplicate"] = {
        "threshold": F._none_if_nan(thr),
        "percentile": F.DUPLICATE_PERCENTILE,
        "n_each": size,
        "nominal_rate": F.DUPLICATE_PERCENTILE / 100,
    }
    if syn_proba is not None:
        lf = F.label_fidelity(syn_y, syn_proba, len(classes), n_boot=n_boot, seed=seed)
        t.add("label_accuracy", "overall", "all", lf["accuracy"], 0, len(syn_y))
        t.add("label_auroc", "overall", "all", lf["auroc"], 0, len(syn_y))
    else:
        for m in ("label_accuracy", "label_auroc"):
            t.add(m, "overall", "all", F.Estimate(math.nan), 0, len(syn_y), "unavailable")
    for c, name in enumerate(classes):
        r, s = real_f[real_y == c], syn_f[syn_y == c]
        distances("class", name, r, s)
        manifold("class", name, r, s)
        t.add(
            "spread_ratio", "class", name, F.spread_ratio(r, s, n_boot=n_boot, seed=seed)[0], len(r), len(s)
        )
        if syn_proba is not None:
            n_c = int((syn_y == c).sum())
            t.add("label_accuracy", "class", name, lf["class_accuracy"][c], 0, n_c)
            t.add("label_auroc", "class", name, lf["class_auroc"][c], 0, n_c)
    for site in sites:
        r = real_f[real_site == site]
        distances("site", site, r, syn_f)
    return t.frame(), extra


def _overall(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    out = {}
    for row in MetricTable(table).select(scope="overall").itertuples(index=False):
        out[row.metric] = {
            "value": F._none_if_nan(row.value),
            "ci_low": F._none_if_nan(row.ci_low),
            "ci_high": F._none_if_nan(row.ci_high),
            "status": row.status,
        }
    return out


def compute_fidelity(
    task: Task | str | Path,
    synthetic: str | Path,
    real: str | Path,
    out: str | Path,
    *,
    features: str = "classifier",
    checkpoint: str | Path | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    real_splits: tuple[str, ...] = ("train",),
    k: int = F.K_NN,
    kid_subsets: int = F.KID_SUBSETS,
    kid_subset_size: int = F.KID_SUBSET_SIZE,
    n_boot: int = 200,
    fd_boot: int = 50,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    generator: str | None = None,
) -> dict[str, Any]:
    """Fidelity, diversity and label fidelity of `synthetic` against `real`; writes OUT/fidelity.json and
    OUT/fidelity.parquet atomically and returns the JSON content."""
    if k < 1:
        raise BadInput(f"--k {k}: must be at least 1")
    t = load_task(task)
    syn_path, real_path = Path(synthetic), Path(real)
    syn = _synthetic_rows(load_valid_manifest(syn_path, t), syn_path)
    ref = _real_reference(load_valid_manifest(real_path, t), t, tuple(real_splits), real_path)
    emb = open_embedder(
        t, features=features, checkpoint=checkpoint, weights=weights, image_size=image_size, device=device
    )
    fr = embed_manifest(emb, ref, t, cache_dir=cache_dir)
    fs = embed_manifest(emb, syn, t, cache_dir=cache_dir)
    cls = {c: i for i, c in enumerate(t.classes)}
    real_y = ref.df["label"].map(cls).to_numpy(np.int64)
    syn_y = syn.df["label"].map(cls).to_numpy(np.int64)
    sites = [s for s in t.sites.train if (ref.df["site"] == s).any()]
    dev = str(emb.device)
    table, extra = fidelity_stats(
        fr.features,
        real_y,
        ref.df["site"].astype(str).to_numpy(),
        fs.features,
        syn_y,
        fs.proba,
        list(t.classes),
        sites,
        space=emb.space.label,
        k=k,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        n_boot=n_boot,
        fd_boot=fd_boot,
        seed=seed,
        device=dev,
    )
    gen = generator or next(iter(syn.df.get("generator", pd.Series(["unknown"])).astype(str)), "unknown")
    # fidelity.json travels (records, bundles, pages): files are named relative to the run or the working folder,
    # never by an absolute local path; the sha256 beside each says which file it was.
    bases = (Path(out).resolve().parent.parent, Path.cwd())
    space = {**emb.space.describe(), "dim": int(fr.features.shape[1])}
    space["weights"] = portable_path(space["weights"], bases)
    result = {
        "schema_version": SCHEMA_VERSION,
        "generator": gen,
        "task": {"name": t.name, "version": t.version},
        "feature_space": space,
        "k": int(k),
        "real": {
            "manifest": portable_path(real_path, bases),
            "sha256": ref.sha256,
            "selection": f"origin real, sites {list(t.sites.train)}, splits {list(real_splits)}",
            "n": len(ref),
        },
        "synthetic": {"manifest": portable_path(syn_path, bases), "sha256": syn.sha256, "n": len(syn)},
        "settings": {
            "kid_subsets": kid_subsets,
            "kid_subset_size": kid_subset_size,
            "n_boot": n_boot,
            "fd_boot": fd_boot,
            "seed": seed,
            "device": dev,
            "label_fidelity_classifier": portable_path(checkpoint, bases) if checkpoint else None,
        },
        "metrics": _overall(table),
        **extra,
        "definitions": {
            "frechet_distance": "||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^1/2); interval: image bootstrap "
            "percentiles shifted by the bootstrap bias estimate, clipped at 0",
            "kid": "unbiased MMD^2, kernel (x.y/d + 1)^3, mean over subsets; interval: 2.5-97.5 percentile of subsets",
            "prdc": f"k-NN balls (k={k}, point inside when distance <= radius); intervals resample scored points",
            "spread_ratio": "synthetic / real sqrt(2 tr S) of class-centred features (1: as diverse as real)",
            "near_duplicate_rate": "share of synthetic images with another synthetic image closer than the 1st "
            "percentile of real nearest-neighbour distances (equal-size sets; real: about 0.01)",
            "label_fidelity": "the run's real-only classifier on each synthetic image against its conditioning "
            "label: accuracy and macro one-vs-rest AUROC (chance: 1/K and 0.5)",
        },
        "cached": {"real": fr.cached, "synthetic": fs.cached},
    }
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        write_table(Path(tmp) / FIDELITY_TABLE, table)
        write_json(Path(tmp) / FIDELITY_FILE, result)
    log.info("wrote %s", out / FIDELITY_FILE)
    return result


def run_checkpoint(rd: RunDir) -> Path:
    """The real-only classifier of a run: the lowest seed's baseline checkpoint."""
    ckpts = [
        r.checkpoint for r in sorted(rd.baseline_runs(), key=lambda r: r.name.seed) if r.checkpoint.is_file()
    ]
    if not ckpts:
        raise BadInput(
            f"{rd.path}: no finished real-only run with a checkpoint.pt (generator 'none', regime 'real')"
        )
    return ckpts[0]


def fidelity_run(
    run: str | Path, generators: list[str] | None = None, **options: Any
) -> dict[str, dict[str, Any]]:
    """The protocol step: every generator of RUN/matrix.json against the run's real manifest, in the run's
    real-only classifier's feature space, written to RUN/fidelity/<generator>/."""
    rd = RunDir(run).require()
    mx = rd.matrix()
    real_ref = mx.real_manifest()
    if real_ref is None or not real_ref.path:
        raise BadInput(f"{rd.matrix_file}: no real manifest recorded")
    names = sorted(set(mx.manifests.synthetic) | set(mx.generators))
    unknown = sorted(set(generators or []) - set(names))
    if unknown:
        raise BadInput(f"--generator {', '.join(unknown)}: not in {rd.matrix_file} (generators: {names})")
    # Label fidelity always uses the run's real-only classifier; it is also the default feature space.
    if options.get("checkpoint") is None and (
        options.get("features", "classifier") == "classifier" or rd.baseline_runs()
    ):
        options["checkpoint"] = run_checkpoint(rd)
    results = {}
    for g in generators or names:
        ref = mx.synthetic_manifest(g)
        if ref is None or not ref.path:
            raise BadInput(f"{rd.matrix_file}: no synthetic manifest recorded for generator {g!r}")
        for what, r in (("real", real_ref), (f"synthetic ({g})", ref)):
            if r.sha256 and Path(r.path).is_file() and read_manifest(r.path).sha256 != r.sha256:
                raise BadInput(
                    f"{r.path}: the {what} manifest changed since the run (sha256 differs from matrix.json)"
                )
        results[g] = compute_fidelity(
            rd.task_file, ref.path, real_ref.path, rd.fidelity_dir(g), generator=g, **options
        )
    return results
