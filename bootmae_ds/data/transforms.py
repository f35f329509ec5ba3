"""Per-sample transform in the loader workers: decode, RandomResizedCrop, flip, BootMAE mask.

Everything random about a sample comes from one ``random.Random`` seeded by
(seed, epoch, sample key), never from the global torch RNG, so a batch is reproducible from its
keys alone and a resumed run re-creates exactly the augmentations it would have drawn.
Images stay uint8: normalisation happens on the accelerator, which is cheaper than in the
worker and keeps host-to-device copies 4x smaller.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from bootmae_ds.config import BootMAEConfig
from bootmae_ds.data.masking import MaskGenerator
from bootmae_ds.data.seeds import mix_seed

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


# The encodings a sample may hold: what the shard builder writes (JPEG, PNG, WebP) plus GIF,
# which ImageFolder trees may contain. Pillow would open many more (TIFF, PSD, ...) through
# decoders nobody here has fuzzed; such files count as corrupt samples instead.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def decode_rgb(data: bytes | torch.Tensor) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP/GIF bytes (or an already decoded uint8 image) -> uint8 [3, H, W].

    Damaged bytes raise a Python exception (OSError, ValueError, RuntimeError, ...); they never
    kill the process. ``torchvision.io.decode_image`` did on damaged PNGs: its libpng error path
    ends in SIGSEGV (``libpng error: IDAT: invalid distance too far back``, 249 of 400 fuzzed
    PNGs), which takes a training rank down. So Pillow parses every header (format, size) and
    decodes PNG, WebP and GIF (its PNG reader is its own code on zlib, not libpng);
    JPEG stays with torchvision's libjpeg-turbo decoder, which fuzzing never crashed and which
    is about 1.7x faster than Pillow's path to a tensor (bench/decode.py). A header that claims
    more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89.5 M by default: a damaged JPEG size
    field, a decompression bomb; raise it before the loader starts for datasets of huge images)
    is refused before pixel memory is allocated. Pixels equal ``decode_image``'s for 8-bit JPEG
    (RGB, grey, CMYK), PNG, WebP and GIF.
    """
    if isinstance(data, torch.Tensor):
        return data
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a sample that big is damage.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # torchvision 0.29 deprecates its codecs in favour of torchcodec (not a dependency yet)
        # and warns on every call; once per image would flood logs and test reports.
        warnings.simplefilter("ignore", DeprecationWarning)
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:  # the header only
            if image.format in ("JPEG", "MPO"):  # MPO: a JPEG with extra frames (cameras)
                # bytearray: torch.frombuffer needs a writable buffer to avoid a warning.
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(encoded, mode=ImageReadMode.RGB)
            if image.mode.startswith("I;16"):  # 16-bit grey PNG: keep the high byte
                grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
                return torch.from_numpy(grey).expand(3, *grey.shape).contiguous()
            rgb = image.convert("RGB")  # decodes everything; truncation raises OSError
    # np.array copies out of Pillow's read-only buffer: the tensor owns writable memory.
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


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
