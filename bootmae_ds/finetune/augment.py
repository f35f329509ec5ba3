"""Fine-tuning's device-side augmentation: normalisation, random erasing, Mixup/CutMix and the
soft targets they produce (the worker half is ``bootmae_ds.data.labelled.LabelledTransform``).

Everything here draws from the process RNGs, which checkpoints save, so a resumed run continues
their streams exactly.
"""

from __future__ import annotations

import torch

from ..config import FinetuneConfig


class DeviceAugment:
    """uint8 batch -> normalised, randomly erased, mixed batch and soft targets, on the device."""

    def __init__(self, cfg: FinetuneConfig, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> None:
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        a = cfg.augment
        self.num_classes = cfg.model.num_classes
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.erase = RandomErasing(a.reprob, mode=a.remode, max_count=a.recount, device=device) if a.reprob else None
        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                           switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                           label_smoothing=a.label_smoothing, num_classes=self.num_classes) if a.mixes else None
        self.smoothing = a.label_smoothing

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (images [B, 3, S, S] fp32, soft targets [B, K] fp32). ``labels`` are in range: the
        trainer checks them on the host before the batch comes over (``data.labelled.check_labels``)."""
        x = self.normalise(images)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            return self.mixup(x, labels)
        off = self.smoothing / self.num_classes
        targets = torch.full((len(labels), self.num_classes), off, device=x.device)
        return x, targets.scatter_(1, labels[:, None], 1.0 - self.smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``, computed in fp32."""
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
