"""Controls with a known right answer: `label-shuffle` (negative) and `real-holdout` (positive).

`copycat` (the memorization control) lives in its own module. A benchmark whose controls do not come out as
declared is broken, whatever it says about the generators under test: `evaluate` checks them and the leaderboard
refuses to publish when one fails.
"""

from __future__ import annotations

import numpy as np

from bench.generators.base import Control, ControlCheck, Generator, register_generator

# How far the positive control's ratio may sit from 1 by the luck of which patients it trained on. Its interval
# covers test patients and training seeds; it cannot cover that the control trains on other patients than real-only
# does. Measured on the cpu demo's phantom (scripts/measure_holdout_draws.py, split seeds 0-5, two training seeds
# each, ~170 training patients): the ratio's sd over split draws was 0.04 on the external hospitals (range
# 0.945-1.038) and 0.03 on the internal test split. That spread also holds test-patient and seed noise, so 0.04 is
# an upper bound of the draw effect. It enters the check in quadrature at the check's level (z 2.39 at 98.3%: a
# band of about +/- 0.096 when the interval itself is narrow); a broken synthetic path (wrong labels, mangled
# images: ratio 0.6-0.8) still falls far outside.
HOLDOUT_DRAW_SD = 0.04


def _draw(pools: dict[int, np.ndarray], labels: np.ndarray, rng: np.random.Generator, who: str) -> np.ndarray:
    """One pool image per requested class index; every image of a class used once before any is used twice."""
    return _draw_pairs(pools, None, labels, rng, who)[0]


def _draw_pairs(
    pools: dict[int, np.ndarray],
    mask_pools: dict[int, np.ndarray] | None,
    labels: np.ndarray,
    rng: np.random.Generator,
    who: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """As `_draw`, with each image's own mask when `mask_pools` (same classes, same order) is given."""
    labels = np.asarray(labels, dtype=int)
    first = next(v for v in pools.values() if len(v))
    out = np.empty((len(labels),) + first.shape[1:], dtype=np.uint8)
    out_m = None if mask_pools is None else np.empty((len(labels),) + first.shape[2:], dtype=np.uint8)
    for c in np.unique(labels):
        pool = pools.get(int(c))
        if pool is None or len(pool) == 0:
            raise ValueError(f"{who}: no images of class index {c} to draw from")
        where = np.flatnonzero(labels == c)
        reps = -(-len(where) // len(pool))
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(reps)])[: len(where)]
        out[where] = pool[order]
        if out_m is not None and mask_pools is not None:
            out_m[where] = mask_pools[int(c)][order]
    return out, out_m


def shuffled_labels(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded rearrangement of `labels` under which the new label tells nothing about the old one.

    The class counts stay. A plain random permutation leaves chance agreement in one draw: with a hundred images
    its count of images that keep their class is off the independent n_c^2 / N by several, and a model trained on
    it learns that much about the true classes, so the control's synthetic-only AUROC sits above 0.5 by more than
    its interval (the draw is not in it). Here every class of new labels is spread evenly over the images sorted
    by old class, so each cell of the old x new table is within one image of n_old * n_new / N.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 104729])
    n = len(labels)
    values, codes = np.unique(labels, return_inverse=True)
    # Images in old-class order, shuffled within each class.
    order = np.lexsort((rng.random(n), codes))
    # New labels as an evenly spread sequence: the k-th of class d's n_d labels sits at (k + u_d) / n_d.
    counts = np.bincount(codes, minlength=len(values))
    keys = np.concatenate([(np.arange(m) + rng.random()) / m for m in counts])
    seq = np.repeat(np.arange(len(values)), counts)[np.argsort(keys, kind="stable")]
    out = np.empty(n, dtype=codes.dtype)
    out[order] = seq
    return values[out]


@register_generator("label-shuffle")
class LabelShuffle(Generator):
    """Negative control: the real training images with their labels permuted; trained on alone, a model is at chance.

    Classification only: a segmenter learns from masks, not labels, and a segmentation set's labels follow from its
    masks, so shuffled labels would change nothing it learns. Its segmentation counterpart is `mask-shuffle`."""

    version = "1.1"
    presets = {"tiny": {}, "full": {}}
    control = Control(
        "negative",
        "images whose labels carry no information: a working pipeline trains a classifier at chance on them",
        (ControlCheck("chance", "synthetic", "synthetic-only macro AUROC: interval contains 0.5 (chance)"),),
    )

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        fake = shuffled_labels(labels, self.seed)
        self._by_class = {c: images[fake == c] for c in range(num_classes)}
        self.fitted_ = {
            "kept_label": float(np.mean(fake == np.asarray(labels))),
            "n_images": int(len(labels)),
        }

    def sample(self, labels: np.ndarray) -> np.ndarray:
        return _draw(self._by_class, labels, np.random.default_rng(self.seed), "label-shuffle")


@register_generator("real-holdout")
class RealHoldout(Generator):
    """Positive control: real images of training-site patients that no run trains on (the task's reserve split).

    On a segmentation task: the reserve patients' image–mask pairs, each image with its own mask."""

    version = "1.0"
    task_kinds = ("classification", "segmentation")
    mask_method = "real: the reserve patients' own masks"
    presets = {"tiny": {}, "full": {}}
    source_split = "reserve"
    control = Control(
        "positive",
        "real patients from the same hospitals, as many as the real training set: as good as the real data",
        (
            ControlCheck(
                "ratio_near_one",
                "synthetic",
                "synthetic-only / real-only macro AUROC ratio: interval reaches 1 once the draw of training patients "
                f"(sd {HOLDOUT_DRAW_SD:g} of the ratio, which the interval does not cover) is added to it",
                draw_sd=HOLDOUT_DRAW_SD,
            ),
        ),
    )

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self._by_class = {c: images[labels == c] for c in range(num_classes)}

    def sample(self, labels: np.ndarray) -> np.ndarray:
        return _draw(self._by_class, labels, np.random.default_rng(self.seed), "real-holdout")

    def fit_pairs(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        num_mask_classes: int,
    ) -> None:
        self.fit(images, labels, num_classes)
        self._masks_by_class = {c: masks[labels == c] for c in range(num_classes)}

    def sample_pairs(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        images, masks = _draw_pairs(self._by_class, self._masks_by_class, labels, rng, "real-holdout")
        assert masks is not None
        return images, masks
