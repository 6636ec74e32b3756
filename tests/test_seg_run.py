"""A segmentation task through the protocol and the evaluation: the phantom with masks, a synthetic pair set, the run
matrix through the command line (run -> evaluate), the stored label maps and count tables, and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench import demo
from bench.cli import main
from bench.evaluation import controls as ctl
from bench.evaluation.controls import check_controls
from bench.generators import Control, ControlCheck
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
    # The task with group-size limits a 60-patient phantom meets, so intervals are defined.
    spec = load_task(TASK).spec()
    spec["metrics"].update(min_patients=3, min_positives=1, min_negatives=1)
    task_path = root / "task" / "task.yaml"
    task_path.parent.mkdir()
    task_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"root": root, "real": real, "syn": syn, "task": str(task_path)}


@pytest.fixture(scope="module")
def matrix(world):
    out = world["root"] / "run"
    args = ["run", "--task", world["task"], "--real", str(world["real"]), "--out", str(out)]
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
    args = ["run", "--task", world["task"], "--real", str(world["real"]), "--out", str(matrix)]
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


@pytest.fixture(scope="module")
def evaluation(matrix):
    out = matrix / "evaluation"
    assert (
        main(
            [
                "evaluate",
                str(matrix),
                "--out",
                str(out),
                "--n-boot",
                "50",
                "--min-patients",
                "3",
                "--min-positives",
                "1",
            ]
        )
        == 0
    )
    return out


def test_evaluate_scores_count_tables_like_predictions(matrix, evaluation):
    task = load_task(TASK)
    table = read_table(evaluation / "metrics.parquet")
    comps = read_table(evaluation / "comparisons.parquet")
    # The same columns as a classification evaluation's tables.
    cls_cols = [
        "metric",
        "scope",
        "split",
        "group_by",
        "group",
        "value",
        "ci_low",
        "ci_high",
        "n_cases",
        "status",
    ]
    assert set(cls_cols) <= set(table.columns)
    assert {"diff", "ci_low", "ci_high", "ratio", "p_boot_holm"} <= set(comps.columns)
    metrics = set(table["metric"])
    assert {"dice_macro", "lesion_f1_macro", "instance_dice"} <= metrics
    assert {f"dice_{c}" for c in task.mask_classes} <= metrics
    assert {"overall", "site", "subgroup"} <= set(table["scope"])
    assert set(comps["generator"]) == {"pairs"} and set(comps["regime"]) == {"augment:1"}
    # The metric table's overall Dice is the pooled Dice of the stored counts (both seeds pooled, per class).
    counts = pd.concat([read_table(r.seg_predictions) for r in RunDir(matrix).finished_runs()])
    base = counts[(counts["generator"] == "none") & (counts["split"] == "test")]
    row = table[
        (table["metric"] == "dice_macro")
        & (table["scope"] == "overall")
        & (table["split"] == "test")
        & (table["generator"] == "none")
    ]
    per_seed = []
    for _, g in base.groupby("seed"):
        d = [
            2 * g[f"tp_{c}"].sum() / (2 * g[f"tp_{c}"].sum() + g[f"fp_{c}"].sum() + g[f"fn_{c}"].sum())
            for c in task.mask_classes
            if (2 * g[f"tp_{c}"].sum() + g[f"fp_{c}"].sum() + g[f"fn_{c}"].sum()) > 0
        ]
        per_seed.append(np.mean(d))
    assert row["value"].iloc[0] == pytest.approx(np.mean(per_seed))
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["primary_metric"] == "dice_macro"
    runs = {(r["generator"], r["regime"]): r for r in summary["runs"]}
    assert runs[("pairs", "augment:1")]["diff_vs_real"] is not None
    assert runs[("none", "real")]["test_primary"]["value"] == pytest.approx(row["value"].iloc[0])
    report = (evaluation / "report.md").read_text()
    assert "Dice per mask class" in report and "Lesion detection" in report
    assert "Fairness at the operating point" not in report and "label-shuffle" not in report


def test_segmentation_controls_are_checked_on_their_own_metric(matrix, evaluation):
    task = load_task(TASK)
    table = read_table(evaluation / "metrics.parquet")
    comps = read_table(evaluation / "comparisons.parquet")
    # label-shuffle's AUROC-at-chance check does not apply to segmenters; real-holdout's and copycat's do.
    results = check_controls(table, comps, {}, task, {})
    assert {r.control for r in results} >= {"copycat", "real-holdout"}
    assert "label-shuffle" not in {r.control for r in results}
    # A Dice-at-chance check reads the arm's macro Dice: the copied real pairs sit far above a tiny ceiling.
    check = ControlCheck("dice_at_chance", "augment:1", "macro Dice at chance", margin=0.0)
    control = Control("negative", "test", (check,))
    split = "test"
    res = ctl._one("mask-test", "pairs", control, check, table, comps, {}, task, split, 0.95)
    assert res.metric == "dice_macro"
    row = table[
        (table["metric"] == "dice_macro")
        & (table["scope"] == "overall")
        & (table["split"] == split)
        & (table["generator"] == "pairs")
    ].iloc[0]
    assert res.value == pytest.approx(row["value"])
    assert res.status == ("PASS" if res.ci_low <= 0.0 else "FAIL")
    ceiling = ctl._one(
        "mask-test",
        "pairs",
        control,
        ControlCheck("dice_at_chance", "augment:1", "x", margin=1.0),
        table,
        comps,
        {},
        task,
        split,
        0.95,
    )
    assert ceiling.status == "PASS"


def test_the_segmentation_demo_runs_its_stages_through_the_command_line(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def cli(args: list[str]) -> int:
        calls.append(args)
        return 0

    summary = demo.run_demo(tmp_path / "demo", cli, "smoke", task=TASK)
    commands = [c[0] if c[0] not in ("data",) else f"data {c[1]}" for c in calls]
    gens = demo.pair_generators((*demo.SEG_GENERATORS, *demo.SEG_CONTROLS))
    assert commands == [
        "data phantom",
        "data manifest",
        "data validate",
        "leaderboard",
        *["generate"] * len(gens),
        "run",
        *["privacy"] * len([g for g in gens if g in demo.SEG_GENERATORS]),
        "privacy-model",
        "evaluate",
        "submit",
        "leaderboard",
    ]
    assert "--masks" in calls[0]
    # These read RUN or the board, which name the task themselves.
    assert all(
        TASK in c for c in calls[1:] if c[0] not in ("privacy-model", "evaluate", "submit", "leaderboard")
    )
    # The demo's board scores at the size the demo trains at (its answer key's masks are made at that size).
    board = yaml.safe_load((tmp_path / "demo" / "leaderboard" / "leaderboard.yaml").read_text())
    assert board["task"]["name"] == TASK and board["image_size"] == demo.SEG_PRESETS["smoke"].image_size
    assert [c[1] for c in calls if c[0] == "leaderboard"] == ["key", "build"]
    assert summary["leaderboard"].endswith("index.html")
    run = next(c for c in calls if c[0] == "run")
    assert [a for a in run if a.endswith("demo-seg.yaml")] and "--protocol" in run
    if not gens:  # without pair generators the matrix runs the regimes that need none
        assert run[run.index("--regimes") + 1] == demo.SEG_REAL_ONLY_REGIMES
    assert summary["task"] == TASK and summary["generators"] == gens
    # A control of classification tasks only (shuffled labels) is not asked for pairs.
    monkeypatch.setattr(demo, "SEG_GENERATORS", ("label-shuffle",))
    assert demo.pair_generators(demo.SEG_GENERATORS) == []


def test_tuning_a_segmenter_maximises_validation_dice(world, tmp_path):
    out = tmp_path / "tuned"
    args = ["run", "--task", world["task"], "--real", str(world["real"]), "--out", str(out), *FAST]
    assert main([*args, "--regimes", "real", "--seeds", "0", "--tune", "1"]) == 0
    (study,) = RunDir(out).tuning_dir.glob("*.json")
    result = json.loads(study.read_text())
    assert result["objective"] == "val_dice_macro" and result["n_complete"] == 1
    (run,) = RunDir(out).finished_runs()
    history = read_table(run.history)
    assert result["best_value"] == pytest.approx(history["val_dice_macro"].iloc[-1], abs=1e-12)
