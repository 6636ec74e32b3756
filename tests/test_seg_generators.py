"""Generators of a segmentation task: image–mask pairs from every pair generator, the copy and shuffle controls, the
mask-shuffle check, and import-synthetic with masks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench.cli import main
from bench.errors import BadInput
from bench.evaluation.controls import check_controls
from bench.generators import generate, get_generator, import_synthetic, list_controls
from bench.generators.pipeline import load_pairs, mask_labels
from bench.generators.segcontrols import CHANCE_DICE, dice_at_chance, shuffled_mask_sources
from bench.imaging import build_cache
from bench.manifest import Manifest, read_manifest, validate_manifest, write_manifest
from bench.phantom import write_phantom
from bench.privacy import audit
from bench.sources import build_manifest
from bench.tasks import load_task

TASK = "mediastinal-neoplasm-seg"
SIZE = 32
PAIRS = ["copycat", "pca-gmm", "mask-shuffle", "real-holdout"]


@pytest.fixture(scope="module")
def task():
    return load_task(TASK)


@pytest.fixture(scope="module")
def env(tmp_path_factory, task):
    root = tmp_path_factory.mktemp("seggen")
    write_phantom(root / "export", patients=60, slices=2, size=48, seed=5, workers=1, masks=True)
    real = root / "real.parquet"
    write_manifest(build_manifest(task, root / "export"), real)
    cache = root / "cache"
    sets = {g: generate(task, g, real, root / g, seed=0, size=SIZE, cache_dir=cache) for g in PAIRS}
    return {"root": root, "real": real, "cache": cache, "sets": sets}


def _train(env, task, split: str = "train") -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    m = read_manifest(env["real"])
    rows = m.df[(m.df["split"] == split) & m.df["site"].isin(task.sites.train)].reset_index(drop=True)
    x, masks = load_pairs(Manifest(rows, m.root, m.path), task, SIZE, env["cache"])
    return rows, x, masks


def _read_set(env, task, gen: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    m = read_manifest(env["sets"][gen] / "manifest.parquet")
    c = build_cache(m, task, size=SIZE, cache_dir=env["cache"], progress=False)
    rows = c.rows(m.df["case_id"].astype(str))
    return m.df, np.asarray(c.images[rows]), np.asarray(c.masks[rows])


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize("gen", PAIRS)
def test_pair_sets_read_back_like_real_pairs(env, task, gen):
    out = env["sets"][gen]
    df, images, masks = _read_set(env, task, gen)
    assert images.shape == (len(df), 1, SIZE, SIZE) and masks.shape == (len(df), SIZE, SIZE)
    assert masks.max() <= len(task.mask_classes) and (masks > 0).any()
    # One mask file per image, named by the manifest, and the label is what the mask shows.
    assert df["mask_path"].tolist() == [f"masks/{c}.png" for c in df["case_id"]]
    assert all((out / p).is_file() for p in df["mask_path"])
    with Image.open(out / df["mask_path"].iloc[0]) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE)
    assert df["label"].tolist() == [task.classes[i] for i in mask_labels(masks, task)]
    assert validate_manifest(read_manifest(out / "manifest.parquet"), task) == []
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["masks"]["pairs"] is True and card["masks"]["classes"] == task.mask_classes
    assert (
        card["samples_per_class"] == df["label"].value_counts().reindex(task.classes, fill_value=0).to_dict()
    )
    assert card["masks"]["n_empty"] == int((masks.reshape(len(masks), -1).max(1) == 0).sum())
    train = read_manifest(out / "train_manifest.parquet")
    assert all(train.image_path(p).is_file() for p in train.df["mask_path"].dropna())
    assert validate_manifest(train, load_task(TASK)) == []


@pytest.mark.parametrize("gen", PAIRS)
def test_pair_sets_are_deterministic_for_a_seed(env, task, gen, tmp_path):
    again = generate(task, gen, env["real"], tmp_path / "again", seed=0, size=SIZE, cache_dir=env["cache"])
    for sub in ("images", "masks"):
        a = sorted((env["sets"][gen] / sub).iterdir())
        b = sorted((again / sub).iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_copycat_copies_each_image_with_its_own_mask(env, task):
    _, x, real_masks = _train(env, task)
    _, images, masks = _read_set(env, task, "copycat")
    d = np.abs(images[:, None].astype(np.float32) - x[None].astype(np.float32)).mean(axis=(2, 3, 4))
    nearest = d.argmin(axis=1)
    assert d.min(axis=1).max() < 4  # the copies carry 2 gray levels of noise, nothing else
    assert np.array_equal(masks, real_masks[nearest])


def test_real_holdout_pairs_are_reserve_pairs(env, task):
    _, x, real_masks = _train(env, task, "reserve")
    _, images, masks = _read_set(env, task, "real-holdout")
    index = {_digest(img): i for i, img in enumerate(x)}
    src = [index[_digest(img)] for img in images]
    assert np.array_equal(masks, real_masks[src])


def test_mask_shuffle_pairs_real_images_with_other_patients_masks(env, task):
    rows, x, real_masks = _train(env, task)
    _, images, masks = _read_set(env, task, "mask-shuffle")
    by_image = {_digest(img): i for i, img in enumerate(x)}
    owner = np.array([by_image[_digest(img)] for img in images])  # every image is a real one, used once
    assert sorted(owner) == list(range(len(x)))
    # The masks are the real masks, rearranged.
    assert sorted(_digest(m) for m in masks) == sorted(_digest(m) for m in real_masks)
    patients = rows["patient_id"].to_numpy()
    lesion = masks.reshape(len(masks), -1).any(1)
    kept = [np.array_equal(masks[k], real_masks[owner[k]]) for k in range(len(masks)) if lesion[k]]
    assert sum(kept) == 0
    # And no image got a mask of its own patient (a neighbouring slice's is nearly its own).
    for k in np.flatnonzero(lesion):
        donors = [j for j in range(len(x)) if np.array_equal(real_masks[j], masks[k])]
        assert any(patients[j] != patients[owner[k]] for j in donors)


@pytest.mark.parametrize("seed", range(8))
def test_shuffled_mask_sources_permute_across_patients_and_classes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 120))
    patients = np.repeat(np.arange(n), 2)[:n]  # two slices per patient
    labels = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    labels[1::2] = labels[::2][: len(labels[1::2])]  # a patient's slices share the class
    src = shuffled_mask_sources(labels, patients, seed)
    assert sorted(src) == list(range(n))
    assert (patients[src] != patients).all()
    # The class of the new mask is independent of the image's own: each cell within about one image of
    # n_a * n_b / N (a plain permutation is off by several).
    table = pd.crosstab(labels, labels[src]).to_numpy()
    counts = np.bincount(labels, minlength=4)
    counts = counts[counts > 0]
    assert np.abs(table - np.outer(counts, counts) / n).max() <= 1.5


def test_pca_gmm_masks_are_lesions_of_the_requested_class_where_that_class_lies(env, task):
    rows, x, masks = _train(env, task)
    y = rows["label"].map(task.classes.index).to_numpy()
    gen = get_generator("pca-gmm")(seed=3)
    gen.fit_pairs(x, masks, y, len(task.classes), len(task.mask_classes))
    want = np.repeat([c for c in np.unique(y)], 12)
    images, out = gen.sample_pairs(want)
    assert images.shape == (len(want), 1, SIZE, SIZE) and out.shape == (len(want), SIZE, SIZE)
    again = get_generator("pca-gmm")(seed=3)
    again.fit_pairs(x, masks, y, len(task.classes), len(task.mask_classes))
    assert all(np.array_equal(a, b) for a, b in zip(again.sample_pairs(want), (images, out), strict=True))
    got = mask_labels(out, task)
    normal = task.classes.index(task.masks.empty_label)
    assert (got[want == normal] == normal).all()
    for c in np.unique(want[want != normal]):
        k = task.mask_classes.index(task.classes[c]) + 1
        sel = want == c
        # Lesions, not blank maps, and mostly of the class asked for.
        assert np.mean(got[sel] == c) >= 0.75
        assert (out[sel] == k).sum(axis=(1, 2)).mean() >= 5
        # Where the class's training lesions lie (their union): a blurred average lesion, not noise.
        where = (masks[y == c] == k).any(axis=0)
        lesion = out[sel] == k
        assert lesion[:, where].sum() >= 0.9 * lesion.sum()


def test_ddpm_generates_pairs_jointly(env, task, tmp_path):
    cfg = {"train_steps": 12, "sample_steps": 4}
    out = generate(
        task, "ddpm", env["real"], tmp_path / "d", seed=1, cache_dir=env["cache"], config=cfg, threads=1
    )
    df = read_manifest(out / "manifest.parquet").df
    c = build_cache(
        read_manifest(out / "manifest.parquet"), task, size=16, cache_dir=env["cache"], progress=False
    )
    masks = np.asarray(c.masks[c.rows(df["case_id"].astype(str))])
    assert masks.shape == (len(df), 16, 16) and masks.max() <= len(task.mask_classes)
    assert df["label"].tolist() == [task.classes[i] for i in mask_labels(masks, task)]
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["masks"]["method"].startswith("joint")
    rows, x, m = _train(env, task)
    y = rows["label"].map(task.classes.index).to_numpy()
    twice = []
    for _ in range(2):
        g = get_generator("ddpm")(config=cfg, seed=1, device="cpu")
        g.fit_pairs(x[:, :, ::2, ::2], m[:, ::2, ::2], y, len(task.classes), len(task.mask_classes))
        twice.append(g.sample_pairs(y[:6]))
    assert twice[0][0].shape == (6, 1, 16, 16) and twice[0][1].shape == (6, 16, 16)
    assert all(np.array_equal(a, b) for a, b in zip(*twice, strict=True))


def test_generators_without_pairs_are_refused_by_name_and_kind(env, task, tmp_path, tiny_task, tiny_manifest):
    with pytest.raises(BadInput, match=r"label-shuffle.*segmentation task.*image–mask pairs"):
        generate(task, "label-shuffle", env["real"], tmp_path / "x", size=SIZE, cache_dir=env["cache"])
    with pytest.raises(BadInput, match=r"mask-shuffle.*classification task"):
        generate(tiny_task, "mask-shuffle", tiny_manifest, tmp_path / "y", cache_dir=env["cache"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_refuses_a_classification_generator_on_a_segmentation_task(env, tmp_path, capsys):
    rc = main(["generate", "--task", TASK, "--generator", "label-shuffle", "--real", str(env["real"]),
               "--out", str(tmp_path / "z"), "--size", str(SIZE)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "label-shuffle" in err and "segmentation" in err


def test_controls_per_task_kind():
    assert "mask-shuffle" not in list_controls() and "label-shuffle" in list_controls()
    assert set(list_controls("segmentation")) == {"copycat", "mask-shuffle", "real-holdout"}
    check = get_generator("mask-shuffle").control.checks[0]
    assert check.kind == "dice_at_chance" and check.regime == "synthetic" and check.margin == CHANCE_DICE


@pytest.mark.parametrize(
    "lo, hi, verdict",
    [(0.0, 0.05, True), (0.02, 0.3, True), (CHANCE_DICE, 0.4, True), (CHANCE_DICE + 0.01, 0.6, False),
     (0.5, 0.7, False), (None, 0.2, None), (float("nan"), 0.2, None)],
)  # fmt: skip
def test_dice_at_chance_verdicts(lo, hi, verdict):
    ok, why = dice_at_chance(lo, hi, CHANCE_DICE)
    assert ok is verdict
    assert (why == "") == (verdict is True)


def test_privacy_audit_flags_copycat_pairs(env, task, tmp_path):
    out = env["sets"]["copycat"]
    r = audit(task, out / "manifest.parquet", out / "train_manifest.parquet", env["real"], tmp_path / "audit",
              features=("pixel",), n_boot=200, size=SIZE, cache_dir=env["cache"])  # fmt: skip
    assert r["flagged"] is True and r["memorization_rate"] > 0.5


# ----------------------------------------------------------------------------------------------------------------
# import-synthetic with masks


@pytest.fixture
def user_pairs(env, task, tmp_path) -> tuple[Path, Path, Path]:
    """A user's folder of pairs: the pca-gmm set's PNGs, a CSV with image and mask columns, a card."""
    src = env["sets"]["pca-gmm"]
    root = tmp_path / "user"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    df = read_manifest(src / "manifest.parquet").df
    for p in list(df["image"]) + list(df["mask_path"]):
        (root / p).write_bytes((src / p).read_bytes())
    csv = root / "labels.csv"
    pd.DataFrame({"image": df["image"], "mask": df["mask_path"], "label": df["label"]}).to_csv(
        csv, index=False
    )
    card = yaml.safe_load((src / "card.yaml").read_text())
    card.pop("masks")
    (root / "card.yaml").write_text(yaml.safe_dump(card))
    return root, csv, root / "card.yaml"


def test_import_pairs_writes_mask_paths_and_labels_from_masks(user_pairs, task, tmp_path):
    root, csv, card = user_pairs
    df = pd.read_csv(csv)
    df.drop(columns="label").to_csv(csv, index=False)
    out = import_synthetic(task, root, csv, card, tmp_path / "syn.parquet")
    m = read_manifest(out)
    assert [Path(p).name for p in m.df["mask_path"]] == [Path(p).name for p in df["mask"]]
    assert m.df["label"].tolist() == df["label"].tolist()
    assert validate_manifest(m, task) == []
    written = yaml.safe_load((tmp_path / "syn.card.yaml").read_text())
    assert written["masks"]["pairs"] is True and written["masks"]["classes"] == task.mask_classes


def _edit_csv(csv: Path, edit) -> None:
    df = pd.read_csv(csv)
    edit(df)
    df.to_csv(csv, index=False)


def _bad_mask(root: Path, name: str, arr: np.ndarray) -> str:
    Image.fromarray(arr.astype(np.uint8), mode="L").save(root / "masks" / name)
    return f"masks/{name}"


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no_column", "column 'mask' missing"),
        ("empty", "row 3: empty 'mask'"),
        ("missing", "row 2: mask 'masks/nowhere.png' not found"),
        ("outside", "row 2: mask '../elsewhere.png' is outside --root"),
        ("shape", "row 2: mask 'masks/small.png': mask is 16x16 pixels, image 32x32"),
        ("values", "row 2: mask 'masks/big.png': label values [9] outside 0..5"),
        ("shared", "the same mask"),
        ("label", "row 2: label 'benign_cyst', but mask"),
    ],
)
def test_import_pairs_bad_cases_exit_2_naming_the_file(user_pairs, tmp_path, capsys, case, expect):
    root, csv, card = user_pairs
    edits = {
        "no_column": lambda df: df.drop(columns="mask", inplace=True),
        "empty": lambda df: df.__setitem__("mask", [m if i != 1 else None for i, m in enumerate(df["mask"])]),
        "missing": lambda df: df.__setitem__("mask", ["masks/nowhere.png"] + list(df["mask"][1:])),
        "outside": lambda df: df.__setitem__("mask", ["../elsewhere.png"] + list(df["mask"][1:])),
        "shape": lambda df: df.__setitem__(
            "mask", [_bad_mask(root, "small.png", np.zeros((16, 16)))] + list(df["mask"][1:])
        ),
        "values": lambda df: df.__setitem__(
            "mask", [_bad_mask(root, "big.png", np.full((SIZE, SIZE), 9))] + list(df["mask"][1:])
        ),
        "shared": lambda df: df.__setitem__("mask", [df["mask"][1]] + list(df["mask"][1:])),
        "label": lambda df: df.__setitem__(
            "label", ["benign_cyst" if df["label"][0] != "benign_cyst" else "thymoma"] + list(df["label"][1:])
        ),
    }
    _edit_csv(csv, edits[case])
    out = tmp_path / "syn.parquet"
    rc = main(["data", "import-synthetic", "--task", TASK, "--root", str(root), "--labels", str(csv),
               "--card", str(card), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    if case == "label":
        expect = expect.replace("'benign_cyst'", repr(pd.read_csv(csv)["label"][0]))
    assert expect in err and str(csv) in err
    assert not out.exists() and not out.with_name("syn.card.yaml").exists()


@pytest.mark.parametrize("ci, status", [((0.02, 0.12), "PASS"), ((0.45, 0.60), "FAIL")])
def test_check_controls_judges_mask_shuffle_by_dice_at_chance(task, ci, status):
    def row(gen, regime, value, lo, hi):
        return dict(generator=gen, regime=regime, backbone="unet-small", metric="dice_macro", scope="overall",
                    split="test", value=value, ci_low=lo, ci_high=hi, status="ok")  # fmt: skip

    table = pd.DataFrame([row("none", "real", 0.6, 0.55, 0.65), row("ms", "synthetic", sum(ci) / 2, *ci)])
    results = check_controls(table, None, {}, task, {"ms": "mask-shuffle"})
    assert {r.control for r in results} == {"copycat", "mask-shuffle", "real-holdout"}
    (r,) = [r for r in results if r.control == "mask-shuffle"]
    assert (r.check, r.metric, r.status) == ("dice_at_chance", "dice_macro", status)
    # Widened to the family's level: the interval it judged contains the one it was given.
    assert r.ci_low <= ci[0] + 1e-9 and r.ci_high >= ci[1] - 1e-9
    assert (r.reason == "") == (status == "PASS")
    # The ratio and gain checks say the metric they compare on: the task's primary, not the classifiers' AUROC.
    (holdout,) = [r for r in results if r.control == "real-holdout"]
    assert "dice_macro ratio" in holdout.expected and "AUROC" not in holdout.expected
