"""Feature spaces for fidelity: where images become vectors, cached by content hash.

- `classifier` (default): the penultimate layer of a classifier the suite trained on real images only (a run's
  real-only `checkpoint.pt`), on images preprocessed exactly as that classifier was trained (the task's intensity
  mapping at the checkpoint's image size). No downloaded weights.
- `timm:<model>`: a timm backbone (`num_classes=0`, pooled features) with weights from a local file the user names
  (`.pt`/`.pth` state dict loaded with `weights_only=True`, or `.safetensors`); images are the task's preprocessing
  at `image_size`, repeated to 3 channels and normalized with the model's mean and std. Nothing is downloaded.

Features (and the classifier's class probabilities, for label fidelity) are cached under
`<cache dir>/features/<key>.npz`, key = sha256 of the image cache key (manifest content, image files, preprocessing)
and the weights file's sha256, so a second call with the same inputs computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BadInput
from bench.imaging import PreprocessSpec, build_cache, cache_key, default_cache_dir
from bench.io import atomic_path, sha256_file
from bench.manifest import Manifest
from bench.tasks import Task

log = logging.getLogger(__name__)

FORMAT = "medsynbench-fidelity-features/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureSpace:
    """What a feature vector is: part of every fidelity result and record."""

    kind: str  # classifier | timm
    model: str  # backbone name
    weights: str  # path of the checkpoint or weight file
    weights_sha256: str
    image_size: int
    layer: str  # penultimate | pooled

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.model}:{self.weights_sha256[:12]}@{self.image_size}px"

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        d["statement"] = (
            f"{self.layer} features of {self.model} "
            + (
                "trained by the suite on real images only (the run's real-only classifier)"
                if self.kind == "classifier"
                else "(timm) with weights from a local file"
            )
            + f", images {self.image_size}x{self.image_size} with the task's preprocessing"
        )
        return d


@dataclass
class Embedder:
    space: FeatureSpace
    model: Any
    device: Any
    normalize: Any  # uint8 tensor batch -> float input of the model
    forward: Any  # float batch -> [N, D]
    classifier: Any | None = None  # the run's classifier (label fidelity), when there is one
    classifier_size: int | None = None  # the image side that classifier was trained at


def _check_classifier(model: Any, path: Path, task: Task) -> None:
    spec = getattr(model, "bench_spec", {}) or {}
    if spec.get("in_chans") not in (None, task.image.channels):
        raise BadInput(
            f"--checkpoint {path}: the model takes {spec['in_chans']} channel(s), the task {task.image.channels}"
        )
    if spec.get("num_classes") not in (None, len(task.classes)):
        raise BadInput(
            f"--checkpoint {path}: the model has {spec['num_classes']} classes, the task {len(task.classes)}"
        )


def load_classifier(checkpoint: str | Path, task: Task, device: str | None) -> tuple[Any, int]:
    """The run's classifier and the image size it was trained at."""
    # torch (bench.train): only when a classifier feature space is used
    from bench.train import load_checkpoint

    path = Path(checkpoint)
    model, meta = load_checkpoint(path, device=device or "auto")
    _check_classifier(model, path, task)
    size = ((meta or {}).get("image") or {}).get("size") or task.image.size
    return model, int(size)


def _torch_state(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise BadInput(f"--weights {path}: reading .safetensors needs the safetensors package") from None
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is the file's fault
        raise BadInput(f"--weights {path}: not a readable weight file: {e}") from None
    for key in ("state_dict", "model", "state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadInput(f"--weights {path}: holds no state dict")
    return state


def open_embedder(
    task: Task,
    *,
    features: str = "classifier",
    checkpoint: str | Path | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    device: str | None = None,
) -> Embedder:
    """The feature space `features` ("classifier" or "timm:<model>"); BadInput names what is missing."""
    import torch

    # torch (bench.train): only when features are computed
    from bench.train import resolve_device, to_float

    dev = resolve_device(device or "auto")
    classifier, trained_size = None, None
    if checkpoint is not None:
        classifier, trained_size = load_classifier(checkpoint, task, str(dev))
    if features == "classifier":
        if checkpoint is None:
            raise BadInput(
                "fidelity: the classifier feature space needs --checkpoint (a run's real-only checkpoint.pt; "
                "`medsynbench fidelity --run RUN` finds it), or choose --features timm:<model> --weights FILE"
            )
        # torch (bench.models): only for the classifier feature space
        from bench.models import embed

        spec = getattr(classifier, "bench_spec", {}) or {}
        space = FeatureSpace(
            "classifier",
            str(spec.get("name", "unknown")),
            str(Path(checkpoint).resolve()),
            sha256_file(checkpoint),
            int(image_size or trained_size),
            "penultimate",
        )
        return Embedder(
            space, classifier, dev, to_float, lambda x: embed(classifier, x), classifier, trained_size
        )
    if not features.startswith("timm:") or not features[5:]:
        raise BadInput(f"--features {features!r}: use 'classifier' or 'timm:<model name>'")
    name = features[5:]
    if weights is None:
        raise BadInput(f"--features {features}: name the weights with --weights FILE (nothing is downloaded)")
    wpath = Path(weights)
    if not wpath.is_file():
        raise BadInput(f"--weights {wpath}: not found")
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=3)
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError/KeyError for unknown names
        raise BadInput(f"--features {features}: timm cannot build {name!r}: {e}") from None
    state = _torch_state(wpath)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(kept))
    if missing:
        raise BadInput(
            f"--weights {wpath}: {len(missing)} parameter(s) of {name} are not in the file "
            f"(e.g. {', '.join(missing[:5])}); is it the weight file of this model?"
        )
    model.load_state_dict(kept)
    model = model.to(dev).eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), device=dev).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_STD), device=dev).view(1, -1, 1, 1)

    def normalize(xb: Any) -> Any:
        x = xb.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - mean) / std

    def forward(x: Any) -> Any:
        with torch.no_grad():
            return model(x).flatten(1)

    space = FeatureSpace(
        "timm", name, str(wpath.resolve()), sha256_file(wpath), int(image_size or task.image.size), "pooled"
    )
    return Embedder(space, model, dev, normalize, forward, classifier, trained_size)


@dataclass
class Features:
    case_ids: list[str]
    features: np.ndarray  # float32 [N, D]
    proba: np.ndarray | None  # float32 [N, K] from the run's classifier, or None
    cached: bool = False


def embed_manifest(
    emb: Embedder,
    manifest: Manifest,
    task: Task,
    *,
    cache_dir: str | Path | None = None,
    batch: int = 256,
) -> Features:
    """Features of every image of `manifest` (and class probabilities when the embedder carries the run's
    classifier), from the feature cache when the same inputs were embedded before."""
    import torch

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    spec = PreprocessSpec.from_task(task, emb.space.image_size)
    csize = emb.classifier_size or emb.space.image_size
    key_text = "\n".join(
        [
            FORMAT,
            json.dumps(emb.space.describe(), sort_keys=True),
            cache_key(manifest, spec),
            "proba" if emb.classifier is not None else "no-proba",
            str(csize),
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()
    path = root / "features" / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                proba = z["proba"] if "proba" in z.files else None
                log.debug("fidelity features from cache: %s", path)
                return Features([str(c) for c in z["case_ids"]], z["features"], proba, cached=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            log.warning("feature cache %s is damaged (%s); recomputing", path, e)
    cache = build_cache(manifest, task, size=emb.space.image_size, cache_dir=root, progress=False)
    ids = [str(c) for c in manifest.df["case_id"]]
    images = cache.images[cache.rows(ids)]
    feats = []
    with torch.no_grad():
        for k in range(0, len(images), batch):
            xb = torch.from_numpy(np.ascontiguousarray(images[k : k + batch])).to(emb.device)
            feats.append(emb.forward(emb.normalize(xb)).float().cpu().numpy())
    f = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)
    proba = None
    if emb.classifier is not None:
        # torch (bench.train): only with a classifier
        from bench.train import predict_proba

        cimages = images
        if csize != emb.space.image_size:
            ccache = build_cache(manifest, task, size=csize, cache_dir=root, progress=False)
            cimages = ccache.images[ccache.rows(ids)]
        proba = predict_proba(emb.classifier, np.ascontiguousarray(cimages), device=emb.device).astype(
            np.float32
        )
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        arrays = {"case_ids": np.array(ids), "features": f}
        if proba is not None:
            arrays["proba"] = proba
        np.savez(fh, **arrays)
    return Features(ids, f, proba)
