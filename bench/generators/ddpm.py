"""`ddpm`: a class-conditional denoising diffusion model from MONAI's generative components.

The network is `monai.networks.nets.DiffusionModelUNet` with one class embedding per task class; training uses the
`DDPMScheduler` noise schedule and sampling the deterministic `DDIMScheduler` (eta = 0) with few steps, so a seed
fixes every image.

- `tiny`: 16 px by default, a two-level UNet (16/32 channels), 1,500 optimizer steps of batch 32, a 300-step noise
  schedule and 25 DDIM steps: a minute or two on a CPU; `--size 32` roughly doubles that. Fewer steps leave
  visibly noisy samples (a diffusion model that has not converged produces noise, not blur).
- `full`: 128 px (capped by the task's size), a four-level UNet with attention at the two lowest resolutions,
  30,000 steps, 1,000-step schedule and 100 DDIM steps, bf16 autocast: meant for a GPU.

`prediction` selects the network's target: `epsilon` (default), `v_prediction` or `sample`.

On a segmentation task the mask is generated jointly with the image: it enters as extra channels (one per class,
background included, one-hot in [-1, 1]) of the same diffusion, and a sample's mask is the argmax over those
channels. Joint generation rather than conditioning on a given mask: it needs no source of masks at sample time
(conditioning would have to draw masks from somewhere, the training masks themselves being the obvious and the
privacy-leaking choice), it keeps the same network, schedule and sampler with only the channel count changed, and
image and mask come out of one denoising trajectory, so the lesion drawn in the image is the one the mask marks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import numpy as np

from bench.generators.base import Generator, register_generator

log = logging.getLogger(__name__)


@register_generator("ddpm")
class Ddpm(Generator):
    version = "1.0"
    uses_torch = True
    task_kinds = ("classification", "segmentation")
    mask_method = "joint: one-hot mask channels generated with the image by the same diffusion; mask = argmax"
    presets = {
        "tiny": {
            "size": 16,
            "channels": [16, 32],
            "attention_levels": [False, False],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "timesteps": 300,
            "train_steps": 1500,
            "batch_size": 32,
            "lr": 2e-3,
            "ema_decay": 0.99,
            "sample_steps": 25,
            "sample_batch": 256,
            "prediction": "epsilon",
        },
        "full": {
            "size": 128,
            "channels": [64, 128, 256, 256],
            "attention_levels": [False, False, True, True],
            "num_res_blocks": 2,
            "norm_num_groups": 32,
            "timesteps": 1000,
            "train_steps": 30000,
            "batch_size": 64,
            "lr": 2e-4,
            "ema_decay": 0.999,
            "sample_steps": 100,
            "sample_batch": 256,
            "prediction": "epsilon",
        },
    }

    def default_size(self, task_size: int) -> int:
        return int(min(task_size, self.config["size"]))

    def _build(self, in_chans: int, num_classes: int):
        from monai.networks.nets import DiffusionModelUNet

        cfg = self.config
        return DiffusionModelUNet(
            spatial_dims=2,
            in_channels=in_chans,
            out_channels=in_chans,
            channels=tuple(cfg["channels"]),
            attention_levels=tuple(bool(a) for a in cfg["attention_levels"]),
            num_res_blocks=int(cfg["num_res_blocks"]),
            norm_num_groups=int(cfg["norm_num_groups"]),
            num_head_channels=max(8, int(cfg["channels"][-1]) // 4),
            num_class_embeds=num_classes,
        )

    def _schedule_args(self) -> dict:
        # The usual 1e-4..0.02 betas assume 1000 steps; scale them so a short schedule still ends in pure noise.
        t = int(self.config["timesteps"])
        k = 1000.0 / t
        return {
            "num_train_timesteps": t,
            "schedule": "linear_beta",
            "beta_start": 1e-4 * k,
            "beta_end": min(0.02 * k, 0.5),
        }

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        import torch

        self._n_mask = None
        self._train(
            torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0), labels, num_classes
        )

    def fit_pairs(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        num_mask_classes: int,
    ) -> None:
        import torch

        self._n_mask = int(num_mask_classes)
        img = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
        onehot = (
            torch.from_numpy(masks.astype(np.int64))[:, None]
            == torch.arange(self._n_mask + 1)[None, :, None, None]
        )
        self._train(torch.cat([img, onehot.float() * 2 - 1], dim=1), labels, num_classes)

    def _train(self, x_all, labels: np.ndarray, num_classes: int) -> None:
        """Train on `x_all` float `[N, channels, S, S]` in [-1, 1] (image channels, then any mask channels)."""
        import torch
        from monai.networks.schedulers import DDPMScheduler

        cfg = self.config
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        dev = torch.device(self.device)
        self._shape = tuple(x_all.shape[1:])
        self._num_classes = num_classes
        model = self._build(int(x_all.shape[1]), num_classes).to(dev)
        ema = copy.deepcopy(model).eval() if cfg["ema_decay"] > 0 else None
        sched = DDPMScheduler(**self._schedule_args())
        y_all = torch.from_numpy(np.array(labels, dtype=np.int64))
        opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=0.0)
        steps = int(cfg["train_steps"])
        warm = max(1, steps // 20)
        lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / steps))  # noqa: E731
        scaler_ctx = _autocast(dev)
        alphas = sched.alphas_cumprod.to(dev)
        bs = min(int(cfg["batch_size"]), len(x_all))
        t0 = time.time()
        model.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = float(cfg["lr"]) * lr_at(step)
            idx = torch.randint(len(x_all), (bs,), generator=gen)
            # No flips: laterality is anatomy in most medical images.
            x0 = x_all[idx].to(dev)
            y = y_all[idx].to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            t = torch.randint(sched.num_train_timesteps, (bs,), generator=gen).to(dev)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with scaler_ctx():
                pred = model(xt, timesteps=t, class_labels=y)
            if cfg["prediction"] == "v_prediction":
                target = a.sqrt() * noise - (1 - a).sqrt() * x0
            elif cfg["prediction"] == "sample":
                target = x0
            else:
                target = noise
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    d = float(cfg["ema_decay"])
                    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                        pe.mul_(d).add_(pm.detach(), alpha=1 - d)
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                log.info("ddpm step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.time() - t0)
        self._model = (ema if ema is not None else model).eval()
        self.fitted_ = {"final_loss": float(loss.item()), "train_seconds": round(time.time() - t0, 1)}

    def sample(self, labels: np.ndarray) -> np.ndarray:
        return self._sample(labels)[0]

    def sample_pairs(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self._sample(labels)
        assert masks is not None, "ddpm: sample_pairs needs fit_pairs"
        return images, masks

    def _sample(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch
        from monai.networks.schedulers import DDIMScheduler

        dev = torch.device(self.device)
        sched = DDIMScheduler(**self._schedule_args(), clip_sample=True)
        sched.set_timesteps(int(self.config["sample_steps"]))
        gen = torch.Generator().manual_seed(self.seed + 1)
        labels = np.asarray(labels, dtype=np.int64)
        n_img = self._shape[0] - (self._n_mask + 1 if self._n_mask is not None else 0)
        out = np.empty((len(labels), n_img) + tuple(self._shape[1:]), dtype=np.uint8)
        out_m = (
            None
            if self._n_mask is None
            else np.empty((len(labels),) + tuple(self._shape[1:]), dtype=np.uint8)
        )
        bs = int(self.config["sample_batch"])
        ctx = _autocast(dev)
        with torch.no_grad():
            for s in range(0, len(labels), bs):
                y = torch.from_numpy(labels[s : s + bs]).to(dev)
                x = torch.randn((len(y),) + tuple(self._shape), generator=gen).to(dev)
                for t in sched.timesteps:
                    tt = torch.full((len(y),), int(t), device=dev, dtype=torch.long)
                    with ctx():
                        eps = self._model(x, timesteps=tt, class_labels=y)
                    x, _ = sched.step(eps.float(), int(t), x)
                img = ((x[:, :n_img].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
                out[s : s + len(y)] = img
                if out_m is not None:
                    out_m[s : s + len(y)] = x[:, n_img:].argmax(dim=1).to(torch.uint8).cpu().numpy()
        return out, out_m


def _autocast(dev):
    import torch

    if dev.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
