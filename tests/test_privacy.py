"""Privacy audit: known answers (copycat flagged, pca-gmm and fresh real data not), contamination, bad input, and
the nearest-neighbour search against scikit-learn."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench.cli import main
from bench.errors import BadInput
from bench.generators.card import hash_id
from bench.generators.pipeline import generate
from bench.manifest import read_manifest, write_manifest
from bench.privacy import audit, memorization_stats, nearest_neighbors, quantile_ci
from bench.tasks import load_task
from tests.conftest import make_tiny_dataset, write_tiny_task

KEYS = {
    "generator",
    "features",
    "percentile",
    "nominal_rate",
    "memorization_rate",
    "ci_low",
    "ci_high",
    "flagged",
    "holdout_rate",
    "n_synthetic",
    "n_train",
    "n_holdout",
    "contamination",
    "rule",
    "by_feature",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("priv")
    old = os.environ.get("MEDSYNBENCH_CACHE")
    os.environ["MEDSYNBENCH_CACHE"] = str(root / "cache")
    task_path = write_tiny_task(root)
    task = load_task(task_path)
    real = make_tiny_dataset(root / "data", task, patients_per_site=25)
    for g in ("copycat", "pca-gmm"):
        generate(task, g, real, root / g, seed=0)
    yield {"root": root, "task_path": task_path, "task": task, "real": real}
    if old is None:
        os.environ.pop("MEDSYNBENCH_CACHE", None)
    else:
        os.environ["MEDSYNBENCH_CACHE"] = old


def clone(env, name: str) -> Path:
    """A copy of a generator folder beside the original, so its training manifest's relative paths still resolve."""
    import uuid

    dst = env["root"] / f"clone-{uuid.uuid4().hex[:8]}"
    shutil.copytree(env["root"] / name, dst)
    return dst


def cli(env, gen_dir: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "privacy",
            "--task",
            str(env["task_path"]),
            "--synthetic",
            str(gen_dir / "manifest.parquet"),
            "--train",
            str(gen_dir / "train_manifest.parquet"),
            "--holdout",
            str(env["real"]),
            "--out",
            str(out),
            "--features",
            "pixel",
            "--bootstrap",
            "300",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def copycat_report(env):
    out = env["root"] / "audit_copycat"
    assert cli(env, env["root"] / "copycat", out) == 0
    return out


def test_copycat_is_flagged(copycat_report):
    r = json.loads((copycat_report / "privacy.json").read_text())
    assert set(r) >= KEYS
    assert r["generator"] == "copycat" and r["features"] == ["pixel"] and r["percentile"] == 5.0
    assert r["nominal_rate"] == pytest.approx(0.05)
    assert r["flagged"] is True and r["flagged_by"] == ["pixel"]
    assert r["memorization_rate"] >= 0.9 and r["ci_low"] > 0.1
    assert r["ci_low"] <= r["memorization_rate"] <= r["ci_high"]
    # The fresh real half, scored the same way, is nowhere near the copies.
    assert r["holdout_rate"] < 0.25
    q = r["by_feature"]["pixel"]["quantiles"]
    assert q["synthetic"]["q50"]["value"] < q["holdout"]["q05"]["value"]
    assert r["contamination"]["status"] == "pass" and r["contamination"]["duplicates"] == []


def test_outputs_hold_no_raw_ids(env, copycat_report):
    real = read_manifest(env["real"]).df
    text = (copycat_report / "privacy.json").read_text()
    dist = pd.read_parquet(copycat_report / "distances.parquet")
    blob = text + dist.to_csv()
    assert not any(pid in blob for pid in real["patient_id"].unique())
    assert not any(cid in blob for cid in real["case_id"])
    assert set(dist["role"]) == {"synthetic", "holdout_calibration", "holdout_fresh"}
    r = json.loads(text)
    n = dist.groupby("role").size()
    assert n["synthetic"] == r["n_synthetic"]
    assert n["holdout_calibration"] + n["holdout_fresh"] == r["n_holdout"]
    # The reported rate is the share of synthetic rows below the threshold, as stored.
    syn = dist[dist["role"] == "synthetic"]
    assert syn["below_threshold"].mean() == pytest.approx(r["memorization_rate"])
    with Image.open(copycat_report / "closest_pairs.png") as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_pca_gmm_is_not_flagged(env):
    out = env["root"] / "audit_pca"
    assert cli(env, env["root"] / "pca-gmm", out) == 0
    r = json.loads((out / "privacy.json").read_text())
    assert r["flagged"] is False and r["memorization_rate"] < 0.1
    assert r["contamination"]["status"] == "pass"


def test_fresh_real_sample_scores_near_nominal(env, tmp_path):
    """Real images the generator never saw, presented as a synthetic set: the rate is the nominal 5%, not flagged."""
    task = env["task"]
    other = make_tiny_dataset(tmp_path / "fresh", task, patients_per_site=25, seed=11)
    df = read_manifest(other).df
    df = df[df["site"].isin(task.sites.train)].copy()
    m = read_manifest(other)
    df["image"] = [str(m.image_path(p)) for p in df["image"]]
    df["case_id"] = ["syn-real-" + c for c in df["case_id"]]
    df["patient_id"] = df["case_id"]
    df["site"], df["origin"], df["generator"], df["split"] = "synthetic", "synthetic", "real-fresh", "train"
    syn_dir = tmp_path / "as_synthetic"
    syn_dir.mkdir()
    write_manifest(df, syn_dir / "manifest.parquet")
    shutil.copy(env["root"] / "copycat" / "card.yaml", syn_dir / "card.yaml")
    r = audit(
        env["task_path"],
        syn_dir / "manifest.parquet",
        env["root"] / "copycat" / "train_manifest.parquet",
        env["real"],
        tmp_path / "audit",
        features=("pixel",),
        n_boot=300,
    )
    assert r["flagged"] is False
    assert r["memorization_rate"] < 0.15
    assert r["ci_low"] <= 0.05 <= r["ci_high"]


def test_memorization_stats_nominal_and_copies():
    """Large samples from one distribution give the nominal rate; near-zero distances give ~100% and a flag."""
    rng = np.random.default_rng(0)
    cal, fresh, syn = (rng.gamma(5.0, 1.0, 20000) for _ in range(3))
    st = memorization_stats(syn, cal, fresh, 5.0, n_boot=200, seed=1)
    assert st["threshold"] == pytest.approx(np.percentile(cal, 5))
    assert abs(st["memorization_rate"] - 0.05) < 0.01 and abs(st["holdout_rate"] - 0.05) < 0.01
    assert st["ci_low"] <= 0.05 <= st["ci_high"] and not st["flagged"]
    copies = rng.uniform(0, 0.1, 500)
    st = memorization_stats(copies, cal, fresh, 5.0, n_boot=200, seed=1)
    assert st["memorization_rate"] == 1.0 and st["flagged"]
    # 2x nominal with an interval that still covers the nominal rate is not flagged (sampling error).
    few = np.concatenate([np.full(2, 0.01), np.full(18, 100.0)])  # 10% of 20 images
    st = memorization_stats(few, cal, fresh, 5.0, n_boot=500, seed=1)
    assert st["memorization_rate"] == pytest.approx(0.1) and st["ci_low"] <= 0.05 and not st["flagged"]


def test_cluster_bootstrap_keeps_patients_whole():
    from bench.privacy import _ClusterSampler

    groups = np.array(["b", "a", "b", "c", "a", "a", "d"])
    sizes = {"a": 3, "b": 2, "c": 1, "d": 1}
    sampler, rng = _ClusterSampler(groups), np.random.default_rng(0)
    for _ in range(50):
        rows = sampler(rng)
        picked = pd.Series(groups[rows]).value_counts()
        # Every patient drawn k times contributes exactly k x its rows, and 4 patients are drawn.
        assert all(n % sizes[g] == 0 for g, n in picked.items())
        assert sum(n // sizes[g] for g, n in picked.items()) == 4


def test_quantile_ci_order_statistics():
    v = np.arange(100.0)
    # Binomial(100, 0.5): 2.5% and 97.5% points are 40 and 60 -> the 40th and 61st order statistics.
    val, lo, hi = quantile_ci(v, 0.5)
    assert (val, lo, hi) == (49.5, 39.0, 60.0)


def test_nearest_neighbors_matches_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    q = rng.standard_normal((301, 17)).astype(np.float32)
    r = rng.standard_normal((203, 17)).astype(np.float32)
    r[50] = r[10]  # an exact tie: the lower index wins, as in scikit-learn
    q[0] = r[10]
    d_ref, i_ref = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(r).kneighbors(q)
    for block, ref_block in ((7, 5), (64, 1000), (4096, 8192)):
        d, i = nearest_neighbors(q, r, block=block, ref_block=ref_block, device="cpu")
        assert np.array_equal(i, i_ref[:, 0])
        np.testing.assert_allclose(d, d_ref[:, 0], atol=1e-5)
    assert i[0] == 10 and d[0] == 0.0


def test_external_site_in_card_fails_contamination(env, tmp_path):
    gen = clone(env, "pca-gmm")
    card = yaml.safe_load((gen / "card.yaml").read_text())
    card["training"]["sites"] = card["training"]["sites"] + ["x1"]
    test_pid = read_manifest(env["real"]).df.query("split == 'test'")["patient_id"].iloc[0]
    card["training"]["patients"] = card["training"]["patients"] + [hash_id(test_pid)]
    (gen / "card.yaml").write_text(yaml.safe_dump(card))
    r = audit(
        env["task_path"],
        gen / "manifest.parquet",
        gen / "train_manifest.parquet",
        env["real"],
        tmp_path / "audit",
        features=("pixel",),
        n_boot=100,
    )
    c = r["contamination"]
    assert c["status"] == "fail"
    assert any("external site" in p and "x1" in p for p in c["problems"])
    assert any("1 test patient" in p and hash_id(test_pid)[:16] in p for p in c["problems"])
    assert test_pid not in json.dumps(r)


def test_duplicates_of_test_and_external_images_are_listed(env, tmp_path):
    gen = clone(env, "pca-gmm")
    real = read_manifest(env["real"])
    syn = read_manifest(gen / "manifest.parquet")
    t_row = real.df[real.df["split"] == "test"].index[0]
    x_row = real.df[real.df["split"] == "external"].index[0]
    exact_src = np.asarray(Image.open(real.image_path(real.df.at[t_row, "image"])))
    near_src = np.asarray(Image.open(real.image_path(real.df.at[x_row, "image"]))).astype(float)
    near = np.clip(near_src + np.random.default_rng(0).normal(0, 1.0, near_src.shape), 0, 255).astype(
        np.uint8
    )
    Image.fromarray(exact_src).save(syn.image_path(syn.df.at[0, "image"]))
    Image.fromarray(near).save(syn.image_path(syn.df.at[1, "image"]))
    r = audit(
        env["task_path"],
        gen / "manifest.parquet",
        gen / "train_manifest.parquet",
        env["real"],
        tmp_path / "audit",
        features=("pixel",),
        n_boot=100,
    )
    c = r["contamination"]
    assert c["status"] == "fail"
    got = {(d["synthetic"], d["kind"], d["split"]) for d in c["duplicates"]}
    assert got == {(syn.df.at[0, "case_id"], "exact", "test"), (syn.df.at[1, "case_id"], "near", "external")}
    assert c["duplicates"][0]["distance"] == 0.0
    assert c["duplicates"][0]["real"] == hash_id(real.df.at[t_row, "case_id"])[:16]


def test_classifier_features_from_checkpoint(env, tmp_path):
    import torch

    from bench.models import create_model
    from bench.train import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", create_model("resnet10t", 3, 1), {"note": "test"})
    out = tmp_path / "audit"
    assert (
        cli(env, env["root"] / "copycat", out, "--features", "pixel,classifier", "--checkpoint", str(ckpt))
        == 0
    )
    r = json.loads((out / "privacy.json").read_text())
    assert r["features"] == ["pixel", "classifier"]
    assert set(r["by_feature"]) == {"pixel", "classifier"}
    # privacy.json travels (records, bundles): the checkpoint is named relative to a working folder, never by its
    # absolute path.
    assert r["classifier"]["checkpoint"] in {"checkpoint.pt", f"{tmp_path.name}/checkpoint.pt"}
    assert not r["classifier"]["checkpoint"].startswith("/")
    assert r["flagged"] is True
    # Headline numbers are those of the feature space with the highest rate.
    assert r["memorization_rate"] == max(v["memorization_rate"] for v in r["by_feature"].values())
    dist = pd.read_parquet(out / "distances.parquet")
    assert set(dist["feature"]) == {"pixel", "classifier"}


def test_classifier_trained_when_no_checkpoint(env, tmp_path):
    r = audit(
        env["task_path"],
        env["root"] / "copycat" / "manifest.parquet",
        env["root"] / "copycat" / "train_manifest.parquet",
        env["real"],
        tmp_path / "audit",
        features=("classifier",),
        n_boot=100,
        classifier_epochs=1,
    )
    assert r["features"] == ["classifier"] and r["classifier"]["backbone"] == "resnet10t"
    assert 0.0 <= r["memorization_rate"] <= 1.0


# -- bad input ----------------------------------------------------------------------------------------------------


def test_synthetic_manifest_without_card(env, tmp_path, capsys):
    gen = clone(env, "copycat")
    (gen / "card.yaml").unlink()
    out = tmp_path / "audit"
    assert cli(env, gen, out) == 2
    err = capsys.readouterr().err
    assert "without a generator card" in err and str(gen / "manifest.parquet") in err
    assert not out.exists()


def test_card_hash_must_match_train_manifest(env, tmp_path, capsys):
    out = tmp_path / "audit"
    rc = main(
        [
            "privacy",
            "--task",
            str(env["task_path"]),
            "--synthetic",
            str(env["root"] / "copycat" / "manifest.parquet"),
            "--train",
            str(env["root"] / "copycat" / "train_manifest.parquet"),
            "--card",
            str(env["root"] / "copycat" / "card.yaml"),
            "--holdout",
            str(env["real"]),
            "--out",
            str(out),
            "--features",
            "pixel",
        ]
    )
    assert rc == 0
    # The real manifest is not what the generator trained on.
    out2 = tmp_path / "audit2"
    rc = main(
        [
            "privacy",
            "--task",
            str(env["task_path"]),
            "--synthetic",
            str(env["root"] / "copycat" / "manifest.parquet"),
            "--train",
            str(env["real"]),
            "--holdout",
            str(env["real"]),
            "--out",
            str(out2),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "training.manifest_sha256" in err and str(env["real"]) in err and "card.yaml" in err
    assert not out2.exists()


@pytest.mark.parametrize("shape, culprit", [((20, 32), "20x32"), ((32, 32, 3), "3 channel")])
def test_synthetic_image_of_wrong_size_or_channels(env, tmp_path, capsys, shape, culprit):
    gen = clone(env, "copycat")
    syn = read_manifest(gen / "manifest.parquet")
    bad = syn.image_path(syn.df.at[3, "image"])
    Image.fromarray(np.zeros(shape, np.uint8)).save(bad)
    out = tmp_path / "audit"
    assert cli(env, gen, out) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "row 3" in err and culprit in err
    assert not out.exists()


def test_bad_options(env, tmp_path, capsys):
    out = tmp_path / "audit"
    assert cli(env, env["root"] / "copycat", out, "--features", "pixel,sift") == 2
    assert "sift" in capsys.readouterr().err
    assert cli(env, env["root"] / "copycat", out, "--percentile", "70") == 2
    assert "--percentile" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(BadInput, match="not a previous audit"):
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("keep me")
        audit(
            env["task_path"],
            env["root"] / "copycat" / "manifest.parquet",
            env["root"] / "copycat" / "train_manifest.parquet",
            env["real"],
            tmp_path / "busy",
            features=("pixel",),
        )
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_known_answers_on_the_phantom_task(tmp_path, monkeypatch):
    """On the built-in CT phantom: copycat is flagged; pca-gmm and the tiny ddpm are not."""
    from bench.phantom import write_phantom
    from bench.sources import build_manifest

    monkeypatch.setenv("MEDSYNBENCH_CACHE", str(tmp_path / "cache"))
    task = load_task("mediastinal-neoplasm")
    # 400 patients give the generators about 190 training images. On 68 (150 patients) the tiny ddpm does memorize
    # since task 3.0.0's crop (measured rate 0.19 against a nominal 0.05; 0.052 on 134 images, 0.011 on 186), and
    # the audit rightly flags it.
    write_phantom(tmp_path / "dicom", patients=400, slices=2, size=64, seed=0)
    real = tmp_path / "manifest.parquet"
    write_manifest(build_manifest(task, tmp_path / "dicom"), real)
    flagged = {}
    for g in ("copycat", "pca-gmm", "ddpm"):
        generate(task, g, real, tmp_path / g, preset="smoke" if g != "ddpm" else None, seed=0)
        r = audit(
            task,
            tmp_path / g / "manifest.parquet",
            tmp_path / g / "train_manifest.parquet",
            real,
            tmp_path / f"audit-{g}",
            features=("pixel",),
            n_boot=300,
        )
        flagged[g] = r["flagged"]
        assert r["contamination"]["status"] == "pass", (g, r["contamination"])
    assert flagged == {"copycat": True, "pca-gmm": False, "ddpm": False}
