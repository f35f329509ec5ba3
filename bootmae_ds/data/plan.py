"""Which samples each (rank, worker) reads in an epoch, and in which order: pure functions.

Per epoch the shard list is permuted with a RNG seeded by (seed, epoch), identically on every
rank, and the shards are laid end to end into one sequence of samples. Rank ``r`` takes the
contiguous range ``[r*N*B, (r+1)*N*B)`` where ``N = total // (world_size * B)``, so every rank has
exactly ``N`` micro-batches of ``B`` and at most ``world_size*B - 1`` samples are dropped.
Splitting at sample level (not shard level) is what makes the counts equal however many shards
there are, even fewer than ranks x workers; a shard cut between two readers costs the second
one a seek (local) or a read-through (stream) of the first part.

Within a rank, micro-batch ``g`` belongs to logical worker ``g % W`` (the DataLoader collects
batches round-robin from its workers); logical worker ``w`` owns the next contiguous sub-range of
``len(range(w, N, W)) * B`` samples and visits them in a buffered-shuffle order drawn from a RNG
seeded by (seed, epoch, rank, w). The order is computed on positions before any byte is read,
so a resumed worker knows which positions were consumed and never reads their image data.
"""

from __future__ import annotations

import random

from bootmae_ds.data.seeds import mix_seed

Segment = tuple[int, int, int]  # (shard index, first position, end position) inside that shard


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    return total // (world_size * batch_size)


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The epoch's shard permutation: the same on every rank and worker."""
    order = list(range(num_shards))
    random.Random(mix_seed(seed, "shards", epoch)).shuffle(order)
    return order


def worker_batches(num_batches: int, workers: int, worker: int) -> int:
    """Micro-batches of logical ``worker`` when its rank yields ``num_batches`` over ``workers``."""
    return len(range(worker, num_batches, workers))


def slice_sequence(counts: list[int], order: list[int], start: int, stop: int) -> list[Segment]:
    """Samples ``[start, stop)`` of the shards laid end to end in ``order``, as segments."""
    segments: list[Segment] = []
    offset = 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            segments.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
        if offset >= stop:
            break
    return segments


def worker_segments(
    counts: list[int],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    workers: int,
    batch_size: int,
    total: int | None = None,
) -> list[Segment]:
    """The samples logical ``worker`` of ``rank`` reads this epoch, in sequence order."""
    total = sum(counts) if total is None else min(total, sum(counts))
    n = batches_per_rank(total, world_size, batch_size)
    before = sum(worker_batches(n, workers, v) for v in range(worker))
    start = (rank * n + before) * batch_size
    stop = start + worker_batches(n, workers, worker) * batch_size
    return slice_sequence(counts, shard_order(seed, epoch, len(counts)), start, stop)


def shuffle_order(length: int, buffer: int, rng: random.Random) -> list[int]:
    """A buffered shuffle of ``range(length)``: output ``i`` is always below ``i + buffer``, so a
    sequential reader holds at most ``buffer`` samples; ``buffer >= length`` is a full shuffle."""
    buffer = max(1, min(buffer, length))
    pool = list(range(min(buffer, length)))
    out: list[int] = []
    for p in range(len(pool), length):
        i = int(rng.random() * buffer)
        out.append(pool[i])
        pool[i] = p
    rng.shuffle(pool)
    out.extend(pool)
    return out


def worker_order(
    seed: int, epoch: int, rank: int, worker: int, length: int, buffer: int
) -> list[int]:
    return shuffle_order(
        length, buffer, random.Random(mix_seed(seed, "samples", epoch, rank, worker))
    )
