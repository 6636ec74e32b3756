"""The generic `folder` source: a user's images + CSV mapped onto the manifest contract by options or a YAML file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench.cli import main
from bench.manifest import manifest_hash, read_manifest
from bench.sources import build_manifest, pseudonym
from tests.conftest import draw_shape

CODES = {"0": "blank", "1": "disc", "2": "bar"}
COLUMNS = {
    "case_id": "img_id",
    "patient_id": "subject",
    "image": "file",
    "label": "dx_code",
    "site": "hospital",
    "sex": "gender",
    "age": "age_years",
}


def make_folder_dataset(
    root: Path, task, patients_per_site: int = 6, images_per_patient: int = 2
) -> pd.DataFrame:
    """PNG files under root/pics/<site>/ and root/table.csv with the user's own column names."""
    rng = np.random.default_rng(1)
    rows = []
    for site in task.all_sites:
        (root / "pics" / site).mkdir(parents=True, exist_ok=True)
        for p in range(patients_per_site):
            code = str(p % 3)
            for k in range(images_per_patient):
                rel = f"{site}/{site}-{p}-{k}.png"
                Image.fromarray(draw_shape(CODES[code], rng, size=16)).save(root / "pics" / rel)
                rows.append(
                    {
                        "img_id": f"{site}-{p}-{k}",
                        "subject": f"{site}-P{p:02d}",
                        "file": rel,
                        "dx_code": code,
                        "hospital": site,
                        "gender": "F" if p % 2 else "M",
                        "age_years": "" if p == 0 else str(30 + 7 * p),
                        "scanner": "A" if k == 0 else "B",
                    }
                )
    table = pd.DataFrame(rows)
    table.to_csv(root / "table.csv", index=False)
    return table


@pytest.fixture
def dataset(tmp_path, tiny_task):
    root = tmp_path / "userdata"
    table = make_folder_dataset(root, tiny_task)
    return root, table


def _cli(task_path: Path, root: Path, out: Path, *options: str) -> int:
    args = ["data", "manifest", "--task", str(task_path), "--root", str(root), "--out", str(out)]
    for o in options:
        args += ["--option", o]
    return main(args)


def _opts(**extra: str) -> list[str]:
    base = {
        "csv": "table.csv",
        "image_dir": "pics",
        "columns": yaml.safe_dump(COLUMNS, default_flow_style=True).strip(),
        "label_map": "{'0': blank, '1': disc, '2': bar}",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_happy_path_cli(dataset, tiny_task, tiny_task_path, tmp_path, capsys):
    root, table = dataset
    out = tmp_path / "out" / "m.parquet"
    assert _cli(tiny_task_path, root, out, *_opts()) == 0, capsys.readouterr().err
    m = read_manifest(out)
    df = m.df.set_index("case_id")
    assert len(df) == len(table) == 48
    src = table.set_index("img_id")
    assert list(df.index.sort_values()) == sorted(src.index)
    # Every mapped field carries the CSV's value (labels renamed through label_map).
    assert (df["patient_id"] == src.loc[df.index, "subject"]).all()
    assert (df["label"] == src.loc[df.index, "dx_code"].map(CODES)).all()
    assert (df["site"] == src.loc[df.index, "hospital"]).all()
    assert (df["sex"] == src.loc[df.index, "gender"]).all()
    # Image paths point at the very file the CSV names.
    for cid in ["s1-0-0", "x1-5-1"]:
        assert (
            m.image_path(df.loc[cid, "image"]).resolve() == (root / "pics" / src.loc[cid, "file"]).resolve()
        )
    # Missing age becomes age_group 'unknown'; ages bin at the task's edge (50).
    assert (df.loc[src.index[src["age_years"] == ""], "age_group"] == "unknown").all()
    assert df.loc["s1-3-0", "age"] == 51 and df.loc["s1-3-0", "age_group"] == ">=50"
    assert df.loc["s1-2-0", "age"] == 44 and df.loc["s1-2-0", "age_group"] == "<50"
    # Patients never cross splits; the external site is only in 'external'.
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(df.loc[df["site"] == "x1", "split"]) == {"external"}
    assert "external" not in set(df.loc[df["site"] != "x1", "split"])
    assert main(["data", "validate", str(out), "--task", str(tiny_task_path)]) == 0


def test_mapping_file_equals_options(dataset, tiny_task, tmp_path):
    root, _ = dataset
    (root / "mapping.yaml").write_text(
        yaml.safe_dump(
            {
                "csv": "table.csv",
                "image_dir": "pics",
                "columns": COLUMNS,
                "label_map": {"0": "blank", "1": "disc", "2": "bar"},
            }
        )
    )
    by_file = build_manifest(tiny_task, root, {"mapping": "mapping.yaml"})
    by_opts = build_manifest(
        tiny_task,
        root,
        {
            "csv": "table.csv",
            "image_dir": "pics",
            "columns": COLUMNS,
            "label_map": {0: "blank", 1: "disc", 2: "bar"},
        },
    )
    assert manifest_hash(by_file) == manifest_hash(by_opts)
    # Options given directly override the file's.
    other = build_manifest(tiny_task, root, {"mapping": "mapping.yaml", "columns": {"sex": "scanner"}})
    assert set(other["sex"]) == {"A", "B"}
    assert (other["patient_id"] == by_file["patient_id"]).all()


def test_extra_mapped_field_is_carried(dataset, tiny_task):
    root, table = dataset
    df = build_manifest(
        tiny_task,
        root,
        {
            "image_dir": "pics",
            "csv": "table.csv",
            "columns": {**COLUMNS, "scanner": "scanner"},
            "label_map": CODES,
        },
    ).set_index("case_id")
    assert (df["scanner"] == table.set_index("img_id").loc[df.index, "scanner"]).all()
    # Unmapped CSV columns stay out of the manifest.
    assert "dx_code" not in df.columns and "hospital" not in df.columns


def test_defaults_without_ids_warn_about_leakage(dataset, tiny_task, caplog):
    root, table = dataset
    cols = {"image": "file", "label": "dx_code", "site": "hospital"}
    with caplog.at_level(logging.WARNING):
        df = build_manifest(tiny_task, root, {"image_dir": "pics", "columns": cols, "label_map": CODES})
    # case_id is the image path without its suffix; each image is its own patient.
    assert sorted(df["case_id"]) == sorted(table["file"].str.removesuffix(".png"))
    assert (df["patient_id"] == df["case_id"]).all()
    assert any("patient_id" in r.getMessage() and "leak" in r.getMessage() for r in caplog.records)


def test_constant_site_and_image_suffix(tmp_path, tiny_task):
    root = tmp_path / "single"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        Image.fromarray(draw_shape(CODES[str(i % 3)], rng, size=16)).save(root / "img" / f"c{i}.png")
        rows.append({"id": f"c{i}", "pt": f"p{i // 3}", "y": CODES[str(i % 3)]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    df = build_manifest(
        tiny_task,
        root,
        {
            "columns": {"case_id": "id", "patient_id": "pt", "image": "id", "label": "y"},
            "image_dir": "img",
            "image_suffix": "png",
            "site": "s2",
        },
    )
    assert set(df["site"]) == {"s2"} and len(df) == 9
    assert all(Path(p).name == f"{c}.png" for c, p in zip(df["case_id"], df["image"], strict=True))


def test_pseudonymize(dataset, tiny_task):
    root, table = dataset
    df = build_manifest(
        tiny_task,
        root,
        {
            "csv": "table.csv",
            "image_dir": "pics",
            "columns": COLUMNS,
            "label_map": CODES,
            "pseudonymize": True,
            "salt": "s3cret",
        },
    )
    assert set(df["case_id"]) == {pseudonym(v, "s3cret") for v in table["img_id"]}
    assert set(df["patient_id"]) == {pseudonym(v, "s3cret") for v in table["subject"]}
    assert not set(df["patient_id"]) & set(table["subject"])


def _break_missing_column(root: Path) -> list[str]:
    return _opts(columns="{image: file, label: diagnosis, site: hospital}")


def _break_missing_image(root: Path) -> list[str]:
    (root / "pics" / "s2" / "s2-3-1.png").unlink()
    (root / "pics" / "x1" / "x1-0-0.png").unlink()
    return _opts()


def _break_unknown_label(root: Path) -> list[str]:
    t = pd.read_csv(root / "table.csv", dtype=str, keep_default_na=False)
    t.loc[4, "dx_code"] = "7"
    t.to_csv(root / "table.csv", index=False)
    return _opts()


def _break_empty_label(root: Path) -> list[str]:
    t = pd.read_csv(root / "table.csv", dtype=str, keep_default_na=False)
    t.loc[10, "dx_code"] = ""
    t.to_csv(root / "table.csv", index=False)
    return _opts()


def _break_duplicate_case(root: Path) -> list[str]:
    t = pd.read_csv(root / "table.csv", dtype=str, keep_default_na=False)
    t.loc[5, "img_id"] = t.loc[2, "img_id"]
    t.to_csv(root / "table.csv", index=False)
    return _opts()


def _break_age(root: Path) -> list[str]:
    t = pd.read_csv(root / "table.csv", dtype=str, keep_default_na=False)
    t.loc[7, "age_years"] = "forty"
    t.to_csv(root / "table.csv", index=False)
    return _opts()


def _break_unknown_site(root: Path) -> list[str]:
    t = pd.read_csv(root / "table.csv", dtype=str, keep_default_na=False)
    t.loc[3, "hospital"] = "elsewhere"
    t.to_csv(root / "table.csv", index=False)
    return _opts()


def _break_option_typo(root: Path) -> list[str]:
    return [*_opts(), "colums={label: dx_code}"]


def _break_mapping_file(root: Path) -> list[str]:
    (root / "map.yaml").write_text("columns: {image: file\n")
    return ["mapping=map.yaml"]


@pytest.mark.parametrize(
    "breaker, culprits",
    [
        (_break_missing_column, ["columns.label", "'diagnosis'"]),
        (_break_missing_image, ["s2/s2-3-1.png", "x1/x1-0-0.png", "line"]),
        (_break_unknown_label, ["'dx_code'", "'7'", "line 6"]),
        (_break_empty_label, ["'dx_code'", "line 12"]),
        (_break_duplicate_case, ["'img_id'", "lines 4, 7"]),
        (_break_age, ["'age_years'", "line 9"]),
        (_break_unknown_site, ["'hospital'", "'elsewhere'", "line 5"]),
        (_break_option_typo, ["colums"]),
        (_break_mapping_file, ["map.yaml", "YAML"]),
    ],
)
def test_bad_input_exit_2_names_culprit_writes_nothing(
    dataset, tiny_task_path, tmp_path, capsys, breaker, culprits
):
    root, _ = dataset
    options = breaker(root)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _cli(tiny_task_path, root, out_dir / "m.parquet", *options) == 2
    err = capsys.readouterr().err
    for c in culprits:
        assert c in err, (c, err)
    assert list(out_dir.iterdir()) == []
    assert not (root / "manifest.parquet").exists()
