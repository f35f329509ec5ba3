"""COCO instance annotations, read in place: checked once, kept compact, one sample at a time.

    split = open_coco_split(root, "train2017", train=True)   # ROOT/train2017/, ROOT/annotations/instances_train2017.json
    sample = read_sample(split, index, epoch, seed=0, hflip=0.5)

Checks at opening (each failure is one ``CocoError`` line naming the file, the image or the
annotation, and what to do; the launcher exits with status 2 before training starts): the json
parses and has ``images``, ``annotations``, ``categories``; ids are unique; every annotation names
an image and a category of the file; every box lies inside its image (1 px of slack for rounding);
every image file exists (one directory listing, not a stat per file).

Training keeps what mmdetection and detectron2 keep: images with at least one object, where an
object is a non-crowd annotation with a box at least 1 px wide and high; crowd regions are not
trained on (COCOeval ignores detections on them). Evaluation keeps every image of the split.

The records of a split are pickled into one byte array (detectron2's trick): forked loader workers
then share a few numpy buffers instead of touching, and so copying, millions of Python objects.
Categories map to contiguous labels 1..K in the order of their ids (0 is the background).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import InputError
from .seeds import mix_seed
from .transforms import decode_rgb

BOX_SLACK = 1.0  # px a box may pass its image's border by (rounding in the released files)


class CocoError(InputError, ValueError):
    """A COCO json or image folder that cannot be used; the message names it and what to do."""


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation json) of ``split`` in a COCO directory as distributed."""
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


@dataclass
class CocoSplit:
    """One split, checked: its images' records packed in one buffer, and the category table."""

    images_dir: Path
    json_path: Path
    category_ids: list[int]  # label i + 1 <-> category_ids[i]
    category_names: list[str]
    image_ids: np.ndarray  # [N] int64, the images this split uses, sorted
    flags: np.ndarray  # [N] uint8, 1 = landscape (width > height): mmdetection's group flag
    _buffer: np.ndarray  # the pickled records, back to back
    _offsets: np.ndarray  # [N + 1] int64 byte offsets into _buffer

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, index: int) -> dict[str, Any]:
        """``{"id", "file_name", "height", "width", "boxes" [K, 4] xyxy, "labels" [K],
        "segmentations" (K COCO polygons or RLEs)}`` of image ``index``."""
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[lo:hi].tobytes())

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CocoError(f"{path}: missing; data.root must hold annotations/instances_<split>.json "
                        f"(COCO as distributed), or set data.train / data.val to the split names it has")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CocoError(f"{path}: not a readable json file ({type(err).__name__}: {err}); restore it") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if not isinstance(data, dict) or missing:
        raise CocoError(f"{path}: not a COCO instances file (no list {missing}); use instances_<split>.json")
    return data


def _unique(items: list[dict[str, Any]], what: str, path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for item in items:
        key = item.get("id")
        if not isinstance(key, int) or key in out:
            raise CocoError(f"{path}: {what} id {key!r} is {'repeated' if key in out else 'not an integer'}; "
                            f"every {what} needs its own integer id")
        out[key] = item
    return out


def _check_annotation(ann: dict[str, Any], images: dict[int, dict], categories: dict[int, dict],
                      path: Path) -> None:
    """An annotation's image, category and box, each named when wrong."""
    aid = ann["id"]
    image = images.get(ann.get("image_id"))  # type: ignore[arg-type]
    if image is None:
        raise CocoError(f"{path}: annotation {aid} names image_id {ann.get('image_id')!r}, which is not "
                        f"among the file's images; remove the annotation or add the image")
    if ann.get("category_id") not in categories:
        raise CocoError(f"{path}: annotation {aid} (image {image['id']}, {image.get('file_name')}) has "
                        f"category_id {ann.get('category_id')!r}, which is not among the categories "
                        f"{sorted(categories)[:12]}{' ...' if len(categories) > 12 else ''}; fix its "
                        f"category_id or add the category")
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise CocoError(f"{path}: annotation {aid} (image {image['id']}) has bbox {box!r}; "
                        f"expected [x, y, width, height]")
    x, y, w, h = box
    W, H = image["width"], image["height"]
    if w < 0 or h < 0 or x < -BOX_SLACK or y < -BOX_SLACK or x + w > W + BOX_SLACK or y + h > H + BOX_SLACK:
        raise CocoError(f"{path}: annotation {aid} (image {image['id']}, {image.get('file_name')}) has bbox "
                        f"[x, y, w, h] = {box}, outside its {W}x{H} image; fix or remove the annotation")


def _check_images(images: dict[int, dict[str, Any]], images_dir: Path, path: Path) -> None:
    if not images_dir.is_dir():
        raise CocoError(f"{images_dir}: missing; the images of {path.name} belong there (COCO as distributed)")
    present = {entry.name for entry in os.scandir(images_dir)}
    for image in images.values():
        name = image.get("file_name")
        if not isinstance(name, str) or not isinstance(image.get("width"), int) or not isinstance(image.get("height"), int):
            raise CocoError(f"{path}: image {image['id']} needs file_name, width and height; it has "
                            f"{sorted(image)}")
        if name not in present and not (images_dir / name).is_file():  # a sub-folder path is allowed
            raise CocoError(f"{path}: image {image['id']} names {images_dir / name}, which does not exist; "
                            f"restore the file or remove the image from the json")


def _is_object(ann: dict[str, Any]) -> bool:
    """A training target: not a crowd region, a box at least 1 px wide and high (mmdetection)."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1


def _record(image: dict[str, Any], anns: list[dict[str, Any]], labels: dict[int, int]) -> dict[str, Any]:
    objects = [a for a in anns if _is_object(a)]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in objects], dtype=np.float32).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image["width"])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image["height"])
    return {"id": image["id"], "file_name": image["file_name"], "height": image["height"],
            "width": image["width"], "boxes": boxes,
            "labels": np.array([labels[a["category_id"]] for a in objects], dtype=np.int64),
            "segmentations": [a.get("segmentation") for a in objects]}


def open_coco_split(root: str | Path, split: str, train: bool, limit: int | None = None) -> CocoSplit:
    """Check and pack ``split`` of ``root`` (see the module docstring). ``train`` keeps only images
    with objects; ``limit`` keeps the first N images by id."""
    images_dir, path = split_paths(root, split)
    data = _load_json(path)
    images = _unique(data["images"], "image", path)
    categories = _unique(data["categories"], "category", path)
    if not categories:
        raise CocoError(f"{path}: no categories; a detection set needs at least one")
    annotations = _unique(data["annotations"], "annotation", path)
    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    for ann in annotations.values():
        _check_annotation(ann, images, categories, path)
        per_image[ann["image_id"]].append(ann)
    ids = sorted(i for i in images if not train or any(_is_object(a) for a in per_image[i]))
    if limit is not None:
        ids = ids[:limit]
    used = {i: images[i] for i in ids}
    _check_images(used, images_dir, path)
    if not ids:
        raise CocoError(f"{path}: no image {'with objects ' if train else ''}to use")
    category_ids = sorted(categories)
    labels = {c: i + 1 for i, c in enumerate(category_ids)}
    blobs = [pickle.dumps(_record(used[i], per_image[i], labels), protocol=pickle.HIGHEST_PROTOCOL) for i in ids]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return CocoSplit(images_dir, path, category_ids, [str(categories[c].get("name", c)) for c in category_ids],
                     np.array(ids, dtype=np.int64),
                     np.array([used[i]["width"] > used[i]["height"] for i in ids], dtype=np.uint8),
                     np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)


def load_coco_api(json_path: Path) -> Any:
    """pycocotools' ``COCO`` of a json, without its progress prints (COCOeval's ground truth)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(json_path))


# -- one sample ----------------------------------------------------------------------------------
def decode_masks(segmentations: list[Any], height: int, width: int) -> torch.Tensor:
    """COCO polygons / RLEs -> uint8 ``[K, H, W]`` (pycocotools' rasteriser, as ``annToMask``)."""
    from pycocotools import mask as mask_utils

    if not segmentations:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    out = np.empty((len(segmentations), height, width), dtype=np.uint8)
    with warnings.catch_warnings():  # pycocotools 2.0 under numpy 2 warns on every decode
        warnings.simplefilter("ignore", DeprecationWarning)
        for k, segm in enumerate(segmentations):
            if isinstance(segm, list):  # polygons of one object
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
            elif isinstance(segm.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segm, height, width)
            else:
                rle = segm
            out[k] = mask_utils.decode(rle)
    return torch.from_numpy(out)


def flip_target(target: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """A horizontally flipped image's target: boxes mirrored (x1' = W - x2, x2' = W - x1), masks flipped."""
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return target | {"boxes": boxes, "masks": target["masks"].flip(-1)}


def read_sample(split: CocoSplit, index: int, epoch: int, seed: int, hflip: float) -> dict[str, Any]:
    """Image ``index`` of ``split``: ``{"image": uint8 [3, H, W], "target": {boxes [K, 4] xyxy,
    labels [K], masks uint8 [K, H, W]}, "id"}``, flipped with probability ``hflip`` by a generator
    seeded with (seed, epoch, image id): the same draw in every run and after every resume.
    Raises (OSError, ValueError, ...) when the file does not decode or is not the json's size."""
    rec = split.record(index)
    image = decode_rgb((split.images_dir / rec["file_name"]).read_bytes())
    if tuple(image.shape[1:]) != (rec["height"], rec["width"]):
        raise ValueError(f"{rec['file_name']}: decoded {image.shape[2]}x{image.shape[1]}, the json says "
                         f"{rec['width']}x{rec['height']}")
    target = {"boxes": torch.from_numpy(rec["boxes"]), "labels": torch.from_numpy(rec["labels"]),
              "masks": decode_masks(rec["segmentations"], rec["height"], rec["width"])}
    if hflip > 0:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, rec["id"]) % 2**63)
        if torch.rand(1, generator=g).item() < hflip:
            image, target = image.flip(-1), flip_target(target, rec["width"])
    return {"image": image.contiguous(), "target": target, "id": rec["id"]}
