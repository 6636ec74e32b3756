"""A segmentation task through the protocol and the evaluation: the phantom with masks, a synthetic pair set, the run
matrix through the command line (run -> evaluate), the stored label maps and count tables, and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.cli import main
from bench.imaging import build_cache
from bench.io import read_table
from bench.labelmaps import load_labelmaps
from bench.manifest import read_manifest, write_manifest
from bench.metrics.segmentation import count_columns
from bench.protocol.segment import recount, recount_run
from bench.runfolder import PREDICTED_SPLITS, RunDir
from bench.tasks import load_task

TASK = "mediastinal-neoplasm-seg"
SIZE = 32
# Tiny and fast: 32 px, a few optimizer steps, few bootstrap replicates; it checks the mechanics, not the numbers.
FAST = ["--preset", "smoke", "--epochs", "1", "--wandb", "disabled", "--threads", "1", "--quiet"]


def write_pair_set(real: Path, out: Path, name: str = "pairs", shuffle_masks: bool = False) -> Path:
    """A synthetic pair set as generators write it: the real training pairs copied as PNG images and PNG label maps
    (`masks/`, manifest column `mask_path`), each under a synthetic id; `shuffle_masks` pairs each image with another
    one's mask."""
    task = load_task(TASK)
    m = read_manifest(real)
    cache = build_cache(m, task, size=SIZE, progress=False)
    df = m.df
    rows = df[(df["split"] == "train") & df["site"].isin(task.sites.train)].reset_index(drop=True)
    idx = cache.rows(rows["case_id"].astype(str))
    images, masks = np.asarray(cache.images[idx]), np.asarray(cache.masks[idx])
    if shuffle_masks:
        masks = masks[np.random.default_rng(0).permutation(len(masks))]
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    ids = [f"syn-{name}-{i:05d}" for i in range(len(rows))]
    for cid, img, mask in zip(ids, images, masks, strict=True):
        Image.fromarray(img[0]).save(out / "images" / f"{cid}.png")
        Image.fromarray(mask).save(out / "masks" / f"{cid}.png")
    labels = [task.label_from_mask(np.bincount(mk.ravel(), minlength=6)[1:]) for mk in masks]
    syn = pd.DataFrame(
        {
            "case_id": ids,
            "patient_id": ids,
            "image": [f"images/{c}.png" for c in ids],
            "mask_path": [f"masks/{c}.png" for c in ids],
            "label": labels,
            "site": "synthetic",
            "sex": rows["sex"].to_numpy(),
            "age": rows["age"].to_numpy(),
            "contrast": rows["contrast"].to_numpy(),
            "origin": "synthetic",
            "generator": name,
            "split": "train",
        }
    )
    write_manifest(syn, out / "manifest.parquet")
    return out / "manifest.parquet"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("segrun")
    phantom = root / "phantom"
    cmd = ["data", "phantom", "--out", str(phantom), "--patients", "60", "--slices", "2", "--size", "64"]
    assert main([*cmd, "--seed", "0", "--masks"]) == 0
    real = root / "manifest.parquet"
    assert main(["data", "manifest", "--task", TASK, "--root", str(phantom), "--out", str(real)]) == 0
    syn = write_pair_set(real, root / "pairs")
    return {"root": root, "real": real, "syn": syn}


@pytest.fixture(scope="module")
def matrix(world):
    out = world["root"] / "run"
    args = ["run", "--task", TASK, "--real", str(world["real"]), "--out", str(out)]
    args += ["--synthetic", f"pairs={world['syn']}", "--regimes", "real,augment:1", "--seeds", "0,1", *FAST]
    assert main(args) == 0
    return out


def test_a_segmentation_run_stores_label_maps_and_count_tables(world, matrix):
    task = load_task(TASK)
    runs = RunDir(matrix).finished_runs()
    assert len(runs) == 4
    for r in runs:
        assert not r.predictions.exists()
        counts = read_table(r.seg_predictions)
        maps = load_labelmaps(r.labelmaps)
        # Every predicted case, in the table's order, once; the classes are the background and the mask classes.
        assert maps.case_ids == counts["case_id"].tolist()
        assert maps.maps.shape[1:] == (SIZE, SIZE) and maps.num_classes == len(task.mask_classes) + 1
        assert set(counts["split"]) <= set(PREDICTED_SPLITS) and {"test", "external"} <= set(counts["split"])
        for c in ["case_id", "patient_id", "site", "split", "sex", "age_group", "contrast", "y_true"]:
            assert c in counts.columns
        assert counts[["generator", "regime", "backbone"]].drop_duplicates().shape[0] == 1
        assert counts["backbone"].iloc[0] == "unet-small"
        assert set(count_columns(task.mask_classes)) <= set(counts.columns)
        hist = read_table(r.history)
        assert "val_dice_macro" in hist.columns and "val_auroc_macro" not in hist.columns
        metrics = json.loads(r.metrics_path.read_text())
        assert metrics["primary"] == "dice_macro" and "test" in metrics["dice_macro"]


def test_counts_are_recomputed_from_label_maps_and_truth_masks(matrix):
    task = load_task(TASK)
    run = RunDir(matrix).finished_runs()[0]
    stored = read_table(run.seg_predictions)
    again = recount_run(run, task)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), stored, check_dtype=False)
    # A changed label map changes its row: the count table is a function of the maps, not a copy of them.
    maps = load_labelmaps(run.labelmaps)
    truth = dict(
        zip(maps.case_ids, maps.maps, strict=True)
    )  # scored against itself: no false positive anywhere
    perfect = recount(stored, maps, truth, task.mask_classes)
    fp = [f"fp_{c}" for c in task.mask_classes]
    assert (perfect[fp].to_numpy() == 0).all()
    assert (stored[[f"fn_{c}" for c in task.mask_classes]].to_numpy() >= 0).all()


def test_resuming_skips_finished_segmentation_runs(world, matrix):
    before = {r.name: r.seg_predictions.stat().st_mtime_ns for r in RunDir(matrix).finished_runs()}
    args = ["run", "--task", TASK, "--real", str(world["real"]), "--out", str(matrix)]
    args += ["--synthetic", f"pairs={world['syn']}", "--regimes", "real,augment:1", "--seeds", "0,1", *FAST]
    assert main(args) == 0
    after = {r.name: r.seg_predictions.stat().st_mtime_ns for r in RunDir(matrix).finished_runs()}
    assert after == before


def test_a_classifier_backbone_for_a_segmentation_task_is_refused(world, tmp_path, capsys):
    args = ["run", "--task", TASK, "--real", str(world["real"]), "--out", str(tmp_path / "r"), *FAST]
    assert main([*args, "--backbone", "resnet10t", "--regimes", "real", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "resnet10t" in err and "segmentation" in err
    assert not (tmp_path / "r").exists()
