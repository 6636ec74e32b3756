"""The protocol matrix end to end on the tiny task: run folders, contracts, resume, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TASK, draw_shape, make_tiny_dataset
from sklearn.metrics import roc_auc_score

from bench.cli import main
from bench.generators.card import hash_id
from bench.manifest import read_manifest, write_manifest
from bench.regimes import compose
from bench.tasks import load_task

REPO = Path(__file__).resolve().parent.parent
CLASSES = TINY_TASK["labels"]["classes"]
# One epoch, one thread: seconds per run on a shared CPU.
FAST = ["--preset", "smoke", "--backbone", "resnet10t", "--epochs", "1", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_synthetic(
    root: Path,
    per_class: dict[str, int] | None = None,
    *,
    name: str = "shapes",
    seed: int = 7,
    card: dict | None = None,
    labels: dict[str, str] | None = None,
) -> Path:
    """A synthetic set drawn like the real one: PNGs + manifest (+ card.yaml when given)."""
    from PIL import Image

    per_class = per_class or {c: 12 for c in CLASSES}
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, n in per_class.items():
        for i in range(n):
            cid = f"{name}-{label}-{i:03d}"
            Image.fromarray(draw_shape(label, rng)).save(root / "images" / f"{cid}.png")
            rows.append(
                dict(
                    case_id=cid,
                    patient_id=cid,
                    image=f"images/{cid}.png",
                    label=(labels or {}).get(label, label),
                    site="synthetic",
                    sex="unknown",
                    age=None,
                    origin="synthetic",
                    generator=name,
                    split="train",
                )
            )
    path = root / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path, image_root=root)
    if card is not None:
        (root / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def card_for(real_manifest: Path, **training) -> dict:
    df = read_manifest(real_manifest).df
    train = df[df["split"] == "train"]
    t = {"sites": sorted(set(train["site"])), "patients": sorted({hash_id(p) for p in train["patient_id"]})}
    t.update(training)
    return {"name": "shapes", "version": "1.0", "training": t}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    (root / "tasks" / "tiny").mkdir(parents=True)
    task_path = root / "tasks" / "tiny" / "task.yaml"
    task_path.write_text(yaml.safe_dump(TINY_TASK, sort_keys=False))
    task = load_task(task_path)
    real = make_tiny_dataset(root / "data", task)
    syn = make_synthetic(root / "syn", card=card_for(real))
    return {
        "root": root,
        "task_path": task_path,
        "task": task,
        "real": real,
        "syn": syn,
        "cache": root / "cache",
    }


def base_args(world, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--task",
        str(world["task_path"]),
        "--real",
        str(world["real"]),
        "--out",
        str(out),
        "--cache-dir",
        str(world["cache"]),
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def matrix(world):
    """real + augment:1 + pretrain with one generator, tracked offline in wandb."""
    out = world["root"] / "run"
    rc = main(
        base_args(
            world,
            out,
            "--synthetic",
            f"shapes={world['syn']}",
            "--regimes",
            "real,augment:1,pretrain",
            "--seeds",
            "0",
            "--wandb",
            "offline",
        )
    )
    assert rc == 0
    return out


RUNS = [
    "none__real__resnet10t__seed0",
    "shapes__augment-1__resnet10t__seed0",
    "shapes__pretrain__resnet10t__seed0",
]
RUN_FILES = {
    "config.json",
    "composition.json",
    "predictions.parquet",
    "metrics.json",
    "checkpoint.pt",
    "history.csv",
    "DONE",
}


def test_run_folder_layout(matrix, world):
    run_dirs = sorted(p.name for p in matrix.iterdir() if p.is_dir() and "__" in p.name)
    assert run_dirs == sorted(RUNS)
    for r in RUNS:
        assert {p.name for p in (matrix / r).iterdir()} == RUN_FILES
    assert not [p for p in matrix.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    # The resolved task loads back as the same task.
    assert load_task(matrix / "task.yaml").spec() == world["task"].spec()
    mx = json.loads((matrix / "matrix.json").read_text())
    assert mx["runs"] == RUNS
    assert mx["manifests"]["real"]["sha256"] == read_manifest(world["real"]).sha256
    assert mx["generators"]["shapes"]["card"]["name"] == "shapes"
    card = json.loads((matrix / "generators" / "shapes" / "card.json").read_text())
    assert card == mx["generators"]["shapes"]["card"]


def test_predictions_follow_the_contract(matrix, world):
    df = read_manifest(world["real"]).df
    held = df[df["split"].isin(["val", "test", "external"])]
    for r in RUNS:
        p = pd.read_parquet(matrix / r / "predictions.parquet")
        expected = [
            "case_id",
            "patient_id",
            "site",
            "split",
            "sex",
            "age",
            "age_group",
            "y_true",
            *[f"prob_{c}" for c in CLASSES],
            "generator",
            "regime",
            "seed",
            "backbone",
        ]
        assert list(p.columns) == expected
        assert sorted(p["case_id"]) == sorted(held["case_id"])
        assert p["case_id"].is_unique
        assert set(p["split"]) == {"val", "test", "external"}
        assert (p.loc[p["split"] == "external", "site"] == "x1").all()
        probs = p[[f"prob_{c}" for c in CLASSES]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-9)
        truth = held.set_index("case_id").loc[p["case_id"], "label"].to_numpy()
        assert (p["y_true"].to_numpy() == truth).all()
        gen, regime = r.split("__")[:2]
        assert set(p["generator"]) == {gen}
        assert set(p["regime"]) == {{"augment-1": "augment:1"}.get(regime, regime)}
        assert set(p["seed"]) == {0} and set(p["backbone"]) == {"resnet10t"}


def test_metrics_are_macro_auroc_recomputed_by_sklearn(matrix):
    for r in RUNS:
        p = pd.read_parquet(matrix / r / "predictions.parquet")
        m = json.loads((matrix / r / "metrics.json").read_text())
        for split in ("val", "test", "external"):
            sub = p[p["split"] == split]
            ref = roc_auc_score(
                sub["y_true"].map(CLASSES.index),
                sub[[f"prob_{c}" for c in CLASSES]].to_numpy(),
                multi_class="ovr",
                average="macro",
                labels=[0, 1, 2],
            )
            assert m["auroc_macro"][split] == pytest.approx(ref, abs=1e-9)
            assert m["splits"][split]["n_cases"] == len(sub)
            assert m["splits"][split]["n_patients"] == sub["patient_id"].nunique()
        assert m["external_sites"]["x1"]["auroc_macro"] == pytest.approx(m["auroc_macro"]["external"])
        hist = pd.read_csv(matrix / r / "history.csv")
        sel = hist[hist["selected"]]
        assert len(sel) == (2 if "pretrain" in r else 1)
        assert m["auroc_macro"]["val"] == pytest.approx(sel["val_auroc_macro"].iloc[-1], abs=1e-9)


def test_config_is_fully_resolved(matrix, world):
    cfg = json.loads((matrix / RUNS[1] / "config.json").read_text())
    assert cfg["task"]["name"] == "tiny" and cfg["task"]["version"] == "1.0"
    assert cfg["manifests"]["real"]["sha256"] == read_manifest(world["real"]).sha256
    assert cfg["manifests"]["synthetic"]["sha256"] == read_manifest(world["syn"]).sha256
    assert cfg["preset"]["name"] == "smoke"
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["backbone"] == "resnet10t"
    assert cfg["image"] == {"size": 16, "channels": 1}  # the tiny task's own smoke size
    assert cfg["regime"] == "augment:1" and cfg["generator"] == "shapes"
    assert cfg["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert cfg["environment"]["torch_threads"] == 1
    assert cfg["selection"]["rule"] == "last" and cfg["selection"]["sites"] == ["s1", "s2", "s3"]
    # The typed settings write the keys config.json always had, so older runs and resumption read alike.
    assert set(cfg["train"]) == {
        "backbone",
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "aug_strength",
        "patience",
        "pretrain_epochs",
        "device",
        "budget_unit",
    }
    from bench.train import load_checkpoint

    model, meta = load_checkpoint(matrix / RUNS[1] / "checkpoint.pt")
    assert meta["classes"] == CLASSES and meta["regime"] == "augment:1"


def test_composition_json_is_what_compose_promised(matrix, world):
    task = world["task"]
    real = read_manifest(world["real"]).df
    syn = read_manifest(world["syn"]).df
    train = real[real["split"] == "train"]
    for r, regime in zip(RUNS, ["real", "augment:1", "pretrain"], strict=True):
        comp = json.loads((matrix / r / "composition.json").read_text())
        assert comp.pop("budget")["steps"] == 2  # 48 real training images, batch 32, one epoch
        _, expected = compose(regime, train, syn if regime != "real" else None, 0, classes=task.classes)
        assert comp == json.loads(json.dumps(expected))
    comp = json.loads((matrix / RUNS[1] / "composition.json").read_text())
    n_real = len(train)
    assert comp["n_real"] == n_real and comp["n_synthetic"] == n_real
    for c in CLASSES:
        assert (
            comp["by_class"][c]["synthetic"]
            == comp["by_class"][c]["real"]
            == int((train["label"] == c).sum())
        )


def test_wandb_offline_run_holds_final_metrics(matrix):
    runs = sorted((matrix / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == len(RUNS)
    found = {}
    for d in runs:
        f = d / "files" / "medsynbench-metrics.json"
        assert f.is_file()
        m = json.loads(f.read_text())
        found[m["run_id"]] = m
        blob = next(d.glob("run-*.wandb")).read_bytes()
        assert b"auroc_macro" in blob and m["run_id"].encode() in blob
    assert sorted(found) == sorted(RUNS)
    for r in RUNS:
        assert found[r] == json.loads((matrix / r / "metrics.json").read_text())


def test_rerun_skips_done_runs_and_refuses_changed_settings(matrix, world, capsys):
    done_before = {r: (matrix / r / "DONE").stat().st_mtime_ns for r in RUNS}
    rc = main(
        base_args(
            world,
            matrix,
            "--synthetic",
            f"shapes={world['syn']}",
            "--regimes",
            "real,augment:1,pretrain",
            "--seeds",
            "0",
            "--wandb",
            "disabled",
            "--resume",
        )
    )
    assert rc == 0
    assert "3/3 runs done (3 were already done)" in capsys.readouterr().out
    assert {r: (matrix / r / "DONE").stat().st_mtime_ns for r in RUNS} == done_before
    rc = main(
        base_args(world, matrix, "--regimes", "real", "--seeds", "0", "--wandb", "disabled", "--epochs", "2")
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "none__real__resnet10t__seed0" in err and "other inputs or settings" in err
    assert (matrix / RUNS[0] / "DONE").stat().st_mtime_ns == done_before[RUNS[0]]


def test_resume_with_nothing_there_is_bad_input(world, tmp_path, capsys):
    out = tmp_path / "nothing"
    assert main(base_args(world, out, "--regimes", "real", "--resume")) == 2
    assert "matrix.json" in capsys.readouterr().err
    assert not out.exists()


# -- resume after SIGKILL ----------------------------------------------------------------------------------------


def _preds(out: Path) -> dict[str, pd.DataFrame]:
    return {
        p.name: pd.read_parquet(p / "predictions.parquet")
        for p in sorted(out.iterdir())
        if (p / "DONE").is_file()
    }


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_predictions(world, matrix, tmp_path):
    """Kill a matrix in another process once its first run is DONE, resume it, and compare every prediction with
    the uninterrupted matrix of the same runs (the `matrix` fixture, trained in this process)."""
    killed = tmp_path / "killed"
    args = base_args(
        world,
        killed,
        "--synthetic",
        f"shapes={world['syn']}",
        "--regimes",
        "real,augment:1,pretrain",
        "--seeds",
        "0",
        "--wandb",
        "disabled",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if killed.is_dir() and any((p / "DONE").is_file() for p in killed.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the matrix finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = [p for p in killed.iterdir() if (p / "DONE").is_file()]
    assert 1 <= len(done) < 3
    # Every DONE-marked folder is complete; nothing half-written carries the marker or a run's name.
    for p in done:
        assert {q.name for q in p.iterdir()} == RUN_FILES
    for p in killed.iterdir():
        if p.is_dir() and "__" in p.name and not p.name.startswith("."):
            assert (p / "DONE").is_file()

    assert main(args + ["--resume"]) == 0
    assert not [p for p in killed.iterdir() if p.name.startswith(".")], "stale temporary folders not cleaned"
    a, b = _preds(killed), _preds(matrix)
    assert sorted(a) == sorted(b) == sorted(RUNS)
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=True)


def test_a_run_interrupted_while_writing_leaves_no_done_folder_and_resumes(
    world, matrix, tmp_path, monkeypatch
):
    """The in-process twin of the SIGKILL test: the second run dies half-way through writing its folder."""
    out = tmp_path / "interrupted"
    args = base_args(
        world,
        out,
        "--synthetic",
        f"shapes={world['syn']}",
        "--regimes",
        "real,augment:1",
        "--seeds",
        "0",
        "--wandb",
        "disabled",
    )
    import bench.train as bt

    calls = {"n": 0}
    original = bt.save_checkpoint

    def dying_save(path, model, meta):
        calls["n"] += 1
        if calls["n"] == 2:
            original(path, model, meta)  # the checkpoint is written, DONE is not
            raise KeyboardInterrupt
        return original(path, model, meta)

    monkeypatch.setattr(bt, "save_checkpoint", dying_save)
    assert main(args) == 130
    assert (out / RUNS[0] / "DONE").is_file()
    assert not (out / RUNS[1]).exists(), "an interrupted run must not appear under its name"
    monkeypatch.setattr(bt, "save_checkpoint", original)
    assert main(args) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    a, b = _preds(out), _preds(matrix)
    assert sorted(a) == RUNS[:2]
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=True)


# -- bad input ---------------------------------------------------------------------------------------------------


def _bad(world, out: Path, capsys, *extra: str) -> str:
    rc = main(base_args(world, out, "--wandb", "disabled", *extra))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists(), "bad input left output behind"
    return err


def test_unknown_regime_and_ratio_out_of_range(world, tmp_path, capsys):
    assert "'mixup'" in _bad(world, tmp_path / "o", capsys, "--regimes", "real,mixup")
    assert "'augment:50'" in _bad(
        world, tmp_path / "o", capsys, "--synthetic", f"shapes={world['syn']}", "--regimes", "augment:50"
    )
    assert "'replace:1.5'" in _bad(
        world, tmp_path / "o", capsys, "--synthetic", f"shapes={world['syn']}", "--regimes", "replace:1.5"
    )


def test_synthetic_regime_without_synthetic_data(world, tmp_path, capsys):
    err = _bad(world, tmp_path / "o", capsys, "--regimes", "real,synthetic")
    assert "'synthetic'" in err and "--synthetic" in err


def test_bad_synthetic_argument_and_unknown_backbone(world, tmp_path, capsys):
    assert "NAME=MANIFEST" in _bad(
        world, tmp_path / "o", capsys, "--synthetic", str(world["syn"]), "--regimes", "synthetic"
    )
    assert "'none'" in _bad(
        world, tmp_path / "o", capsys, "--synthetic", f"none={world['syn']}", "--regimes", "synthetic"
    )
    err = _bad(world, tmp_path / "o", capsys, "--regimes", "real", "--backbone", "vgg99")
    assert "'vgg99'" in err and "resnet18" in err


def test_synthetic_labels_outside_the_task(world, tmp_path, capsys):
    syn = make_synthetic(tmp_path / "s", {"disc": 3, "bar": 3}, labels={"bar": "triangle"})
    err = _bad(world, tmp_path / "o", capsys, "--synthetic", f"g={syn}", "--regimes", "synthetic")
    assert str(syn) in err and "triangle" in err and "'label'" in err


def test_synthetic_manifest_with_real_rows(world, tmp_path, capsys):
    syn = make_synthetic(tmp_path / "s", {"disc": 3, "bar": 3})
    df = pd.read_parquet(syn)
    df.loc[[1, 4], "origin"] = "real"
    df.to_parquet(syn, index=False)
    err = _bad(world, tmp_path / "o", capsys, "--synthetic", f"g={syn}", "--regimes", "synthetic")
    assert str(syn) in err and "origin 'real'" in err and "rows 1, 4" in err


def test_card_trained_on_an_external_site(world, tmp_path, capsys):
    card = card_for(world["real"], sites=["s1", "x1"])
    syn = make_synthetic(tmp_path / "s", {"disc": 3, "bar": 3}, card=card)
    err = _bad(world, tmp_path / "o", capsys, "--synthetic", f"g={syn}", "--regimes", "augment:1")
    assert "card.yaml" in err and "training.sites" in err and "x1" in err


def test_card_trained_on_test_patients(world, tmp_path, capsys):
    df = read_manifest(world["real"]).df
    leaked = sorted(set(df.loc[df["split"] == "test", "patient_id"]))[:2]
    card = card_for(world["real"])
    card["training"]["patients"] = card["training"]["patients"] + [hash_id(p) for p in leaked]
    syn = make_synthetic(tmp_path / "s", {"disc": 3, "bar": 3}, card=card)
    err = _bad(world, tmp_path / "o", capsys, "--synthetic", f"g={syn}", "--regimes", "augment:1")
    assert "training.patients" in err and "2 patient(s)" in err and "'test': 2" in err


def test_protocol_with_unknown_key(world, tmp_path, capsys):
    proto = tmp_path / "p.yaml"
    proto.write_text(yaml.safe_dump({"regimes": ["real"], "seeds": [0], "epochz": 3}))
    err = _bad(world, tmp_path / "o", capsys, "--protocol", str(proto))
    assert str(proto) in err and "'epochz'" in err and "unknown key" in err
    proto.write_text(
        yaml.safe_dump({"tune": {"trials": 2, "search_space": {"momentum": {"low": 0, "high": 1}}}})
    )
    err = _bad(world, tmp_path / "o", capsys, "--protocol", str(proto))
    assert "momentum" in err


def test_real_manifest_with_synthetic_rows(world, tmp_path, capsys):
    df = read_manifest(world["real"]).df
    df.loc[0, ["origin", "generator"]] = ["synthetic", "g"]
    bad = world["real"].with_name("mixed.parquet")
    write_manifest(df, bad)
    err = _bad(world, tmp_path / "o", capsys, "--regimes", "real", "--real", str(bad))
    assert str(bad) in err and "origin other than 'real'" in err


# -- every regime through the matrix ------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_regime_runs_and_writes_its_composition(world, tmp_path):
    regimes = [
        "real",
        "synthetic",
        "augment:1",
        "replace:0.5",
        "scarce:0.5",
        "scarce:0.5+synthetic",
        "pretrain",
    ]
    out = tmp_path / "all"
    assert (
        main(
            base_args(
                world,
                out,
                "--synthetic",
                f"shapes={world['syn']}",
                "--regimes",
                ",".join(regimes),
                "--seeds",
                "0",
                "--wandb",
                "disabled",
            )
        )
        == 0
    )
    real = read_manifest(world["real"]).df
    syn = read_manifest(world["syn"]).df
    train = real[real["split"] == "train"]
    from bench.regimes import parse_regime

    # Equal budgets (smoke preset, one real epoch): every regime takes ceil(n_real_train / batch_size) optimizer
    # steps, whatever its training set holds, validated after each real epoch's worth of steps.
    batch = 32
    want_steps = -(-len(train) // batch)
    steps, sizes = {}, {}
    for regime in regimes:
        reg = parse_regime(regime)
        gen = "shapes" if reg.uses_synthetic else "none"
        d = out / f"{gen}__{reg.slug}__resnet10t__seed0"
        assert (d / "DONE").is_file()
        comp = json.loads((d / "composition.json").read_text())
        budget = comp.pop("budget")
        _, expected = compose(regime, train, syn if reg.uses_synthetic else None, 0, classes=CLASSES)
        assert comp == json.loads(json.dumps(expected))
        assert set(pd.read_parquet(d / "predictions.parquet")["regime"]) == {regime}
        assert budget["steps"] == want_steps and budget["n_real_train"] == len(train)
        hist = pd.read_csv(d / "history.csv")
        steps[regime] = int(hist.groupby("stage", sort=False)["step"].max().sum())
        sizes[regime] = comp["n_total"]
        config = json.loads((d / "config.json").read_text())
        assert config["budget"]["steps"] == want_steps and config["budget"]["steps_run"] == steps[regime]
    assert set(steps.values()) == {want_steps}, steps
    # ... although the regimes train on sets of different sizes.
    assert sizes["scarce:0.5"] < sizes["real"] < sizes["augment:1"]
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["protocol"]["budget"]["steps"] == want_steps


@pytest.mark.slow
def test_local_process_pool_reproduces_in_process_runs(world, matrix, tmp_path):
    out = tmp_path / "pool"
    assert (
        main(
            base_args(
                world,
                out,
                "--synthetic",
                f"shapes={world['syn']}",
                "--regimes",
                "real,augment:1,pretrain",
                "--seeds",
                "0",
                "--wandb",
                "disabled",
                "--workers",
                "2",
            )
        )
        == 0
    )
    a, b = _preds(out), _preds(matrix)
    assert sorted(a) == sorted(RUNS)
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=True)


def test_shipped_presets_and_protocols_load():
    from bench.protocol import load_preset, load_protocol
    from bench.regimes import expand_regimes

    for name in ("smoke", "cpu", "gpu"):
        preset, path = load_preset(name)
        assert preset.name == name and path.parent.name == "presets"
    assert load_preset("smoke")[0].backbone == "resnet10t"
    default, _ = load_protocol("default")
    names = [r.name for r in expand_regimes(default.regimes, default.ratios)]
    assert names[:5] == ["real", "synthetic", "augment:0.5", "augment:1", "augment:2"]
    assert "pretrain" in names and default.seeds == [0, 1, 2]
    assert set(default.tune.search_space) == {"lr", "weight_decay", "aug_strength"}
    demo, _ = load_protocol("demo")
    assert demo.regimes == ["real", "synthetic", "augment:1", "scarce:0.25", "scarce:0.25+synthetic"]
    # Three seeds per arm: the fewest the bootstrap's seed stage accepts without a `few_seeds` note.
    assert demo.seeds == [0, 1, 2]


def test_unknown_preset_is_bad_input(world, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(
        [
            "run",
            "--task",
            str(world["task_path"]),
            "--real",
            str(world["real"]),
            "--out",
            str(out),
            "--regimes",
            "real",
            "--preset",
            "turbo",
            "--wandb",
            "disabled",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "'turbo'" in err and "smoke" in err
    assert not out.exists()
