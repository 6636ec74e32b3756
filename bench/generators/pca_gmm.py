"""`pca-gmm`: per class, a Gaussian mixture in PCA space plus isotropic pixel noise (probabilistic PCA).

The low-fidelity baseline. The discarded PCA variance is added back as white noise so samples carry the same
amount of fine-grained texture as real images; without it samples are smoother than any real image and sit
artificially close to every training image in pixel space, which would bias the memorization audit.

On a segmentation task it models image and mask jointly: each training pair becomes one vector, the image's pixels
followed by its mask as one-hot channels (background and every mask class) scaled to `MASK_SCALE` gray levels, and
the same PCA + per-class mixture is fitted to those vectors. A sample is decoded into its image (plus the white noise
of the image part's discarded variance) and its mask, the argmax over the class channels, background included. The
crude baseline: a mask comes out as a blurred average lesion of its class, its place tied to the image only through
the shared components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bench.generators.base import Generator, register_generator

# A mask pixel's one-hot channels weigh half the gray range: enough for the shared components to carry where the
# lesion is, not so much that the mask's variance crowds the image's out of a small PCA. Not a preset key, so the
# configuration (and card) of a classification set stays what it was.
MASK_SCALE = 128.0


@register_generator("pca-gmm")
class PcaGmm(Generator):
    version = "1.0"
    task_kinds = ("classification", "segmentation")
    mask_method = (
        "joint: PCA + per-class Gaussian mixture on image pixels and one-hot mask channels (scaled to "
        f"{MASK_SCALE:g} gray levels); mask = argmax over the class channels"
    )
    # Caps keep the model far from interpolating individual images when a class is small: at most half the class
    # size in PCA components and one mixture component per `min_per_mixture` images.
    presets = {
        "tiny": {
            "n_components": 16,
            "n_mixtures": 3,
            "covariance": "diag",
            "min_per_mixture": 20,
            "noise": True,
        },
        "full": {
            "n_components": 64,
            "n_mixtures": 8,
            "covariance": "full",
            "min_per_mixture": 50,
            "noise": True,
        },
    }

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self._shape = images.shape[1:]
        x_all = images.reshape(len(images), -1).astype(np.float64)
        self._fit_classes(
            x_all,
            labels,
            num_classes,
            lambda x, pca, z: float(
                max(x.var(axis=0, ddof=1).sum() - pca.explained_variance_.sum(), 0.0) / x.shape[1]
            ),
        )

    def _fit_classes(
        self,
        x_all: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        residual: Callable[[np.ndarray, Any, np.ndarray], float],
    ) -> None:
        """PCA + Gaussian mixture per class on the rows of `x_all`; `residual(x, pca, z)` is the per-dimension
        variance the PCA leaves out, given back as noise when sampling."""
        # sklearn is slow to import; only fitting this generator needs it
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        self._models: dict[int, tuple] = {}
        self.fitted_: dict[str, dict[str, float]] = {}
        for c in range(num_classes):
            x = x_all[labels == c]
            n = len(x)
            if n == 0:
                continue
            if n < 2:
                self._models[c] = (None, None, x[0], 0.0)
                continue
            q = int(max(1, min(self.config["n_components"], n // 2, x.shape[1])))
            pca = PCA(n_components=q, random_state=self.seed).fit(x)
            z = pca.transform(x)
            k = int(max(1, min(self.config["n_mixtures"], n // int(self.config["min_per_mixture"]))))
            gmm = GaussianMixture(
                n_components=k,
                covariance_type=self.config["covariance"],
                reg_covar=1e-3,
                random_state=self.seed,
            ).fit(z)
            resid = residual(x, pca, z)
            self._models[c] = (pca, gmm, None, resid)
            self.fitted_[str(c)] = {"pca_components": q, "mixtures": k, "residual_std": resid**0.5}

    def _draw(self, c: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """n rows of class `c` (before noise) and the class's residual variance."""
        if int(c) not in self._models:
            raise ValueError(f"pca-gmm: no training images of class index {c}")
        pca, gmm, single, resid = self._models[int(c)]
        if pca is None:
            return np.repeat(single[None], n, axis=0), resid
        # GaussianMixture.sample draws from its own RandomState; re-seed it per class for determinism.
        gmm.random_state = int(rng.integers(2**31 - 1))
        z, _ = gmm.sample(n)
        z = z[rng.permutation(len(z))]  # sample() groups draws by mixture component
        return pca.inverse_transform(z), resid

    def sample(self, labels: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        labels = np.asarray(labels, dtype=int)
        out = np.empty((len(labels),) + tuple(self._shape), dtype=np.uint8)
        for c in np.unique(labels):
            where = np.flatnonzero(labels == c)
            x, resid = self._draw(int(c), len(where), rng)
            if self.config["noise"] and resid > 0:
                x = x + rng.normal(0.0, resid**0.5, x.shape)
            out[where] = (
                np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape((len(where),) + tuple(self._shape))
            )
        return out

    def fit_pairs(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        num_mask_classes: int,
    ) -> None:
        self._shape = images.shape[1:]
        self._n_mask = int(num_mask_classes)
        d_img = int(np.prod(self._shape))
        scale = MASK_SCALE
        onehot = (masks[:, None] == np.arange(self._n_mask + 1)[None, :, None, None]).astype(
            np.float64
        ) * scale
        x_all = np.concatenate([images.reshape(len(images), -1), onehot.reshape(len(images), -1)], axis=1)
        x_all = x_all.astype(np.float64)
        # Only the image part gets its discarded variance back as noise: noise in the mask channels would only
        # speckle the argmax.
        self._fit_classes(
            x_all,
            labels,
            num_classes,
            lambda x, pca, z: float(
                (x[:, :d_img] - pca.inverse_transform(z)[:, :d_img]).var(axis=0, ddof=1).mean()
            ),
        )

    def sample_pairs(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        labels = np.asarray(labels, dtype=int)
        d_img = int(np.prod(self._shape))
        side = tuple(self._shape[1:])
        images = np.empty((len(labels),) + tuple(self._shape), dtype=np.uint8)
        masks = np.empty((len(labels),) + side, dtype=np.uint8)
        for c in np.unique(labels):
            where = np.flatnonzero(labels == c)
            x, resid = self._draw(int(c), len(where), rng)
            img = x[:, :d_img]
            if self.config["noise"] and resid > 0:
                img = img + rng.normal(0.0, resid**0.5, img.shape)
            images[where] = (
                np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape((len(where),) + tuple(self._shape))
            )
            channels = x[:, d_img:].reshape((len(where), self._n_mask + 1) + side)
            masks[where] = np.argmax(channels, axis=1).astype(np.uint8)
        return images, masks
