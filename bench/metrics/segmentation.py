"""Segmentation metrics: per-case, per-class counts from label maps, and the metrics built on them.

A segmenter's prediction for a case is a 2-D label map (uint8; 0 = background, k = the k-th mask class of the
task, 1-based). What the metrics need of a case is a short row of counts per class, the *count table*; every
registered segmentation metric is a ratio of weighted sums of its columns, so the patient bootstrap's weight
matrices apply unchanged (one matrix product per batch of replicates) and a leaderboard can recompute every number
from the stored table.

Count table (version `COUNTS_VERSION`), one row per case, for each mask class `<c>` in the task's order:

- `tp_<c>`, `fp_<c>`, `fn_<c>`: pixel counts (truth == c and prediction == c; prediction == c elsewhere; truth == c
  predicted as anything else).
- `ltp_<c>`, `lfp_<c>`, `lfn_<c>`: lesion counts. Lesions are the connected components of each class's pixels
  (8-connectivity by default). A predicted lesion matches a true lesion of the same class when their IoU exceeds
  `iou_threshold` (0.5, the panoptic-quality convention); matching is one-to-one, greedy by decreasing IoU. Above
  0.5 a lesion can overlap at most one partner that much, so the greedy matching is the unique (and optimal) one.
  Matched true lesions are `ltp`, unmatched true lesions `lfn`, unmatched predicted lesions `lfp`; a split lesion
  (two small predictions over one true lesion) or a merged one (one prediction over two true lesions) then counts
  as missed plus false positives unless one part still exceeds the threshold.
- `idice_<c>`: the sum of the Dice of the matched lesion pairs (an unmatched true lesion contributes 0).
- `hd95_<c>`: the case's 95th-percentile Hausdorff distance of the class in pixels, as MONAI's
  `compute_hausdorff_distance(percentile=95)` defines it (edges: the mask minus its erosion; the larger of the two
  directed 95th percentiles of edge-to-edge distances); NaN unless the class is in both truth and prediction.

Metrics (pooled over the cases and patient multiplicities of a group or bootstrap replicate):

- `dice_<c>` = sum 2 tp / sum (2 tp + fp + fn): the global (pooled) Dice. NaN where the class is absent from both
  truth and prediction in the cases (undefined, not 1).
- `dice_macro`: the mean of `dice_<c>` over the classes that are defined (NaN when none is).
- `lesion_f1_<c>` = 2 ltp / (2 ltp + lfp + lfn), `lesion_f1_macro` its mean over defined classes.
- `instance_dice` = sum of matched-lesion Dice / number of true lesions, over every class: each true lesion
  counts once, a missed one with Dice 0 (false-positive lesions do not enter; `lesion_f1` penalises them).
- `hd95_macro`: per class, the mean HD95 over the cases where it is defined; then the mean over classes with any.

Why pooled: most cases have an empty mask or one small lesion, so a per-case Dice is 0, 1 or undefined on most
cases and its mean is dominated by how empty cases are counted. Pooled Dice weighs each pixel once. The per-case mean
(sum_i w_i d_i / sum_i w_i over cases with a defined Dice) is the alternative; it needs per-case Dice, which the
counts give (`case_dice`). See docs/STATISTICS.md, "Segmentation metrics".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from bench.errors import BadInput
from bench.metrics.core import Kernel, Metric, _matmul_kernel, _nanmean_rows, _safe_div, register_metric

COUNTS_VERSION = "seg-counts/1"
STATS: tuple[str, ...] = ("tp", "fp", "fn", "ltp", "lfp", "lfn", "idice", "hd95")
IOU_THRESHOLD = 0.5
CONNECTIVITY = 2  # 8-neighbours in 2-D: a lesion touching itself diagonally is one lesion
_CHUNK_PIXELS = 8_000_000  # pixels per batch of images (int64 codes: 64 MB)


def count_columns(classes: Sequence[str]) -> list[str]:
    """The count table's columns for these mask classes, class-major: tp_<c1>, fp_<c1>, ..., hd95_<c1>, tp_<c2>..."""
    return [f"{s}_{c}" for c in classes for s in STATS]


def _check_maps(true_maps: Any, pred_maps: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(true_maps)
    p = np.asarray(pred_maps)
    if t.ndim == 2:
        t, p = t[None], p[None] if p.ndim == 2 else p
    if t.ndim != 3 or t.shape != p.shape:
        raise BadInput(
            f"label maps: truth {t.shape} and prediction {p.shape} must be equal stacks of 2-D maps"
        )
    for what, a in (("truth", t), ("prediction", p)):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > n_classes):
            raise BadInput(f"label maps: {what} values must be integers 0..{n_classes} (0 = background)")
    return t, p


def count_matrix(
    true_maps: Any,
    pred_maps: Any,
    n_classes: int,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    connectivity: int = CONNECTIVITY,
    hd95: bool = True,
) -> np.ndarray:
    """(cases, n_classes x len(STATS)) counts of stacks of label maps (n, H, W), in `count_columns` order.

    `hd95=False` leaves the HD95 columns NaN (undefined) and skips the distance transforms."""
    t, p = _check_maps(true_maps, pred_maps, n_classes)
    n = t.shape[0]
    out = np.zeros((n, n_classes, len(STATS)))
    per = max(1, _CHUNK_PIXELS // max(t[0].size, 1))
    for a in range(0, n, per):
        b = min(n, a + per)
        pix = _pixel_counts(t[a:b], p[a:b], n_classes)
        out[a:b, :, :3] = pix
        for k in range(n_classes):
            # only images where the class is in the truth or the prediction can hold its lesions
            has = a + np.flatnonzero(pix[:, k].any(axis=1))
            if len(has):
                out[has, k, 3:7] = _lesion_counts(
                    t[has] == k + 1, p[has] == k + 1, iou_threshold, connectivity
                )
    out[:, :, 7] = np.nan
    if hd95:
        both = (out[:, :, 0] + out[:, :, 2] > 0) & (out[:, :, 0] + out[:, :, 1] > 0)
        for i, k in zip(*np.nonzero(both), strict=True):
            out[i, k, 7] = _hd95(t[i] == k + 1, p[i] == k + 1)
    return out.reshape(n, -1)


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _hd95(t: np.ndarray, p: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty 2-D masks, on their union's bounding box
    padded by a background pixel (erosion then sees background outside the image, as on the full map)."""
    ys, xs = np.nonzero(t | p)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    et = _edges(np.pad(t[box], 1))
    ep = _edges(np.pad(p[box], 1))
    d_pt = ndimage.distance_transform_edt(~et)[ep]
    d_tp = ndimage.distance_transform_edt(~ep)[et]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _pixel_counts(t: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    # one bincount over (image, truth, prediction) codes gives every image's confusion matrix at once
    n = t.shape[0]
    K = n_classes + 1
    code = (np.arange(n, dtype=np.int64)[:, None] * K + t.reshape(n, -1)) * K + p.reshape(n, -1)
    conf = np.bincount(code.ravel(), minlength=n * K * K).reshape(n, K, K)
    tp = conf[:, 1:, 1:].diagonal(axis1=1, axis2=2)
    fp = conf[:, :, 1:].sum(axis=1) - tp
    fn = conf[:, 1:, :].sum(axis=2) - tp
    return np.stack([tp, fp, fn], axis=-1)


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Components of a stack of 2-D masks (never across images), their count and each component's image."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)
    lab, n = ndimage.label(mask, structure)
    flat = lab.reshape(len(lab), -1)
    last = flat.max(axis=1)
    first = np.where(flat > 0, flat, n + 1).min(axis=1)
    prev = np.maximum.accumulate(np.concatenate([[0], last[:-1]]))
    present = last > 0
    if np.array_equal(first[present], prev[present] + 1):
        # labels run image by image (scipy numbers components in scan order): image j holds labels
        # prev[j] + 1 .. last[j], found by one search instead of a pass over every labelled pixel
        image = np.searchsorted(np.maximum.accumulate(last), np.arange(1, n + 1), side="left")
    else:
        image = np.zeros(n + 1, dtype=np.int64)
        image[lab[lab > 0]] = np.nonzero(lab)[0]
        image = image[1:]
    return lab, n, image.astype(np.int64)


def _lesion_counts(t: np.ndarray, p: np.ndarray, thr: float, connectivity: int) -> np.ndarray:
    """(images, 4) matched, false-positive and missed lesions and summed matched Dice of one class."""
    n = t.shape[0]
    tl, nt, t_img = _label(t, connectivity)
    pl, npred, p_img = _label(p, connectivity)
    t_size = np.bincount(tl.ravel(), minlength=nt + 1)
    p_size = np.bincount(pl.ravel(), minlength=npred + 1)
    both = (tl > 0) & (pl > 0)
    pair, inter = np.unique(tl[both].astype(np.int64) * (npred + 1) + pl[both], return_counts=True)
    ti, pi = pair // (npred + 1), pair % (npred + 1)
    iou = inter / (t_size[ti] + p_size[pi] - inter)
    ok = iou > thr
    ti, pi, inter, iou = ti[ok], pi[ok], inter[ok], iou[ok]
    # greedy by decreasing IoU (ties: lower true, then predicted label, so the result never depends on sort order)
    order = np.lexsort((pi, ti, -iou))
    used_t: set[int] = set()
    used_p: set[int] = set()
    keep = []
    for j in order:
        if ti[j] not in used_t and pi[j] not in used_p:
            used_t.add(int(ti[j]))
            used_p.add(int(pi[j]))
            keep.append(j)
    keep = np.asarray(keep, dtype=np.int64)
    img = t_img[ti[keep] - 1]
    dice = 2.0 * inter[keep] / (t_size[ti[keep]] + p_size[pi[keep]])
    ltp = np.bincount(img, minlength=n).astype(float)
    idice = np.bincount(img, weights=dice, minlength=n)
    lfn = np.bincount(t_img, minlength=n) - ltp
    lfp = np.bincount(p_img, minlength=n) - ltp
    return np.stack([ltp, lfp, lfn, idice], axis=-1)


def case_counts(
    true_map: Any,
    pred_map: Any,
    n_classes: int,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    connectivity: int = CONNECTIVITY,
    hd95: bool = True,
) -> dict[str, np.ndarray]:
    """One case's counts: {stat: array over the mask classes 1..n_classes} for every stat of `STATS`."""
    row = count_matrix(
        np.asarray(true_map)[None],
        np.asarray(pred_map)[None],
        n_classes,
        iou_threshold=iou_threshold,
        connectivity=connectivity,
        hd95=hd95,
    )
    per_class = row.reshape(n_classes, len(STATS))
    return {s: per_class[:, j] for j, s in enumerate(STATS)}


def count_table(
    true_maps: Any,
    pred_maps: Any,
    classes: Sequence[str],
    cases: pd.DataFrame | None = None,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    connectivity: int = CONNECTIVITY,
    hd95: bool = True,
) -> pd.DataFrame:
    """The count table of stacks of label maps: `cases`' columns (ids, keys, groups; one row per map) followed by
    `count_columns(classes)`. The table's `attrs` hold the version and the matching settings."""
    C = count_matrix(
        true_maps, pred_maps, len(classes), iou_threshold=iou_threshold, connectivity=connectivity, hd95=hd95
    )
    counts = pd.DataFrame(C, columns=count_columns(classes))
    if cases is not None:
        if len(cases) != len(counts):
            raise BadInput(f"count table: {len(cases)} case rows for {len(counts)} label maps")
        counts = pd.concat([cases.reset_index(drop=True), counts], axis=1)
    counts.attrs.update(version=COUNTS_VERSION, iou_threshold=iou_threshold, connectivity=connectivity)
    return counts


def case_dice(counts: Any, n_classes: int) -> np.ndarray:
    """(cases, classes) per-case Dice from a count matrix; NaN where the class is in neither truth nor prediction."""
    C = np.asarray(counts, dtype=float).reshape(len(counts), n_classes, len(STATS))
    tp, fp, fn = C[..., 0], C[..., 1], C[..., 2]
    return _safe_div(2 * tp, 2 * tp + fp + fn)


def true_label(counts: Any, n_classes: int) -> np.ndarray:
    """Per case, 1 + the index of the class with the most true pixels (0: empty mask); ties go to the first class."""
    C = np.asarray(counts, dtype=float).reshape(len(counts), n_classes, len(STATS))
    area = C[..., 0] + C[..., 2]
    return np.where(area.sum(axis=1) > 0, area.argmax(axis=1) + 1, 0).astype(np.int64)


def undefined_reason(metric: str) -> str:
    """Why a segmentation metric has no value for a group of cases (it is NaN only for these reasons)."""
    if metric == "instance_dice":
        return "no true lesion in these cases"
    if metric == "hd95_macro":
        return "no case with a class in both truth and prediction"
    return "class absent from truth and prediction in these cases"


# --------------------------------------------------------------------------------------------- kernels


def _blocks(counts: Any) -> tuple[np.ndarray, int]:
    C = np.asarray(counts, dtype=float)
    if C.ndim != 2 or C.shape[1] % len(STATS):
        raise ValueError(f"a count matrix has {len(STATS)} columns per class, got shape {C.shape}")
    return C, C.shape[1] // len(STATS)


def _col(k: int, stat: str) -> int:
    return k * len(STATS) + STATS.index(stat)


def _f_columns(C: np.ndarray, k: int, hit: str, fp: str, fn: str) -> np.ndarray:
    """Numerator 2 hit and denominator 2 hit + fp + fn of class k's F-measure (Dice is the pixel F1)."""
    h = C[:, _col(k, hit)]
    return np.column_stack([2 * h, 2 * h + C[:, _col(k, fp)] + C[:, _col(k, fn)]])


def _f_kernel(counts: Any, y_score: Any = None, *, k: int, lesion: bool) -> Kernel:
    C, _ = _blocks(counts)
    stats = ("ltp", "lfp", "lfn") if lesion else ("tp", "fp", "fn")
    return _matmul_kernel(_f_columns(C, k, *stats), lambda s: _safe_div(s[:, 0], s[:, 1]))


def _f_macro_kernel(counts: Any, y_score: Any = None, *, lesion: bool) -> Kernel:
    C, n_classes = _blocks(counts)
    stats = ("ltp", "lfp", "lfn") if lesion else ("tp", "fp", "fn")
    cols = np.hstack([_f_columns(C, k, *stats) for k in range(n_classes)])

    # mean over the classes defined in this replicate: an absent class has no Dice, it is not a perfect 1
    def combine(s: np.ndarray) -> np.ndarray:
        return _nanmean_rows(_safe_div(s[:, 0::2], s[:, 1::2]))

    return _matmul_kernel(cols, combine)


def _hd95_macro_kernel(counts: Any, y_score: Any = None) -> Kernel:
    C, n_classes = _blocks(counts)
    cols = []
    for k in range(n_classes):
        h = C[:, _col(k, "hd95")]
        ok = np.isfinite(h)
        cols += [np.where(ok, h, 0.0), ok.astype(float)]

    def combine(s: np.ndarray) -> np.ndarray:
        return _nanmean_rows(_safe_div(s[:, 0::2], s[:, 1::2]))

    return _matmul_kernel(np.column_stack(cols), combine)


def _instance_dice_kernel(counts: Any, y_score: Any = None) -> Kernel:
    C, n_classes = _blocks(counts)
    ks = range(n_classes)
    num = sum(C[:, _col(k, "idice")] for k in ks)
    den = sum(C[:, _col(k, "ltp")] + C[:, _col(k, "lfn")] for k in ks)
    return _matmul_kernel(np.column_stack([num, den]), lambda s: _safe_div(s[:, 0], s[:, 1]))


def _seg_metric(
    name: str, factory: Any, params: dict, order: int, label: str, description: str, **kw: Any
) -> Metric:
    return register_metric(
        Metric(
            name,
            True,
            "segmentation",
            factory,
            params,
            description=description,
            order=order,
            label=label,
            **kw,
        )
    )


dice_macro = _seg_metric(
    "dice_macro",
    _f_macro_kernel,
    {"lesion": False},
    200,
    "macro Dice",
    "pooled pixel Dice, mean over the mask classes present in truth or prediction",
    comparisons=True,
    headline=True,
    leaderboard="Dice (macro)",
    leaderboard_help="pooled pixel Dice averaged over lesion classes",
)
dice_per_class = _seg_metric(
    "dice_<class>",
    _f_kernel,
    {"lesion": False},
    210,
    "Dice <class>",
    "pooled pixel Dice of <class>",
    per_class=True,
    fairness=False,
)
lesion_f1_macro = _seg_metric(
    "lesion_f1_macro",
    _f_macro_kernel,
    {"lesion": True},
    220,
    "macro lesion F1",
    "lesion detection F1 (IoU > 0.5, one-to-one), mean over the mask classes with lesions",
    comparisons=True,
)
lesion_f1_per_class = _seg_metric(
    "lesion_f1_<class>",
    _f_kernel,
    {"lesion": True},
    230,
    "lesion F1 <class>",
    "lesion detection F1 of <class> (IoU > 0.5, one-to-one)",
    per_class=True,
    fairness=False,
)
instance_dice = _seg_metric(
    "instance_dice",
    _instance_dice_kernel,
    {},
    240,
    "instance Dice",
    "Dice of each true lesion with its matched prediction (0 if missed), mean over true lesions",
    comparisons=True,
)
hd95_macro = register_metric(
    Metric(
        "hd95_macro",
        False,
        "segmentation",
        _hd95_macro_kernel,
        description="95th-percentile Hausdorff distance (pixels), mean over cases with the class in truth and "
        "prediction, then over classes",
        order=250,
        label="macro HD95 (px)",
        digits=2,
    )
)
