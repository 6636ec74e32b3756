"""Builders shared by the leaderboard tests: a run folder that follows the RUN layout (docs/ARCHITECTURE.md), with
predictions whose quality each generator controls, and a leaderboard folder that pins the tiny task."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from conftest import TINY_TASK

REGIMES = ["real", "synthetic", "augment:1", "scarce:0.5", "scarce:0.5+synthetic"]
SEEDS = [0, 1]
BACKBONE = "resnet18"
CLASSES = TINY_TASK["labels"]["classes"]


def board_yaml(**over) -> dict:
    cfg = {
        "schema_version": "1.0",
        "title": "tiny (test)",
        "task": {"name": "tiny", "version": "1.0"},
        "protocol": {"regimes": REGIMES, "seeds": SEEDS, "backbone": BACKBONE},
        "primary_metric": "auroc_macro",
        "id_salt": "test-salt-0123",
        "bootstrap": {"n": 40, "seed": 0},
        "require_privacy": True,
        "max_archive_bytes": 50_000_000,
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def make_board(path: Path, *, key: bool = True, n_per_site: int = 14, **over) -> Path:
    """A leaderboard folder pinning the tiny task (kept as its task.yaml), with the answer key of `cases()`."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = board_yaml(**over)
    (path / "leaderboard.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / "task.yaml").write_text(yaml.safe_dump(TINY_TASK, sort_keys=False))
    if key:
        from bench.leaderboard.config import set_answer_key

        set_answer_key(path, answer_key(cfg["id_salt"], n_per_site))
    return path


def answer_key(salt: str, n_per_site: int = 14):
    """The key of the evaluation cases `make_run` predicts: test and external rows of `cases()`."""
    from bench.leaderboard.key import AnswerKey, hash_ids

    cs = cases(n_per_site)
    ev = cs[cs["split"].isin(["test", "external"])].rename(columns={"y_true": "label"})
    ev = ev.assign(
        case_id=hash_ids(ev["case_id"], salt), patient_id=hash_ids(ev["patient_id"], salt), part="public"
    )
    return AnswerKey.from_frame(ev, TINY_TASK["subgroups"]["columns"])


def cases(n_per_site: int = 14, seed: int = 0) -> pd.DataFrame:
    """Evaluation cases: val and test patients at the training sites, every patient of the external site."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in TINY_TASK["sites"]["train"] + TINY_TASK["sites"]["external"]:
        external = site in TINY_TASK["sites"]["external"]
        n = n_per_site * (3 if external else 1)
        for p in range(n):
            pid = f"PAT-{site}-{p:04d}"
            split = "external" if external else ("val" if p % 2 else "test")
            label = CLASSES[p % len(CLASSES)]
            sex = "M" if p % 4 < 2 else "F"
            age = int(rng.integers(20, 85))
            for k in range(2):
                rows.append(
                    dict(
                        case_id=f"CASE-{pid}-{k}",
                        patient_id=pid,
                        site=site,
                        split=split,
                        y_true=label,
                        sex=sex,
                        age=age,
                        age_group="<50" if age < 50 else ">=50",
                    )
                )
    return pd.DataFrame(rows)


def predictions(
    cs: pd.DataFrame, quality: float, generator: str, regime: str, seed: int, noise_seed: int
) -> pd.DataFrame:
    rng = np.random.default_rng(noise_seed)
    y = cs["y_true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    logits = rng.normal(0, 1, (len(cs), len(CLASSES)))
    logits[np.arange(len(cs)), y] += quality
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    out = cs.drop(columns=["age"]).copy()
    for i, c in enumerate(CLASSES):
        out[f"prob_{c}"] = p[:, i]
    out["generator"] = generator
    out["regime"] = regime
    out["seed"] = seed
    out["backbone"] = BACKBONE
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_run(
    root: Path,
    generators: dict[str, float] | None = None,
    *,
    real_quality: float = 1.5,
    regimes: list[str] = REGIMES,
    seeds: list[int] = SEEDS,
    privacy: dict[str, dict] | None = None,
    with_manifest: bool = False,
    task: dict | None = None,
    n_per_site: int = 14,
    noise_offset: int = 0,
) -> Path:
    """A finished run folder: the real-only reference (`none`) plus one quality level per generator."""
    generators = {"good": 2.0, "weak": 0.5} if generators is None else generators
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.yaml").write_text(yaml.safe_dump(task or TINY_TASK, sort_keys=False))
    cs = cases(n_per_site)
    real_sha = _sha("real-manifest")
    manifests = {
        "real": {
            "path": "manifests/real.parquet" if with_manifest else "/elsewhere/real.parquet",
            "sha256": real_sha,
        },
        "synthetic": {},
    }
    if with_manifest:
        from bench.manifest import manifest_hash

        man = cs.drop_duplicates("case_id")[["case_id", "patient_id", "site", "split", "sex", "age"]].copy()
        man["label"] = cs["y_true"]
        man["image"] = [f"img/{c}.png" for c in man["case_id"]]
        man["origin"] = "real"
        (root / "manifests").mkdir(exist_ok=True)
        man.to_parquet(root / "manifests" / "real.parquet", index=False)
        manifests["real"]["sha256"] = manifest_hash(man)
    k = 0
    plan = []
    for r in regimes:
        uses_syn = r not in ("real",) and not (r.startswith("scarce:") and "+" not in r)
        if not uses_syn:
            plan.append(("none", r, real_quality if r == "real" else real_quality * 0.6))
        else:
            for g, q in generators.items():
                bonus = {
                    "synthetic": 0.0,
                    "augment:1": real_quality * 0.6,
                    "scarce:0.5+synthetic": real_quality * 0.4,
                }
                plan.append((g, r, q + bonus.get(r, 0.0)))
    for g, r, q in plan:
        for s in seeds:
            d = root / f"{g}__{r.replace(':', '-')}__{BACKBONE}__seed{s}"
            d.mkdir(parents=True, exist_ok=True)
            predictions(cs, q, g, r, s, noise_seed=1000 + noise_offset + k).to_parquet(
                d / "predictions.parquet", index=False
            )
            (d / "config.json").write_text(
                json.dumps(
                    {
                        "schema_version": 1,
                        "run_id": d.name,
                        "generator": g,
                        "regime": r,
                        "seed": s,
                        "backbone": BACKBONE,
                        "train": {"epochs": 3, "lr": 0.001},
                        "tuning": None,
                    }
                )
            )
            (d / "DONE").write_text("")
            k += 1
    gens = {}
    for g in generators:
        manifests["synthetic"][g] = {"path": f"/elsewhere/{g}.parquet", "sha256": _sha(f"syn-{g}")}
        card = {
            "name": g,
            "version": "0.1",
            "link": f"https://example.org/{g}",
            "training": {
                "manifest_sha256": _sha("train"),
                "sites": TINY_TASK["sites"]["train"],
                "patients": [_sha(p) for p in sorted(set(cs["patient_id"]))[:3]],
            },
        }
        (root / "generators" / g).mkdir(parents=True, exist_ok=True)
        (root / "generators" / g / "card.json").write_text(json.dumps(card))
        gens[g] = {"card_path": f"generators/{g}/card.json", "card": card}
        pv = {
            "generator": g,
            "memorization_rate": 0.02,
            "ci_low": 0.01,
            "ci_high": 0.04,
            "flagged": False,
            "nominal_rate": 0.05,
            "percentile": 5.0,
            "contamination": {"status": "pass", "problems": []},
        }
        pv.update((privacy or {}).get(g, {}))
        (root / "privacy" / g).mkdir(parents=True, exist_ok=True)
        (root / "privacy" / g / "privacy.json").write_text(json.dumps(pv))
    matrix = {
        "protocol": {"regimes": regimes, "seeds": seeds, "backbone": BACKBONE, "tune": {"trials": 0}},
        "manifests": manifests,
        "generators": gens,
        "environment": {"packages": {"torch": "2.15.0"}, "git": "abc123", "device": "cpu"},
    }
    (root / "matrix.json").write_text(json.dumps(matrix))
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256): equal snapshots mean nothing changed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
