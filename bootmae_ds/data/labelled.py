"""Labelled images for the classification jobs (fine-tuning, probing, k-NN): timm's training
transform run per sample in the loader workers, and the held-out images, centre-cropped.

The training transform is timm's ``create_transform(..., use_prefetcher=True)``
(RandomResizedCrop, flip, RandAugment; uint8 out), run under random generators seeded from
(seed, epoch, sample key), so a resumed run re-draws exactly the augmentations of an
uninterrupted one. Held-out images get the official evaluation view (Pillow bicubic resize of the
shorter side to ``int(size / crop_pct)``, centre crop); ``eval_batches`` gives every image to
exactly one rank.
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

from bootmae_ds.config import BootMAEConfig, InputError
from bootmae_ds.config.finetune import AugmentConfig
from bootmae_ds.data.loader import iterate_and_join
from bootmae_ds.data.seeds import mix_seed
from bootmae_ds.data.sources import Source
from bootmae_ds.data.transforms import decode_rgb
from bootmae_ds.data.workers import eval_worker_options


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


class LabelError(InputError, ValueError):
    """A label outside ``0..model.num_classes-1``; the message names the sample."""


def check_labels(labels: torch.Tensor, num_classes: int, keys: list[str] | None) -> None:
    """Raise :class:`LabelError` naming the first sample whose label is outside ``0..K-1``.

    Training loops call it on the host copy of each batch, before it goes to the device (the
    trainers' ``watch(check=...)``): on a device tensor the test would stall the device."""
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        name = f"sample {keys[i]}" if keys else "an evaluation sample"
        raise LabelError(f"{name}: label {int(labels[i])} outside 0..{num_classes - 1}; set model.num_classes "
                         f"to the number of classes of the data")


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


@dataclass
class LabelledImages:
    """uint8 images ``[N, 3, S, S]`` with int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor


def open_eval_source(spec: str, cfg: BootMAEConfig) -> Source:
    """``demo`` / ``demo-test`` (the digits' splits) or anything ``data.train`` accepts."""
    from bootmae_ds.data.demo import ensure_demo_shards
    from bootmae_ds.data.shards import MANIFEST_NAME
    from bootmae_ds.data.sources import TarSource, open_source

    if spec in ("demo", "demo-test"):
        split = "train" if spec == "demo" else "test"
        return TarSource.from_manifest(ensure_demo_shards(cfg.data.cache_dir) / split / MANIFEST_NAME)
    return open_source(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": spec})}))


def eval_transform(image: torch.Tensor, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """The official evaluation view (BEiT/BootMAE ``build_transform(is_train=False)``, MAE's and
    timm's alike) on a uint8 ``[3, H, W]`` image, bit for bit: Pillow's bicubic resize of the
    shorter side to ``int(size / crop_pct)`` (truncated; the longer side to
    ``int(short * long / shorter)``, as torchvision's ``Resize(int)``), on every image, then the
    centre ``size x size`` crop (offsets ``round((H - size) / 2)``, torchvision's ``CenterCrop``).
    A preset that keeps small images whole (the demo's 32 px digits) says ``crop_pct: 1.0``:
    Pillow leaves an image already at the target size untouched."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    w, h = pil.size
    short = int(size / crop_pct)
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new != (w, h):
        pil = pil.resize(new, Image.Resampling.BICUBIC)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    if top < 0 or left < 0:
        raise ValueError(f"crop_pct={crop_pct}: the resized image {new} is smaller than the {size} px crop")
    out = np.asarray(pil)[top:top + size, left:left + size]
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()


def load_images(source: Source, size: int, limit: int | None = None, crop_pct: float = 0.875) -> LabelledImages:
    """The first ``limit`` readable samples of ``source`` in shard order (deterministic), in the
    evaluation view (:func:`eval_transform`)."""
    images, labels = [], []
    for shard in range(len(source.shards)):
        for _, sample in source.read(shard, 0, source.shards[shard].count, lambda _: True):
            if sample.error is not None or sample.data is None:
                continue
            images.append(eval_transform(decode_rgb(sample.data), size, crop_pct))
            labels.append(sample.label)
            if limit is not None and len(images) >= limit:
                return LabelledImages(torch.stack(images), torch.tensor(labels))
    if not images:
        raise ValueError(f"{source.description}: no readable labelled images")
    return LabelledImages(torch.stack(images), torch.tensor(labels))


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
        images, labels, indices, base = [], [], [], 0
        for shard, spec in enumerate(self.source.shards):
            stop = min(spec.count, self.limit - base)
            if stop <= 0:
                break

            def mine(p: int, base: int = base) -> bool:
                i = base + p
                return i % self.world == self.rank and (i // self.world) % workers == worker

            for p, raw in self.source.read(shard, 0, stop, mine):
                if raw.error is not None or raw.data is None:
                    raise ValueError(f"evaluation sample {raw.key}: {raw.error or 'no image'}; fix or "
                                     f"rebuild the shard (python data_prep/verify_shards.py)")
                images.append(eval_transform(decode_rgb(raw.data), self.size, self.crop_pct))
                labels.append(raw.label)
                indices.append(base + p)  # the sample's place in shard order: gathers restore it
                if len(images) == self.batch_size:
                    yield _eval_batch(images, labels, indices)
                    images, labels, indices = [], [], []
            base += spec.count
        if images:
            yield _eval_batch(images, labels, indices)


def _eval_batch(images: list[torch.Tensor], labels: list[int], indices: list[int]) -> dict[str, Any]:
    return {"images": torch.stack(images), "labels": torch.tensor(labels), "indices": torch.tensor(indices)}


def eval_batches(source: Source, size: int, crop_pct: float, rank: int, world: int, batch_size: int,
                 limit: int | None, num_workers: int) -> Iterator[dict[str, Any]]:
    """Centre-cropped uint8 batches of this rank's share of ``source`` (each image on one rank):
    ``images``, ``labels`` and ``indices`` (each image's position in shard order)."""
    share = _EvalShare(source, size, crop_pct, rank, world, batch_size, limit)
    # A private generator: worker seeds must not come from (and advance) the training RNG.
    loader = DataLoader(share, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(rank),
                        **eval_worker_options(share, num_workers))
    return iterate_and_join(loader)
