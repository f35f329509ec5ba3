"""The official probe's training augmentation, per sample in the loader workers.

MAE's ``main_linprobe.py``: ``RandomResizedCrop(224, interpolation=3)`` from ``util/crop.py``, then
``RandomHorizontalFlip``. That crop is not torchvision's 10-try loop but one draw (as BYOL's
TF code): area fraction uniform in ``scale``, log-uniform aspect ratio in ``ratio``,
``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``, each clamped to the image, then a
uniform position. The crop is resized (bicubic by default) to ``size`` x ``size``.

Everything random comes from one ``torch.Generator`` seeded by (seed, epoch, sample key), so a
resumed run re-draws exactly the crops of an uninterrupted one. Images stay uint8; normalisation
happens on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.labelled import to_pil
from ..data.seeds import mix_seed

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def single_draw_crop(g: torch.Generator, height: int, width: int, scale: tuple[float, float],
                     ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """MAE's crop box ``(top, left, h, w)`` drawn from ``g`` (see the module docstring)."""
    area = height * width
    target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
    log_r = torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).item()
    aspect = math.exp(log_r)
    w = min(round(math.sqrt(target * aspect)), width)
    h = min(round(math.sqrt(target / aspect)), height)
    top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
    left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
    return top, left, h, w


@dataclass
class ProbeTransform:
    """Decode, crop + resize, flip; returns ``(uint8 [3, size, size], None)``."""

    size: int
    seed: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: bool = True

    def __call__(self, data: bytes | torch.Tensor, epoch: int, key: str) -> tuple[torch.Tensor, None]:
        image = to_pil(data)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, key) % 2**63)
        top, left, h, w = single_draw_crop(g, image.height, image.width, self.scale, self.ratio)
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), _RESAMPLE[self.interpolation])
        if self.hflip and torch.rand(1, generator=g).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous(), None
