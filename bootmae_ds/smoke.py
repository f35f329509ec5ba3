"""A single-process forward/loss/backward smoke of a config on the demo digits.

This is what ``launchers/pretrain.py`` runs until the DeepSpeed engine exists: it proves that a
config builds, masks, predicts, computes both losses against a momentum copy of the encoder and
takes optimizer steps, and it says plainly that it is not the pre-training engine.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import BootMAEConfig
from .losses import feature_loss, pixel_loss
from .masking import MaskGenerator
from .models import build_model


def demo_images(img_size: int) -> torch.Tensor:
    """scikit-learn's 1,797 bundled 8x8 digits as uint8 RGB ``[N, 3, S, S]`` (no download)."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images).float()  # [N, 8, 8], values 0..16
    up = F.interpolate(digits[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (up.clamp(0, 16) * (255 / 16)).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def run_smoke(cfg: BootMAEConfig, out_dir: Path, steps: int) -> list[dict[str, float]]:
    """Run ``steps`` plain AdamW steps on CPU; returns and writes the per-step losses."""
    torch.manual_seed(cfg.run.seed)
    rng = random.Random(cfg.run.seed)
    model = build_model(cfg).train()
    teacher = copy.deepcopy(model.encoder).eval().requires_grad_(False)
    masks = MaskGenerator.from_config(cfg)
    images = demo_images(cfg.model.img_size)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    global_batch = cfg.data.global_batch_size
    lr = cfg.optim.base_lr * global_batch / cfg.optim.lr_batch_divisor
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    history = []
    log = (out_dir / "smoke_metrics.jsonl").open("w")
    for step in range(steps):
        start = time.perf_counter()
        idx = torch.tensor(rng.sample(range(len(images)), min(global_batch, len(images))))
        batch = (images[idx].float() / 255 - mean) / std
        mask = masks.batch(len(idx), rng)
        out = model(batch, mask)
        loss_pix = pixel_loss(out.pixels, batch, mask, patch_size=cfg.model.patch_size,
                              weighted=cfg.loss.weighted_mask, norm=cfg.loss.pixel_norm,
                              eps=cfg.loss.pixel_norm_eps)
        loss_feat = torch.zeros(())
        if out.features is not None:
            with torch.no_grad():
                targets = teacher.target_features(batch)
            loss_feat = feature_loss(out.features, targets, mask, weighted=cfg.loss.weighted_mask,
                                     eps=cfg.loss.feature_norm_eps)
        loss = loss_pix + cfg.loss.feature_weight * loss_feat
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), model.encoder.parameters()):
                t.lerp_(s, 1 - cfg.momentum.start)
        row = {"step": step + 1, "loss": loss.item(), "loss_pixel": loss_pix.item(),
               "loss_feature": loss_feat.item(), "samples_per_s": len(idx) / (time.perf_counter() - start)}
        history.append(row)
        log.write(json.dumps(row) + "\n")
        print(f"[smoke] step {row['step']}/{steps}  loss {row['loss']:.4f}  (pixel {row['loss_pixel']:.4f}, "
              f"feature {row['loss_feature']:.4f})  {row['samples_per_s']:.0f} img/s", flush=True)
    log.close()
    return history
