"""Detection batches: equal micro-batches per rank, grouped by orientation, exact mid-epoch resume.

The epoch's micro-batches are a pure function of (seed, epoch, world size, batch size): the images
are shuffled, split by orientation (landscape / portrait, mmdetection's GroupSampler, so that a
batch pads little), cut into micro-batches of one orientation, the micro-batches shuffled and
dealt to the ranks round-robin; each rank gets the same count (the last few are dropped). A
micro-batch is read whole by one loader worker, which decodes its images, rasterises the masks and
flips (``coco.read_sample``, per-sample seeds).

The iteration and its position (``state_dict``, ``position_after``, resume, moving to the next
epoch after a change of world size) are ``bootmae_ds.data.loader.TrainLoader``'s, the
pre-training loader's: the dataset below yields micro-batches in the order it expects.

Batches: ``images`` (list of uint8 [3, H, W]), ``targets`` (list of {boxes, labels, masks}),
``keys`` (image ids), ``corrupt`` / ``filled`` (images that did not decode, replaced by another
image of the batch / from later batches), ``damaged_shards`` (their file names), ``epoch``,
``index``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .coco import CocoError, CocoSplit, read_sample
from .loader import TrainLoader
from .seeds import mix_seed
from .workers import eval_worker_options

log = logging.getLogger("bootmae_ds.data")
Batch = dict[str, Any]


def epoch_batches(flags: np.ndarray, seed: int, epoch: int, world_size: int, rank: int, batch_size: int,
                  group: bool) -> list[np.ndarray]:
    """Rank ``rank``'s micro-batches of ``epoch`` (indices into the split), all of one orientation
    when ``group`` (``flags``: 1 = landscape)."""
    rng = np.random.default_rng(mix_seed(seed, "detection", epoch))
    order = rng.permutation(len(flags))
    pools = [order[flags[order] == g] for g in (0, 1)] if group else [order]
    batches = [pool[i : i + batch_size] for pool in pools for i in range(0, len(pool) - batch_size + 1, batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world_size
    return batches[rank : per_rank * world_size : world_size]


def batches_per_rank(flags: np.ndarray, world_size: int, batch_size: int, group: bool) -> int:
    """Micro-batches per rank and epoch (the same every epoch)."""
    counts = [int((flags == g).sum()) for g in (0, 1)] if group else [len(flags)]
    return sum(c // batch_size for c in counts) // world_size


@dataclasses.dataclass
class DetectionDataset(IterableDataset):
    """One rank's micro-batches of one epoch from micro-batch ``start`` on, dealt to the workers
    round-robin (the order ``TrainLoader`` checks)."""

    split: CocoSplit
    rank: int
    world_size: int
    workers: int
    batch_size: int
    seed: int
    hflip: float
    group: bool
    epoch: int = 0
    start: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def num_samples(self) -> int:
        return len(self.split)

    @property
    def num_batches(self) -> int:
        return batches_per_rank(self.split.flags, self.world_size, self.batch_size, self.group)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, count = (info.id, info.num_workers) if info else (0, 1)
        if count != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs in {count}")
        batches = epoch_batches(self.split.flags, self.seed, self.epoch, self.world_size, self.rank,
                                self.batch_size, self.group)
        for j in range(self.start + worker, len(batches), self.workers):
            yield self._read(batches, j)

    def _read(self, batches: list[np.ndarray], j: int) -> Batch:
        """Micro-batch ``j``: an unreadable image's slot takes a readable image of the batch (slot i
        the (i mod n)-th of the n readable), or, when none reads, the first readable images of the
        later micro-batches: a function of the epoch's plan only, so resume stays exact."""
        reads = [self._try(int(index)) for index in batches[j]]
        errors = {i: error for i, (_, error) in enumerate(reads) if error is not None}
        good = [sample for sample, _ in reads if sample is not None]
        filled = 0
        if not good:
            good = self._stand_ins(batches, j, len(reads))
            filled = len(reads)
        out = [sample if sample is not None else good[i % len(good)] for i, (sample, _) in enumerate(reads)]
        for message in errors.values():
            log.warning("unreadable image replaced: %s", message)
        return {"images": [s["image"] for s in out], "targets": [s["target"] for s in out],
                "keys": [s["id"] for s in out], "corrupt": len(errors), "filled": filled,
                "damaged_shards": [m.split(" (")[0] for m in errors.values()], "epoch": self.epoch, "index": j}

    def _try(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """(the sample, None) or (None, what went wrong with its file)."""
        try:
            return read_sample(self.split, index, self.epoch, self.seed, self.hflip), None
        except Exception as err:  # noqa: BLE001 - any decoder failure marks the image bad
            return None, f"{self.split.record(index)['file_name']} ({type(err).__name__}: {err})"

    def _stand_ins(self, batches: list[np.ndarray], j: int, want: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for later in batches[j + 1 :] + batches[:j]:
            for index in later:
                sample, _ = self._try(int(index))
                found += [sample] if sample is not None else []
                if len(found) == want:
                    return found
        if not found:
            raise CocoError(f"{self.split.images_dir}: no image of this rank's epoch {self.epoch} decodes; "
                            f"check the image files")
        return found


def build_detection_loader(cfg: Any, split: CocoSplit, *, rank: int, world_size: int,
                           state: dict[str, Any] | None = None) -> TrainLoader:
    """This rank's training loader over ``split`` (``cfg.data``, ``cfg.run.seed``), at ``state``."""
    d = cfg.data
    dataset = DetectionDataset(split, rank, world_size, max(1, d.num_workers), d.micro_batch_size, cfg.run.seed,
                               d.hflip, d.group_by_aspect)
    if dataset.num_batches == 0:
        raise CocoError(f"{split.json_path}: {len(split)} training images give no micro-batch per rank "
                        f"(world size {world_size} x data.micro_batch_size {d.micro_batch_size})")
    return TrainLoader(dataset, d.num_workers, state, pin_memory=torch.cuda.is_available())  # type: ignore[arg-type]


# -- evaluation --------------------------------------------------------------------------------
class EvalShare(Dataset):
    """Rank ``rank``'s share of a split for evaluation: images ``rank, rank + world, ...`` (each
    image on exactly one rank), in batches of ``batch_size``, not flipped."""

    def __init__(self, split: CocoSplit, rank: int, world_size: int, batch_size: int) -> None:
        self.split, self.batch_size = split, batch_size
        self.indices = list(range(rank, len(split), world_size))

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __getitem__(self, j: int) -> Batch:
        chunk = self.indices[j * self.batch_size : (j + 1) * self.batch_size]
        samples = [read_sample(self.split, i, 0, 0, 0.0) for i in chunk]
        return {"images": [s["image"] for s in samples], "keys": [s["id"] for s in samples]}


def eval_batches(split: CocoSplit, rank: int, world_size: int, batch_size: int, num_workers: int) -> Iterator[Batch]:
    """This rank's evaluation batches (``EvalShare``) through a DataLoader with ``num_workers``."""
    from torch.utils.data import DataLoader

    from .loader import iterate_and_join

    share = EvalShare(split, rank, world_size, batch_size)
    workers = num_workers if len(share) else 0
    # a private generator: the global RNG (drop path, proposal sampling) must not see an evaluation
    loader = DataLoader(share, batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0),
                        **eval_worker_options(share, workers))
    yield from iterate_and_join(loader)
