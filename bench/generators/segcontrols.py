"""`mask-shuffle`: the negative control of a segmentation task, and its check `dice_at_chance`.

Each real training image is handed out with another patient's mask. The pairs keep every real image and every real
mask, the class mix and the lesion sizes and places, and lose only what a segmenter is for: where in *this* image
the lesion is. A segmenter trained on them alone can learn no more than an image-blind prediction (the places and
classes lesions usually take), so its macro Dice must not rise above what such a prediction gets.

What "chance" is for Dice: an empty prediction scores 0 on every class with lesions; an image-blind one that always
draws the same map scores more, because lesions cluster in the mediastinum. `CHANCE_DICE` is the best macro Dice any
fixed map reaches on the built-in phantom's internal test split (the map and its threshold chosen on those very
test masks, so an upper bound of image-blind skill; `scripts/measure_chance_dice.py`). The check passes when the
interval of the control's synthetic-only macro Dice, at the check's level, reaches down to it: the run cannot tell
the control apart from an image-blind segmenter. A pipeline that pairs images with their own masks after all (a
broken shuffle, masks read by the wrong key) gives the real-only Dice, far above it.
"""

from __future__ import annotations

import numpy as np

from bench.generators.base import Control, ControlCheck, Generator, register_generator
from bench.generators.controls import _draw_pairs, shuffled_labels

# Measured by scripts/measure_chance_dice.py on mediastinal-neoplasm-seg's phantom (64 px, internal test split, 120
# images): the best fixed map 0.099 (with the map learnt from the training masks instead: 0.054). unet-small trained
# 1,200 steps on the real training pairs scored 0.565, on their mask-shuffled version 0.012 (300 steps: 0.099 and
# 0.005, so the check only separates a broken shuffle from a working one at a budget where real pairs beat chance).
CHANCE_DICE = 0.10


def shuffled_mask_sources(labels: np.ndarray, patients: np.ndarray | None, seed: int) -> np.ndarray:
    """`src[i]`: whose mask image i gets. A permutation of the images under which the class of an image's new mask
    tells nothing about its own class (each class of new masks spread evenly over the old classes, as
    `shuffled_labels` does for labels), and no image gets a mask of its own patient (its own, or a neighbouring
    slice's nearly identical one) where the class sizes leave any choice."""
    labels = np.asarray(labels)
    n = len(labels)
    patients = np.arange(n) if patients is None else np.asarray(patients)
    new = shuffled_labels(labels, seed)
    rng = np.random.default_rng([int(seed), 15485863])
    src = np.empty(n, dtype=np.int64)
    for d in np.unique(labels):
        takers = np.flatnonzero(new == d)  # images that receive a mask of class d
        givers = rng.permutation(np.flatnonzero(labels == d))  # the masks of class d, each given once
        # Repair same-patient matches by swapping with a partner for whom the swap clashes with neither.
        for _ in range(3):
            clash = np.flatnonzero(patients[takers] == patients[givers])
            if len(clash) == 0:
                break
            for a in clash:
                if patients[takers[a]] != patients[givers[a]]:
                    continue
                for b in rng.permutation(len(takers)):
                    if (
                        patients[takers[a]] != patients[givers[b]]
                        and patients[takers[b]] != patients[givers[a]]
                    ):
                        givers[a], givers[b] = givers[b], givers[a]
                        break
        src[takers] = givers
    return src


@register_generator("mask-shuffle")
class MaskShuffle(Generator):
    """Negative control (segmentation): each real training image paired with another patient's mask."""

    version = "1.0"
    presets = {"tiny": {}, "full": {}}
    task_kinds = ("segmentation",)
    mask_method = (
        "shuffled: each real image with another patient's real mask (class of the new mask independent)"
    )
    control = Control(
        "negative",
        "images paired with other patients' masks: a working pipeline trains a segmenter no better than an "
        "image-blind prediction on them",
        (
            ControlCheck(
                "dice_at_chance",
                "synthetic",
                "synthetic-only macro Dice: interval reaches the most an image-blind prediction gets "
                f"({CHANCE_DICE:g})",
                margin=CHANCE_DICE,
            ),
        ),
    )

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        raise NotImplementedError(
            "mask-shuffle serves segmentation tasks only (label-shuffle is for classification)"
        )

    def fit_pairs(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        num_mask_classes: int,
    ) -> None:
        labels = np.asarray(labels)
        src = shuffled_mask_sources(labels, self.patients, self.seed)
        new = labels[src]  # a real mask keeps the class it implies
        self._by_class = {c: images[new == c] for c in range(num_classes)}
        self._masks_by_class = {c: masks[src[new == c]] for c in range(num_classes)}
        self.fitted_ = {
            "kept_own_mask": float(np.mean(src == np.arange(len(src)))),
            "kept_class": float(np.mean(new == labels)),
            "n_images": int(len(labels)),
        }

    def sample_pairs(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        images, masks = _draw_pairs(self._by_class, self._masks_by_class, labels, rng, "mask-shuffle")
        assert masks is not None
        return images, masks


def dice_at_chance(lo: float | None, hi: float | None, ceiling: float) -> tuple[bool | None, str]:
    """The verdict of a `dice_at_chance` check from the control's macro Dice interval at the check's level:
    True when it reaches down to `ceiling` (the control is indistinguishable from an image-blind segmenter), None
    when the interval is undefined."""
    if lo is None or hi is None or not np.isfinite(lo) or not np.isfinite(hi):
        return None, "interval undefined"
    if lo <= ceiling:
        return True, ""
    return False, (
        f"the interval lies above {ceiling:g}, the most an image-blind segmenter gets: images and masks that were "
        "paired at random still taught where lesions are (are the masks shuffled?)"
    )
