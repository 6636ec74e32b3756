"""Segmentation on repository leaderboards: the answer key with every evaluation case's truth label map, submissions
recounted against it from their label maps, and the board rebuilt from stored maps + key.

The runs are made here without training: the phantom's truth maps, perturbed per generator and seed, stored as a
run stores them (`labelmaps.npz` + `seg_predictions.parquet`), so a generator's quality is known by construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.cli import main
from bench.errors import BadInput
from bench.imaging import build_cache
from bench.labelmaps import save_labelmaps
from bench.leaderboard.config import load_config, load_key
from bench.leaderboard.key import MASKS_FILE, AnswerKey, hash_ids
from bench.manifest import read_manifest
from bench.tasks import load_task

TASK = "mediastinal-neoplasm-seg"
SIZE = 32
SALT = "seg-salt-0123"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("segboard")
    phantom = root / "phantom"
    cmd = ["data", "phantom", "--out", str(phantom), "--patients", "40", "--slices", "2", "--size", "64"]
    assert main([*cmd, "--seed", "0", "--masks"]) == 0
    real = root / "manifest.parquet"
    assert main(["data", "manifest", "--task", TASK, "--root", str(phantom), "--out", str(real)]) == 0
    return {"root": root, "real": real}


def make_seg_board(path: Path, real: Path, **over) -> Path:
    """A segmentation leaderboard folder scoring at SIZE px, with its answer key written by the command line."""
    path.mkdir(parents=True, exist_ok=True)
    task = load_task(TASK)
    cfg = {
        "schema_version": "1.0",
        "title": "mediastinal segmentation (test)",
        "task": {"name": TASK, "version": task.version},
        "protocol": {"regimes": ["real", "synthetic"], "seeds": [0, 1], "backbone": "unet-small"},
        "id_salt": SALT,
        "bootstrap": {"n": 30, "seed": 0},
        "require_privacy": False,
        "image_size": SIZE,
        "max_archive_bytes": 50_000_000,
        **over,
    }
    (path / "leaderboard.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["leaderboard", "key", str(path), "--real", str(real)]) == 0
    return path


def truth_of(real: Path) -> dict[str, np.ndarray]:
    """Raw case id -> truth label map at SIZE, as the runs see it."""
    m = read_manifest(real)
    cache = build_cache(m, load_task(TASK), size=SIZE, progress=False)
    ids = m.df["case_id"].astype(str)
    return dict(zip(ids, np.asarray(cache.masks[cache.rows(ids)]), strict=True))


# ------------------------------------------------------------------------------------------------ the answer key


def test_the_key_of_a_segmentation_board_holds_every_evaluation_mask(world, tmp_path, capsys):
    board = make_seg_board(tmp_path / "board", world["real"])
    out = capsys.readouterr().out
    assert MASKS_FILE in out and f"{SIZE}x{SIZE}" in out
    cfg = load_config(board)
    assert cfg.answer_key.masks is not None and cfg.answer_key.masks.path == MASKS_FILE
    key = load_key(cfg)
    assert key.is_segmentation and key.image_size == (SIZE, SIZE)
    # Exactly the key's cases, under their salted ids, each the very mask a run at SIZE px is scored against.
    assert key.masks.case_ids == key.case_ids
    assert key.masks.num_classes == len(load_task(TASK).mask_classes) + 1
    df = read_manifest(world["real"]).df
    ev = df[df["split"].isin(["test", "external"])]
    raw = ev["case_id"].astype(str)
    salted = dict(zip(hash_ids(raw, SALT), raw, strict=True))
    truth = truth_of(world["real"])
    for cid, m in key.truth.items():
        assert np.array_equal(m, truth[salted[cid]])
    assert any(m.any() for m in key.truth.values()), "some evaluation case has a lesion"
    # The masks hold labels: owner-only like the key.
    assert (board / MASKS_FILE).stat().st_mode & 0o077 == 0
    # A part keeps its own cases' masks.
    pub = key.part("public")
    assert pub.masks.case_ids == pub.case_ids


def test_a_changed_or_mismatched_masks_file_is_refused(world, tmp_path, capsys):
    board = make_seg_board(tmp_path / "board", world["real"])
    cfg = load_config(board)
    key = load_key(cfg)
    # Edited after the key was written: the recorded sha256 no longer matches.
    maps = key.masks.maps.copy()
    maps[0, 0, 0] = 1 - maps[0, 0, 0]
    save_labelmaps(board / MASKS_FILE, key.masks.case_ids, maps, num_classes=key.masks.num_classes)
    with pytest.raises(BadInput, match="answer key masks does not match the sha256"):
        load_key(cfg)
    # Consistent hashes but a case missing: refused, by counts (no id or mask value quoted).
    save_labelmaps(
        board / MASKS_FILE, key.masks.case_ids[1:], key.masks.maps[1:], num_classes=key.masks.num_classes
    )
    with pytest.raises(BadInput, match="1 case\\(s\\) without a mask") as e:
        AnswerKey.read(board / "answer_key.parquet", masks=board / MASKS_FILE)
    assert key.masks.case_ids[0] not in str(e.value)


def test_a_board_image_size_and_the_key_option_agree(world, tmp_path, capsys):
    board = make_seg_board(tmp_path / "board", world["real"])
    args = ["leaderboard", "key", str(board), "--real", str(world["real"])]
    assert main([*args, "--image-size", "64"]) == 2
    assert "pins image_size 32" in capsys.readouterr().err
    # Unpinned, the option (or a preset name) sets the scoring resolution.
    cfg = yaml.safe_load((board / "leaderboard.yaml").read_text())
    cfg.pop("image_size")
    (board / "leaderboard.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main([*args, "--image-size", "smoke"]) == 0
    assert load_key(load_config(board)).image_size == (32, 32)


def test_a_segmentation_key_needs_the_manifest_file(world):
    df = read_manifest(world["real"]).df
    with pytest.raises(BadInput, match="needs the manifest file"):
        AnswerKey.build_from_manifest(df, TASK, SALT)
