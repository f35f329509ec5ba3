"""Fine-tuning data: timm's training transform in the loader workers, erasing and mixing on the
device, and a held-out loader that gives every evaluation image to exactly one rank.

The worker half is timm's ``create_transform(..., use_prefetcher=True)`` (RandomResizedCrop,
flip, RandAugment; uint8 out), run under random generators seeded from (seed, epoch, sample key)
so a resumed run re-draws exactly the augmentations of an uninterrupted one. The device half
(normalisation, RandomErasing, Mixup/CutMix) draws from the process RNGs, which checkpoints save.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.seeds import mix_seed
from ..data.sources import Source
from ..data.transforms import decode_rgb
from ..knn import eval_transform
from .config import AugmentConfig, FinetuneConfig


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run a block under python/numpy/torch generators seeded with ``seed``, then restore them."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed % 2**63)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def to_pil(data: bytes | torch.Tensor) -> Image.Image:
    if isinstance(data, torch.Tensor):
        return Image.fromarray(data.permute(1, 2, 0).numpy())
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with Pillow < 13's meaning of 0 bits (a black image): RandAugment's
    PosterizeIncreasing asks for 0 bits at magnitude 10, which Pillow 13 rejects."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> None:
    """Point every Posterize op of the RandAugment inside ``transform`` at :func:`_posterize`."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


@dataclass
class LabelledTransform:
    """Decode + timm training transform for one sample; returns ``(uint8 [3, S, S], None)``."""

    size: int
    seed: int
    augment: AugmentConfig
    mean: tuple[float, float, float]

    def __post_init__(self) -> None:
        from timm.data import create_transform

        a = self.augment
        self.transform = create_transform(
            self.size, is_training=True, scale=a.crop_scale, ratio=a.crop_ratio, hflip=a.hflip,
            color_jitter=a.color_jitter or 0.0, auto_augment=a.auto_augment, interpolation=a.interpolation,
            mean=self.mean, use_prefetcher=True)
        _patch_posterize(self.transform)

    def __call__(self, data: bytes | torch.Tensor, epoch: int, key: str) -> tuple[torch.Tensor, None]:
        image = to_pil(data)
        with seeded_rngs(mix_seed(self.seed, epoch, key)):
            out = self.transform(image)
        return torch.as_tensor(np.asarray(out)).contiguous(), None


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
        """-> (images [B, 3, S, S] fp32, soft targets [B, K] fp32)."""
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"sample {keys[i]}: label {int(labels[i])} outside 0..{self.num_classes - 1}; "
                             f"set model.num_classes to the number of classes of data.train")
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


class _EvalShare(IterableDataset):
    """Rank ``rank``'s evaluation images: sample ``i`` (in shard order) goes to rank ``i % world``."""

    def __init__(self, source: Source, size: int, crop_pct: float, rank: int, world: int,
                 batch_size: int, limit: int | None) -> None:
        super().__init__()
        self.source, self.size, self.crop_pct = source, size, crop_pct
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.limit = min(limit or source.num_samples, source.num_samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        images, labels, base = [], [], 0
        for shard, spec in enumerate(self.source.shards):
            stop = min(spec.count, self.limit - base)
            if stop <= 0:
                break

            def mine(p: int, base: int = base) -> bool:
                i = base + p
                return i % self.world == self.rank and (i // self.world) % workers == worker

            for _, raw in self.source.read(shard, 0, stop, mine):
                if raw.error is not None or raw.data is None:
                    raise ValueError(f"evaluation sample {raw.key}: {raw.error or 'no image'}; fix or "
                                     f"rebuild the shard (python data_prep/verify_shards.py)")
                images.append(eval_transform(decode_rgb(raw.data), self.size, self.crop_pct))
                labels.append(raw.label)
                if len(images) == self.batch_size:
                    yield {"images": torch.stack(images), "labels": torch.tensor(labels)}
                    images, labels = [], []
            base += spec.count
        if images:
            yield {"images": torch.stack(images), "labels": torch.tensor(labels)}


def eval_batches(source: Source, size: int, crop_pct: float, rank: int, world: int, batch_size: int,
                 limit: int | None, num_workers: int) -> DataLoader:
    """Centre-cropped uint8 batches of this rank's share of ``source`` (each image on one rank)."""
    share = _EvalShare(source, size, crop_pct, rank, world, batch_size, limit)
    # A private generator: worker seeds must not come from (and advance) the training RNG.
    return DataLoader(share, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(rank))
