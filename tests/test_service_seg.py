"""The hosted service on a segmentation board: the key's truth masks, label maps uploads (bounded, validated,
recounted against the masks and scored), image–mask bundles trained and scored, and responses that echo no key
value."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from service_support import add_team, leaked, secrets_of, submit
from test_labelmaps_bounds import zip_bomb

from bench.cli import main
from bench.imaging import build_cache
from bench.labelmaps import LabelMaps
from bench.manifest import read_manifest
from bench.tasks import load_task

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bench.service.app import create_app  # noqa: E402
from bench.service.host import Host  # noqa: E402
from bench.service.settings import load_settings  # noqa: E402
from bench.service.worker import run_worker, seed_vote  # noqa: E402

TASK = "mediastinal-neoplasm-seg"
SIZE = 32  # the smoke preset: the protocol's resolution, and so the key's


def make_seg_service(tmp: Path) -> Path:
    phantom, real = tmp / "hostdata" / "phantom", tmp / "hostdata" / "real.parquet"
    cmd = ["data", "phantom", "--out", str(phantom), "--patients", "80", "--slices", "1", "--size", "64"]
    assert main([*cmd, "--seed", "0", "--masks"]) == 0
    assert main(["data", "manifest", "--task", TASK, "--root", str(phantom), "--out", str(real)]) == 0
    spec = load_task(TASK).spec()
    spec["metrics"].update(min_patients=3, min_positives=1, min_negatives=1)
    task_file = tmp / "hostdata" / "task" / "task.yaml"
    task_file.parent.mkdir(parents=True)
    task_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cfg = {
        "title": "segmentation board",
        "database": "sqlite:///service.db",
        "storage": "storage",
        "task": str(task_file),
        "real_manifest": str(real),
        "id_salt": "seg-salt-0123",
        "protocol": {
            "regimes": ["synthetic"],
            "seeds": [0, 1],
            "backbone": "unet-small",
            "preset": "smoke",
            "epochs": 1,
            "threads": 1,
            "device": "cpu",
        },
        "privacy": {"features": ["pixel"], "bootstrap": 20},
        "limits": {"quota_submissions": 50, "quota_period_s": 3600, "max_upload_bytes": 2_000_000},
        "worker": {"lease_s": 60, "poll_s": 0.2},
        "scoring": {"n_boot": 30},
    }
    svc = tmp / "service"
    svc.mkdir()
    path = svc / "service.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    assert main(["host", "init", "--config", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def seg_service(tmp_path_factory):
    config = make_seg_service(tmp_path_factory.mktemp("segsvc"))
    settings = load_settings(config)
    host = Host(settings)
    client = TestClient(create_app(settings, host))
    yield config, host, client, secrets_of(config)
    host.dispose()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def npz(ids, maps, num_classes=6) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        format=np.array("medsynbench-labelmaps/1"),
        case_ids=np.array(list(ids), dtype=str),
        maps=np.asarray(maps, dtype=np.uint8),
        num_classes=np.array(num_classes),
    )
    return buf.getvalue()


def _pooled_dice_macro(t: np.ndarray, p: np.ndarray, k: int) -> float:
    """By hand: per mask class, 2 * sum tp / sum (2 tp + fp + fn) over every pixel of every case; mean over the
    classes present in truth or prediction."""
    out = []
    for c in range(1, k):
        tp = int(((t == c) & (p == c)).sum())
        fp = int(((t != c) & (p == c)).sum())
        fn = int(((t == c) & (p != c)).sum())
        if 2 * tp + fp + fn:
            out.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(out))


def _scored(c, host, token, name, data) -> dict:
    r = submit(c, token, "predictions", name, data)
    assert r.status_code == 202, r.text
    assert run_worker(host, idle_exit=True) == 1
    body = c.get(f"/api/submissions/{r.json()['id']}", headers=auth(token)).json()
    assert body["status"] == "scored", body["reason"]
    return body


def test_host_init_writes_the_truth_masks_at_the_protocols_resolution(seg_service):
    config, host, _, _ = seg_service
    key = host.key
    assert key.is_segmentation and key.image_size == (SIZE, SIZE)
    assert host.settings.answer_key_masks == host.settings.answer_key.with_name("answer_key.masks.npz")
    assert host.settings.answer_key_masks.is_file()
    assert str(host.settings.answer_key_masks) in host.settings.host_paths()
    # The very masks a run at that size is scored against: the cache's, under the salted ids.
    task = load_task(host.settings.task)
    m = read_manifest(host.settings.real_manifest)
    cache = build_cache(m, task, size=SIZE, cache_dir=host.cache, progress=False)
    raw = m.df[m.df["split"].isin(["test", "external"])]["case_id"].astype(str)
    from bench.service.scoring import salt_ids

    salted = dict(zip(salt_ids(raw, host.settings.id_salt), raw, strict=True))
    for cid in key.case_ids[:10]:
        np.testing.assert_array_equal(key.truth[cid], cache.masks[cache.rows([salted[cid]])[0]])


def test_host_init_builds_a_segmentation_key_again_when_its_masks_are_missing(seg_service, capsys):
    config, host, _, _ = seg_service
    masks = host.settings.answer_key_masks
    assert main(["host", "init", "--config", str(config)]) == 0
    assert "exists" in capsys.readouterr().out
    masks.unlink()
    assert main(["host", "init", "--config", str(config)]) == 0
    assert "wrote its truth label maps" in capsys.readouterr().out
    from bench.labelmaps import load_labelmaps

    again = load_labelmaps(masks)
    assert again.case_ids == host.key.masks.case_ids and np.array_equal(again.maps, host.key.masks.maps)


def test_label_maps_are_recounted_against_the_truth_masks_and_scored(seg_service):
    config, host, c, secrets = seg_service
    token = add_team(config, "maps")
    key = host.key
    ids, truth = key.masks.case_ids, key.masks.maps
    pub = (key.df.set_index("case_id").loc[ids, ["part", "split"]] == ["public", "external"]).all(axis=1)
    assert 0 < pub.sum() < len(ids)
    perfect = _scored(c, host, token, "perfect.npz", npz(ids, truth))
    assert perfect["score"]["value"] == pytest.approx(1.0) and perfect["score"]["metric"] == "dice_macro"
    assert perfect["score"]["n_cases"] == int(pub.sum())
    # Each lesion pixel kept with probability 0.6, some background pixels called lesion: the public score is the
    # pooled macro Dice of the public external cases, by hand.
    rng = np.random.default_rng(3)
    noisy = np.where(rng.random(truth.shape) < 0.6, truth, 0).astype(np.uint8)
    noisy[rng.random(truth.shape) < 0.01] = 2
    body = _scored(c, host, token, "noisy.npz", npz(ids, noisy))
    want = _pooled_dice_macro(truth[pub.to_numpy()], noisy[pub.to_numpy()], 6)
    assert body["score"]["value"] == pytest.approx(want, abs=1e-9) and 0.2 < want < 0.95
    assert body["score"]["ci_low"] <= body["score"]["value"] <= body["score"]["ci_high"]
    # Shuffling the file's order changes nothing: maps are matched by case id.
    order = rng.permutation(len(ids))
    again = _scored(c, host, token, "shuffled.npz", npz([ids[i] for i in order], noisy[order]))
    assert again["score"]["value"] == pytest.approx(want, abs=1e-9)
    board = c.get("/api/leaderboard").json()
    assert board["metric"] == "dice_macro" and board["rows"][0]["team"] == "maps"
    for r in (perfect, body, again, board):
        assert not leaked(str(r), secrets)


@pytest.mark.parametrize(
    "case",
    ["bomb", "resolution", "small", "unknown", "values", "csv", "classes"],
)
def test_a_bad_label_maps_upload_is_400_naming_the_file_and_queues_nothing(seg_service, case, tmp_path):
    config, host, c, secrets = seg_service
    token = add_team(config, f"bad-{case}")
    key = host.key
    ids, truth = key.masks.case_ids, key.masks.maps
    name, data, want = f"{case}.npz", None, ""
    if case == "bomb":  # about 64 KiB that inflate to 64 MiB: refused from the zip directory
        data, want = (
            zip_bomb(tmp_path / "b.npz").read_bytes(),
            "over the limit of .*\\(max_(bytes|maps|map_pixels)\\)",
        )
    elif case == "resolution":
        data, want = npz(ids, np.zeros((len(ids), 64, 64))), "64 x 64 = 4,096 pixels, over the limit of 1,024"
    elif case == "small":
        data, want = npz(ids, np.zeros((len(ids), 16, 16))), "16 x 16 pixels; this board scores .* 32 x 32"
    elif case == "unknown":
        fake = [f"{i:032x}" for i in range(5)]
        data = npz([*ids[5:], *fake], truth[list(range(5, len(ids))) + [0] * 5])
        want = (
            f"map\\(s\\) {len(ids) - 4}, .*: not an evaluation case of this board.*5 of the {len(ids)} eval"
        )
    elif case == "values":
        bad = truth.copy()
        bad[3, 0, 0] = 9
        data, want = npz(ids, bad), "values up to 9 in 1 map"
    elif case == "classes":
        data, want = (
            npz(ids, np.minimum(truth, 2), num_classes=3),
            "num_classes: 3; this task's label maps have 6",
        )
    else:
        name, data, want = (
            "preds.csv",
            b"case_id,prob_a\nx,1\n",
            "segmentation board: predictions must be a label",
        )
    before = c.get("/api/submissions", headers=auth(token)).json()
    r = submit(c, token, "predictions", name, data)
    assert r.status_code == 400, r.text
    text = r.json()["detail"] + "\n" + "\n".join(r.json()["problems"])
    assert name in r.json()["detail"]
    import re

    assert re.search(want, text, re.S), text
    assert not leaked(r.text, secrets) and "<host>" not in r.text
    assert c.get("/api/submissions", headers=auth(token)).json() == before == []


def test_seeds_are_combined_by_a_pixelwise_vote(seg_service):
    _, host, _, _ = seg_service
    m = read_manifest(host.settings.real_manifest).df
    raw = m.loc[m["split"].isin(["test", "external"]), "case_id"].astype(str).tolist()
    rng = np.random.default_rng(0)
    runs = [rng.integers(0, 6, (len(raw) + 2, SIZE, SIZE)).astype(np.uint8) for _ in range(3)]
    # Two val cases besides the key's: dropped.
    ids = [*raw, *m.loc[m["split"] == "val", "case_id"].astype(str).head(2)]
    out = seed_vote(host, [LabelMaps(ids, r, 6) for r in runs])
    assert sorted(out.case_ids) == sorted(host.key.case_ids) and out.num_classes == 6
    from bench.service.scoring import salt_ids

    back = dict(zip(salt_ids(raw, host.settings.id_salt), range(len(raw)), strict=True))
    for cid, got in list(zip(out.case_ids, out.maps, strict=True))[:5]:
        i = back[cid]
        for y, x in [(0, 0), (5, 7), (31, 31), (16, 3)]:
            votes = [int(r[i, y, x]) for r in runs]
            best = max(votes.count(v) for v in votes)
            assert got[y, x] == min(v for v in votes if votes.count(v) == best)
    with pytest.raises(RuntimeError, match="rebuild the key"):
        seed_vote(host, [LabelMaps(ids, np.zeros((len(ids), 16, 16), np.uint8), 6)])


def pairs_bundle(host: Host, name: str = "copies") -> bytes:
    """The host's own training pairs as a team would send a generator's pairs: PNG images, PNG label maps,
    labels.csv with a `mask` column, and a card."""
    task = load_task(host.settings.task)
    m = read_manifest(host.settings.real_manifest)
    cache = build_cache(m, task, size=SIZE, cache_dir=host.cache, progress=False)
    rows = m.df[(m.df["split"] == "train") & m.df["site"].isin(task.sites.train)]
    idx = cache.rows(rows["case_id"].astype(str))
    buf = io.BytesIO()
    lines = []
    with zipfile.ZipFile(buf, "w") as z:
        for i, (img, mask) in enumerate(zip(cache.images[idx], cache.masks[idx], strict=True)):
            for folder, arr in (("images", img[0]), ("masks", mask)):
                b = io.BytesIO()
                Image.fromarray(np.asarray(arr)).save(b, format="PNG")
                z.writestr(f"{name}/{folder}/{i:04d}.png", b.getvalue())
            lines.append(f"images/{i:04d}.png,masks/{i:04d}.png")
        z.writestr(f"{name}/labels.csv", "image,mask\n" + "\n".join(lines) + "\n")
        card = {
            "name": name,
            "version": "1.0",
            "training": {"sites": list(task.sites.train), "n_images": len(rows)},
        }
        z.writestr(f"{name}/card.yaml", yaml.safe_dump(card))
    return buf.getvalue()


def test_an_image_mask_bundle_is_trained_audited_and_scored(seg_service):
    config, host, c, secrets = seg_service
    token = add_team(config, "pairs")
    r = submit(c, token, "synthetic", "copies.zip", pairs_bundle(host))
    assert r.status_code == 202, r.text
    assert run_worker(host, idle_exit=True) == 1
    body = c.get(f"/api/submissions/{r.json()['id']}", headers=auth(token)).json()
    assert body["status"] == "scored", body["reason"]
    assert body["score"]["metric"] == "dice_macro" and 0 <= body["score"]["value"] <= 1
    d = body["details"]
    assert d["generator"] == "copies" and d["regime"] == "synthetic"
    assert 0 <= d["privacy"]["memorization_rate"] <= 1
    mp = d["model_privacy"]
    assert mp is not None and ("arms" in mp or mp["status"] == "not run")
    rec = (host.records / f"{body['id']}.json").read_text()
    assert not leaked(rec, secrets) and not leaked(str(body), secrets)
    assert not list(host.work.iterdir())


def test_the_client_sends_a_label_maps_file_as_predictions():
    from bench.service.client import guess_kind

    assert guess_kind(Path("maps.NPZ")) == "predictions" and guess_kind(Path("p.csv")) == "predictions"
    assert guess_kind(Path("pairs.zip")) == "synthetic"
