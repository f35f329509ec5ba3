"""The demo detection set: the demo digits pasted on textured canvases, written as COCO.

Each canvas (64 x 64 RGB PNG) holds 0 to 4 digits of scikit-learn's set, each upsampled to a side
of 14-30 px, tinted, and pasted where it overlaps the others' boxes by at most 30% IoU; every
digit is an instance of its class ("0" .. "9", category ids 1 .. 10) with its box and its mask (the
pixels the digit covers, minus those a later digit hides), written as compressed RLE. The training
canvases use the demo's 1,500 training digits, the validation canvases its 297 test digits. About
5% of the canvases are empty: training drops them as COCO training does, evaluation keeps them.

    root = ensure_demo_coco()   # <cache>/coco-digits-v1/{train,val}/, annotations/instances_{train,val}.json

Built once per cache directory, atomically (a racing rank keeps the winner's build); the bytes are
the same on every build.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .demo import default_cache_dir, demo_split

NAME = "coco-digits-v1"
CANVAS = 64
SIDES = (14, 30)
MAX_DIGITS = 4
MAX_IOU = 0.3
COUNTS = {"train": 480, "val": 120}
SEEDS = {"train": 1, "val": 2}
SPLITS = tuple(COUNTS)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two (x, y, w, h) boxes."""
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dark, smooth texture: coarse noise upsampled, in a random grey-blue tint. [H, W, 3] float."""
    coarse = rng.uniform(0, 70, size=(8, 8)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((CANVAS, CANVAS), Image.BICUBIC))
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    return np.clip(smooth, 0, 255)[..., None] * tint


def _digit(pixels: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 digit (0..16) upsampled to ``side`` px, intensity 0..1. [side, side] float."""
    grey = Image.fromarray((pixels * (255 / 16)).astype(np.float32), mode="F")
    ink = np.clip(np.asarray(grey.resize((side, side), Image.BICUBIC)) / 255.0, 0, 1)
    return np.where(ink > 0.2, ink, 0.0)  # no faint square around the digit


def _canvas(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """One canvas: uint8 [H, W, 3] and its objects (category id, full-canvas mask)."""
    canvas = _background(rng)
    count = 0 if rng.random() < 0.05 else int(rng.integers(1, MAX_DIGITS + 1))
    placed: list[tuple[int, int, int, int]] = []
    objects: list[dict[str, Any]] = []
    for _ in range(count):
        for _attempt in range(20):
            side = int(rng.integers(SIDES[0], SIDES[1] + 1))
            x, y = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
            if all(_box_iou((x, y, side, side), p) <= MAX_IOU for p in placed):
                break
        else:
            continue
        which = int(rng.integers(len(images)))
        ink = _digit(images[which], side)
        colour = rng.uniform(160, 255, size=3).astype(np.float32)
        region = canvas[y : y + side, x : x + side]
        region[:] = region * (1 - ink[..., None]) + colour * ink[..., None]
        mask = np.zeros((CANVAS, CANVAS), dtype=bool)
        mask[y : y + side, x : x + side] = ink > 0.3
        for obj in objects:  # what this digit paints over is no longer the earlier one's
            obj["mask"] &= ~mask
        placed.append((x, y, side, side))
        objects.append({"category_id": int(targets[which]) + 1, "mask": mask})
    return np.round(canvas).clip(0, 255).astype(np.uint8), [o for o in objects if o["mask"].any()]


def _annotation(obj: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": obj["category_id"], "bbox": [x, y, w, h],
            "area": float(mask_utils.area(rle)), "iscrowd": 0,
            "segmentation": {"size": [CANVAS, CANVAS], "counts": rle["counts"].decode("ascii")}}


def _write_split(root: Path, split: str, images: np.ndarray, targets: np.ndarray) -> None:
    rng = np.random.default_rng(SEEDS[split])
    (root / split).mkdir(parents=True)
    records, annotations = [], []
    for image_id in range(1, COUNTS[split] + 1):
        pixels, objects = _canvas(rng, images, targets)
        name = f"{image_id:06d}.png"
        out = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(out, format="PNG")
        (root / split / name).write_bytes(out.getvalue())
        records.append({"id": image_id, "file_name": name, "width": CANVAS, "height": CANVAS})
        for obj in objects:
            annotations.append(_annotation(obj, len(annotations) + 1, image_id))
    categories = [{"id": c + 1, "name": str(c), "supercategory": "digit"} for c in range(10)]
    data = {"info": {"description": "bootmae-ds demo: scikit-learn digits on 64x64 canvases", "version": NAME},
            "images": records, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def build_demo_coco(out: str | Path) -> Path:
    """Build the set into ``out`` atomically; an existing complete build is kept."""
    out = Path(out)
    if _complete(out):
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    parts = demo_split()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for split, digit_split in zip(SPLITS, ("train", "test")):
            index = parts[digit_split]
            _write_split(tmp, split, digits.images[index], digits.target[index])
        try:
            os.rename(tmp, out)
        except OSError:
            if not _complete(out):  # not a lost race: something else is in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(root: Path) -> bool:
    return all((root / "annotations" / f"instances_{s}.json").is_file() for s in SPLITS)


def ensure_demo_coco(cache_dir: str | Path | None = None) -> Path:
    """The demo set under ``cache_dir`` (default: $BOOTMAE_DS_CACHE, else ~/.cache/bootmae_ds)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return build_demo_coco(root / NAME)
