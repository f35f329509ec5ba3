"""The training data loader: streaming, equal batches on every rank, exact mid-epoch resume.

Public entry point::

    loader = build_train_loader(cfg, rank=rank, world_size=world_size, state=ckpt.get("data"))
    for batch in loader:          # one epoch, from the saved position to its end
        ...                       # then loader.epoch += 1 happens by itself
        ckpt["data"] = loader.state_dict()

Each micro-batch is a dict:
  ``images`` uint8 [B, 3, S, S] (not normalised), ``masks`` bool [B, N] (True = masked),
  ``labels`` int64 [B], ``keys`` list[str] (B sample keys), ``corrupt`` int (samples of this
  batch that were unreadable and replaced, re-augmented), ``filled`` int (how many of those came
  from outside the batch because none of its samples was readable), ``damaged_shards``
  list[str] (shards, or ImageFolder files, first found damaged by this batch's worker this
  epoch), ``epoch`` and ``index`` (the micro-batch's position in the epoch on this rank); from a
  mixture also ``source_samples`` and ``source_corrupt`` ({source name: count}).

State (``state_dict()``): ``{"epoch", "batches", "world_size", "num_workers", "micro_batch_size",
"num_samples", "seed"}``; ``batches`` counts micro-batches already handed out in ``epoch``. A loader
built from it yields exactly the batches the uninterrupted run would have yielded next. Resuming
with a different world size, worker count, batch size, dataset size or seed is refused: the
sample layout is a function of all of them (resume those at an epoch boundary, with
``state=None`` and ``loader.epoch`` set, or keep them unchanged).

Workers (``data.num_workers`` > 0) start once per run, at the first iteration, from the fork
server of ``bootmae_ds.data.workers`` (never a fork of the rank, which has threads by then) and
stay for every epoch; each epoch's number and start are handed to the live workers.
``loader.close()`` ends them (it also runs at interpreter exit, and when the loader's own
iteration fails).

Rank and world size are explicit arguments: workers never look at ``torch.distributed`` or the
environment, which spawned workers cannot see reliably. Iterate the loader yourself; do not hand
it to ``deepspeed.initialize(training_data=...)``, which would wrap it in a DistributedSampler.

Unreadable samples (bad image, truncated or damaged tar) are replaced inside their micro-batch
by a re-augmented copy of another sample, so batch size and batch count never change. A
micro-batch with no readable sample at all (it fell into the lost tail of a damaged tar) is
filled with samples drawn by ``plan.fill_positions`` from the rest of the worker's share, then
from the whole epoch: a function of (seed, epoch, rank, worker, batch) and the data, so a
resumed loader fills it the same way. Only data in which none of those draws reads stops the
run. Replaced samples are counted in ``batch["corrupt"]`` / ``loader.stats["corrupt"]`` (those
filled from elsewhere also in ``filled``), logged at a limited rate, and every damaged shard is
named once in the log and in ``loader.stats["damaged_shards"]``.

``cfg.data.train`` selects the source: ``demo``, a ``manifest.json`` (or a folder holding one;
``data.shard_url_template`` opens its shards remotely), a brace-expanded shard URL list, an
ImageFolder directory, or ``synthetic``; or a list of them mixed by weight
(``bootmae_ds.data.mixture``). See ``bootmae_ds.data.plan`` for the sample layout.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bootmae_ds.config import BootMAEConfig
from bootmae_ds.data import plan
from bootmae_ds.data.mixture import MixedSource, open_train_source, source_counts, worker_layout
from bootmae_ds.data.seeds import mix_seed
from bootmae_ds.data.shards import ShardError
from bootmae_ds.data.sources import RawSample, Source
from bootmae_ds.data.transforms import SampleTransform
from bootmae_ds.data.workers import (
    Positioned,
    close_at_exit,
    owner_watch,
    shut_down,
    train_worker_context,
)

log = logging.getLogger("bootmae_ds.data")
Batch = dict[str, Any]


FILL_TRIES = 64  # samples drawn for an all-unreadable micro-batch before the data counts as unreadable
FILL_SOURCES = 4  # distinct readable samples that fill such a micro-batch (views of them repeat)


class _RateLimitedLog:
    """The first ``burst`` messages, then at most one per ``interval`` seconds with a count."""

    def __init__(self, burst: int = 5, interval: float = 60.0) -> None:
        self.burst, self.interval = burst, interval
        self.sent, self.suppressed, self.last = 0, 0, 0.0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if self.sent < self.burst or now - self.last >= self.interval:
            extra = f" ({self.suppressed} similar messages suppressed)" if self.suppressed else ""
            log.warning("corrupt sample skipped: %s%s", message, extra)
            self.sent, self.suppressed, self.last = self.sent + 1, 0, now
        else:
            self.suppressed += 1


@dataclasses.dataclass
class _Reader:
    """What one logical worker knows while it reads its share of an epoch."""

    worker: int
    segments: list[plan.Segment]
    report: _RateLimitedLog = dataclasses.field(default_factory=_RateLimitedLog)
    reported: set[str] = dataclasses.field(default_factory=set)  # damaged origins named so far
    # (shard, position) pairs a fill draw found unreadable; skipping them again changes no
    # outcome (they would fail again), it only saves the re-read.
    known_bad: set[tuple[int, int]] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class StreamingDataset(IterableDataset):
    """One rank's micro-batches of one epoch, from micro-batch ``start`` on, split over workers."""

    source: Source
    transform: Callable[[bytes | torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor | None]]
    rank: int
    world_size: int
    workers: int  # logical workers: max(1, DataLoader num_workers)
    batch_size: int
    seed: int
    shuffle_buffer: int
    num_samples: int
    epoch: int = 0
    start: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def num_batches(self) -> int:
        return plan.batches_per_rank(self.num_samples, self.world_size, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info else (0, 1)
        if count != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs in {count}")
        worker, first = plan.resume_point(self.start, self.workers, physical)
        n = plan.worker_batches(self.num_batches, self.workers, worker)
        if first >= n:
            return
        layout = worker_layout(self.source, self.seed, self.epoch, self.rank, self.world_size,
                               worker, self.workers, self.batch_size, self.num_samples)
        B = self.batch_size
        order = plan.worker_order(self.seed, self.epoch, self.rank, worker, n * B,
                                  self.shuffle_buffer)
        needed = bytearray(n * B)
        for q in order[first * B :]:
            needed[q] = 1
        streams = layout.streams(self.source, needed)  # one per source of a mixture
        pending: dict[int, RawSample] = {}
        reader = _Reader(worker, layout.segments)
        for j in range(first, n):
            raws = []
            for q in order[j * B : (j + 1) * B]:
                while q not in pending:  # read on in its source's sequence order until q arrives
                    pos, raw = next(streams[layout.part_of(q)])
                    pending[pos] = raw
                raws.append(pending.pop(q))
            parts = None if layout.slots is None else [layout.part_of(q) for q in order[j * B : (j + 1) * B]]
            yield self._collate(raws, j, reader, parts)

    def _collate(self, raws: list[RawSample], j: int, reader: _Reader, parts: list[int] | None = None) -> Batch:
        """Micro-batch ``j`` of ``reader``'s logical worker from its raw samples (``parts``: the
        mixture source of each, counted per source)."""
        B, index = len(raws), j * self.workers + reader.worker
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * B
        errors: dict[int, str] = {}
        for i, raw in enumerate(raws):
            if raw.error is None:
                try:
                    out[i] = self.transform(raw.data, self.epoch, raw.key)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - any decoder failure marks the sample bad
                    errors[i] = f"{raw.key}: does not decode ({type(err).__name__}: {err})"
            else:
                errors[i] = raw.error
        keys = [r.key for r in raws]
        labels = [r.label for r in raws]
        damaged = []
        for i in errors:
            origin = raws[i].origin
            if origin and origin not in reader.reported:
                reader.reported.add(origin)
                damaged.append(origin)
        good = [i for i in range(B) if out[i] is not None]
        filled = 0
        if good:
            for i in errors:
                # Keep B and the batch count fixed: reuse the next good sample of this batch,
                # with the bad sample's own RNG so the copy is a different view. Depending only
                # on this batch keeps resume exact.
                src = next((g for g in good if g > i), good[0])
                out[i] = self.transform(raws[src].data, self.epoch, raws[i].key)  # type: ignore[arg-type]
                keys[i], labels[i] = raws[src].key, raws[src].label
        else:  # nothing to copy here: stand-ins from elsewhere, each slot a view of one
            pool, views = self._fill(raws, j, errors, reader)
            for i in range(B):
                data, keys[i], labels[i] = pool[i % len(pool)]
                out[i] = views[i] if i < len(views) else self.transform(data, self.epoch, raws[i].key)  # type: ignore[arg-type]
            filled = B
        for message in errors.values():
            reader.report(message)
        images, masks = zip(*out)  # type: ignore[misc]
        batch: Batch = {"images": torch.stack(images)}
        if masks[0] is not None:  # labelled (fine-tuning) transforms make no masks
            batch["masks"] = torch.stack(masks)
        if parts is not None:
            batch |= source_counts(self.source, parts, errors)
        return batch | {
            "labels": torch.tensor(labels, dtype=torch.int64),
            "keys": keys,
            "corrupt": len(errors),
            "filled": filled,
            "damaged_shards": damaged,
            "epoch": self.epoch,
            "index": index,
        }

    def _fill(
        self, raws: list[RawSample], j: int, errors: dict[int, str], reader: _Reader
    ) -> tuple[list[tuple[Any, str, int]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Stand-ins for micro-batch ``j``, none of whose samples reads: up to ``FILL_SOURCES``
        readable samples found among ``plan.fill_positions``, and their first views (made with
        the RNGs of the batch's first slots). Reads only those positions, so it costs nothing
        unless a batch is wholly lost, and depends on nothing the stream read before."""
        own = sum(hi - lo for _, lo, hi in reader.segments)
        counts = [s.count for s in self.source.shards]
        sequence = plan.slice_sequence(counts, plan.shard_order(self.seed, self.epoch, len(counts)),
                                       0, sum(counts))
        total = min(self.num_samples, sum(counts))
        want = min(len(raws), FILL_SOURCES)
        pool: list[tuple[Any, str, int]] = []
        views: list[tuple[torch.Tensor, torch.Tensor]] = []
        for mine, q in plan.fill_positions(self.seed, self.epoch, self.rank, reader.worker, j,
                                           own, total, FILL_TRIES):
            shard, p = plan.locate(reader.segments if mine else sequence, q)
            if (shard, p) in reader.known_bad:  # known from an earlier draw: skip the re-read
                continue
            raw = next(iter(self.source.read(shard, p, p + 1, lambda _: True)), None)
            if raw is not None and raw[1].error is None and raw[1].key not in (s[1] for s in pool):
                sample = raw[1]
                try:
                    views.append(self.transform(sample.data, self.epoch, raws[len(pool)].key))  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - an unreadable stand-in is just skipped
                    reader.known_bad.add((shard, p))
                    continue
                pool.append((sample.data, sample.key, sample.label))
                if len(pool) == want:
                    break
            elif raw is None or raw[1].error is not None:
                reader.known_bad.add((shard, p))
        if not pool:
            first = next(iter(errors.values()))
            raise ShardError(
                f"epoch {self.epoch}, rank {self.rank}, micro-batch {j * self.workers + reader.worker}: "
                f"all {len(raws)} samples are unreadable (first: {first}), and so are "
                f"{FILL_TRIES} samples drawn from the rest of the data to replace them; check "
                f"the shards with `python data_prep/verify_shards.py` and rebuild the bad ones")
        return pool, views


def iterate_and_join(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; when done (or abandoned), shut its workers down and wait until its
    queue feeder threads have exited.

    A DataLoader's iterator lets those threads exit on their own after it shuts down. CPython
    3.11 deadlocks a child forked while another thread is being torn down (the child waits
    forever on the interpreter's thread-list lock), and the next DataLoader forks its workers at
    once: seen here as a fine-tuning rank hung at its second evaluation, whose worker never
    started. Joining the threads first closes that window.
    """
    it = iter(loader)
    try:
        yield from it
    finally:
        shut_down(it)


class TrainLoader:
    """Iterates one rank's micro-batches epoch after epoch and knows its exact position."""

    def __init__(
        self,
        dataset: StreamingDataset,
        num_workers: int,
        state: dict[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.epoch, self.batches = 0, 0
        # damaged_shards: every shard (ImageFolder: file) found damaged so far, first-seen order
        self.stats: dict[str, Any] = {"corrupt": 0, "filled": 0, "batches": 0, "damaged_shards": []}
        if state is not None:
            self.load_state_dict(state)
        self._workers: DataLoader | None = None  # the persistent workers' DataLoader, once started
        self._context = train_worker_context(dataset) if num_workers else None

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (the same on every rank)."""
        return self.dataset.num_batches

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "world_size": d.world_size,
            "num_workers": self.num_workers,
            "micro_batch_size": d.batch_size,
            "num_samples": d.num_samples,
            "seed": d.seed,
        }

    def position_after(self, batch: Batch) -> dict[str, Any]:
        """``state_dict()`` as it was right after ``batch`` was handed out: the position to save
        when a consumer holds batches ahead (a device prefetcher) and the loader has moved on."""
        return self.state_dict() | {"epoch": int(batch["epoch"]), "batches": int(batch["index"]) + 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [
            f"{k} {state.get(k)!r} -> {mine[k]!r}"
            for k in ("world_size", "num_workers", "micro_batch_size", "num_samples", "seed")
            if state.get(k) != mine[k]
        ]
        if changed:
            raise ValueError(
                "cannot resume the data position mid-epoch: " + ", ".join(changed) + ". The "
                "sample layout depends on these; resume with the saved values (world size, "
                "data.num_workers, data.micro_batch_size, data, run.seed), or restart the data "
                "stream at an epoch boundary by building the loader with state=None and setting "
                f"loader.epoch = {state.get('epoch', 0) + 1}"
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])

    def start_at_next_epoch(self, state: dict[str, Any]) -> None:
        """Continue after ``state`` of a stream whose sample layout changed (another world size,
        worker count or batch size), at the next epoch boundary."""
        self.epoch, self.batches = int(state["epoch"]) + (1 if state["batches"] else 0), 0

    def __iter__(self) -> Iterator[Batch]:
        if self.batches >= len(self):
            self.epoch, self.batches = self.epoch + 1, 0
        for batch in self._epoch():
            if batch["index"] != self.batches:  # guards the round-robin assumption
                raise RuntimeError(
                    f"loader out of order: got micro-batch {batch['index']}, "
                    f"expected {self.batches}"
                )
            self.batches += 1
            self.stats["batches"] += 1
            self.stats["corrupt"] += batch["corrupt"]
            self.stats["filled"] += batch["filled"]
            for name in batch["damaged_shards"]:  # each worker names a shard once per epoch
                if name not in self.stats["damaged_shards"]:
                    self.stats["damaged_shards"].append(name)
                    log.warning("damaged shard %s: its unreadable samples are replaced and "
                                "counted; check it with `python data_prep/verify_shards.py` "
                                "and rebuild it", name)
            yield batch
        self.epoch, self.batches = self.epoch + 1, 0

    def _epoch(self) -> Iterator[Batch]:
        """This epoch's micro-batches from ``self.batches`` on."""
        # Each DataLoader iterator draws its workers' base seed (and, per epoch, a shared seed)
        # from `generator`, by default the global torch RNG: a private one keeps the trainer's RNG
        # stream the same whether or not the run was resumed (the workers themselves use
        # per-sample RNGs only, so their global seeds do not matter).
        seed = mix_seed(self.dataset.seed, "dataloader", self.dataset.rank, self.epoch, self.batches)
        generator = torch.Generator().manual_seed(seed % 2**63)
        if not self.num_workers:  # read in this process: a plain per-epoch DataLoader, no process
            dataset = dataclasses.replace(self.dataset, epoch=self.epoch, start=self.batches)
            yield from DataLoader(dataset, batch_size=None, num_workers=0, pin_memory=self.pin_memory,
                                  generator=generator)
            return
        if self._workers is None:
            # Started once, at the first epoch, from the fork server: a rank with threads is never
            # forked (CPython 3.11 can leave such a child stuck in PyOS_AfterFork_Child).
            position = self._context.RawArray("q", 2)  # type: ignore[union-attr]
            self._workers = DataLoader(
                Positioned(self.dataset, position),
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=True,
                multiprocessing_context=self._context,
                worker_init_fn=owner_watch(),
                generator=generator,
            )
            close_at_exit.add(self)
        # Written before iter(): starting the workers, or sending them the resume message that
        # makes each one re-read it (and drop whatever an abandoned epoch left in flight).
        self._workers.dataset.position[:] = [self.epoch, self.batches]  # type: ignore[attr-defined]
        try:
            yield from self._workers
        except Exception:
            self.close()  # a failed stream is not continued: its workers must not outlive it
            raise

    def close(self) -> None:
        """End the workers and join their queue threads (the end of the run; also done at
        interpreter exit). Iterating again afterwards starts new workers."""
        workers, self._workers = self._workers, None
        close_at_exit.discard(self)
        if workers is not None and workers._iterator is not None:
            shut_down(workers._iterator)
            workers._iterator = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_train_loader(
    cfg: BootMAEConfig, *, rank: int, world_size: int, state: dict[str, Any] | None = None,
    transform: Callable[[bytes | torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> TrainLoader:
    """The training loader of ``rank`` among ``world_size`` ranks (see the module docstring).

    ``transform(data, epoch, key) -> (uint8 image, mask or None)`` replaces the pre-training
    crop + flip + mask (fine-tuning passes its labelled transform; only ``cfg.data``,
    ``cfg.run.seed`` and ``cfg.model.img_size`` are read then)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    d = cfg.data
    source = open_train_source(cfg)
    source.check()
    total = source.num_samples if d.num_samples is None else min(d.num_samples, source.num_samples)
    if isinstance(source, MixedSource):
        total = source.epoch_samples
        if rank == 0:
            print(source.summary(), flush=True)
    dataset = StreamingDataset(
        source=source,
        transform=transform or SampleTransform.from_config(cfg),
        rank=rank,
        world_size=world_size,
        workers=max(1, d.num_workers),
        batch_size=d.micro_batch_size,
        seed=cfg.run.seed,
        shuffle_buffer=d.shuffle_buffer,
        num_samples=total,
    )
    if dataset.num_batches == 0:
        raise ShardError(
            f"{source.description}: {total} samples give no micro-batch per rank "
            f"(world size {world_size} x data.micro_batch_size {d.micro_batch_size})"
        )
    return TrainLoader(dataset, d.num_workers, state, pin_memory=torch.cuda.is_available())
