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

A micro-batch whose samples are all unreadable is filled from samples drawn by
:func:`fill_positions`, a function of (seed, epoch, rank, worker, batch) alone, never of what
the stream read before it, so a resumed loader fills it exactly as the uninterrupted one did.

A mixture of several sources (``bootmae_ds.data.mixture``) keeps this layout over the mixture's
positions and deals each position to a source by weight.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random

from bootmae_ds.data.seeds import mix_seed

Segment = tuple[int, int, int]  # (shard index, first position, end position) inside that shard


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    return total // (world_size * batch_size)


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The epoch's shard permutation: the same on every rank and worker."""
    return list(_shard_order(seed, epoch, num_shards))


@functools.lru_cache(maxsize=8)
def _shard_order(seed: int, epoch: int, num_shards: int) -> tuple[int, ...]:
    # Cached: every worker_segments call needs it, and a simulation of thousands of ranks
    # would otherwise re-shuffle the same list for each.
    order = list(range(num_shards))
    random.Random(mix_seed(seed, "shards", epoch)).shuffle(order)
    return tuple(order)


def worker_batches(num_batches: int, workers: int, worker: int) -> int:
    """Micro-batches of logical ``worker`` when its rank yields ``num_batches`` over ``workers``."""
    return len(range(worker, num_batches, workers))


def slice_sequence(counts: list[int], order: list[int], start: int, stop: int) -> list[Segment]:
    """Samples ``[start, stop)`` of the shards laid end to end in ``order``, as segments."""
    ends = list(itertools.accumulate(counts[shard] for shard in order))
    segments: list[Segment] = []
    for k in range(bisect.bisect_right(ends, start), len(order)):  # the first shard ending past start
        offset = ends[k] - counts[order[k]]
        if offset >= stop:
            break
        lo, hi = max(start, offset), min(stop, ends[k])
        if lo < hi:
            segments.append((order[k], lo - offset, hi - offset))
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


def file_order(seed: int, count: int) -> list[int]:
    """The order an ImageFolder's ``count`` (sorted) files are read in: a permutation seeded by
    the run seed alone, so every rank and every resume sees the same list. Cut into virtual
    shards in class order instead, each reader's contiguous stretch would hold a few classes."""
    order = list(range(count))
    random.Random(mix_seed(seed, "folder-files")).shuffle(order)
    return order


def resume_point(consumed: int, workers: int, physical: int) -> tuple[int, int]:
    """(logical worker, its first micro-batch) that physical DataLoader worker ``physical`` plays
    when the epoch resumes after ``consumed`` micro-batches.

    The DataLoader asks its physical workers round-robin from worker 0, and micro-batch ``g`` of
    the epoch belongs to logical worker ``g % workers``; so physical ``p`` plays logical worker
    ``(consumed + p) % workers`` from that worker's ``(consumed + p) // workers``-th batch on, and
    its ``i``-th batch is micro-batch ``consumed + p + i * workers`` of the epoch."""
    return (consumed + physical) % workers, (consumed + physical) // workers


def locate(segments: list[Segment], position: int) -> tuple[int, int]:
    """(shard, position inside the shard) of ``position`` in the sequence ``segments`` spell."""
    ends, total = [], 0
    for _, lo, hi in segments:
        total += hi - lo
        ends.append(total)
    k = bisect.bisect_right(ends, position)
    if not 0 <= position < total:
        raise IndexError(f"position {position} outside a sequence of {total}")
    shard, lo, hi = segments[k]
    return shard, lo + position - (ends[k] - (hi - lo))


def fill_positions(
    seed: int, epoch: int, rank: int, worker: int, batch: int, own: int, total: int, tries: int
) -> list[tuple[bool, int]]:
    """Where to look for stand-ins when micro-batch ``batch`` of logical ``worker`` has no
    readable sample: ``tries`` draws of (own, position), the first half in the worker's own
    ``own`` positions (its stretch of the sequence, so the rank keeps to its share when it can),
    the rest anywhere in the epoch's ``total`` positions (when a damaged shard covers all of the
    worker's share). A pure function: resuming never changes which samples fill a batch."""
    rng = random.Random(mix_seed(seed, "fill", epoch, rank, worker, batch))
    out = []
    for t in range(tries):
        mine = t < tries // 2 and own > 0
        out.append((mine, int(rng.random() * (own if mine else total))))
    return out
