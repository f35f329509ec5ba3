"""Per-sample transform in the loader workers: decode, RandomResizedCrop, flip, BootMAE mask.

Everything random about a sample comes from one ``random.Random`` seeded by
(seed, epoch, sample key), never from the global torch RNG, so a batch is reproducible from its
keys alone and a resumed run re-creates exactly the augmentations it would have drawn.
Images stay uint8: normalisation happens on the accelerator, which is cheaper than in the
worker and keeps host-to-device copies 4x smaller.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from bootmae_ds.config import BootMAEConfig
from bootmae_ds.data.masking import MaskGenerator
from bootmae_ds.data.seeds import mix_seed

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def decode_rgb(data: bytes | torch.Tensor) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP bytes (or an already decoded uint8 image) -> uint8 [3, H, W]."""
    if isinstance(data, torch.Tensor):
        return data
    # bytearray: torch.frombuffer needs a writable buffer to avoid a warning per call.
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec (not a dependency
        # yet) and warns on every call; once per image would flood logs and test reports.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(encoded, mode=ImageReadMode.RGB)


def crop_params(
    rng: random.Random, height: int, width: int,
    scale: tuple[float, float], ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area fraction uniform in ``scale``, log-uniform
    aspect ratio in ``ratio``, 10 tries, then a centre crop clamped to ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.random() * (height - h + 1)), int(rng.random() * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class SampleTransform:
    """Decode + crop + flip + mask for one sample, all randomness from its own RNG."""

    size: int
    masker: MaskGenerator
    seed: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: bool = True

    @classmethod
    def from_config(cls, cfg: BootMAEConfig) -> SampleTransform:
        d = cfg.data
        return cls(
            size=cfg.model.img_size,
            masker=MaskGenerator.from_config(cfg),
            seed=cfg.run.seed,
            scale=tuple(d.crop_scale),
            ratio=tuple(d.crop_ratio),
            interpolation=d.interpolation,
            hflip=d.hflip,
        )

    def __call__(
        self, data: bytes | torch.Tensor, epoch: int, key: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image uint8 [3, size, size], mask bool [N]); raises if ``data`` does not decode."""
        rng = random.Random(mix_seed(self.seed, epoch, key))
        image = decode_rgb(data)  # [3, H, W]
        top, left, h, w = crop_params(rng, image.shape[-2], image.shape[-1], self.scale, self.ratio)
        image = TF.resized_crop(
            image,
            top,
            left,
            h,
            w,
            [self.size, self.size],
            interpolation=_INTERP[self.interpolation],
            antialias=True,
        )
        if self.hflip and rng.random() < 0.5:
            image = image.flip(-1)
        return image.contiguous(), self.masker(rng)
