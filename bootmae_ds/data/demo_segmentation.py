"""The segmentation demo set: the demo digits pasted on textured canvases, in ADE20K's layout.

Each image is a canvas of 48-80 x 64-112 px (sizes vary, as ADE20K's do) with a dark, smooth colour
field, stripes of a random angle and noise, and two or three scikit-learn digits (8x8, upsampled to
26-34 px, in a light colour, as the pre-training digits are light on dark; not overlapping) pasted
onto it. The label map follows ADE20K's convention: 0 = "other"
(ignored with ``reduce_zero_label``: here the soft rim of each digit's strokes), 1 = background,
2 + d = digit d; so the segmentor sees 11 classes (background and the ten digits).

Training canvases use the digits of the demo pre-training's training split, validation canvases
those of its test split (digits no pre-training run has seen). The bytes are identical on every
build; ``ensure_demo_segmentation`` builds ``<cache>/digits-seg-v1`` on first use, atomically, as
the pre-training demo shards are built.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from bootmae_ds.data.demo import default_cache_dir, demo_split

DEMO_NAME = "digits-seg-v3"
SPLITS = {"training": ("train", 600), "validation": ("test", 150)}  # our split -> (digit split, images)
CLASSES = ["background", *(f"digit {d}" for d in range(10))]  # after reduce_zero_label


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float ``[h, w, 3]`` background in 0..255: colour field, stripes, noise."""
    coarse = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    field = np.asarray(coarse, dtype=np.float32)
    angle, period = rng.random() * math.pi, 4 + rng.random() * 8
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    field = field * 0.15 + (stripes[..., None] * 8 * rng.random(3)) + rng.normal(0, 4, (h, w, 3))
    return np.clip(field, 0, 255)


def _place(rng: np.random.Generator, h: int, w: int, side: int, taken: list[tuple[int, int, int, int]]
           ) -> tuple[int, int] | None:
    """A top-left corner for a ``side`` square that overlaps no box of ``taken`` (20 tries)."""
    for _ in range(20):
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        if all(top + side <= t or t + s <= top or left + side <= lft or lft + s <= left for t, lft, s, _ in taken):
            return top, left
    return None


def _canvas(rng: np.random.Generator, digits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 image ``[h, w, 3]`` and its uint8 label map ``[h, w]``."""
    h, w = int(rng.integers(48, 81)), int(rng.integers(64, 113))
    image = _texture(rng, h, w)
    label = np.ones((h, w), dtype=np.uint8)
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(2, 4))):
        i, side = int(rng.integers(len(digits))), int(rng.integers(26, 35))
        corner = _place(rng, h, w, min(side, h, w), taken)
        if corner is None:
            continue
        top, left = corner
        side = min(side, h, w)
        taken.append((top, left, side, i))
        grey = Image.fromarray(np.round(digits[i] * (255 / 16)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        alpha = np.asarray(grey, dtype=np.float32)[..., None] / 255  # [s, s, 1]
        colour = np.clip(rng.uniform(200, 255) + rng.uniform(-25, 25, 3), 0, 255)
        patch = image[top:top + side, left:left + side]
        image[top:top + side, left:left + side] = patch * (1 - alpha) + colour * alpha
        strokes, rim = alpha[..., 0] > 0.5, (alpha[..., 0] > 0.2) & (alpha[..., 0] <= 0.5)
        region = label[top:top + side, left:left + side]
        region[rim] = 0
        region[strokes] = 2 + int(targets[i])
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def build_demo_segmentation(out: str | Path) -> Path:
    """Build ``OUT/{images,annotations}/{training,validation}`` atomically; a complete build is kept."""
    out = Path(out)
    if _complete(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but holds no complete segmentation demo; remove it or choose "
                              f"another data.cache_dir")
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = demo_split()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for split, (digit_split, count) in SPLITS.items():
            rng = np.random.default_rng([7, len(split)])
            idx = splits[digit_split]
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            for n in range(count):
                image, label = _canvas(rng, digits.images[idx], digits.target[idx])
                name = f"demo_{split}_{n:05d}"
                Image.fromarray(image).save(tmp / "images" / split / f"{name}.jpg", quality=95)
                Image.fromarray(label, mode="L").save(tmp / "annotations" / split / f"{name}.png")
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        try:
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
        except OSError:
            if not _complete(out):  # not a lost race with another rank: something is in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(root: Path) -> bool:
    return (root / "classes.txt").is_file()


def ensure_demo_segmentation(cache_dir: str | Path | None = None) -> Path:
    """The demo set under ``cache_dir`` (default: $BOOTMAE_DS_CACHE, else ~/.cache/bootmae_ds)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return build_demo_segmentation(root / DEMO_NAME)
