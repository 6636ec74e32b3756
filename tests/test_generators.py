"""Reference generators: the output contract, the card, class counts, subgroup restriction, determinism."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.cli import main
from bench.errors import BadInput
from bench.generators import get_generator, list_generators
from bench.generators.card import hash_id, read_card
from bench.generators.pipeline import class_counts, generate
from bench.manifest import manifest_hash, read_manifest, validate_manifest
from bench.tasks import load_task
from tests.conftest import make_tiny_dataset, write_tiny_task

TINY_DDPM = [
    "--set",
    "channels=[8, 16]",
    "--set",
    "norm_num_groups=4",
    "--set",
    "train_steps=3",
    "--set",
    "sample_steps=2",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One task + real dataset shared by the module; the image cache lives in the module's temp folder."""
    root = tmp_path_factory.mktemp("gen")
    old = os.environ.get("MEDSYNBENCH_CACHE")
    os.environ["MEDSYNBENCH_CACHE"] = str(root / "cache")
    task_path = write_tiny_task(root)
    task = load_task(task_path)
    manifest = make_tiny_dataset(root / "data", task, patients_per_site=15)
    yield {"root": root, "task_path": task_path, "task": task, "real": manifest}
    if old is None:
        os.environ.pop("MEDSYNBENCH_CACHE", None)
    else:
        os.environ["MEDSYNBENCH_CACHE"] = old


@pytest.fixture(scope="module")
def copycat(env):
    out = env["root"] / "copycat"
    rc = main(
        [
            "generate",
            "--task",
            str(env["task_path"]),
            "--generator",
            "copycat",
            "--real",
            str(env["real"]),
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    return out


def _expected_train(env) -> pd.DataFrame:
    df = read_manifest(env["real"]).df
    return df[(df["split"] == "train") & df["site"].isin(env["task"].sites.train)]


def test_registry_names():
    assert {"copycat", "pca-gmm", "ddpm"} <= set(list_generators())
    with pytest.raises(BadInput, match="nope"):
        get_generator("nope")


def test_copycat_output_contract(env, copycat):
    task = env["task"]
    syn = read_manifest(copycat / "manifest.parquet")
    assert validate_manifest(syn, task, check_images=True) == []
    df = syn.df
    exp = _expected_train(env)
    assert len(df) == len(exp)
    assert set(df["origin"]) == {"synthetic"} and set(df["generator"]) == {"copycat"}
    assert set(df["split"]) == {"train"} and set(df["site"]) == {"synthetic"}
    assert (df["case_id"] == df["patient_id"]).all() and df["case_id"].is_unique
    assert df["case_id"].str.match(r"^syn-copycat-\d{6}$").all()
    # Samples per class follow the training class distribution exactly (default).
    assert df["label"].value_counts().to_dict() == exp["label"].value_counts().to_dict()
    for col in ("sex", "age", "age_group"):
        assert col in df.columns
    # Metadata is drawn from training rows of the same class.
    pairs = set(zip(exp["label"], exp["sex"], exp["age"], strict=True))
    assert set(zip(df["label"], df["sex"], df["age"], strict=True)) <= pairs
    img = Image.open(syn.image_path(df["image"][0]))
    assert img.mode == "L" and img.size == (32, 32)


def test_train_manifest_and_card(env, copycat):
    exp = _expected_train(env)
    tr = read_manifest(copycat / "train_manifest.parquet")
    assert set(tr.df["case_id"]) == set(exp["case_id"])
    # Image paths still resolve to the real images.
    assert all(p.is_file() for p in tr.image_paths())
    card = read_card(copycat / "card.yaml")
    assert card.name == "copycat" and card.seed == 3 and card.version
    assert card.training.manifest_sha256 == manifest_hash(tr.df)
    assert card.training.sites == sorted(set(exp["site"]))
    assert card.training.patients == sorted(hash_id(p) for p in exp["patient_id"].unique())
    assert card.training.n_images == len(exp)
    assert card.samples_per_class == {c: int((exp["label"] == c).sum()) for c in env["task"].classes}
    assert card.config["noise_std"] == 2.0 and card.config["max_shift"] == 0  # the tiny preset
    text = (copycat / "card.yaml").read_text()
    assert not any(str(p) in text for p in exp["patient_id"]), "raw patient ids in the card"


def test_copycat_images_are_perturbed_training_images(env, copycat):
    from bench.generators.pipeline import load_pixels

    task = env["task"]
    syn = read_manifest(copycat / "manifest.parquet")
    tr = read_manifest(copycat / "train_manifest.parquet")
    xs = load_pixels(syn, task, 32).astype(float)
    xt = load_pixels(tr, task, 32).astype(float)
    pad = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    for i in range(len(xs)):
        # Undo the (at most one pixel) shift: some shift of the synthetic image matches a training image up to
        # the noise (sd 2 gray levels), in the interior where edge repetition plays no part.
        best = min(
            np.abs(pad[i, :, 1 + dy : 33 + dy, 1 + dx : 33 + dx][:, 2:-2, 2:-2] - xt[:, :, 2:-2, 2:-2])
            .mean(axis=(1, 2, 3))
            .min()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        assert best < 2.5, i
    # ... and it is not just the training set unchanged.
    assert not all(any(np.array_equal(a, b) for b in xt) for a in xs[:5])


def test_class_counts_largest_remainder():
    labels = pd.Series(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    # 7 * (0.5, 0.3, 0.2) = (3.5, 2.1, 1.4): floors (3, 2, 1), the leftover goes to the largest remainder (a).
    assert class_counts(labels, ["a", "b", "c"], n=7) == {"a": 4, "b": 2, "c": 1}
    assert class_counts(labels, ["a", "b", "c"]) == {"a": 5, "b": 3, "c": 2}
    assert class_counts(labels, ["a", "b", "c"], per_class=4) == {"a": 4, "b": 4, "c": 4}
    assert sum(class_counts(labels, ["a", "b", "c"], n=1001).values()) == 1001
    with pytest.raises(BadInput, match="--n"):
        class_counts(labels, ["a", "b", "c"], n=0)


def test_pca_gmm_matches_class_statistics_and_is_seeded(env):
    from bench.generators.pipeline import load_pixels

    task = env["task"]
    out1, out2, out3 = (env["root"] / f"pca{k}" for k in range(3))
    for out, seed in ((out1, 0), (out2, 0), (out3, 1)):
        generate(env["task_path"], "pca-gmm", env["real"], out, n=90, seed=seed)
    s1, s2, s3 = (read_manifest(o / "manifest.parquet") for o in (out1, out2, out3))
    x1, x2, x3 = (load_pixels(m, task, 32) for m in (s1, s2, s3))
    assert np.array_equal(x1, x2) and not np.array_equal(x1, x3)
    assert len(s1.df) == 90
    tr = read_manifest(out1 / "train_manifest.parquet")
    xt = load_pixels(tr, task, 32).astype(float)
    for c in task.classes:
        a = x1[(s1.df["label"] == c).to_numpy()].astype(float)
        b = xt[(tr.df["label"] == c).to_numpy()]
        # Class mean brightness and per-image contrast (PPCA residual noise restored) follow the training class.
        assert abs(a.mean() - b.mean()) < 4.0, c
        assert abs(a.std(axis=(1, 2, 3)).mean() / b.std(axis=(1, 2, 3)).mean() - 1) < 0.25, c
    # disc images are brighter than blank ones, in the synthetic set as in the real one.
    means = {c: x1[(s1.df["label"] == c).to_numpy()].mean() for c in task.classes}
    assert means["disc"] > means["blank"] + 5


def test_only_trains_and_samples_the_subgroup(env):
    out = env["root"] / "only_m"
    rc = main(
        [
            "generate",
            "--task",
            str(env["task_path"]),
            "--generator",
            "pca-gmm",
            "--real",
            str(env["real"]),
            "--out",
            str(out),
            "--only",
            "sex=M",
            "--per-class",
            "5",
        ]
    )
    assert rc == 0
    tr = read_manifest(out / "train_manifest.parquet").df
    exp = _expected_train(env)
    assert set(tr["case_id"]) == set(exp.loc[exp["sex"] == "M", "case_id"])
    syn = read_manifest(out / "manifest.parquet").df
    assert set(syn["sex"]) == {"M"} and len(syn) == 15
    assert read_card(out / "card.yaml").only == {"sex": "M"}


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["--generator", "nope"], "nope"),
        (["--generator", "copycat", "--only", "colour=red"], "colour"),
        (["--generator", "copycat", "--only", "sex"], "sex"),
        (["--generator", "copycat", "--config", "huge"], "huge"),
        (["--generator", "pca-gmm", "--set", "bogus=1"], "bogus"),
        (["--generator", "copycat", "--n", "10", "--per-class", "3"], "--per-class"),
    ],
)
def test_generate_bad_input_exit_2(env, extra, culprit, capsys):
    out = env["root"] / "bad"
    rc = main(
        ["generate", "--task", str(env["task_path"]), "--real", str(env["real"]), "--out", str(out), *extra]
    )
    assert rc == 2
    assert culprit in capsys.readouterr().err
    assert not out.exists()


def test_generate_refuses_existing_out_and_leaves_no_partial(env, copycat, capsys):
    before = sorted(p.name for p in copycat.iterdir())
    rc = main(
        [
            "generate",
            "--task",
            str(env["task_path"]),
            "--generator",
            "copycat",
            "--real",
            str(env["real"]),
            "--out",
            str(copycat),
        ]
    )
    assert rc == 2 and str(copycat) in capsys.readouterr().err
    assert sorted(p.name for p in copycat.iterdir()) == before
    leftovers = [p for p in copycat.parent.iterdir() if p.name.startswith(".copycat")]
    assert leftovers == []


def test_real_manifest_without_training_rows(env, tmp_path, capsys):
    from bench.manifest import write_manifest

    m = read_manifest(env["real"])
    df = m.df[m.df["split"] != "train"].copy()
    df["image"] = [str(p) for p in m.subset(m.df["split"] != "train").image_paths()]
    bad = tmp_path / "no_train.parquet"
    write_manifest(df, bad)
    out = tmp_path / "o"
    rc = main(
        [
            "generate",
            "--task",
            str(env["task_path"]),
            "--generator",
            "copycat",
            "--real",
            str(bad),
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "no real training rows" in capsys.readouterr().err and not out.exists()


def test_ddpm_smoke_cli(env):
    out = env["root"] / "ddpm"
    rc = main(
        [
            "generate",
            "--task",
            str(env["task_path"]),
            "--generator",
            "ddpm",
            "--real",
            str(env["real"]),
            "--out",
            str(out),
            "--size",
            "16",
            "--n",
            "6",
            *TINY_DDPM,
        ]
    )
    assert rc == 0
    syn = read_manifest(out / "manifest.parquet")
    assert validate_manifest(syn, env["task"], check_images=True) == []
    assert Image.open(syn.image_paths()[0]).size == (16, 16)
    card = read_card(out / "card.yaml")
    assert card.config["train_steps"] == 3 and card.config["channels"] == [8, 16]
    assert card.image.size == 16


def test_ddpm_is_seeded():
    cls = get_generator("ddpm")
    cfg = {"preset": "tiny", "channels": [8, 16], "norm_num_groups": 4, "train_steps": 2, "sample_steps": 2}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8)
    y = np.arange(12) % 3
    outs = []
    for seed in (5, 5, 6):
        g = cls(config=cfg, seed=seed, device="cpu")
        g.fit(x, y, 3)
        outs.append(g.sample(np.array([0, 1, 2, 2])))
    assert outs[0].shape == (4, 1, 16, 16) and outs[0].dtype == np.uint8
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_ddpm_full_preset_builds_a_larger_network():
    cls = get_generator("ddpm")
    tiny, full = cls(config="tiny", device="cpu"), cls(config="full", device="cpu")
    n = {k: sum(p.numel() for p in g._build(1, 3).parameters()) for k, g in (("tiny", tiny), ("full", full))}
    assert n["full"] > 50 * n["tiny"]
    assert full.default_size(224) == 128 and tiny.default_size(224) == 16 and tiny.default_size(12) == 12


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_ddpm_other_targets_train_and_sample(prediction):
    g = get_generator("ddpm")(
        config={
            "preset": "tiny",
            "channels": [8, 16],
            "norm_num_groups": 4,
            "train_steps": 2,
            "sample_steps": 2,
            "prediction": prediction,
        },
        device="cpu",
    )
    x = np.random.default_rng(0).integers(0, 256, (6, 1, 16, 16), dtype=np.uint8)
    g.fit(x, np.arange(6) % 3, 3)
    out = g.sample(np.array([0, 2]))
    assert out.shape == (2, 1, 16, 16) and out.dtype == np.uint8


@pytest.mark.slow
def test_tiny_ddpm_not_flagged(env):
    from bench.privacy import audit

    out = env["root"] / "ddpm_tiny"
    generate(env["task_path"], "ddpm", env["real"], out, config="tiny", seed=0)
    r = audit(
        env["task_path"],
        out / "manifest.parquet",
        out / "train_manifest.parquet",
        env["real"],
        env["root"] / "ddpm_privacy",
        features=("pixel",),
        n_boot=300,
    )
    assert not r["flagged"], r["by_feature"]
