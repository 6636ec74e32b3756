"""Public releases as users download them: HAM10000's official metadata quirk, predefined splits, MedMNIST .npz.

Every dataset here is made up in the test (tiny images with the releases' layout and keys); nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from bench.cli import main
from bench.imaging import PreprocessSpec, build_cache, cache_key, load_image
from bench.manifest import read_manifest, validate_manifest
from bench.tasks import load_task
from tests.conftest import TINY_TASK, draw_shape

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


# ---------------------------------------------------------------------------------------------------------------
# HAM10000: the official metadata records nine lesions at both ViDIR sites


def _ham_release(tmp_path: Path, extra: list[dict] | None = None) -> tuple[Path, pd.DataFrame]:
    """A made-up HAM10000 download: official column names and layout, 16x12 JPEGs, lesions HAM_0000001.. at four
    sites, two of them (HAM_0000900, HAM_0000901) imaged at vidir_modern and vidir_molemax as in the release."""
    rng = np.random.default_rng(0)
    root = tmp_path / "HAM10000"
    parts = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
    for p in parts:
        p.mkdir(parents=True)
    rows = []
    n = 0

    def add(lesion: str, site: str, dx: str) -> None:
        nonlocal n
        iid = f"ISIC_{n:07d}"
        img = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(parts[n % 2] / f"{iid}.jpg")
        rows.append(
            {
                "lesion_id": lesion,
                "image_id": iid,
                "dx": dx,
                "dx_type": "histo",
                "age": str(float(30 + n % 50)),
                "sex": ("male", "female")[n % 2],
                "localization": "back",
                "dataset": site,
            }
        )
        n += 1

    k = 0
    for site, lesions in [("vidir_modern", 24), ("vidir_molemax", 24), ("rosendahl", 8), ("vienna_dias", 6)]:
        for _ in range(lesions):
            k += 1
            for _ in range(1 + k % 2):
                add(f"HAM_{k:07d}", site, HAM_CLASSES[k % 7])
    for lesion in ("HAM_0000900", "HAM_0000901"):
        add(lesion, "vidir_modern", "nv")
        add(lesion, "vidir_molemax", "nv")
        add(lesion, "vidir_molemax", "nv")
    for r in extra or []:
        add(**r)
    meta = pd.DataFrame(rows)
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root, meta


def _ham_manifest(root: Path, out: Path, *options: str) -> int:
    args = ["data", "manifest", "--task", "ham10000", "--root", str(root), "--out", str(out)]
    for o in options:
        args += ["--option", o]
    return main(args)


def test_official_quirk_lesion_at_both_training_sites_builds_unchanged(tmp_path, caplog):
    root, meta = _ham_release(tmp_path)
    before = (root / "HAM10000_metadata.csv").read_bytes()
    out = tmp_path / "full.parquet"
    with caplog.at_level(logging.WARNING):
        assert _ham_manifest(root, out) == 0
    assert (root / "HAM10000_metadata.csv").read_bytes() == before
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "2 lesion(s) recorded at two sites" in warned
    assert "HAM_0000900: vidir_modern, vidir_molemax" in warned and "HAM_0000901" in warned
    task = load_task("ham10000")
    m = read_manifest(out)
    df = m.df
    assert len(df) == len(meta) and validate_manifest(m, task, check_images=True) == []
    for lesion in ("HAM_0000900", "HAM_0000901"):
        rows = df[df["patient_id"] == lesion]
        # All three images stay, each with its own site, in one training split (the unit is the lesion).
        assert len(rows) == 3 and sorted(rows["site"]) == ["vidir_modern", "vidir_molemax", "vidir_molemax"]
        assert rows["split"].nunique() == 1 and rows["split"].iloc[0] in {"train", "val", "test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(df.loc[df["site"].isin(task.sites.external), "split"]) == {"external"}


def test_lesion_at_training_and_external_site_needs_an_option(tmp_path, capsys, caplog):
    leak = [
        {"lesion": "HAM_0000950", "site": "vidir_modern", "dx": "mel"},
        {"lesion": "HAM_0000950", "site": "rosendahl", "dx": "mel"},
        {"lesion": "HAM_0000950", "site": "rosendahl", "dx": "mel"},
    ]
    root, meta = _ham_release(tmp_path, leak)
    out = tmp_path / "m.parquet"
    assert _ham_manifest(root, out) == 2
    err = capsys.readouterr().err
    assert "HAM10000_metadata.csv" in err and "HAM_0000950" in err and "['rosendahl', 'vidir_modern']" in err
    assert "cross_site_lesions=drop" in err and not out.exists()
    leak_lines = [i + 2 for i in meta.index[meta["lesion_id"] == "HAM_0000950"]]
    assert f"lines {', '.join(map(str, leak_lines))}" in err

    def lesion_rows(option: str) -> pd.DataFrame:
        o = tmp_path / f"{option}.parquet"
        with caplog.at_level(logging.WARNING):
            assert _ham_manifest(root, o, f"cross_site_lesions={option}") == 0
        df = read_manifest(o).df
        assert len(df) == len(meta) - {"drop": 3, "train": 2, "external": 1}[option]
        return df[df["patient_id"] == "HAM_0000950"]

    assert lesion_rows("drop").empty
    kept = lesion_rows("train")
    assert list(kept["site"]) == ["vidir_modern"] and kept["split"].iloc[0] != "external"
    kept = lesion_rows("external")
    assert list(kept["site"]) == ["rosendahl"] * 2 and set(kept["split"]) == {"external"}
    assert "HAM_0000950" in caplog.text and "removed" in caplog.text
    assert _ham_manifest(root, tmp_path / "x.parquet", "cross_site_lesions=merge") == 2
    assert "cross_site_lesions" in capsys.readouterr().err


def test_ham10000_header_only_or_non_utf8_metadata_exit_2(tmp_path, capsys):
    root, meta = _ham_release(tmp_path)
    path = root / "HAM10000_metadata.csv"
    meta.head(0).to_csv(path, index=False)
    assert _ham_manifest(root, tmp_path / "m.parquet") == 2
    assert f"{path}: the metadata table has a header but no rows" in capsys.readouterr().err
    meta.to_csv(path, index=False)
    path.write_bytes(path.read_bytes().replace(b"back", b"b\xe4ck", 1))
    assert _ham_manifest(root, tmp_path / "m.parquet") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "utf-8" in err.lower() and "Traceback" not in err
    assert not (tmp_path / "m.parquet").exists()


# ---------------------------------------------------------------------------------------------------------------
# Predefined splits: a column of the source says train / val / test


def _folder_with_split_column(tmp_path: Path, n_patients: int = 18) -> tuple[Path, Path, pd.DataFrame]:
    spec = dict(TINY_TASK, name="tinyfixed", splits={"unit": "patient_id", "from_column": "official"})
    tdir = tmp_path / "tasks" / "tinyfixed"
    tdir.mkdir(parents=True)
    (tdir / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        site = ["s1", "s2", "s3", "x1"][p % 4]
        split = ["train", "train", "valid", "test", "train", "Test"][p % 6]
        for k in range(2):
            label = TINY_TASK["labels"]["classes"][(p + k) % 3]
            rel = f"img/p{p:02d}_{k}.png"
            Image.fromarray(draw_shape(label, rng, size=16)).save(root / rel)
            rows.append(
                {"image": rel, "patient_id": f"p{p:02d}", "label": label, "site": site, "official": split}
            )
    table = pd.DataFrame(rows)
    table.to_csv(root / "labels.csv", index=False)
    return tdir / "task.yaml", root, table


def test_predefined_splits_are_used_as_given_and_external_stays_external(tmp_path):
    task_path, root, table = _folder_with_split_column(tmp_path)
    out = tmp_path / "m.parquet"
    assert main(["data", "manifest", "--task", str(task_path), "--root", str(root), "--out", str(out)]) == 0
    df = read_manifest(out).df.set_index("case_id")
    t = table.assign(case_id=table["image"].str.replace(".png", "", regex=False)).set_index("case_id")
    expected = t["official"].str.lower().map({"train": "train", "valid": "val", "test": "test"})
    expected[t["site"] == "x1"] = "external"
    assert (df.loc[t.index, "split"] == expected).all()
    assert set(df["split"]) == {"train", "val", "test", "external"}
    # The same source with drawn splits gives another assignment: the column, not the seed, decided.
    drawn = load_task(task_path).model_copy(
        update={"splits": load_task(task_path).splits.model_copy(update={"from_column": None})}
    )
    from bench.sources import build_manifest

    assert not (build_manifest(drawn, root).set_index("case_id").loc[t.index, "split"] == expected).all()


def test_predefined_splits_leakage_bad_value_and_missing_column(tmp_path, capsys):
    task_path, root, table = _folder_with_split_column(tmp_path)

    def build() -> int:
        return main(
            [
                "data",
                "manifest",
                "--task",
                str(task_path),
                "--root",
                str(root),
                "--out",
                str(tmp_path / "m.csv"),
            ]
        )

    leaky = table.copy()
    leaky.loc[1, "official"] = "test"  # patient p00's second image, the first is in train
    leaky.to_csv(root / "labels.csv", index=False)
    assert build() == 2
    err = capsys.readouterr().err
    assert "splits.from_column" in err and "patient_id 'p00' is in splits ['test', 'train']" in err
    assert "img/p00_0" in err and "leakage" in err

    odd = table.copy()
    odd.loc[2, "official"] = "holdout"
    odd.to_csv(root / "labels.csv", index=False)
    assert build() == 2
    assert "['holdout']" in capsys.readouterr().err

    table.drop(columns=["official"]).to_csv(root / "labels.csv", index=False)
    assert build() == 2
    assert "no column 'official'" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_patient_at_training_and_external_site_with_predefined_splits_is_leakage(tmp_path, capsys):
    task_path, root, table = _folder_with_split_column(tmp_path)
    t = table.copy()
    t.loc[t["patient_id"] == "p03", "patient_id"] = "p00"  # p03 is at the external site x1
    t.to_csv(root / "labels.csv", index=False)
    out = tmp_path / "m.parquet"
    assert main(["data", "manifest", "--task", str(task_path), "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "patient 'p00' appears in several splits" in err and "leakage" in err and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# MedMNIST: the official .npz with its own splits


def _medmnist(path: Path, channels: int, n_classes: int, sizes=(40, 12, 14), side: int = 28) -> dict:
    rng = np.random.default_rng(2)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        lab = (np.arange(n) % n_classes)[rng.permutation(n)].reshape(n, 1).astype(np.uint8)
        shape = (n, side, side) if channels == 1 else (n, side, side, 3)
        img = rng.integers(0, 60, shape).astype(np.uint8)
        for c in range(n_classes):
            img[lab[:, 0] == c, 4 + 2 * c : 10 + 2 * c, 4:20] = 200
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = img, lab
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def _mm_manifest(task: str, root: Path, out: Path, *options: str) -> int:
    args = ["data", "manifest", "--task", task, "--root", str(root), "--out", str(out)]
    for o in options:
        args += ["--option", o]
    return main(args)


def test_medmnist_tasks_and_cards():
    for name, classes, channels in [
        ("pneumoniamnist", ["normal", "pneumonia"], 1),
        ("dermamnist", HAM_CLASSES, 3),
    ]:
        task = load_task(name)
        assert task.classes == classes and task.image.channels == channels
        assert task.source.kind == "medmnist" and task.source.options == {"file": f"{name}.npz"}
        assert task.sites.external == [] and task.subgroups.columns == []
        assert task.splits.from_column == "official_split"
        card = (task.folder / "README.md").read_text(encoding="utf-8")
        assert "MedMNIST v2" in card and "Scientific Data" in card and "CC BY 4.0" in card
        assert "cannot be checked" in card
    assert "Kermany" in (load_task("pneumoniamnist").folder / "README.md").read_text(encoding="utf-8")
    assert "Tschandl" in (load_task("dermamnist").folder / "README.md").read_text(encoding="utf-8")


def test_pneumoniamnist_manifest_keeps_official_splits_and_reads_images_from_the_npz(tmp_path):
    arrays = _medmnist(tmp_path / "mm" / "pneumoniamnist.npz", 1, 2)
    out = tmp_path / "m.parquet"
    assert _mm_manifest("pneumoniamnist", tmp_path / "mm", out) == 0
    task = load_task("pneumoniamnist")
    m = read_manifest(out)
    df = m.df
    assert validate_manifest(m, task, check_images=True) == []
    assert df["split"].value_counts().to_dict() == {"train": 40, "test": 14, "val": 12}
    assert (df["case_id"] == df["patient_id"]).all() and set(df["site"]) == {"medmnist"}
    assert set(df["sex"]) == {"unknown"} or df["sex"].isna().all()
    row = df.set_index("case_id").loc["val-000007"]
    assert row["image"] == "mm/pneumoniamnist.npz#val/7" and row["split"] == "val"
    assert row["label"] == ["normal", "pneumonia"][int(arrays["val_labels"][7, 0])]
    # 28 px stays 28 px: the cached pixel is the stored one.
    spec = PreprocessSpec.from_task(task)
    img = load_image(m.image_path(row["image"]), spec)
    assert img.shape == (1, 28, 28) and np.array_equal(img[0], arrays["val_images"][7])
    cache = build_cache(m, task, cache_dir=tmp_path / "cache", progress=False)
    pos = cache.rows(["test-000003", "train-000039"])
    assert np.array_equal(cache.images[pos[0], 0], arrays["test_images"][3])
    assert np.array_equal(cache.images[pos[1], 0], arrays["train_images"][39])
    # The cache follows the .npz file: a new file (new mtime) is a new key.
    key = cache_key(m, spec)
    st = (tmp_path / "mm" / "pneumoniamnist.npz").stat()
    os.utime(tmp_path / "mm" / "pneumoniamnist.npz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(m, spec) != key


def test_dermamnist_rgb_and_medmnist_plus_size_variant(tmp_path, capsys):
    arrays = _medmnist(tmp_path / "mm" / "dermamnist_64.npz", 3, 7, sizes=(21, 7, 7), side=64)
    out = tmp_path / "d.parquet"
    assert _mm_manifest("dermamnist", tmp_path / "mm", out) == 0
    task = load_task("dermamnist")
    m = read_manifest(out)
    df = m.df.set_index("case_id")
    assert df.loc["train-000005", "label"] == HAM_CLASSES[int(arrays["train_labels"][5, 0])]
    img = load_image(m.image_path(df.loc["train-000005", "image"]), PreprocessSpec.from_task(task, size=64))
    assert img.shape == (3, 64, 64) and np.array_equal(np.moveaxis(img, 0, -1), arrays["train_images"][5])
    # The file itself as --root; two size variants need a choice.
    assert _mm_manifest("dermamnist", tmp_path / "mm" / "dermamnist_64.npz", tmp_path / "e.parquet") == 0
    _medmnist(tmp_path / "mm" / "dermamnist_128.npz", 3, 7, sizes=(7, 7, 7), side=32)
    assert _mm_manifest("dermamnist", tmp_path / "mm", tmp_path / "f.parquet") == 2
    err = capsys.readouterr().err
    assert "dermamnist_128.npz" in err and "dermamnist_64.npz" in err and "--option file=" in err
    assert _mm_manifest("dermamnist", tmp_path / "mm", tmp_path / "f.parquet", "file=dermamnist_128.npz") == 0
    assert len(read_manifest(tmp_path / "f.parquet").df) == 21


def test_medmnist_bad_files_exit_2(tmp_path, capsys):
    mm = tmp_path / "mm"
    arrays = _medmnist(mm / "pneumoniamnist.npz", 1, 2)
    out = tmp_path / "m.parquet"

    def rewrite(**change) -> None:
        a = {k: v for k, v in {**arrays, **change}.items() if v is not None}
        np.savez_compressed(mm / "pneumoniamnist.npz", **a)

    rewrite(val_labels=None)
    assert _mm_manifest("pneumoniamnist", mm, out) == 2
    assert "['val_labels'] missing" in capsys.readouterr().err
    rewrite(test_labels=np.full((14, 1), 5, dtype=np.uint8))
    assert _mm_manifest("pneumoniamnist", mm, out) == 2
    assert "'test_labels': values [5]" in capsys.readouterr().err
    rewrite(train_labels=arrays["train_labels"][:30])
    assert _mm_manifest("pneumoniamnist", mm, out) == 2
    assert "40 images but train_labels 30 labels" in capsys.readouterr().err
    rewrite(train_labels=np.zeros((40, 14), dtype=np.uint8))
    assert _mm_manifest("pneumoniamnist", mm, out) == 2
    assert "multi-label" in capsys.readouterr().err
    rewrite()
    assert _mm_manifest("dermamnist", mm, out, "file=pneumoniamnist.npz") == 2
    assert "grayscale images, but the task reads 3 channel(s)" in capsys.readouterr().err
    (mm / "pneumoniamnist.npz").write_bytes(b"not a zip file")
    assert _mm_manifest("pneumoniamnist", mm, out) == 2
    err = capsys.readouterr().err
    assert "pneumoniamnist.npz: cannot be read as an .npz file" in err
    assert _mm_manifest("pneumoniamnist", tmp_path / "empty_dir_missing", out) == 2
    (tmp_path / "nothing").mkdir()
    assert _mm_manifest("pneumoniamnist", tmp_path / "nothing", out) == 2
    assert "MedMNIST file not found" in capsys.readouterr().err and not out.exists()


def test_image_in_npz_stack_errors_name_the_place(tmp_path):
    from bench.imaging import check_readable

    _medmnist(tmp_path / "x.npz", 1, 2, sizes=(3, 3, 3))
    assert check_readable(tmp_path / "x.npz#train/2") is None
    assert "index 3 out of range" in check_readable(tmp_path / "x.npz#train/3")
    assert "no array 'extra_images'" in check_readable(tmp_path / "x.npz#extra/0")
    assert "not found" in check_readable(tmp_path / "y.npz#train/0")


def test_medmnist_manifest_then_smoke_run(tmp_path):
    _medmnist(tmp_path / "mm" / "pneumoniamnist.npz", 1, 2, sizes=(32, 10, 10))
    man = tmp_path / "m.parquet"
    assert _mm_manifest("pneumoniamnist", tmp_path / "mm", man) == 0
    run = tmp_path / "run"
    args = ["run", "--task", "pneumoniamnist", "--real", str(man), "--regimes", "real", "--seeds", "0"]
    args += ["--preset", "smoke", "--epochs", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(run), "--quiet"]) == 0
    (folder,) = [d for d in run.iterdir() if d.is_dir() and (d / "DONE").exists()]
    preds = pd.read_parquet(folder / "predictions.parquet")
    df = read_manifest(man).df
    held = df[df["split"].isin(["val", "test"])]
    assert sorted(preds["case_id"]) == sorted(held["case_id"]) and set(preds["split"]) == {"val", "test"}
