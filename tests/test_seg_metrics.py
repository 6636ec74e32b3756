"""Segmentation metrics: counts from label maps against MONAI and brute force, lesion matching on hand-worked cases,
kernels under bootstrap weights, and the metric table and comparisons from count tables."""

from __future__ import annotations

from collections import deque

import numpy as np
import pandas as pd
import pytest

from bench.errors import BadInput
from bench.metrics import (
    COUNTS_VERSION,
    TABLE_COLUMNS,
    compare_segmentation,
    count_columns,
    count_matrix,
    count_table,
    evaluate_predictions,
    evaluate_segmentation,
    get_metric,
    metric_names,
    metric_specs,
    reported,
)
from bench.metrics.compare import COMPARISON_COLUMNS
from bench.metrics.segmentation import STATS, case_counts, case_dice
from bench.tasks import Task
from tests.conftest import TINY_TASK

CLASSES = ["disc", "bar", "ring"]
K = len(CLASSES)


def random_maps(rng: np.random.Generator, n: int, size: int = 24, k: int = K, blobs: int = 3) -> np.ndarray:
    """Stacks of label maps with a few rectangular lesions of random classes (some overlapping, some empty)."""
    out = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, blobs + 1)):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 7, 2)
            out[i, y : y + h, x : x + w] = rng.integers(1, k + 1)
    return out


def perturb(rng: np.random.Generator, maps: np.ndarray, k: int = K) -> np.ndarray:
    """A prediction: the truth shifted by up to a pixel, some pixels relabelled, some lesions added."""
    pred = np.roll(maps, rng.integers(-1, 2, 2), axis=(1, 2)).copy()
    flip = (rng.random(pred.shape) < 0.03) & (rng.random((len(maps), 1, 1)) < 0.5)
    pred[flip] = rng.integers(0, k + 1, flip.sum())
    return np.maximum(pred, random_maps(rng, len(maps), maps.shape[1], k, blobs=1) * (rng.random() < 0.5))


# --------------------------------------------------------------------------------------------- brute force


def brute_pixels(t: np.ndarray, p: np.ndarray, k: int) -> tuple[int, int, int]:
    tp = fp = fn = 0
    for a, b in zip(t.ravel().tolist(), p.ravel().tolist(), strict=True):
        tp += a == k and b == k
        fp += a != k and b == k
        fn += a == k and b != k
    return tp, fp, fn


def brute_components(mask: np.ndarray) -> list[set]:
    """8-connected components by breadth-first flood fill."""
    seen: set = set()
    comps = []
    h, w = mask.shape
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or (y0, x0) in seen:
                continue
            comp, todo = set(), deque([(y0, x0)])
            seen.add((y0, x0))
            while todo:
                y, x = todo.popleft()
                comp.add((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        q = (y + dy, x + dx)
                        if 0 <= q[0] < h and 0 <= q[1] < w and mask[q] and q not in seen:
                            seen.add(q)
                            todo.append(q)
            comps.append(comp)
    return comps


def brute_lesions(t: np.ndarray, p: np.ndarray, k: int, thr: float) -> tuple[int, int, int, float]:
    """Greedy one-to-one matching by decreasing IoU over every (true, predicted) pair, on Python sets."""
    T, P = brute_components(t == k), brute_components(p == k)
    pairs = []
    for i, a in enumerate(T):
        for j, b in enumerate(P):
            iou = len(a & b) / len(a | b)
            if iou > thr:
                pairs.append((-iou, i, j, 2 * len(a & b) / (len(a) + len(b))))
    used_t, used_p, hits, dice = set(), set(), 0, 0.0
    for _, i, j, d in sorted(pairs):
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            hits += 1
            dice += d
    return hits, len(P) - hits, len(T) - hits, dice


# --------------------------------------------------------------------------------------------- counts


def test_pixel_counts_and_case_dice_match_monai_and_brute_force():
    torch = pytest.importorskip("torch")
    from monai.metrics import DiceMetric, get_confusion_matrix
    from monai.networks.utils import one_hot

    for draw in range(3):
        rng = np.random.default_rng([27, draw])
        t = random_maps(rng, 12)
        p = perturb(rng, t)
        p[0] = t[0] = 0  # an empty case: every class absent from truth and prediction
        C = count_matrix(t, p, K).reshape(len(t), K, len(STATS))
        for i in range(len(t)):
            for k in range(K):
                assert tuple(C[i, k, :3]) == brute_pixels(t[i], p[i], k + 1)
        yt = one_hot(torch.as_tensor(t[:, None].astype(np.int64)), K + 1)
        yp = one_hot(torch.as_tensor(p[:, None].astype(np.int64)), K + 1)
        monai = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yt).numpy()
        mine = case_dice(C.reshape(len(t), -1), K)
        # MONAI scores a class absent from truth and prediction 1; ours leaves it undefined
        both_empty = np.isnan(mine)
        assert both_empty.any() and (~both_empty).any()
        np.testing.assert_allclose(mine[~both_empty], monai[~both_empty], atol=1e-6)
        assert (monai[both_empty] == 1).all()
        # pooled Dice: MONAI's confusion counts summed over the cases
        cm = (
            get_confusion_matrix(yp, yt, include_background=False).numpy().sum(axis=0)
        )  # classes x [tp fp tn fn]
        pooled = 2 * cm[:, 0] / (2 * cm[:, 0] + cm[:, 1] + cm[:, 3])
        M = C.reshape(len(t), -1)
        for k, cls in enumerate(CLASSES):
            assert get_metric(f"dice_{cls}", CLASSES)(M, None) == pytest.approx(pooled[k])
        assert get_metric("dice_macro")(M, None) == pytest.approx(pooled.mean())
        # the per-case mean, the documented alternative, is not what is reported
        assert np.nanmean(mine[:, 0]) != pytest.approx(pooled[0])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation inside get_mask_edges
def test_hd95_matches_monai_where_defined():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(95)
    t = random_maps(rng, 16, blobs=4)
    p = perturb(rng, t)
    p[0] = 0  # truth without prediction: undefined
    C = count_matrix(t, p, K).reshape(len(t), K, len(STATS))
    mine = C[..., STATS.index("hd95")]
    yt = one_hot(torch.as_tensor(t[:, None].astype(np.int64)), K + 1)
    yp = one_hot(torch.as_tensor(p[:, None].astype(np.int64)), K + 1)
    with pytest.warns(UserWarning):  # MONAI warns of the empty masks it scores inf or nan
        monai = compute_hausdorff_distance(yp, yt, include_background=False, percentile=95).numpy()
    present_t = (t[:, None] == np.arange(1, K + 1)[None, :, None, None]).any(axis=(2, 3))
    present_p = (p[:, None] == np.arange(1, K + 1)[None, :, None, None]).any(axis=(2, 3))
    defined = present_t & present_p
    assert defined.sum() > 10 and (~defined).any()
    np.testing.assert_allclose(mine[defined], monai[defined], rtol=1e-5)
    assert np.isnan(mine[~defined]).all()
    # the macro metric: per class, the mean over cases where it is defined, then over classes
    per_class = [np.nanmean(mine[:, k]) for k in range(K) if defined[:, k].any()]
    assert get_metric("hd95_macro")(C.reshape(len(t), -1), None) == pytest.approx(np.mean(per_class))
    assert np.isnan(count_matrix(t, p, K, hd95=False).reshape(len(t), K, len(STATS))[..., 7]).all()


@pytest.mark.parametrize("thr", [0.5, 0.1])
def test_lesion_counts_match_a_brute_force_matcher(thr):
    rng = np.random.default_rng(5)
    t = random_maps(rng, 10, blobs=5)
    p = perturb(rng, t)
    C = count_matrix(t, p, K, iou_threshold=thr).reshape(len(t), K, len(STATS))
    for i in range(len(t)):
        for k in range(K):
            ltp, lfp, lfn, idice = C[i, k, 3:7]
            bt = brute_lesions(t[i], p[i], k + 1, thr)
            assert (ltp, lfp, lfn) == bt[:3]
            assert idice == pytest.approx(bt[3])
    assert C[..., 3].sum() > 0 and C[..., 4].sum() > 0 and C[..., 5].sum() > 0


def test_lesion_matching_hand_worked_hit_split_merge_and_false_positive():
    t = np.zeros((20, 20), dtype=np.uint8)
    p = np.zeros_like(t)
    t[1:4, 1:4] = 1  # hit: predicted exactly
    p[1:4, 1:4] = 1
    t[6:8, 1:9] = 1  # split: two 2x2 predictions at the ends, IoU 4/16 each
    p[6:8, 1:3] = 1
    p[6:8, 7:9] = 1
    t[11:13, 1:3] = 1  # merged: one prediction over two true lesions, IoU 4/10 each
    t[11:13, 4:6] = 1
    p[11:13, 1:6] = 1
    p[16:18, 16:18] = 1  # false positive
    c = case_counts(t, p, 1)
    assert (c["ltp"][0], c["lfp"][0], c["lfn"][0]) == (1, 4, 3)
    assert c["idice"][0] == 1.0
    M = count_matrix(t, p, 1)
    assert get_metric("lesion_f1_macro")(M, None) == pytest.approx(2 / (2 + 4 + 3))
    assert get_metric("instance_dice")(M, None) == pytest.approx(1 / 4)
    # a split whose larger part still covers most of the lesion is a hit plus a false positive
    p2 = p.copy()
    p2[6:8, 1:9] = 0
    p2[6:8, 1:7] = 1
    p2[6:8, 8] = 1
    c2 = case_counts(t, p2, 1)
    assert (c2["ltp"][0], c2["lfp"][0], c2["lfn"][0]) == (2, 3, 2)
    assert c2["idice"][0] == pytest.approx(1 + 2 * 12 / (16 + 12))


def test_instance_dice_hand_cases_across_classes():
    t = np.zeros((10, 10), dtype=np.uint8)
    p = np.zeros_like(t)
    t[0:2, 0:2] = 1
    p[0:2, 0:3] = 1  # class 1 matched: IoU 4/6, Dice 8/10
    t[5:7, 5:7] = 2  # class 2 missed
    p[5:7, 5:7] = 1  # ... predicted as class 1: a false-positive class-1 lesion
    M = count_matrix(t, p, 2)
    assert get_metric("instance_dice")(M, None) == pytest.approx(0.8 / 2)
    assert get_metric("lesion_f1_macro")(M, None) == pytest.approx(
        (2 / 3 + 0) / 2
    )  # class 1: 1 hit, 1 false positive
    # no true lesion at all: undefined, not 0 or 1
    assert np.isnan(get_metric("instance_dice")(count_matrix(np.zeros_like(t), p, 2), None))


def test_undefined_classes_are_left_out_of_the_macro_mean():
    t = np.zeros((8, 8), dtype=np.uint8)
    t[1:3, 1:3] = 1
    M = count_matrix(t, t, 3)
    assert (
        get_metric("dice_macro")(M, None) == 1.0
    )  # classes 2 and 3 absent everywhere: undefined, not 1 or 0
    assert np.isnan(get_metric("dice_ring", CLASSES)(M, None))
    assert np.isnan(get_metric("dice_macro")(count_matrix(np.zeros_like(t), np.zeros_like(t), 3), None))


def test_count_table_layout_and_bad_maps():
    rng = np.random.default_rng(0)
    t = random_maps(rng, 4)
    cases = pd.DataFrame({"case_id": list("abcd")})
    tab = count_table(t, t, CLASSES, cases)
    assert list(tab.columns) == ["case_id", *count_columns(CLASSES)]
    assert count_columns(CLASSES)[: len(STATS)] == [f"{s}_disc" for s in STATS]
    assert tab.attrs["version"] == COUNTS_VERSION
    with pytest.raises(BadInput, match="values must be integers 0..3"):
        count_matrix(t, t + 4, K)
    with pytest.raises(BadInput, match="equal stacks"):
        count_matrix(t, t[:, :-1], K)
    with pytest.raises(BadInput, match="4 label maps"):
        count_table(t, t, CLASSES, cases.iloc[:3])


# --------------------------------------------------------------------------------------------- registry, kernels


def test_segmentation_metrics_are_listed_for_segmentation_tasks_only():
    seg = metric_names(CLASSES, "segmentation")
    assert seg == [
        "dice_macro",
        *(f"dice_{c}" for c in CLASSES),
        "lesion_f1_macro",
        *(f"lesion_f1_{c}" for c in CLASSES),
        "instance_dice",
        "hd95_macro",
    ]
    assert not set(seg) & set(metric_names(CLASSES))
    assert all(m.task_kind == "classification" for m in metric_specs())
    assert all(m.task_kind == "classification" for m in reported("comparisons"))
    assert [m.name for m in reported("comparisons", "segmentation")] == [
        "dice_macro",
        "lesion_f1_macro",
        "instance_dice",
    ]
    assert get_metric("dice_bar", CLASSES).params["k"] == 1


def test_kernels_under_bootstrap_weights_equal_the_direct_computation():
    rng = np.random.default_rng(11)
    t = random_maps(rng, 30)
    M = count_matrix(t, perturb(rng, t), K)
    for name in metric_names(CLASSES, "segmentation"):
        m = get_metric(name, CLASSES)
        kern = m.kernel(M, None)
        assert kern(np.ones((1, len(M))))[0] == pytest.approx(m(M, None), nan_ok=True)
        # identity-like weights: each row a single case, i.e. the per-case value
        one = kern(np.eye(len(M)))
        direct = np.array([m(M[i : i + 1], None) for i in range(len(M))])
        np.testing.assert_allclose(one, direct)
        # multiplicities equal repeated cases
        W = rng.integers(0, 3, (5, len(M))).astype(float)
        rep = [m(np.repeat(M, W[r].astype(int), axis=0), None) for r in range(len(W))]
        np.testing.assert_allclose(kern(W), rep)


# --------------------------------------------------------------------------------------------- evaluation


@pytest.fixture
def task():
    return Task.model_validate(TINY_TASK)


def seg_counts(seed: int, arms: dict[tuple[str, str], float], n_pat: int = 40, seeds=(0, 1)) -> pd.DataFrame:
    """A count table of `arms` (generator, regime) -> prediction quality (share of true pixels kept) on shared
    cases: test cases from sites s1-s3 and external cases from x1, two cases per patient."""
    rng = np.random.default_rng(seed)
    n = n_pat * 2
    truth = random_maps(rng, n)
    pid = np.repeat([f"p{i}" for i in range(n_pat)], 2)
    site = np.repeat(rng.choice(["s1", "s2", "s3", "x1"], n_pat), 2)
    cases = pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(n)],
            "patient_id": pid,
            "site": site,
            "split": np.where(site == "x1", "external", "test"),
            "sex": np.repeat(rng.choice(["F", "M"], n_pat), 2),
            "age": np.repeat(rng.integers(30, 80, n_pat), 2),
        }
    )
    out = []
    for (gen, reg), keep in arms.items():
        for s in seeds:
            r = np.random.default_rng([seed, s, len(gen)])
            pred = np.where(r.random(truth.shape) < keep, truth, 0).astype(np.uint8)
            tab = count_table(
                truth, pred, CLASSES, cases.assign(generator=gen, regime=reg, seed=s, backbone="unet")
            )
            out.append(tab)
    return pd.concat(out, ignore_index=True)


def test_metric_table_per_site_and_subgroup_from_counts(task):
    counts = seg_counts(1, {("none", "real"): 0.9})
    table = evaluate_segmentation(
        counts, task, classes=CLASSES, n_boot=200, n_perm=20, intersections=[["sex", "age_group"]]
    )
    assert list(table.columns) == TABLE_COLUMNS
    assert set(table["scope"]) == {"overall", "site", "subgroup", "intersection"}
    assert {"s1", "s2", "s3", "x1", "F", "M"} <= set(table["group"])
    names = metric_names(CLASSES, "segmentation")
    assert set(names) <= set(table["metric"])
    assert "dice_macro_gap" in set(table["metric"]) and "dice_disc_gap" not in set(table["metric"])
    assert "fnr_gap" not in set(table["metric"])
    # point estimates: the pooled metric over the cell's cases, averaged over training seeds
    ev = counts[counts["split"] == "test"]
    for name in names:
        want = np.mean(
            [
                get_metric(name, CLASSES)(g[count_columns(CLASSES)].to_numpy(), None)
                for _, g in ev.groupby("seed")
            ]
        )
        row = table[
            (table["metric"] == name) & (table["scope"] == "overall") & (table["split"] == "test")
        ].iloc[0]
        assert row["value"] == pytest.approx(want)
        assert row["status"] == "ok" and row["ci_low"] <= row["value"] <= row["ci_high"]
    s1 = counts[(counts["site"] == "s1")]
    row = table[(table["metric"] == "dice_macro") & (table["group"] == "s1")].iloc[0]
    want = np.mean(
        [get_metric("dice_macro")(g[count_columns(CLASSES)].to_numpy(), None) for _, g in s1.groupby("seed")]
    )
    assert row["value"] == pytest.approx(want)
    assert row["n_patients"] == s1["patient_id"].nunique()


def test_a_class_never_segmented_is_undefined_not_perfect(task):
    counts = seg_counts(3, {("none", "real"): 0.9}, n_pat=20)
    cyst = {f"{s}_cyst": 0.0 for s in STATS} | {"hd95_cyst": np.nan}  # a class no case holds or predicts
    table = evaluate_segmentation(
        counts.assign(**cyst), task, classes=[*CLASSES, "cyst"], n_boot=50, n_perm=0
    )
    row = table[(table["metric"] == "dice_cyst") & (table["scope"] == "overall")].iloc[0]
    assert row["status"] == "undefined" and np.isnan(row["value"])
    assert row["reason"] == "class absent from truth and prediction in these cases"
    macro = table[
        (table["metric"] == "dice_macro") & (table["scope"] == "overall") & (table["split"] == "test")
    ]
    plain = evaluate_segmentation(counts, task, classes=CLASSES, n_boot=50, n_perm=0)
    same = plain[
        (plain["metric"] == "dice_macro") & (plain["scope"] == "overall") & (plain["split"] == "test")
    ]
    assert macro["value"].iloc[0] == pytest.approx(same["value"].iloc[0])


def test_classification_tables_keep_their_metrics(task):
    from bench.metrics.simulate import simulate_predictions

    preds = simulate_predictions(task, runs={("none", "real"): 1.0}, seeds=[0], patients_per_site=10)
    table = evaluate_predictions(preds, task, n_boot=20, n_perm=0)
    assert not set(table["metric"]) & set(metric_names(CLASSES, "segmentation"))
    assert "fnr_gap" in set(table["metric"])


@pytest.mark.parametrize("draw", range(3))
def test_paired_comparison_against_real_only(task, draw):
    counts = seg_counts(
        10 + draw,
        {("none", "real"): 0.9, ("same", "synthetic"): 0.9, ("worse", "synthetic"): 0.5},
        seeds=(0, 1, 2, 3),  # the seed stage's t interval needs more than two seeds per arm to be informative
    )
    # "same" gets exactly the baseline's predictions: a zero difference with a zero-width interval
    base = counts[counts["generator"] == "none"]
    counts.loc[counts["generator"] == "same", count_columns(CLASSES)] = base[
        count_columns(CLASSES)
    ].to_numpy()
    comp = compare_segmentation(counts, task, classes=CLASSES, n_boot=200)
    assert list(comp.columns) == COMPARISON_COLUMNS
    assert set(comp["metric"]) == {"dice_macro", "lesion_f1_macro", "instance_dice"}
    overall = comp[(comp["scope"] == "overall") & (comp["split"] == "test")].set_index(
        ["generator", "metric"]
    )
    for m in ("dice_macro", "lesion_f1_macro", "instance_dice"):
        assert overall.loc[("same", m), "diff"] == pytest.approx(0)
        worse = overall.loc[("worse", m)]
        assert worse["status"] == "ok"
        assert worse["ci_high"] < 0 and worse["p_boot"] < 0.05
        assert worse["ratio"] < 1


def test_bad_count_tables_are_refused_with_rows_named(task):
    counts = seg_counts(2, {("none", "real"): 0.9}, n_pat=10)
    with pytest.raises(BadInput, match="missing column"):
        evaluate_segmentation(counts.drop(columns=["tp_bar"]), task, classes=CLASSES)
    bad = counts.copy()
    bad.loc[3, "fn_disc"] = -1
    with pytest.raises(BadInput) as e:
        evaluate_segmentation(bad, task, classes=CLASSES)
    assert "row 4" in str(e.value.problems) and "negative" in str(e.value.problems)
    with pytest.raises(BadInput, match="no mask classes"):
        evaluate_segmentation(counts, task)
