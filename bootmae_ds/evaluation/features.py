"""Features of a whole labelled set, extracted by every rank and gathered in sample order.

Each rank encodes its share of the images (centre crops; ``eval_batches`` gives every image to
exactly one rank), then the shares are all-gathered and put back in shard order, so every rank
holds the same ``[N, D]`` tensor a single process would have built. Memory: the images stream
through; the features of the whole set (N x D fp32) are what every rank keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data.labelled import eval_batches
from ..data.sources import Source


@dataclass
class Normalise:
    """uint8 images ``[B, 3, H, W]`` -> ``(x / 255 - mean) / std`` in ``dtype`` on ``device``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self._m = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._s = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return ((x - self._m) / self._s).to(self.dtype)


@dataclass
class LabelledFeatures:
    """Features ``[N, D]`` (fp32) and labels ``[N]`` of a labelled set, in shard order."""

    features: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def extract_share(features_fn: Callable[[torch.Tensor], torch.Tensor], source: Source, normalise: Normalise,
                  size: int, crop_pct: float, rank: int, world: int, batch_size: int, limit: int | None,
                  num_workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share: features ``[n, D]`` fp32, labels ``[n]`` and shard-order indices ``[n]``,
    all on ``normalise.device``. ``features_fn`` maps normalised images to ``[B, D]``."""
    feats, labels, indices = [], [], []
    for batch in eval_batches(source, size, crop_pct, rank, world, batch_size, limit, num_workers):
        feats.append(features_fn(normalise(batch["images"])).float())
        labels.append(batch["labels"].to(normalise.device))
        indices.append(batch["indices"].to(normalise.device))
    if not feats:  # more ranks than images: an empty share still takes part in the gather
        empty = torch.empty(0, dtype=torch.int64, device=normalise.device)
        return torch.empty(0, 0, device=normalise.device), empty, empty
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def gather_in_order(features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> LabelledFeatures:
    """Every rank's share, joined on every rank and sorted back into shard order (a collective
    when torch.distributed is up with more than one rank)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        device = features.device
        dim = torch.tensor([features.shape[1] if len(features) else 0], device=device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
        if not len(features):
            features = features.new_empty(0, int(dim.item()))
        count = torch.tensor([len(labels)], device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        most = int(max(c.item() for c in counts))

        def padded(t: torch.Tensor) -> list[torch.Tensor]:
            # all_gather needs equal shapes: pad every share to the largest, cut afterwards
            pad = torch.zeros((most - len(t), *t.shape[1:]), dtype=t.dtype, device=device)
            full = torch.cat([t, pad])
            out = [torch.empty_like(full) for _ in range(world)]
            dist.all_gather(out, full)
            return [o[: int(c.item())] for o, c in zip(out, counts)]

        features = torch.cat(padded(features))
        labels, indices = torch.cat(padded(labels)), torch.cat(padded(indices))
    order = indices.argsort()
    if not torch.equal(indices[order], torch.arange(len(indices), device=indices.device)):
        raise RuntimeError("gathered features do not cover every sample exactly once")
    return LabelledFeatures(features[order], labels[order])


def extract_set_features(features_fn: Callable[[torch.Tensor], torch.Tensor], source: Source, normalise: Normalise,
                     size: int, crop_pct: float = 0.875, batch_size: int = 256, limit: int | None = None,
                     num_workers: int = 2) -> LabelledFeatures:
    """The features of all of ``source`` (its first ``limit`` images) on every rank, in shard order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = extract_share(features_fn, source, normalise, size, crop_pct, rank, world, batch_size, limit,
                          num_workers)
    return gather_in_order(*share)
