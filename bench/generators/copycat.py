"""`copycat`: training images handed back with a light perturbation.

The memorization control: it has the utility of the real data and none of the privacy. A privacy audit that does
not flag it is broken.

On a segmentation task it copies pairs: each training image, perturbed as above, with its own mask (shifted along
with it under `full`; the mask is never noised).
"""

from __future__ import annotations

import numpy as np

from bench.generators.base import Control, ControlCheck, Generator, register_generator


@register_generator("copycat")
class Copycat(Generator):
    version = "1.1"
    task_kinds = ("classification", "segmentation")
    mask_method = "copied: each training image's own mask"
    control = Control(
        "negative",
        "copies of the training images carry no information beyond the real data, and no privacy",
        (
            ControlCheck(
                "gain_contains_zero", "augment:1", "augment:1 gain over real-only: interval contains 0"
            ),
            ControlCheck("privacy_flagged", None, "privacy audit: flagged as memorizing"),
        ),
    )
    # noise_std in gray levels (0-255); max_shift in pixels along each axis. The noise alone keeps a copy from being
    # byte-identical. tiny does not shift: at the CPU sizes (32 px of a 280 mm crop) one pixel is about 9 mm, and
    # copies shifted by it trailed real data by 0.05 external macro AUROC on the cpu demo (4 seeds; unshifted
    # copies tied), which a control for "no information beyond the real data" must not do.
    presets = {"tiny": {"noise_std": 2.0, "max_shift": 0}, "full": {"noise_std": 2.0, "max_shift": 1}}

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self._by_class = {c: images[labels == c] for c in range(num_classes)}

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

    def sample(self, labels: np.ndarray) -> np.ndarray:
        return self._sample(labels, None)[0]

    def sample_pairs(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self._sample(labels, self._masks_by_class)
        assert masks is not None
        return images, masks

    def _sample(
        self, labels: np.ndarray, mask_pools: dict[int, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng(self.seed)
        labels = np.asarray(labels, dtype=int)
        first = next(v for v in self._by_class.values() if len(v))
        out = np.empty((len(labels),) + first.shape[1:], dtype=np.uint8)
        out_m = None if mask_pools is None else np.empty((len(labels),) + first.shape[2:], dtype=np.uint8)
        for c in np.unique(labels):
            pool = self._by_class.get(int(c))
            if pool is None or len(pool) == 0:
                raise ValueError(f"copycat: no training images of class index {c}")
            where = np.flatnonzero(labels == c)
            # Every training image is used once before any is used twice.
            reps = -(-len(where) // len(pool))
            order = np.concatenate([rng.permutation(len(pool)) for _ in range(reps)])[: len(where)]
            for k, i in zip(where, order, strict=True):
                if out_m is None:
                    out[k] = self._perturb(pool[i], rng)[0]
                else:
                    out[k], out_m[k] = self._perturb(pool[i], rng, mask_pools[int(c)][i])
        return out, out_m

    def _perturb(
        self, img: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        s = int(self.config["max_shift"])
        x = img.astype(np.float32)
        if s > 0:
            dy, dx = rng.integers(-s, s + 1, 2)
            x = _shift(x, int(dy), int(dx))
            if mask is not None:
                mask = _shift(mask[None], int(dy), int(dx))[0]
        x = x + rng.normal(0.0, float(self.config["noise_std"]), x.shape)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), mask


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate `[C, H, W]` by whole pixels, repeating the edge rather than wrapping around."""
    h, w = x.shape[-2:]
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    p = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    return p[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w]
