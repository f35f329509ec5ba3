"""Several sample sources read as one, each taking its weighted share of every epoch.

A mixture epoch has a fixed length ``E`` (``data.epoch_samples``, by default the sum of the
sources' sizes). Source ``s`` of weight ``w_s`` gets the quota ``q_s`` (``w_s E`` rounded by
largest remainder, so the quotas sum to ``E``) and the epoch's positions are dealt to the
sources in one fixed low-discrepancy interleave (draw ``k`` of source ``s`` sits at key
``(k + 1/2) / q_s``): any stretch of ``L`` positions holds within one of ``w_s L`` draws of
each source, so every rank, worker and micro-batch gets the shares the weights say, with no
sampling noise. Which samples the draws read is random: draw ``k`` of source ``s`` in epoch
``e`` is the source's running draw ``g = e q_s + k``, its own epoch ``g // n_s`` and position
``g % n_s`` in that own epoch's sequence (the source's shards permuted with a seed of its own
and laid end to end, as ``plan`` does for one source). A source smaller than its quota thus
runs through its next permutations (each of its samples read equally often, to within one); a
larger one is read without replacement across mixture epochs.

Everything else is ``plan``'s layout of one source applied to the mixture positions: rank ``r``
takes a contiguous range, workers take sub-ranges, each visited in a buffered-shuffle order. The
layout is a pure function of (seed, epoch, rank, worker, sources), so resume and fills work as
for one source. Each worker reads every source it draws from sequentially (one stream per
source), so a mixture costs no more reads than its draws.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bootmae_ds.config import ConfigError, InputError
from bootmae_ds.data import plan
from bootmae_ds.data.seeds import mix_seed
from bootmae_ds.data.shards import ShardError
from bootmae_ds.data.sources import RawSample, ShardSpec, Source, Wanted, open_source

if TYPE_CHECKING:
    from bootmae_ds.config import BootMAEConfig


@dataclass
class Part:
    """One source of a mixture: its row name, the source, its weight and its shards' place in
    the mixture's shard list."""

    name: str
    source: Source
    weight: float
    key: str  # what identifies the source (its resolved path): seeds its own shard order
    offset: int = 0  # index of its first shard in MixedSource.shards

    @property
    def size(self) -> int:
        return self.source.num_samples


def quotas(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder (sums to ``total``)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return [int(q) for q in out]


def interleave(counts: list[int]) -> np.ndarray:
    """The part index of each position of an epoch holding ``counts[s]`` draws of part ``s``:
    draw ``k`` of part ``s`` at key ``(k + 1/2) / counts[s]``, ties to the lower part."""
    keys = np.concatenate([(np.arange(c, dtype=np.float64) + 0.5) / c for c in counts if c])
    parts = np.concatenate([np.full(c, s, dtype=np.int32) for s, c in enumerate(counts) if c])
    return parts[np.lexsort((parts, keys))]


@dataclass
class WorkerLayout:
    """What one logical worker reads in one epoch: ``segments`` (its own positions, as shard
    segments, for ``plan.locate``), the part of each of its positions (None: one source) and,
    per part, the positions it fills and the segments they read, in sequence order."""

    segments: list[plan.Segment]
    slots: np.ndarray | None = None
    positions: list[np.ndarray] = field(default_factory=list)
    part_segments: list[list[plan.Segment]] = field(default_factory=list)

    def part_of(self, q: int) -> int:
        return 0 if self.slots is None else int(self.slots[q])

    def streams(self, source: Source, needed: bytearray) -> list[Iterator[tuple[int, RawSample]]]:
        """One iterator per part: (worker position, raw sample) for its needed positions."""
        if self.slots is None:
            return [_stream(source, self.segments, None, needed)]
        return [_stream(source, segs, pos, needed) for segs, pos in zip(self.part_segments, self.positions)]


def _stream(source: Source, segments: list[plan.Segment], positions: np.ndarray | None,
            needed: bytearray) -> Iterator[tuple[int, RawSample]]:
    """Read ``segments`` in order; their ``k``-th sample is worker position ``positions[k]``."""
    where = (lambda k: k) if positions is None else (lambda k: int(positions[k]))
    offset = 0
    for shard, lo, hi in segments:
        base = offset - lo
        wanted = lambda p, base=base: needed[where(base + p)] == 1
        for p, raw in source.read(shard, lo, hi, wanted):
            yield where(base + p), raw
        offset += hi - lo


def worker_layout(source: Source, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  workers: int, batch_size: int, total: int) -> WorkerLayout:
    """The layout of logical ``worker`` of ``rank`` in ``epoch`` (see the module docstring)."""
    if isinstance(source, MixedSource):
        return source.worker_layout(seed, epoch, rank, world_size, worker, workers, batch_size)
    counts = [s.count for s in source.shards]
    return WorkerLayout(plan.worker_segments(counts, seed, epoch, rank, world_size, worker, workers,
                                             batch_size, total))


class MixedSource(Source):
    """The parts' shards in one list (part after part), read by the part that owns them."""

    def __init__(self, parts: list[Part], epoch_samples: int | None = None) -> None:
        self.parts = parts
        self.shards: list[ShardSpec] = []
        for part in parts:
            part.offset = len(self.shards)
            self.shards += part.source.shards
        self.offsets = [p.offset for p in parts]
        self.epoch_samples = epoch_samples or sum(p.size for p in parts)
        self.quotas = quotas([p.weight for p in parts], self.epoch_samples)
        self._dealt: dict[int, tuple[list[int], np.ndarray]] = {}
        self.description = f"mixture of {len(parts)} sources, {self.epoch_samples} samples per epoch"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def check(self) -> None:
        for part in self.parts:
            part.source.check()

    def read(self, shard: int, start: int, stop: int, wanted: Wanted) -> Iterator[tuple[int, RawSample]]:
        part = self.parts[bisect.bisect_right(self.offsets, shard) - 1]
        return part.source.read(shard - part.offset, start, stop, wanted)

    def dealt(self, used: int) -> tuple[list[int], np.ndarray]:
        """The quotas and the interleave of an epoch's ``used`` positions (those that make whole
        micro-batches on every rank): dealing only those, no draw is ever skipped, so a source's
        samples are read equally often to within one."""
        if used not in self._dealt:
            quota = quotas([p.weight for p in self.parts], used)
            self._dealt[used] = quota, interleave(quota)
        return self._dealt[used]

    def draw_segments(self, seed: int, s: int, first: int, stop: int) -> list[plan.Segment]:
        """Running draws ``[first, stop)`` of part ``s`` as segments of the mixture's shards."""
        part = self.parts[s]
        counts = [x.count for x in part.source.shards]
        n, own_seed = part.size, mix_seed(seed, "mixture-part", part.key) % 2**63
        out: list[plan.Segment] = []
        for t in range(first // n, (stop - 1) // n + 1 if stop > first else first // n):
            lo, hi = max(first, t * n) - t * n, min(stop, (t + 1) * n) - t * n
            order = plan.shard_order(own_seed, t, len(counts))
            out += [(part.offset + sh, a, b) for sh, a, b in plan.slice_sequence(counts, order, lo, hi)]
        return out

    def worker_layout(self, seed: int, epoch: int, rank: int, world_size: int, worker: int, workers: int,
                      batch_size: int) -> WorkerLayout:
        n = plan.batches_per_rank(self.epoch_samples, world_size, batch_size)
        before = sum(plan.worker_batches(n, workers, v) for v in range(worker))
        start = (rank * n + before) * batch_size
        stop = start + plan.worker_batches(n, workers, worker) * batch_size
        quota, dealt = self.dealt(n * world_size * batch_size)
        slots = dealt[start:stop]
        positions, part_segments, segments = [], [], []
        for s, q in enumerate(quota):
            mine = np.flatnonzero(slots == s)
            first = epoch * q + int(np.count_nonzero(dealt[:start] == s))
            segs = self.draw_segments(seed, s, first, first + len(mine))
            positions.append(mine)
            part_segments.append(segs)
            segments += segs
        return WorkerLayout(segments, slots, positions, part_segments)

    def summary(self) -> str:
        """The start-up line: each source, its size, weight and what an epoch takes from it."""
        E = self.epoch_samples
        head = (f"data: {self.description} (data.epoch_samples; one epoch of the lr warm-up and "
                f"the schedules is this mixture epoch)")
        lines = [head]
        for part, q in zip(self.parts, self.quotas):
            lines.append(f"  {part.name}: {part.source.description}, {part.size} samples, weight "
                         f"{part.weight:g} -> {q} per epoch ({q / E:.1%} of the epoch, "
                         f"{q / part.size:.3g} passes over the source)")
        return "\n".join(lines)


def source_counts(source: Source, parts: list[int], errors: dict[int, str]) -> dict[str, dict[str, int]]:
    """A micro-batch's samples per mixture source (by the slot each was drawn for) and those of
    them that were unreadable and replaced: what ``runtime.recovery.DataFaults`` sums per step."""
    assert isinstance(source, MixedSource)
    samples = dict.fromkeys(source.names, 0)
    corrupt = dict.fromkeys(source.names, 0)
    for i, s in enumerate(parts):
        samples[source.names[s]] += 1
        corrupt[source.names[s]] += i in errors
    return {"source_samples": samples, "source_corrupt": corrupt}


def check_entries_exist(cfg: BootMAEConfig) -> BootMAEConfig:
    """A one-line ``ConfigError`` for a mixture entry naming a local path that does not exist: a
    stat per entry, run by the launcher before any process group or model is built."""
    if isinstance(cfg.data.train, str):
        return cfg
    for i, entry in enumerate(cfg.data.train):
        spec = entry.source
        remote = "://" in spec or spec.startswith("pipe:") or "{" in spec
        if spec not in ("demo", "synthetic") and not remote and not Path(spec).exists():
            raise ConfigError(f"data.train[{i}] ({spec!r}): no such file or directory; fix the path "
                              f"or drop the entry")
    return cfg


def open_train_source(cfg: BootMAEConfig) -> Source:
    """The source ``cfg.data.train`` names: one, or the mixture of those it lists."""
    return open_source(cfg) if isinstance(cfg.data.train, str) else open_mixture(cfg)


def open_mixture(cfg: BootMAEConfig) -> MixedSource:
    """The mixture ``cfg.data.train`` lists (validated by the config: weights, names, keys)."""
    d = cfg.data
    parts = []
    for i, entry in enumerate(d.train):
        where = f"data.train[{i}] ({entry.source!r})"
        one = cfg.model_copy(update={"data": d.model_copy(update={
            "train": entry.source, "num_samples": entry.num_samples, "epoch_samples": None})})
        try:
            source = open_source(one, name=entry.label)
            source.check()
        except (InputError, OSError) as err:
            raise ShardError(f"{where}: {err}") from None
        if source.num_samples == 0:
            raise ShardError(f"{where}: holds no samples; fix the source or drop the entry")
        parts.append(Part(entry.label, source, entry.weight, entry.identity))
    return MixedSource(parts, d.epoch_samples)
