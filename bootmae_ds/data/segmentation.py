"""Segmentation data: images with their label maps, from an ADE20K-style folder or from shards.

- A folder is read in place, as distributed: ``ROOT/images/<split>/<name>.jpg`` (or .png, .webp)
  with ``ROOT/annotations/<split>/<name>.png``, a single-channel PNG of class indices of the image's
  size (ADE20K: 0 = "other", 1..150 the classes). The pairs are checked when the source opens, from
  the file headers only: an image without its label map, or with a label map of another size,
  stops the run naming the file (status 2) before any work.
- Shards (``data_prep/build_shards.py SRC OUT --segmentation <split>``) hold per sample the image
  (``KEY.jpg``), the label map (``KEY.seg.png``) and ``KEY.json``; the builder checked the pairs.

Both yield ``RawSample.data = (image bytes, label-map bytes)``; decoding and the joint augmentation
happen in the loader workers (``bootmae_ds/segment/data.py``). A training folder's pairs are
shuffled with the run seed before they are cut into virtual shards, as an ImageFolder's files are.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bootmae_ds.config.base import InputError
from bootmae_ds.data import plan
from bootmae_ds.data.shards import MANIFEST_NAME, SEG_MEMBER, image_member, make_key
from bootmae_ds.data.sources import (
    FOLDER_SHARD_SIZE,
    RawSample,
    ShardSpec,
    Source,
    TarSource,
    Wanted,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class SegmentationDataError(InputError, ValueError):
    """A segmentation dataset that cannot be used; the message names the file and what to do."""


def label_path(root: Path, image_rel: str) -> Path:
    """``images/<split>/<name>.<ext>`` -> ``ROOT/annotations/<split>/<name>.png``."""
    parts = Path(image_rel).parts
    return root / "annotations" / Path(*parts[1:]).with_suffix(".png")


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as err:
        raise SegmentationDataError(f"{path}: unreadable image header ({err}); fix or remove the file") from None


def scan_pairs(root: str | Path, split: str) -> list[str]:
    """The images of ``ROOT/images/<split>`` (relative paths, sorted) after checking that each has a
    label map of its size in ``ROOT/annotations/<split>``; raises SegmentationDataError otherwise."""
    root = Path(root)
    folder = root / "images" / split
    if not folder.is_dir():
        raise SegmentationDataError(
            f"{folder}: no such folder; an ADE20K-style root holds images/<split>/ and annotations/<split>/ "
            f"(ADEChallengeData2016 as distributed), set data.train/data.val and data.*_split")
    images = sorted(p.relative_to(root).as_posix() for p in folder.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise SegmentationDataError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [rel for rel in images if not label_path(root, rel).is_file()]
    if missing:
        raise SegmentationDataError(
            f"{root / missing[0]}: no label map {label_path(root, missing[0])} ({len(missing)} of {len(images)} "
            f"images lack theirs); add them or remove those images")
    for rel in images:
        size, label_size = _header_size(root / rel), _header_size(label_path(root, rel))
        if size != label_size:
            raise SegmentationDataError(
                f"{label_path(root, rel)}: label map of {label_size[0]}x{label_size[1]} for an image of "
                f"{size[0]}x{size[1]} ({root / rel}); label maps must have their image's size")
    return images


def decode_label(data: bytes) -> np.ndarray:
    """A PNG label map -> ``uint8 [H, W]`` class indices (palette PNGs give their indices)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"label map of mode {image.mode}: expected a single-channel (L or P) PNG")
        return np.asarray(image, dtype=np.uint8)


class SegFolderSource(Source):
    """An ADE20K-style split read file by file, in virtual shards of ``FOLDER_SHARD_SIZE`` pairs
    (shuffled with ``seed`` unless ``seed`` is None: evaluation keeps the sorted order)."""

    def __init__(self, root: str | Path, split: str, seed: int | None = 0) -> None:
        self.root = Path(root)
        images = scan_pairs(self.root, split)
        if seed is not None:
            images = [images[i] for i in plan.file_order(seed, len(images))]
        self.images = images
        n = len(images)
        self.shards = [ShardSpec(f"{self.root}/images/{split}#{i}", min(FOLDER_SHARD_SIZE, n - i))
                       for i in range(0, n, FOLDER_SHARD_SIZE)]
        self.description = f"segmentation folder {self.root} ({split}: {n} images)"

    def read(self, shard: int, start: int, stop: int, wanted: Wanted) -> Iterator[tuple[int, RawSample]]:
        base = shard * FOLDER_SHARD_SIZE
        for p in range(start, stop):
            if not wanted(p):
                continue
            rel = self.images[base + p]
            key = make_key(base + p, rel)
            path = self.root / rel
            try:
                pair = (path.read_bytes(), label_path(self.root, rel).read_bytes())
                yield p, RawSample(key, pair, 0, None, str(path))
            except OSError as err:
                yield p, RawSample(key, None, 0, f"{rel}: unreadable ({err})", str(path))


class SegTarSource(TarSource):
    """Segmentation shards: each sample's image and ``seg.png`` label map."""

    def _sample(self, key: str, parts: dict[str, bytes], shard_name: str, origin: str) -> RawSample:
        ext = image_member(parts)
        if ext is None or SEG_MEMBER not in parts:
            return RawSample(key, None, 0, f"{shard_name}: sample {key} lacks an image or .{SEG_MEMBER} "
                             f"member (not a segmentation shard?)", origin)
        return RawSample(key, (parts[ext], parts[SEG_MEMBER]), 0, None, origin)


def open_segmentation_source(spec: str, split: str, seed: int | None, cache_dir: str | None = None,
                             url_template: str | None = None) -> Source:
    """The pairs named by ``spec``: ``demo`` (the demo set's ``split``), an ADE20K-style root, or a
    segmentation shards' manifest.json (or its folder). ``seed`` shuffles a folder's pairs."""
    if spec == "demo":
        from bootmae_ds.data.demo_segmentation import ensure_demo_segmentation

        return SegFolderSource(ensure_demo_segmentation(cache_dir), split, seed)
    path = Path(spec)
    if spec.endswith(".json") or (path / MANIFEST_NAME).is_file():
        return SegTarSource.from_manifest(path if spec.endswith(".json") else path / MANIFEST_NAME, url_template)
    if path.is_dir():
        return SegFolderSource(path, split, seed)
    raise SegmentationDataError(
        f"{spec!r}: no such directory or manifest; give an ADE20K-style root (images/, annotations/), "
        f"the manifest.json of segmentation shards, or 'demo'")
