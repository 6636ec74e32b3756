"""Segmentation on repository leaderboards: the answer key with every evaluation case's truth label map, submissions
recounted against it from their label maps, and the board rebuilt from stored maps + key.

The runs are made here without training: the phantom's truth maps, perturbed per generator and seed, stored as a
run stores them (`labelmaps.npz` + `seg_predictions.parquet`), so a generator's quality is known by construction."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.cli import main
from bench.errors import BadInput
from bench.imaging import build_cache
from bench.labelmaps import load_labelmaps, save_labelmaps
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
    cmd = ["data", "phantom", "--out", str(phantom), "--patients", "80", "--slices", "2", "--size", "64"]
    assert main([*cmd, "--seed", "0", "--masks"]) == 0
    real = root / "manifest.parquet"
    assert main(["data", "manifest", "--task", TASK, "--root", str(phantom), "--out", str(real)]) == 0
    return {"root": root, "real": real}


def relaxed_task() -> dict:
    """The task with group-size limits a 40-patient phantom meets, so intervals and control checks are defined."""
    spec = load_task(TASK).spec()
    spec["metrics"].update(min_patients=3, min_positives=1, min_negatives=1)
    return spec


def make_seg_board(path: Path, real: Path, **over) -> Path:
    """A segmentation leaderboard folder scoring at SIZE px (its task.yaml: `relaxed_task`), with its answer key
    written by the command line."""
    path.mkdir(parents=True, exist_ok=True)
    task = load_task(TASK)
    (path / "task.yaml").write_text(yaml.safe_dump(relaxed_task(), sort_keys=False))
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


BACKBONE = "unet-small"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def predicted_maps(truth: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """A segmenter of known skill: each lesion kept with probability `quality` (else missed), and a spurious blob
    with probability (1 - quality) / 2 (a false-positive lesion)."""
    out = truth.copy()
    n, h, w = out.shape
    for i in range(n):
        if out[i].any() and rng.random() > quality:
            out[i] = 0
        if rng.random() < (1 - quality) / 2:
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            out[i, y : y + 3, x : x + 3] = rng.integers(1, 6)
    return out


def make_seg_run(
    root: Path,
    real: Path,
    generators: dict[str, float] | None = None,
    *,
    real_quality: float = 0.85,
    regimes: tuple[str, ...] = ("real", "synthetic"),
    seeds: tuple[int, ...] = (0, 1),
    controls: dict[str, float] | None = None,
) -> Path:
    """A finished segmentation run folder (no training): per run `seg_predictions.parquet` and `labelmaps.npz` at
    SIZE px for every val/test/external case; `controls` are control-only generators (e.g. mask-shuffle)."""
    from bench.manifest import manifest_hash
    from bench.metrics.segmentation import count_table
    from bench.protocol.segment import case_frame

    generators = {"good": 0.95, "weak": 0.3} if generators is None else generators
    controls = controls or {}
    task = load_task(TASK)
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.yaml").write_text(yaml.safe_dump(relaxed_task(), sort_keys=False))
    m = read_manifest(real)
    ev = m.df[m.df["split"].isin(["val", "test", "external"])].reset_index(drop=True)
    truth_by = truth_of(real)
    truth = np.stack([truth_by[c] for c in ev["case_id"].astype(str)])
    plan = [("none", "real", real_quality)]
    plan += [(g, "synthetic", q) for g, q in {**generators, **controls}.items() if "synthetic" in regimes]
    k = 0
    for g, r, q in plan:
        for s in seeds:
            d = root / f"{g}__{r}__{BACKBONE}__seed{s}"
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(1000 + k)
            k += 1
            if q < 0:  # an image-blind prediction: another case's mask
                pred = truth[rng.permutation(len(truth))]
            else:
                pred = predicted_maps(truth, q, rng)
            cases = case_frame(task, ev, generator=g, regime=r, seed=s, backbone=BACKBONE)
            count_table(truth, pred, task.mask_classes, cases).to_parquet(
                d / "seg_predictions.parquet", index=False
            )
            save_labelmaps(d / "labelmaps.npz", ev["case_id"].astype(str), pred, num_classes=6)
            config = {"schema_version": 1, "run_id": d.name, "generator": g, "regime": r, "seed": s}
            config.update(backbone=BACKBONE, train={"steps": 10}, tuning=None)
            (d / "config.json").write_text(json.dumps(config))
            (d / "DONE").write_text("")
    gens, syn = {}, {}
    for g in [*generators, *controls]:
        training = {"manifest_sha256": _sha("train"), "sites": task.sites.train}
        card = {"name": g, "version": "0.1", "link": f"https://example.org/{g}", "training": training}
        (root / "generators" / g).mkdir(parents=True, exist_ok=True)
        (root / "generators" / g / "card.json").write_text(json.dumps(card))
        gens[g] = {"card_path": f"generators/{g}/card.json", "card": card}
        syn[g] = {"path": f"/elsewhere/{g}.parquet", "sha256": _sha(f"syn-{g}")}
    matrix = {
        "protocol": {
            "regimes": list(regimes),
            "seeds": list(seeds),
            "backbone": BACKBONE,
            "controls": {c: ["synthetic"] for c in controls},
        },
        "manifests": {
            "real": {"path": "/elsewhere/real.parquet", "sha256": manifest_hash(m.df)},
            "synthetic": syn,
        },
        "generators": gens,
        "environment": {"packages": {"torch": "2.15.0"}, "git": "abc123", "device": "cpu"},
    }
    (root / "matrix.json").write_text(json.dumps(matrix))
    return root


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


# ------------------------------------------------------------------------------------------------ submit and build


@pytest.fixture(scope="module")
def submitted(world, tmp_path_factory):
    """A board with one segmentation run submitted and the pages built."""
    root = tmp_path_factory.mktemp("seg-submitted")
    board = make_seg_board(root / "board", world["real"])
    run = make_seg_run(root / "run", world["real"])
    assert main(["submit", str(run), "--leaderboard", str(board), "--submitter", "t"]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    return {"board": board, "run": run}


def records_of(board: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((board / "records").glob("*.json")):
        r = json.loads(p.read_text())
        out[r["generator"]["name"]] = r
    return out


def test_a_segmentation_run_submits_and_the_board_builds(submitted):
    board = submitted["board"]
    recs = records_of(board)
    assert set(recs) == {"none", "good", "weak"}
    for r in recs.values():
        assert r["evaluation"]["primary_metric"] == "dice_macro"
        info = r["predictions"]["labelmaps"]
        assert (board / info["file"]).is_file() and (board / r["predictions"]["file"]).is_file()
        maps = load_labelmaps(board / info["file"])
        assert maps.maps.shape[1:] == (SIZE, SIZE)
        assert {"lesion_f1_macro", "instance_dice", "dice_macro"} <= set(r["metrics"]["columns"])
    # Quality by construction: good above weak on the headline (synthetic-only) Dice.
    head = {g: r["metrics"]["regimes"][r["metrics"]["headline_regime"]]["value"] for g, r in recs.items()}
    assert head["good"] > head["weak"]
    # The same two-stage bootstrap as classification boards: intervals, worst subgroup and gap on macro Dice,
    # the paired ratio against real-only.
    good = recs["good"]["metrics"]
    est = good["regimes"]["synthetic"]
    assert est["ci_low"] is not None and est["ci_low"] <= est["value"] <= est["ci_high"]
    assert good["worst_subgroup"]["metric"] == "dice_macro" and good["largest_gap"] is not None
    assert good["utility_ratio"]["value"] > recs["weak"]["metrics"]["utility_ratio"]["value"]
    readme = (board / "README.md").read_text()
    assert "Worst-subgroup Dice" in readme and "lesion F1" in readme and "label maps" in readme
    assert "good" in (board / "index.html").read_text()
    # A warm rebuild (score cache, ranking replicates) writes the same bytes.
    pages = {p: (board / p).read_bytes() for p in ("README.md", "index.html")}
    assert main(["leaderboard", "build", str(board)]) == 0
    assert pages == {p: (board / p).read_bytes() for p in ("README.md", "index.html")}


def _submit(run: Path, board: Path, capsys) -> tuple[int, str]:
    rc = main(["submit", str(run), "--leaderboard", str(board), "--submitter", "t"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert_no_key_values(text, board)
    return rc, text


def assert_no_key_values(text: str, board: Path) -> None:
    """No message quotes a count (each is a function of a truth mask) or the key's label of a case."""
    assert not any(
        f" {s}_" in text or f"'{s}_" in text for s in ("tp", "fp", "fn", "ltp", "lfp", "lfn", "idice")
    )
    assert "differs from the key" not in text or "'y_true' disagrees" in text


@pytest.fixture
def fresh(world, tmp_path):
    """An empty board and a run to spoil, per test."""
    board = make_seg_board(tmp_path / "board", world["real"])
    run = make_seg_run(tmp_path / "run", world["real"], {"good": 0.95})
    return board, run


def test_submitted_counts_are_never_scored(world, tmp_path):
    from bench.leaderboard.submit import submit

    board = make_seg_board(tmp_path / "board", world["real"])
    honest = make_seg_run(tmp_path / "honest", world["real"], {"good": 0.6})
    forged = make_seg_run(tmp_path / "forged", world["real"], {"good": 0.6})
    # The forged run claims a perfect segmenter in its count tables: every true pixel found, nothing spurious.
    for p in forged.glob("good__*/seg_predictions.parquet"):
        df = pd.read_parquet(p)
        for c in load_task(TASK).mask_classes:
            df[f"tp_{c}"] = df[f"tp_{c}"] + df[f"fn_{c}"]
            df[f"fn_{c}"] = 0
            df[f"fp_{c}"] = 0
        df.to_parquet(p, index=False)
    a = {r["generator"]["name"]: r["metrics"] for r in submit(honest, board, submitter="t", dry_run=True)}
    b = {r["generator"]["name"]: r["metrics"] for r in submit(forged, board, submitter="t", dry_run=True)}
    assert a == b
    assert a["good"]["regimes"]["synthetic"]["value"] < 0.9


def test_a_relabelled_count_table_is_refused_naming_the_row(fresh, capsys):
    board, run = fresh
    # The same case relabelled in every run (one run alone differs from the others and is refused for that).
    truth_label = None
    for p in run.glob("*/seg_predictions.parquet"):
        df = pd.read_parquet(p)
        i = int(np.flatnonzero(df["split"].to_numpy() == "test")[0])
        truth_label = df.loc[i, "y_true"]
        df.loc[i, "y_true"] = "thymoma" if truth_label != "thymoma" else "normal"
        df.to_parquet(p, index=False)
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and "seg_predictions.parquet row" in text
    assert "'y_true' disagrees with the answer key" in text
    # The submitted label is quoted, never the key's.
    assert repr(truth_label) not in text
    assert not list(board.glob("records/*.json"))


def test_label_maps_of_another_size_are_refused_naming_the_file_and_both_shapes(fresh, capsys):
    board, run = fresh
    p = next(run.glob("good__*seed1/labelmaps.npz"))
    m = load_labelmaps(p)
    save_labelmaps(p, m.case_ids, np.kron(m.maps, np.ones((1, 2, 2), np.uint8)), num_classes=m.num_classes)
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and str(p) in text and "64x64" in text and "32x32" in text


def test_a_case_missing_from_the_label_maps_is_refused_naming_the_file(fresh, capsys):
    board, run = fresh
    p = next(run.glob("none__*seed0/labelmaps.npz"))
    m = load_labelmaps(p)
    counts = pd.read_parquet(p.with_name("seg_predictions.parquet"))
    drop = counts.loc[counts["split"] == "external", "case_id"].iloc[0]
    keep = [i for i, c in enumerate(m.case_ids) if c != drop]
    save_labelmaps(p, [m.case_ids[i] for i in keep], m.maps[keep], num_classes=m.num_classes)
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and str(p) in text and "have no label map" in text


def test_missing_duplicate_and_unknown_cases_in_a_count_table_are_refused(fresh, capsys):
    board, run = fresh
    p = next(run.glob("good__*seed0/seg_predictions.parquet"))
    df = pd.read_parquet(p)
    # missing: a test case left out of one run
    df.drop(index=int(np.flatnonzero(df["split"].to_numpy() == "test")[0])).to_parquet(p, index=False)
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and str(p) in text and "not predicted" in text
    # duplicate: one case twice
    pd.concat([df, df.iloc[[0]]], ignore_index=True).to_parquet(p, index=False)
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and str(p) in text and "more than once" in text
    # unknown: a test case the key does not hold, in every run
    for q in run.glob("*/seg_predictions.parquet"):
        d = pd.read_parquet(q) if q != p else df
        extra = d[d["split"] == "test"].iloc[[0]].assign(case_id="NOT-A-CASE")
        pd.concat([d, extra], ignore_index=True).to_parquet(q, index=False)
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and "predicted as test/external that the answer key does not hold" in text
    # Each run's own file is named (the real-only runs, re-scored for the controls, come first).
    assert f"{run}/none__real__{BACKBONE}__seed0/seg_predictions.parquet:" in text


def test_a_label_maps_zip_bomb_is_refused_before_it_is_expanded(fresh, capsys):
    board, run = fresh
    p = next(run.glob("good__*seed1/labelmaps.npz"))
    m = load_labelmaps(p)
    # 50 MB of zeros compress to a few tens of kilobytes; the key allows about a megabyte for this run.
    n = 50_000
    ids = [*m.case_ids, *(f"pad-{i}" for i in range(n - len(m.case_ids)))]
    maps = np.zeros((n, SIZE, SIZE), np.uint8)
    save_labelmaps(p, ids, maps, num_classes=m.num_classes)
    assert p.stat().st_size < 2_000_000
    rc, text = _submit(run, board, capsys)
    assert rc == 2 and str(p) in text and "declare" in text and "limit" in text


def test_mask_shuffle_is_rescored_from_its_maps(world, tmp_path, capsys):
    board = make_seg_board(tmp_path / "board", world["real"])
    # An image-blind control passes; one whose maps follow the images (a leak) fails, whatever its counts say.
    ok = make_seg_run(tmp_path / "ok", world["real"], {"good": 0.95}, controls={"mask-shuffle": 0.0})
    rc, text = _submit(ok, board, capsys)
    assert rc == 0, text
    ref = next(r for r in records_of(board).values() if r["kind"] == "reference")
    ms = [c for c in ref["controls"] if c["control"] == "mask-shuffle"]
    assert [c["status"] for c in ms] == ["PASS"], ms
    leak = make_seg_run(tmp_path / "leak", world["real"], {"good": 0.9}, controls={"mask-shuffle": 1.0})
    for p in leak.glob("mask-shuffle__*/seg_predictions.parquet"):
        df = pd.read_parquet(p)
        for c in load_task(TASK).mask_classes:  # counts claiming nothing was found
            df[f"fp_{c}"] = df[f"fp_{c}"] + df[f"tp_{c}"]
            df[f"tp_{c}"] = 0
        df.to_parquet(p, index=False)
    rc, text = _submit(leak, board, capsys)
    assert rc == 2 and "mask-shuffle" in text and "control" in text


def _spoiled_copy(submitted, tmp_path) -> tuple[Path, dict, Path]:
    board = tmp_path / "board"
    shutil.copytree(submitted["board"], board)
    rec_path = next(p for p in board.glob("records/*.json") if "good" in p.name)
    return board, json.loads(rec_path.read_text()), rec_path


def test_build_catches_tampered_stored_label_maps(submitted, tmp_path, capsys):
    board, rec, rec_path = _spoiled_copy(submitted, tmp_path)
    maps_path = board / rec["predictions"]["labelmaps"]["file"]
    m = load_labelmaps(maps_path)
    better = m.maps.copy()
    better[:] = 0  # every stored map replaced: a different segmenter than the one scored
    save_labelmaps(maps_path, m.case_ids, better, num_classes=m.num_classes, mode=0o644)
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert rec["id"] in err and "labelmaps sha256" in err
    # With the record's hash edited to match, the recount against the key still tells.
    rec["predictions"]["labelmaps"]["sha256"] = hashlib.sha256(maps_path.read_bytes()).hexdigest()
    rec_path.write_text(json.dumps(rec))
    assert main(["leaderboard", "build", str(board)]) == 2
    err = capsys.readouterr().err
    assert rec["id"] in err and "recounted against the answer key" in err
    # Counts only: no truth value or count is quoted.
    assert not any(f"{s}_" in err for s in ("tp", "fp", "fn", "ltp", "idice"))


def test_build_recounts_every_stored_row(submitted, tmp_path, capsys):
    from bench.leaderboard.config import load_config, load_key
    from bench.leaderboard.segboard import verify_record_maps

    board, rec, _ = _spoiled_copy(submitted, tmp_path)
    stored = pd.read_parquet(board / rec["predictions"]["file"])
    key = load_key(load_config(board))
    assert verify_record_maps(rec, board, stored, key, load_task(TASK)) == []
    edited = stored.copy()
    edited.loc[3, "tp_thymoma"] += 1
    found = verify_record_maps(rec, board, edited, key, load_task(TASK))
    assert found and "1 row(s)" in found[0]


def test_a_segmentation_bundle_submits_like_its_folder(world, tmp_path, capsys):
    from bench.leaderboard.push import table_columns

    board = make_seg_board(tmp_path / "board", world["real"])
    run = make_seg_run(tmp_path / "run", world["real"], {"good": 0.95})
    bundle = shutil.make_archive(str(tmp_path / "bundle"), "zip", run)
    rc, text = _submit(Path(bundle), board, capsys)
    assert rc == 0, text
    # A label maps file that unpacks past the board's archive limit never reaches the scorer.
    cfg = yaml.safe_load((board / "leaderboard.yaml").read_text())
    cfg["max_archive_bytes"] = 20_000
    (board / "leaderboard.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, text = _submit(Path(bundle), board, capsys)
    assert rc == 2 and "bundle.zip" in text and "oversized archive" in text
    assert {"lesion_f1_macro", "instance_dice"} <= set(table_columns("segmentation"))
    assert "lesion_f1_macro" not in table_columns()
