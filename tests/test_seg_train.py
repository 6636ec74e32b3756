"""Segmenters: the registry's kinds, the segmentation fit and its paired augmentation, stored label maps."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.errors import BadInput
from bench.labelmaps import FORMAT, load_labelmaps, save_labelmaps
from bench.models import check_kind, create_model, list_models, model_info, register_model
from bench.train import FitSettings, augment, augment_pair, fit, load_checkpoint, save_checkpoint
from bench.train_seg import dice_per_class, fit_segmenter, predict_labelmaps


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: on a shared 2-core machine more threads make these tiny models slower, not faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def discs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images with 0-2 discs each; class 1 discs are bright, class 2 discs mid-grey. Masks are exact."""
    rng = np.random.default_rng(seed)
    x = rng.normal(50, 15, (n, 1, size, size))
    y = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            k = int(rng.integers(1, 3))
            r = rng.uniform(3, 7)
            cy, cx = rng.uniform(r, size - r, 2)
            d = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            y[i][d] = k
            x[i, 0][d] = rng.normal(210 if k == 1 else 130, 15, int(d.sum()))
    return np.clip(x, 0, 255).astype(np.uint8), y


def settings(**kw) -> FitSettings:
    base = dict(backbone="unet-small", num_classes=3, steps=300, eval_every=300, lr=3e-3, batch_size=16)
    base.update(kw)
    return FitSettings(device="cpu", **base)


# -- registry ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet-small", "dynunet"])
def test_segmenters_are_registered_and_give_per_pixel_logits(name):
    info = model_info(name)
    assert info.kind == "segmentation" and info.family == "monai"
    assert name in list_models("segmentation") and name not in list_models("classification")
    torch.manual_seed(0)
    model = create_model(name, 6, 1, kind="segmentation").eval()
    assert model.bench_spec == {"name": name, "num_classes": 6, "in_chans": 1}
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 48))
    assert out.shape == (2, 6, 64, 48)
    assert set(list_models("segmentation")) | set(list_models("classification")) == set(list_models())
    with pytest.raises(ValueError, match="kind 'detection' is not one of"):
        register_model("detector", "plug-in", kind="detection")


def test_a_backbone_of_the_other_kind_is_bad_input_naming_it():
    x, y = discs(8, 32, 0)
    with pytest.raises(BadInput, match=r"'resnet10t' is a classification network; a segmentation task") as e:
        fit_segmenter(settings(backbone="resnet10t", steps=1), x, y, x[:0], y[:0])
    assert "unet-small" in str(e.value)  # the choices the user has
    with pytest.raises(BadInput, match=r"'unet-small' is a segmentation network; a classification task"):
        fit(settings(steps=1), x, (y.max(axis=(1, 2)) > 0).astype(int), x[:0], np.zeros(0, int))
    assert check_kind("resnet10t", "classification").family == "timm"
    with pytest.raises(BadInput, match="task kind 'detection'"):
        check_kind("resnet10t", "detection")


def test_an_image_size_the_network_cannot_halve_is_bad_input():
    x, y = discs(4, 36, 0)  # unet-small halves three times: 36 is not a multiple of 8
    with pytest.raises(BadInput, match=r"'unet-small': image size 36x36 must be a multiple of 8"):
        fit_segmenter(settings(steps=1), x, y, x[:0], y[:0])


def test_masks_that_do_not_pair_with_their_images_are_refused():
    x, y = discs(4, 32, 0)
    with pytest.raises(ValueError, match="do not pair up"):
        fit_segmenter(settings(steps=1), x, y[:3], x[:0], y[:0])
    with pytest.raises(ValueError, match="hold class 3; expected 0..2"):
        fit_segmenter(settings(steps=1), x, np.where(y > 0, 3, 0).astype(np.uint8), x[:0], y[:0])


# -- training ----------------------------------------------------------------------------------------------------


def test_unet_small_learns_to_segment_held_out_discs_at_every_seed():
    x, y = discs(64, 32, 1)
    xv, yv = discs(64, 32, 2)
    for seed in (0, 1, 2):
        st = settings(seed=seed, steps=200, eval_every=200, lr=1e-2, batch_size=8)
        model, history = fit_segmenter(st, x, y, xv, yv)
        pred = predict_labelmaps(model, xv, "cpu")
        assert pred.dtype == np.uint8 and pred.shape == yv.shape
        dice = dice_per_class(yv, pred, 3)
        assert (dice > 0.8).all(), (seed, dice)
        # The recorded validation Dice is the held-out Dice of the weights returned (select="last").
        assert history[-1]["selected"] and history[-1]["val_dice_macro"] == pytest.approx(dice.mean())
        assert history[-1]["step"] == 200 and history[-1]["samples_seen"] == 200 * 8


def test_with_each_image_paired_to_another_images_mask_nothing_is_learnt():
    # The mask-shuffle control in miniature: the same images and masks, mispaired, teach no segmentation.
    x, y = discs(64, 32, 1)
    xv, yv = discs(64, 32, 2)
    for seed in (0, 1):
        st = settings(seed=seed, steps=200, eval_every=200, lr=1e-2, batch_size=8)
        model, _ = fit_segmenter(st, x, np.roll(y, 1, axis=0), xv[:0], yv[:0])
        assert (dice_per_class(yv, predict_labelmaps(model, xv, "cpu"), 3) < 0.3).all()


def test_same_seed_gives_identical_label_maps_on_cpu_and_another_seed_does_not():
    x, y = discs(32, 32, 3)
    runs = [fit_segmenter(settings(steps=25, eval_every=25, seed=s), x, y, x[:0], y[:0]) for s in (4, 4, 5)]
    maps = [predict_labelmaps(m, x, "cpu", batch_size=7) for m, _ in runs]
    assert np.array_equal(maps[0], maps[1])
    assert [h[-1]["train_loss"] for _, h in runs[:2]] == [runs[0][1][-1]["train_loss"]] * 2
    assert not np.array_equal(maps[0], maps[2])


def test_best_val_selection_keeps_the_best_validation_round():
    x, y = discs(32, 32, 3)
    model, history = fit_segmenter(settings(steps=60, eval_every=20, select="best_val"), x, y, x, y)
    dices = [h["val_dice_macro"] for h in history]
    best = int(np.argmax(dices))
    assert [h["selected"] for h in history] == [i == best for i in range(len(history))]
    pred = predict_labelmaps(model, x, "cpu")
    assert dice_per_class(y, pred, 3).mean() == pytest.approx(dices[best])


def test_a_segmenter_checkpoint_rebuilds_the_same_predictions(tmp_path):
    x, y = discs(16, 32, 4)
    model, _ = fit_segmenter(settings(steps=10, eval_every=10), x, y, x[:0], y[:0])
    path = save_checkpoint(tmp_path / "seg.pt", model, {"task": "discs"})
    again, meta = load_checkpoint(path)
    assert meta == {"task": "discs"} and model_info(again.bench_spec["name"]).kind == "segmentation"
    assert np.array_equal(predict_labelmaps(model, x, "cpu"), predict_labelmaps(again, x, "cpu"))
    # Fine-tuning starts from given weights: one near-zero step leaves the predictions as they were.
    tuned, _ = fit_segmenter(settings(steps=1, eval_every=1, lr=1e-9), x, y, x[:0], y[:0], init=again)
    assert np.array_equal(predict_labelmaps(tuned, x, "cpu"), predict_labelmaps(model, x, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_and_prediction_give_label_maps():
    x, y = discs(64, 32, 1)
    model, _ = fit_segmenter(settings(device="cuda"), x, y, x[:8], y[:8])
    pred = predict_labelmaps(model, x, "cuda")
    assert pred.dtype == np.uint8 and pred.shape == y.shape
    assert (dice_per_class(y, pred, 3) > 0.8).all()


# -- paired augmentation -----------------------------------------------------------------------------------------


def test_paired_augmentation_moves_the_mask_with_its_image():
    _, y = discs(64, 32, 5)
    # The mask is the image's own foreground: a flat, noise-free picture of it, so alignment can be read off.
    img = torch.from_numpy(np.where(y > 0, 200.0, 40.0).astype(np.float32))[:, None]
    mask = torch.from_numpy(y).long()
    out, moved = augment_pair(img, mask, 1.0, torch.Generator().manual_seed(0))
    assert moved.dtype == mask.dtype and set(moved.unique().tolist()) <= set(mask.unique().tolist())
    # Contrast and brightness jitter are per image and increasing, so the midpoint of each image's range splits
    # foreground from background; only interpolated boundary pixels may disagree with the nearest-neighbour mask.
    lo, hi = out.amin(dim=(1, 2, 3)), out.amax(dim=(1, 2, 3))
    # (An image without a disc is flat: its range is float rounding, and it has no foreground.)
    fg = (out[:, 0] > ((lo + hi) / 2)[:, None, None]) & (hi - lo > 1)[:, None, None]
    agree = (fg == (moved > 0)).float().mean().item()
    assert agree > 0.99
    m = (moved > 0).float()[:, None]
    inside = (F.max_pool2d(m, 3, 1, 1) == -F.max_pool2d(-m, 3, 1, 1))[:, 0]  # no other class within one pixel
    assert not ((fg != (moved > 0)) & inside).any()
    # The augmentation did move things: against the unmoved mask the same reading is much worse.
    assert (fg == (mask > 0)).float().mean().item() < agree - 0.03
    # Class values are copied, never blended: each moved mask holds only classes its own mask had.
    assert all(set(moved[i].unique().tolist()) <= set(mask[i].unique().tolist()) for i in range(len(mask)))


def test_paired_augmentation_draws_what_the_image_augmentation_draws():
    x = torch.rand(8, 1, 32, 32)
    y = torch.zeros(8, 32, 32, dtype=torch.uint8)
    alone = augment(x, 0.7, torch.Generator().manual_seed(3))
    paired, _ = augment_pair(x, y, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(alone, paired)
    same, same_mask = augment_pair(x, y, 0.0, torch.Generator().manual_seed(3))
    assert same is x and same_mask is y


# -- the local validation Dice -----------------------------------------------------------------------------------


def test_validation_dice_matches_a_brute_force_count():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, (5, 9, 9)), rng.integers(0, 4, (5, 9, 9))
    p[p == 3] = 0  # class 3 never predicted
    t[t == 2] = 1
    p[p == 2] = 1  # class 2 in neither: undefined
    d = dice_per_class(t, p, 4)
    for k in (1, 3):
        inter = sum(int(((t == k) & (p == k))[i, j, m]) for i in range(5) for j in range(9) for m in range(9))
        assert d[k - 1] == pytest.approx(2 * inter / ((t == k).sum() + (p == k).sum()))
    assert np.isnan(d[1]) and d[2] == 0.0


# -- stored label maps -------------------------------------------------------------------------------------------


def test_label_maps_round_trip_compactly(tmp_path):
    _, y = discs(50, 32, 6)
    ids = [f"case-{i:03d}" for i in range(50)]
    path = save_labelmaps(tmp_path / "pred" / "test.npz", ids, y, num_classes=3)
    back = load_labelmaps(path)
    assert back.case_ids == ids and back.num_classes == 3
    assert back.maps.dtype == np.uint8 and np.array_equal(back.maps, y)
    assert np.array_equal(back.by_case()["case-007"], y[7])
    assert path.stat().st_size < y.nbytes / 4  # compressed
    assert [p.name for p in path.parent.iterdir()] == ["test.npz"]  # no temporary file left beside it


def test_inconsistent_label_maps_are_not_written(tmp_path):
    _, y = discs(4, 32, 6)
    target = tmp_path / "p.npz"
    for ids, maps, k, msg in [
        (["a", "b", "c"], y, 3, "3 ids for 4 maps"),
        (["a", "b", "a", "c"], y, 3, r"1 repeated, e.g. \['a'\]"),
        (["a", "b", "c", "d"], y, 2, "expected 0..1"),
        (["a", "b", "c", "d"], y.astype(np.int32), 3, "expected uint8"),
    ]:
        with pytest.raises(ValueError, match=msg):
            save_labelmaps(target, ids, maps, num_classes=k)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def _raw(path, **arrays):
    full = {
        "format": np.array(FORMAT),
        "case_ids": np.array(["a", "b"]),
        "maps": np.zeros((2, 4, 4), np.uint8),
        "num_classes": np.array(3),
    }
    full.update(arrays)
    with open(path, "wb") as f:
        np.savez_compressed(f, **{k: v for k, v in full.items() if v is not None})
    return path


@pytest.mark.parametrize(
    "arrays,msg",
    [
        (
            {"format": np.array("medsynbench-labelmaps/9")},
            "format .*this version reads 'medsynbench-labelmaps/1'",
        ),
        ({"maps": None}, r"missing arrays: maps"),
        ({"case_ids": np.array(["a", "a"])}, r"1 repeated, e.g. \['a'\]"),
        ({"case_ids": np.array(["a", ""])}, "empty or not a string"),
        ({"case_ids": np.array([1, 2])}, "case_ids: expected a 1-D string array"),
        ({"maps": np.full((2, 4, 4), 3, np.uint8)}, r"values up to 3 in 2 map\(s\); expected 0..2"),
        ({"maps": np.zeros((2, 4, 4), np.int16)}, r"expected uint8 \[N, H, W\], got int16"),
        ({"maps": np.zeros((3, 4, 4), np.uint8)}, "2 ids for 3 maps"),
        ({"num_classes": np.array(1)}, "num_classes: 1"),
        ({"num_classes": np.array(2.5)}, "num_classes: expected an integer"),
        ({"case_ids": np.array(["a", None], dtype=object)}, "not a readable label maps file"),
    ],
)
def test_a_bad_label_maps_file_is_bad_input_naming_it(tmp_path, arrays, msg):
    path = _raw(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInput, match=msg) as e:
        load_labelmaps(path)
    assert str(path) in str(e.value)


def test_a_missing_or_foreign_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="label maps file not found"):
        load_labelmaps(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(BadInput, match="text.npz: not a readable label maps file"):
        load_labelmaps(tmp_path / "text.npz")
    with zipfile.ZipFile(tmp_path / "torn.npz", "w") as z:
        z.writestr("maps.npy", b"\x93NUMPY garbage")
    with pytest.raises(BadInput, match="torn.npz: not a label maps file"):
        load_labelmaps(tmp_path / "torn.npz")
