"""The official segmentation pipelines: joint image + label augmentation in the loader workers,
and the held-out images resized for sliding-window scoring, each on exactly one rank.

Training (mmseg's train_pipeline of the official config), per sample with a generator seeded from
(seed, epoch, key), so a resumed run re-draws exactly the same augmentations:
``label_map`` and ``reduce_zero_label`` -> resize by a random ratio of ``img_scale`` keeping the aspect ratio
(bilinear for the image, nearest for the labels) -> random crop of ``model.img_size`` whose
largest class covers less than ``cat_max_ratio`` of the labelled pixels (up to 10 redraws) ->
flip -> PhotoMetricDistortion -> pad to the crop size. The geometric steps are torchvision
transforms v2 on an ``Image`` and a ``Mask`` together. mmseg pads after normalising (padded
pixels are 0 in the normalised image); here images stay uint8 until the device, so padding is
marked in the label map with ``PAD`` (-1) and :func:`device_batch` zeroes those pixels after
normalising and turns their labels into ``ignore_index``.

Evaluation: resize to ``img_scale`` keeping the ratio (or, multi-scale, the official SETR
resize per ratio), the label map kept at the original size (scores are computed there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config.segment import SegmentConfig
from ..data.labelled import LabelError
from ..data.loader import StreamingDataset, TrainLoader, iterate_and_join
from ..data.seeds import mix_seed
from ..data.segmentation import SegmentationDataError, decode_label, open_segmentation_source
from ..data.shards import ShardError
from ..data.sources import Source
from ..data.transforms import decode_rgb
from ..data.workers import eval_worker_options
from .augment import photometric_distortion

PAD = -1  # label of padded pixels (int16 label maps), told apart from ignored ones until the device
CROP_TRIES = 10  # mmseg RandomCrop's redraws for cat_max_ratio


def reduce_zero_label(label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ADE20K's labels: 0 ("other") -> ignored, 1..K -> 0..K-1, ``ignore_index`` stays ignored."""
    out = label.to(torch.int16) - 1
    return out.masked_fill((label == 0) | (label == ignore_index), ignore_index)


def prepare_labels(label: torch.Tensor, label_map: dict[int, int], reduce_zero: bool, ignore_index: int) -> torch.Tensor:
    """A decoded uint8 label map as training and scoring see it (int16): ``label_map`` first (raw
    value -> new value, mmseg's way of merging classes), then ``reduce_zero_label``."""
    if label_map:
        lut = torch.arange(256, dtype=torch.int16)
        for old, new in label_map.items():
            lut[old] = new
        label = lut[label.long()]
    return reduce_zero_label(label, ignore_index) if reduce_zero else label.to(torch.int16)


def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's ``imrescale`` size: the largest factor fitting (long, short) = ``scale``, rounded."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def setr_scale(height: int, width: int, short: float, crop: int) -> tuple[int, int]:
    """The official ``SETR_Resize(setr_multi_scale=True)``: short side max(``crop``, ``short``), ratio kept."""
    new_short = max(short, crop)
    target = (new_short * height / width, new_short) if height > width else (new_short, new_short * width / height)
    return rescale_size(height, width, target)


def _cv2_resize(array: torch.Tensor, size: tuple[int, int], interpolation: int) -> torch.Tensor:
    """OpenCV's resize of an ``[H, W]`` or ``[H, W, C]`` tensor to ``size`` = (h, w), as mmcv's
    ``imresize`` calls it (cv2 takes (w, h))."""
    import cv2

    out = cv2.resize(array.contiguous().numpy(), (size[1], size[0]), interpolation=interpolation)
    return torch.from_numpy(out.reshape(size[0], size[1], *array.shape[2:]))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> ``[3, *size]`` through OpenCV's ``INTER_LINEAR`` itself (mmcv's
    ``imresize``, which the official pipeline runs: fixed-point weights, not a float bilinear)."""
    import cv2

    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return _cv2_resize(image.permute(1, 2, 0), size, cv2.INTER_LINEAR).permute(2, 0, 1).contiguous()


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label map ``[H, W]`` -> ``size`` through OpenCV's ``INTER_NEAREST`` (mmcv's ``imrescale``
    with ``interpolation="nearest"``, as mmseg's Resize treats ``gt_semantic_seg``)."""
    import cv2

    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return _cv2_resize(label, size, cv2.INTER_NEAREST)


def decode_pair(data: tuple[bytes, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image ``[3, H, W]``, uint8 label map ``[H, W]``); ValueError when their sizes differ."""
    image = decode_rgb(data[0])
    label = torch.from_numpy(decode_label(data[1]).copy())
    if tuple(image.shape[-2:]) != tuple(label.shape):
        raise ValueError(f"label map of {tuple(label.shape)} for an image of {tuple(image.shape[-2:])}")
    return image, label


@dataclass
class SegTrainTransform:
    """Decode + the joint training augmentation; returns ``(uint8 [3, S, S], int16 [S, S])``."""

    crop: int
    seed: int
    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    reduce_zero_label: bool = True
    ignore_index: int = 255
    label_map: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: SegmentConfig) -> SegTrainTransform:
        d = cfg.data
        return cls(cfg.model.img_size, cfg.run.seed, d.img_scale, d.ratio_range, d.cat_max_ratio, d.hflip,
                   d.photometric, d.reduce_zero_label, d.ignore_index, dict(d.label_map))

    def __call__(self, data: tuple[bytes, bytes], epoch: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = decode_pair(data)
        label = prepare_labels(label, self.label_map, self.reduce_zero_label, self.ignore_index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, key) % 2**63)
        ratio = self.ratio_range[0] + (self.ratio_range[1] - self.ratio_range[0]) * torch.rand((), generator=g).item()
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        size = rescale_size(*image.shape[-2:], scale)
        pair = (tv_tensors.Image(resize_image(image, size)), tv_tensors.Mask(resize_label(label, size)))
        top, left, h, w = self._crop_box(pair[1], g)
        pair = tuple(TF.crop(t, top, left, h, w) for t in pair)
        if torch.rand((), generator=g).item() < self.hflip:
            pair = v2.RandomHorizontalFlip(p=1.0)(pair)
        image, label = pair
        if self.photometric:
            image = photometric_distortion(image.as_subclass(torch.Tensor), g)
        pad = [0, 0, self.crop - image.shape[-1], self.crop - image.shape[-2]]  # left, top, right, bottom
        image, label = v2.Pad(pad, fill={tv_tensors.Image: 0, tv_tensors.Mask: PAD})(
            (tv_tensors.Image(image), tv_tensors.Mask(label)))
        return image.as_subclass(torch.Tensor).contiguous(), label.as_subclass(torch.Tensor).contiguous()

    def _crop_box(self, label: torch.Tensor, g: torch.Generator) -> tuple[int, int, int, int]:
        """mmseg's RandomCrop box (top, left, h, w), redrawn while one class dominates."""
        H, W = label.shape[-2:]
        h, w = min(self.crop, H), min(self.crop, W)

        def draw() -> tuple[int, int, int, int]:
            top = int(torch.randint(0, H - h + 1, (), generator=g))
            left = int(torch.randint(0, W - w + 1, (), generator=g))
            return top, left, h, w

        box = draw()
        if self.cat_max_ratio < 1:
            for _ in range(CROP_TRIES):
                t, lft = box[0], box[1]
                values, counts = torch.unique(label[t:t + h, lft:lft + w], return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                box = draw()
        return box


def open_train_source(cfg: SegmentConfig) -> Source:
    """``data.train``, a folder's pairs shuffled with the run seed."""
    d = cfg.data
    return open_segmentation_source(d.train, d.train_split, cfg.run.seed, d.cache_dir, d.shard_url_template)


def build_segment_loader(cfg: SegmentConfig, *, rank: int, world_size: int, state: dict[str, Any] | None = None,
                         transform: Any = None, source: Source | None = None) -> TrainLoader:
    """This rank's streaming training loader over ``source`` (default: ``data.train``), with the
    pre-training loader's machinery: equal batches on every rank, exact mid-epoch resume, damaged
    samples replaced."""
    d = cfg.data
    source = source or open_train_source(cfg)
    source.check()
    total = source.num_samples if d.num_samples is None else min(d.num_samples, source.num_samples)
    dataset = StreamingDataset(source=source, transform=transform or SegTrainTransform.from_config(cfg), rank=rank,
                               world_size=world_size, workers=max(1, d.num_workers), batch_size=d.micro_batch_size,
                               seed=cfg.run.seed, shuffle_buffer=d.shuffle_buffer, num_samples=total)
    if dataset.num_batches == 0:
        raise ShardError(f"{source.description}: {total} samples give no micro-batch per rank "
                         f"(world size {world_size} x data.micro_batch_size {d.micro_batch_size})")
    return TrainLoader(dataset, d.num_workers, state, pin_memory=torch.cuda.is_available())


def check_labels(batch: dict[str, Any], num_classes: int, ignore_index: int) -> None:
    """Raise LabelError naming the first sample whose label map (``batch["masks"]``) holds a value
    other than ``0..num_classes-1``, ``ignore_index`` or ``PAD`` (a wrong ``model.num_classes``, or
    label maps not reduced as ``data.reduce_zero_label`` says)."""
    labels = batch["masks"]
    bad = ((labels >= num_classes) & (labels != ignore_index)) | (labels < PAD)
    if bad.any():
        i = int(bad.flatten(1).any(1).nonzero()[0])
        value = int(labels[i][bad[i]][0])
        raise LabelError(f"sample {batch['keys'][i]}: label {value} beyond model.num_classes={num_classes} "
                         f"(0..{num_classes - 1}, {ignore_index} ignored); set model.num_classes, or "
                         f"data.reduce_zero_label for label maps whose 0 means 'other'")



def device_batch(images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and int16 labels on the device -> normalised float images with padded pixels 0
    (mmseg pads after normalising) and int64 labels with padding ignored."""
    pad = labels == PAD  # [B, S, S]
    x = (images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = x.masked_fill(pad.unsqueeze(1), 0.0)
    return x, labels.long().masked_fill(pad, ignore_index)


def eval_views(image: torch.Tensor, cfg: SegmentConfig) -> list[torch.Tensor]:
    """The resized uint8 images an evaluation scores: one (``img_scale``, ratio kept), or one per
    ``eval.ratios`` entry (SETR's multi-scale resize)."""
    H, W = image.shape[-2:]
    if not cfg.eval.ratios:
        return [resize_image(image, rescale_size(H, W, cfg.data.img_scale))]
    short = min(cfg.data.img_scale)
    return [resize_image(image, setr_scale(H, W, int(short * r), cfg.model.img_size)) for r in cfg.eval.ratios]


class SegEvalShare(IterableDataset):
    """Rank ``rank``'s held-out images: image ``i`` (in source order) goes to rank ``i % world``.
    Yields one image at a time: ``views`` (uint8, see :func:`eval_views`), ``label`` (int64 at the
    original size, zero label reduced), ``key``, ``index``; or ``error`` for a sample that does not read."""

    def __init__(self, source: Source, cfg: SegmentConfig, rank: int, world: int, limit: int | None) -> None:
        super().__init__()
        self.source, self.cfg, self.rank, self.world = source, cfg, rank, world
        self.limit = min(limit or source.num_samples, source.num_samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        d, base = self.cfg.data, 0
        for shard, spec in enumerate(self.source.shards):
            stop = min(spec.count, self.limit - base)
            if stop <= 0:
                break

            def mine(p: int, base: int = base) -> bool:
                i = base + p
                return i % self.world == self.rank and (i // self.world) % workers == worker

            for p, raw in self.source.read(shard, 0, stop, mine):
                out: dict[str, Any] = {"key": raw.key, "index": base + p}
                try:
                    if raw.error is not None:
                        raise ValueError(raw.error)
                    image, label = decode_pair(raw.data)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - named in the main process
                    yield out | {"error": f"evaluation sample {raw.key} ({raw.origin}): {err}"}
                    continue
                label = prepare_labels(label, dict(d.label_map), d.reduce_zero_label, d.ignore_index)
                yield out | {"views": eval_views(image, self.cfg), "label": label.long()}
            base += spec.count


def eval_samples(source: Source, cfg: SegmentConfig, rank: int, world: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """This rank's share of the held-out images (each image on exactly one rank), checked: an
    unreadable sample or a label beyond the classes raises with the sample's name."""
    share = SegEvalShare(source, cfg, rank, world, cfg.data.val_limit)
    loader = DataLoader(share, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(rank),
                        **eval_worker_options(share, num_workers))
    K, ignore = cfg.model.num_classes, cfg.data.ignore_index
    for sample in iterate_and_join(loader):
        if "error" in sample:
            raise SegmentationDataError(f"{sample['error']}; fix or remove it")
        label = sample["label"]
        bad = (label >= K) & (label != ignore)
        if bad.any():
            raise LabelError(f"evaluation sample {sample['key']}: label {int(label[bad][0])} beyond "
                             f"model.num_classes={K}; set model.num_classes or data.reduce_zero_label")
        yield sample


def open_eval_source(cfg: SegmentConfig) -> Source:
    """``data.val`` in source order (no shuffle)."""
    d = cfg.data
    return open_segmentation_source(d.val, d.val_split, None, d.cache_dir, d.shard_url_template)

