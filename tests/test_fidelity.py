"""The fidelity step on made-up data with known answers: copies, shuffled labels, a crude and a better generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.cli import main
from bench.io import read_table, write_json
from bench.manifest import read_manifest, write_manifest
from tests.conftest import draw_shape, make_tiny_dataset, write_tiny_task

COLUMNS = [
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


def _synthetic(real: pd.DataFrame, name: str, images: list[str], labels: list[str]) -> pd.DataFrame:
    n = len(images)
    return pd.DataFrame(
        {
            "case_id": [f"{name}-{i:04d}" for i in range(n)],
            "patient_id": [f"{name}-{i:04d}" for i in range(n)],
            "image": images,
            "label": labels,
            "site": "synthetic",
            "origin": "synthetic",
            "split": "train",
            "generator": name,
            "sex": real["sex"].to_numpy()[:n],
            "age": real["age"].to_numpy()[:n],
        }
    )


def _write_images(folder: Path, arrays: list[np.ndarray]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, a in enumerate(arrays):
        p = folder / f"{i:04d}.png"
        Image.fromarray(a).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from bench.tasks import load_task
    from bench.train import FitSettings, fit, save_checkpoint

    root = tmp_path_factory.mktemp("fid")
    task_path = write_tiny_task(root)
    task = load_task(task_path)
    real_path = make_tiny_dataset(root / "data", task, patients_per_site=15, images_per_patient=3)
    m = read_manifest(real_path)
    df = m.df
    train = df[(df["split"] == "train") & df["site"].isin(task.sites.train)].reset_index(drop=True)
    val = df[(df["split"] == "val") & df["site"].isin(task.sites.train)].reset_index(drop=True)
    cls = {c: i for i, c in enumerate(task.classes)}

    def load(rows):
        return np.stack([np.asarray(Image.open(m.image_path(p)))[None] for p in rows["image"]]).astype(
            np.uint8
        )

    settings = FitSettings(
        backbone="resnet10t",
        num_classes=3,
        epochs=8,
        lr=3e-3,
        weight_decay=1e-4,
        batch_size=8,
        aug_strength=0.0,
        seed=0,
        device="cpu",
        select="best_val",
    )
    model, _ = fit(
        settings,
        load(train),
        train["label"].map(cls).to_numpy(),
        load(val),
        val["label"].map(cls).to_numpy(),
    )
    ckpt = save_checkpoint(root / "checkpoint.pt", model, {"image": {"size": 32, "channels": 1}})
    paths = [str(m.image_path(p)) for p in train["image"]]
    labels = list(train["label"])
    rng = np.random.default_rng(1)
    manifests = {}
    # copycat: the training images themselves; label-shuffle: the same images with permuted labels.
    manifests["copycat"] = _synthetic(train, "copycat", paths, labels)
    manifests["label-shuffle"] = _synthetic(train, "label-shuffle", paths, list(rng.permutation(labels)))
    # better: fresh draws of the same shapes; crude: each class's blurred mean image plus noise.
    fresh = [draw_shape(lab, rng, site_shift=8.0 * (i % 3)) for i, lab in enumerate(labels)]
    manifests["better"] = _synthetic(train, "better", _write_images(root / "better", fresh), labels)
    imgs = load(train)[:, 0].astype(float)
    means = {c: imgs[np.array(labels) == c].mean(0) for c in task.classes}
    crude = [
        np.clip(means[lab] + rng.normal(0, 4, means[lab].shape), 0, 255).astype(np.uint8) for lab in labels
    ]
    manifests["crude"] = _synthetic(train, "crude", _write_images(root / "crude", crude), labels)
    files = {}
    for name, sdf in manifests.items():
        files[name] = root / "syn" / name / "manifest.parquet"
        files[name].parent.mkdir(parents=True)
        write_manifest(task.add_subgroup_columns(sdf), files[name])
    results = {}
    for name, f in files.items():
        out = root / "out" / name
        args = ["fidelity", "--task", str(task_path), "--synthetic", str(f), "--real", str(real_path)]
        args += ["--out", str(out), "--checkpoint", str(ckpt), "--device", "cpu", "--n-boot", "200"]
        args += ["--kid-subsets", "10", "--kid-subset-size", "50", "--fd-boot", "10"]
        assert main(args) == 0
        results[name] = (
            json.loads((out / "fidelity.json").read_text()),
            read_table(out / "fidelity.parquet"),
        )
    return {
        "root": root,
        "task_path": task_path,
        "task": task,
        "real": real_path,
        "ckpt": ckpt,
        "files": files,
        "results": results,
    }


def _m(env, name, metric):
    return env["results"][name][0]["metrics"][metric]


def test_outputs_and_feature_space(env):
    r, table = env["results"]["copycat"]
    assert list(table.columns) == COLUMNS
    space = r["feature_space"]
    assert space["kind"] == "classifier" and space["layer"] == "penultimate" and space["image_size"] == 32
    assert space["model"] == "resnet10t" and space["label"].startswith("classifier:resnet10t:")
    assert (table["feature_space"] == space["label"]).all()
    assert r["k"] == 5 and r["real"]["n"] == r["synthetic"]["n"]
    # Scopes: overall, every class, every training site for the distances.
    sites = set(table.loc[table["scope"] == "site", "group"])
    assert sites == set(env["task"].sites.train)
    assert set(table.loc[(table["scope"] == "site"), "metric"]) == {"frechet_distance", "kid"}
    classes = table[table["scope"] == "class"]
    assert set(classes["group"]) == set(env["task"].classes)
    assert {
        "precision",
        "recall",
        "density",
        "coverage",
        "label_accuracy",
        "label_auroc",
        "spread_ratio",
    } <= set(classes["metric"])
    assert (table["status"] == "ok").all()
    ok = table.dropna(subset=["ci_low"])
    assert (ok["ci_low"] <= ok["value"] + 1e-12).all() and (ok["value"] <= ok["ci_high"] + 1e-12).all()


def test_copycat_has_zero_distance_and_full_manifold(env):
    crude = _m(env, "crude", "frechet_distance")["value"]
    assert _m(env, "copycat", "frechet_distance")["value"] < 1e-3 * crude
    # Unbiased KID of a set against itself is slightly negative: subsets drawn from the same images share some,
    # and the cross term keeps those identical pairs.
    kid = _m(env, "copycat", "kid")
    assert abs(kid["value"]) < 0.05 * _m(env, "crude", "kid")["value"] and kid["ci_low"] <= 0
    for metric in ("precision", "recall", "coverage"):
        assert _m(env, "copycat", metric)["value"] == 1.0
    assert _m(env, "copycat", "spread_ratio")["value"] == pytest.approx(1.0)
    assert _m(env, "copycat", "label_accuracy")["value"] > 0.8


def test_label_shuffle_keeps_image_fidelity_but_not_labels(env):
    for metric in ("frechet_distance", "precision", "recall", "density", "coverage"):
        assert _m(env, "label-shuffle", metric)["value"] == pytest.approx(
            _m(env, "copycat", metric)["value"], abs=1e-6
        )
    acc, auc = _m(env, "label-shuffle", "label_accuracy"), _m(env, "label-shuffle", "label_auroc")
    # Chance: accuracy 1/3, AUROC 0.5, both inside their intervals; far below the correctly labelled copies.
    assert acc["ci_low"] < 1 / 3 < acc["ci_high"] < _m(env, "copycat", "label_accuracy")["ci_low"]
    assert auc["ci_low"] < 0.5 < auc["ci_high"] < _m(env, "copycat", "label_auroc")["ci_low"]


def test_crude_generator_is_worse_than_better_one(env):
    for metric in ("frechet_distance", "kid"):
        assert _m(env, "crude", metric)["value"] > _m(env, "better", metric)["value"]
    for metric in ("precision", "recall", "coverage"):
        assert _m(env, "crude", metric)["value"] < _m(env, "better", metric)["value"]
    # The crude generator's images of a class are nearly alike: collapsed spread.
    assert _m(env, "crude", "spread_ratio")["ci_high"] < _m(env, "better", "spread_ratio")["ci_low"]


def test_features_are_cached(env, tmp_path):
    out = tmp_path / "again"
    f = env["files"]["better"]
    args = ["fidelity", "--task", str(env["task_path"]), "--synthetic", str(f), "--real", str(env["real"])]
    args += ["--out", str(out), "--checkpoint", str(env["ckpt"]), "--device", "cpu", "--n-boot", "20"]
    args += ["--kid-subsets", "5", "--kid-subset-size", "50", "--fd-boot", "0"]
    assert main(args) == 0
    r = json.loads((out / "fidelity.json").read_text())
    assert r["cached"] == {"real": True, "synthetic": True}
    first = env["results"]["better"][0]["metrics"]["precision"]["value"]
    assert r["metrics"]["precision"]["value"] == first


def test_run_step_writes_per_generator_folders(env, tmp_path):
    from bench.runfolder import RunDir

    run = tmp_path / "RUN"
    run.mkdir()
    (run / "task.yaml").write_text(Path(env["task_path"]).read_text())
    real = read_manifest(env["real"])
    syn = {g: env["files"][g] for g in ("copycat", "crude")}
    write_json(
        run / "matrix.json",
        {
            "manifests": {
                "real": {"path": str(env["real"]), "sha256": real.sha256},
                "synthetic": {g: {"path": str(p), "sha256": read_manifest(p).sha256} for g, p in syn.items()},
            }
        },
    )
    base = RunDir(run).run("none__real__resnet10t__seed0")
    base.path.mkdir()
    (base.path / "checkpoint.pt").write_bytes(Path(env["ckpt"]).read_bytes())
    pd.DataFrame({"case_id": ["a"]}).to_parquet(base.predictions)
    (base.path / "DONE").write_text("x\n")
    args = ["fidelity", "--run", str(run), "--device", "cpu", "--n-boot", "20", "--kid-subsets", "5"]
    assert main([*args, "--fd-boot", "0"]) == 0
    files = RunDir(run).fidelity_files()
    assert sorted(files) == ["copycat", "crude"]
    r = json.loads(files["crude"].read_text())
    assert r["generator"] == "crude" and r["settings"]["label_fidelity_classifier"].endswith("checkpoint.pt")
    assert main([*args, "--generator", "nope"]) == 2


def test_bad_inputs(env, tmp_path, capsys):
    base = ["fidelity", "--task", str(env["task_path"]), "--synthetic", str(env["files"]["crude"])]
    base += ["--real", str(env["real"]), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main([*base, "--features", "timm:resnet18"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(env["ckpt"]), "--k", "0"]) == 2
    assert main(["fidelity", "--task", str(env["task_path"])]) == 2
    assert "missing" in capsys.readouterr().err


def test_timm_backbone_with_local_weights(env, tmp_path):
    import timm
    import torch

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), weights)
    out = tmp_path / "timm"
    args = ["fidelity", "--task", str(env["task_path"]), "--synthetic", str(env["files"]["crude"])]
    args += [
        "--real",
        str(env["real"]),
        "--out",
        str(out),
        "--features",
        "timm:resnet18",
        "--weights",
        str(weights),
    ]
    args += [
        "--checkpoint",
        str(env["ckpt"]),
        "--device",
        "cpu",
        "--n-boot",
        "20",
        "--kid-subsets",
        "5",
        "--fd-boot",
        "0",
    ]
    assert main(args) == 0
    r = json.loads((out / "fidelity.json").read_text())
    assert r["feature_space"]["kind"] == "timm" and r["feature_space"]["dim"] == 512
    assert r["feature_space"]["label"].startswith("timm:resnet18:")
    assert (
        r["metrics"]["label_accuracy"]["value"] is not None
    )  # label fidelity still from the run's classifier
    bad = tmp_path / "bad.pth"
    torch.save({"nothing": torch.zeros(1)}, bad)
    assert (
        main(
            [*args[:-14], "--features", "timm:resnet18", "--weights", str(bad), "--out", str(tmp_path / "b")]
        )
        == 2
    )
