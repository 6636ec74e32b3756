"""The model audit on a segmentation run: the per-image score of a segmenter, who counts as a member, the result
the leaderboard records, and a checkpoint that is not a segmenter of the task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from test_privacy_model import memorizer_settings

from bench.cli import main
from bench.generators.card import hash_id
from bench.imaging import build_cache
from bench.io import read_table
from bench.leaderboard.model_privacy import record_model_privacy
from bench.manifest import read_manifest, write_manifest
from bench.models import create_model
from bench.privacy.model import SCORES_FILE, SEG_SCORE, segmenter_confidence
from bench.runfolder import RunDir
from bench.tasks import load_task
from bench.train import save_checkpoint

TASK = "mediastinal-neoplasm-seg"
SIZE = 32
FAST = ["--preset", "smoke", "--epochs", "1", "--wandb", "disabled", "--threads", "1", "--quiet"]


def reserve_pair_set(real: Path, cache_dir: Path, out: Path) -> tuple[Path, list[str]]:
    """The reserve split's pairs as a synthetic set whose card says its generator trained on those patients (as the
    real-holdout control's does): its synthetic-only models and the real-only ones never share a member."""
    task = load_task(TASK)
    m = read_manifest(real)
    cache = build_cache(m, task, size=SIZE, cache_dir=cache_dir, progress=False)
    df = m.df
    rows = df[(df["split"] == "reserve") & df["site"].isin(task.sites.train)].reset_index(drop=True)
    idx = cache.rows(rows["case_id"].astype(str))
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    ids = [f"syn-{i:05d}" for i in range(len(rows))]
    for cid, img, mask in zip(ids, np.asarray(cache.images[idx]), np.asarray(cache.masks[idx]), strict=True):
        Image.fromarray(img[0]).save(out / "images" / f"{cid}.png")
        Image.fromarray(mask).save(out / "masks" / f"{cid}.png")
    syn = rows[["label", "sex", "age", "contrast"]].assign(
        case_id=ids,
        patient_id=ids,
        image=[f"images/{c}.png" for c in ids],
        mask_path=[f"masks/{c}.png" for c in ids],
        site="synthetic",
        origin="synthetic",
        generator="pairs",
        split="train",
    )
    write_manifest(syn, out / "manifest.parquet")
    reserve = sorted(set(rows["patient_id"].astype(str)))
    card = {
        "name": "pairs",
        "version": "1.0",
        "training": {
            "sites": list(task.sites.train),
            "splits": ["reserve"],
            "patients": [hash_id(p) for p in reserve],
        },
    }
    (out / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return out / "manifest.parquet", reserve


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("segmia")
    phantom, real, cache = root / "phantom", root / "manifest.parquet", root / "cache"
    cmd = ["data", "phantom", "--out", str(phantom), "--patients", "200", "--slices", "1", "--size", "64"]
    try:
        assert main([*cmd, "--seed", "0", "--masks"]) == 0
        assert main(["data", "manifest", "--task", TASK, "--root", str(phantom), "--out", str(real)]) == 0
        syn, reserve = reserve_pair_set(real, cache, root / "pairs")
        spec = load_task(TASK).spec()
        spec["metrics"].update(min_patients=3, min_positives=1, min_negatives=1)
        task_path = root / "task" / "task.yaml"
        task_path.parent.mkdir()
        task_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        out = root / "run"
        args = [
            "run",
            "--task",
            str(task_path),
            "--real",
            str(real),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
        ]
        args += ["--synthetic", f"pairs={syn}", "--regimes", "real,synthetic", "--seeds", "0", *FAST]
        assert main(args) == 0
        assert main(["privacy-model", str(out), "--n-boot", "30", "--cache-dir", str(cache)]) == 0
    finally:
        torch.set_num_threads(before)
    result = json.loads(RunDir(out).model_privacy_file.read_text())
    return {"out": out, "real": real, "cache": cache, "reserve": reserve, "result": result}


def _arm(result, generator, regime):
    return next(a for a in result["arms"] if a["generator"] == generator and a["regime"] == regime)


def test_segmenters_are_audited_with_their_members_and_references(audited):
    result, df = audited["result"], read_manifest(audited["real"]).df
    task = load_task(TASK)
    assert result["attack"]["score"] == SEG_SCORE and result["n_models"] == 2
    scores = read_table(RunDir(audited["out"]).model_privacy_dir / SCORES_FILE)
    train = df[(df["split"] == "train") & df["site"].isin(task.sites.train)]
    for (gen, regime), seen in {
        ("none", "real"): set(train["patient_id"].astype(str)),
        ("pairs", "synthetic"): set(audited["reserve"]),
    }.items():
        arm = _arm(result, gen, regime)
        # Each model's only other model never saw its members: the attack is calibrated by it.
        assert arm["calibrated"] and arm["n_reference_models"] == 1
        assert arm["n_members"] == len(seen) and arm["n_nonmembers"] > 0
        rows = scores[scores["run"] == arm["per_seed"][0]["run"]]
        hashed = {hash_id(p)[:16] for p in seen}
        assert set(rows.loc[rows["member"], "patient"]) == hashed
        assert not set(rows.loc[~rows["member"], "patient"]) & hashed
        assert np.isfinite(rows["phi"]).all() and arm["metrics"]["auroc"]["value"] is not None


def test_the_stored_scores_are_each_segmenters_confidence_on_the_cached_pairs(audited):
    from bench.train import load_checkpoint

    task = load_task(TASK)
    m = read_manifest(audited["real"])
    cache = build_cache(m, task, size=SIZE, cache_dir=audited["cache"], progress=False)
    scores = read_table(RunDir(audited["out"]).model_privacy_dir / SCORES_FILE)
    run = RunDir(audited["out"]).finished_runs()[0]
    rows = scores[scores["run"] == run.path.name].head(12)
    by_hash = {hash_id(c)[:16]: c for c in m.df["case_id"].astype(str)}
    idx = cache.rows([by_hash[h] for h in rows["case"]])
    model, _ = load_checkpoint(run.checkpoint)
    phi = segmenter_confidence(
        model, np.asarray(cache.images[idx]), np.asarray(cache.masks[idx]), num_classes=6
    )
    np.testing.assert_allclose(phi, rows["phi"].to_numpy(), rtol=1e-6, atol=1e-6)


def _brute_force(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = []
    for zi, yi in zip(z, y, strict=True):
        vals = []
        for r in range(yi.shape[0]):
            for c in range(yi.shape[1]):
                t = int(yi[r, c])
                others = [float(zi[k, r, c]) for k in range(zi.shape[0]) if k != t]
                vals.append(float(zi[t, r, c]) - float(np.log(np.sum(np.exp(others)))))
        out.append(np.mean(vals))
    return np.array(out)


class _Fixed(torch.nn.Module):
    """Returns fixed logits, one map set per image, whatever the input."""

    def __init__(self, z: np.ndarray):
        super().__init__()
        self.z = torch.from_numpy(z)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.z[self.seen : self.seen + len(x)]
        self.seen += len(x)
        return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmenter_confidence_matches_a_brute_force_mean_of_pixel_margins(seed):
    rng = np.random.default_rng(seed)
    n, k, s = 70, 4, 5  # more images than one batch
    z = rng.normal(0, 3, (n, k, s, s)).astype(np.float32)
    y = rng.integers(0, k, (n, s, s)).astype(np.uint8)
    x = np.zeros((n, 1, s, s), np.uint8)
    phi = segmenter_confidence(_Fixed(z), x, y, num_classes=k)
    np.testing.assert_allclose(phi, _brute_force(z.astype(np.float64), y), rtol=1e-5, atol=1e-5)
    # A confident correct pixel raises its image's score; the others stay.
    z2 = z.copy()
    z2[0, y[0, 0, 0], 0, 0] += 50
    phi2 = segmenter_confidence(_Fixed(z2), x, y, num_classes=k)
    assert phi2[0] > phi[0] + 1 and np.allclose(phi2[1:], phi[1:])


def test_the_leaderboard_records_a_segmentation_audit(audited):
    field = record_model_privacy(RunDir(audited["out"]), "pairs")
    assert field is not None and field["attack"] == "lira-offline"
    (arm,) = field["arms"]
    assert arm["regime"] == "synthetic" and arm["backbone"] == "unet-small"
    assert arm["auroc"]["value"] == _arm(audited["result"], "pairs", "synthetic")["metrics"]["auroc"]["value"]
    assert record_model_privacy(RunDir(audited["out"]), "none")["arms"][0]["regime"] == "real"


def test_a_checkpoint_that_is_not_a_segmenter_of_the_task_is_exit_2_naming_it(audited, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(audited["out"], out)
    shutil.rmtree(RunDir(out).model_privacy_dir)
    run = RunDir(out).finished_runs()[0]
    # Two classes (background + one): another task's segmenter, in this run's folder.
    save_checkpoint(run.checkpoint, create_model("unet-small", 2, 1, kind="segmentation"), {})
    capsys.readouterr()
    rc = main(["privacy-model", str(out), "--n-boot", "5", "--cache-dir", str(audited["cache"])])
    err = capsys.readouterr().err
    assert rc == 2 and str(run.checkpoint) in err and "outputs 6 logit maps" in err
    assert not RunDir(out).model_privacy_dir.exists()  # nothing half-written


# -- known answers with trained segmenters ------------------------------------------------------------------------


def _noise_pairs(rng, n_patients, per_patient=2, size=16):
    """Noise images, each with a random rectangle of a random class as its mask: a segmenter can only fit them by
    memorizing its training images."""
    x = rng.integers(0, 256, (n_patients * per_patient, 1, size, size), dtype=np.uint8)
    y = np.zeros((len(x), size, size), np.uint8)
    for i in range(len(x)):
        r, c = rng.integers(0, size - 6, 2)
        h, w = rng.integers(3, 7, 2)
        y[i, r : r + h, c : c + w] = rng.integers(1, 3)
    return x, y, np.repeat(np.arange(n_patients), per_patient)


def _fit_segmenter(x, y, seed, epochs):
    from bench.train_seg import fit_segmenter

    model, _ = fit_segmenter(memorizer_settings("unet-small", 3, seed, epochs), x, y, x[:8], y[:8])
    return model


def _seg_known_answers(seed, epochs=25, n=50):
    """Attack AUROC intervals of a segmenter trained on 50 patients (A) and of one trained on disjoint patients (D):
    members A, non-members B, the reference segmenter trained on C; the audit's score and attack."""
    from bench.privacy.model import membership_attack

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(seed)
        x, y, pid = _noise_pairs(rng, 4 * n)
        group = pid // n  # 0 A, 1 B, 2 C, 3 D
        target = _fit_segmenter(x[group == 0], y[group == 0], seed, epochs)
        disjoint = _fit_segmenter(x[group == 3], y[group == 3], seed + 100, epochs)
        ref = _fit_segmenter(x[group == 2], y[group == 2], seed + 200, epochs)
        ab = group <= 1
        phi_ref = segmenter_confidence(ref, x[ab], y[ab], num_classes=3)[None]
        out = []
        for model in (target, disjoint):
            phi = segmenter_confidence(model, x[ab], y[ab], num_classes=3)
            r = membership_attack(phi, phi_ref, group[ab] == 0, pid[ab], n_boot=400, seed=seed)
            out.append(r["metrics"]["auroc"])
        return out
    finally:
        torch.set_num_threads(before)


def test_a_memorizing_segmenter_leaks_and_a_disjoint_one_does_not():
    mem, dis = _seg_known_answers(seed=0)
    assert mem["ci_low"] > 0.5, mem
    assert dis["ci_low"] <= 0.5 <= dis["ci_high"], dis


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_memorizing_segmenter_leaks_and_a_disjoint_one_does_not_across_draws(seed):
    mem, dis = _seg_known_answers(seed=seed)
    assert mem["ci_low"] > 0.5, mem
    assert dis["ci_low"] <= 0.5 <= dis["ci_high"], dis


def test_shuffle_controls_never_serve_as_reference_models(tmp_path):
    from bench.privacy.model import ModelRun, _attack_one
    from bench.runfolder import RunFolder

    train = {f"t{i}" for i in range(20)}
    reserve = {f"r{i}" for i in range(20)}
    test = {f"x{i}" for i in range(20)}

    def run(gen, seen):
        return ModelRun(RunFolder(tmp_path / gen, gen), gen, "synthetic", "unet-small", 0, 32, set(seen))

    runs = [
        run("real-holdout", reserve),
        run("none", train),
        run("mask-shuffle", train),
        run("label-shuffle", train),
    ]
    patients = np.array(sorted(train | reserve | test))
    label_of = pd.Series("normal", index=patients)
    phi = np.random.default_rng(0).normal(size=(len(runs), len(patients)))
    a = _attack_one(0, runs, phi, patients, label_of, seed=0)
    assert a.references == ["none"]
    assert set(a.members) == reserve and set(a.nonmembers) <= test
