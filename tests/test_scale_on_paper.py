"""What cannot run here, simulated with the code's own pure functions: the data plan at 4,096 ranks
x 10 workers over ImageNet, ImageFolder class mixing at ImageNet size, and the momentum-shard
re-slicing of ViT-L from 512 to 384 ranks. Interval arithmetic, no per-sample sets."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from bootmae_ds.data import plan
from bootmae_ds.runtime.sharded_ema import (
    ParamSlot,
    ShardLayout,
    consolidate_shards,
    reslice,
    reslice_plan,
    zero2_layout,
)

IMAGENET = 1_281_167
SHARDS = 1_024
# 4,096 ranks x micro-batch 8 = 32,768 images per micro-step (a large-batch recipe: LAMB/LARS
# runs go to 32k); that leaves 39 micro-batches per rank per epoch, more than the 10 workers.
WORLD, WORKERS, BATCH = 4_096, 10, 8


def imagenet_counts() -> list[int]:
    """1,281,167 samples in 1,024 shards of uneven size, as a byte-budgeted build gives."""
    rng = random.Random(0)
    counts = [1_251 + rng.randint(-40, 40) for _ in range(SHARDS - 1)]
    counts.append(IMAGENET - sum(counts))
    assert min(counts) > 0 and sum(counts) == IMAGENET
    return counts


def check_epoch(counts: list[int], epoch: int) -> int:
    """All (rank, worker) reads of one epoch tile the used part of the sequence exactly once."""
    n = plan.batches_per_rank(IMAGENET, WORLD, BATCH)
    order = plan.shard_order(0, epoch, SHARDS)
    start = dict(zip(order, np.cumsum([0] + [counts[s] for s in order[:-1]]).tolist()))
    intervals = []
    for rank in range(WORLD):
        rank_total = 0
        for w in range(WORKERS):
            segments = plan.worker_segments(counts, 0, epoch, rank, WORLD, w, WORKERS, BATCH)
            length = sum(hi - lo for _, lo, hi in segments)
            assert length == plan.worker_batches(n, WORKERS, w) * BATCH
            assert all(0 <= lo < hi <= counts[s] for s, lo, hi in segments)
            intervals += [(start[s] + lo, start[s] + hi) for s, lo, hi in segments]
            rank_total += length
        assert rank_total == n * BATCH  # equal batch counts on every rank
    intervals.sort()
    edges = np.array(intervals)
    assert edges[0, 0] == 0 and np.all(edges[1:, 0] == edges[:-1, 1])  # disjoint, no gaps
    covered = int(edges[-1, 1])
    assert covered == WORLD * n * BATCH and IMAGENET - covered < WORLD * BATCH  # only the remainder
    return n


def test_data_plan_at_4096_ranks_x_10_workers_over_imagenet() -> None:
    counts = imagenet_counts()
    n = check_epoch(counts, 0)
    assert n == 39
    assert check_epoch(counts, 1) == n
    assert plan.shard_order(0, 0, SHARDS) != plan.shard_order(0, 1, SHARDS)


def test_resume_position_every_1000_steps_covers_exactly_the_rest_of_the_epoch() -> None:
    """After k consumed micro-batches, the workers' (logical worker, first batch) from
    ``plan.resume_point`` read exactly micro-batches k..N-1, and the DataLoader's round-robin
    over them hands those out in order: checked at every 1,000th step of an 800-epoch run."""
    n = plan.batches_per_rank(IMAGENET, WORLD, BATCH)
    per_worker = [plan.worker_batches(n, WORKERS, w) for w in range(WORKERS)]
    for step in range(0, 800 * n, 1_000):
        epoch, consumed = divmod(step, n)
        streams = []
        for physical in range(WORKERS):
            worker, first = plan.resume_point(consumed, WORKERS, physical)
            streams.append([j * WORKERS + worker for j in range(first, per_worker[worker])])
        handed = []  # torch's DataLoader: ask workers 0, 1, ... in turn, skipping exhausted ones
        for i in range(max(map(len, streams))):
            handed += [s[i] for s in streams if i < len(s)]
        assert handed == list(range(consumed, n)), (step, epoch, consumed)
    # And the samples of those batches are the uninterrupted epoch's, for one rank per step.
    counts = imagenet_counts()
    for step in range(0, 800 * n, 1_000):
        epoch, consumed = divmod(step, n)
        rank = step % WORLD
        full = _batches(counts, epoch, rank, n, 0)
        for physical in range(WORKERS):
            worker, first = plan.resume_point(consumed, WORKERS, physical)
            resumed = _batches(counts, epoch, rank, n, 0, only=worker)
            assert resumed[first:] == [full[j * WORKERS + worker] for j in range(first, per_worker[worker])]


def _batches(counts, epoch, rank, n, seed, only=None):
    """A rank's micro-batches as lists of (shard, position), in epoch order (or one worker's)."""
    out = {}
    for w in range(WORKERS) if only is None else [only]:
        segments = plan.worker_segments(counts, seed, epoch, rank, WORLD, w, WORKERS, BATCH)
        order = plan.worker_order(seed, epoch, rank, w, plan.worker_batches(n, WORKERS, w) * BATCH, 1000)
        for j in range(plan.worker_batches(n, WORKERS, w)):
            out[j * WORKERS + w] = [plan.locate(segments, q) for q in order[j * BATCH:(j + 1) * BATCH]]
    keys = sorted(out)
    return [out[g] for g in keys]


# ImageFolder class mixing, at ImageNet size: 1000 classes x 1281 files, 16 ranks x 10 workers x
# micro-batch 256 (the evaluation issue's numbers).
CLASSES, PER_CLASS, F_WORLD, F_WORKERS, F_BATCH = 1000, 1281, 16, 10, 256


def distinct_per_batch(labels: np.ndarray, shuffled: bool) -> np.ndarray:
    """Classes in every micro-batch of every (rank, worker) of epoch 0, for files in class order
    (``labels``) put through ``plan.file_order`` (``shuffled``) or not, cut into 512-file shards."""
    from bootmae_ds.data.sources import FOLDER_SHARD_SIZE

    n_files = len(labels)
    if shuffled:
        labels = labels[np.array(plan.file_order(0, n_files))]
    counts = [min(FOLDER_SHARD_SIZE, n_files - i) for i in range(0, n_files, FOLDER_SHARD_SIZE)]
    n = plan.batches_per_rank(n_files, F_WORLD, F_BATCH)
    out = []
    for rank in range(F_WORLD):
        for w in range(F_WORKERS):
            segments = plan.worker_segments(counts, 0, 0, rank, F_WORLD, w, F_WORKERS, F_BATCH)
            files = np.concatenate([np.arange(s * FOLDER_SHARD_SIZE + lo, s * FOLDER_SHARD_SIZE + hi)
                                    for s, lo, hi in segments])
            order = plan.worker_order(0, 0, rank, w, len(files), 1000)  # data.shuffle_buffer
            batches = np.sort(labels[files[np.array(order)]].reshape(-1, F_BATCH), axis=1)
            out.append(1 + (np.diff(batches, axis=1) != 0).sum(axis=1))
    assert sum(map(len, out)) == F_WORLD * n
    return np.concatenate(out)


def expected_distinct(class_sizes: np.ndarray, batch: int) -> float:
    """Expected distinct classes among ``batch`` i.i.d. draws from the class distribution."""
    p = class_sizes / class_sizes.sum()
    return float(np.sum(1 - (1 - p) ** batch))


def test_imagefolder_batches_mix_classes_at_imagenet_size() -> None:
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    expected = expected_distinct(np.full(CLASSES, PER_CLASS), F_BATCH)
    assert 225 < expected < 227  # 1000 * (1 - 0.999**256)
    mixed = distinct_per_batch(labels, shuffled=True)
    assert abs(mixed.mean() - expected) < 1.0  # ~5,000 batches: the mean's error is ~0.1
    assert mixed.min() > expected - 30  # one batch's spread is about 6.5
    before = distinct_per_batch(labels, shuffled=False)  # the file list as scanned: the bug
    assert before.mean() < 15 and before.max() < 25  # measured: 3-20, mean 11.2


# Momentum-shard re-slicing on ViT-L's real slot layout.


def vit_large_encoder_groups() -> list[list[tuple[str, tuple[int, ...]]]]:
    """The momentum EMA's groups: the encoder's optimizer groups of the ViT-L preset, built on
    the meta device (no memory), in the optimizer's order."""
    from bootmae_ds.config import load_config
    from bootmae_ds.models import build_model
    from bootmae_ds.runtime.optim import param_groups

    with torch.device("meta"):
        model = build_model(load_config("vit_large_800ep"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[(names[id(p)][len("encoder."):], tuple(p.shape)) for p in g["params"]]
              for g in param_groups(model) if g["name"].startswith("encoder")]
    assert sum(math.prod(s) for g in groups for _, s in g) > 300_000_000  # ViT-L/16: 303M
    return groups


def check_every_element_once(old: ShardLayout, new: ShardLayout, pieces: dict[int, list]) -> int:
    """Interval arithmetic: every element of every parameter is written once into the new
    slices, from the old slice that held the same element."""
    by_group = {}
    for s in new.slots:
        by_group.setdefault(s.group, []).append(s)
    old_at = {s.name: s for s in old.slots}
    covered = {g: [] for g in by_group}
    for rank, rank_pieces in pieces.items():
        for p in rank_pieces:
            assert 0 <= p.old_offset and p.old_offset + p.length <= old.partition_sizes[p.group]
            assert 0 <= p.new_offset and p.new_offset + p.length <= new.partition_sizes[p.group]
            lo = rank * new.partition_sizes[p.group] + p.new_offset  # new flat coordinates
            src = p.old_rank * old.partition_sizes[p.group] + p.old_offset  # old flat coordinates
            # split at parameter boundaries: each part must come from the same parameter element
            slots = sorted(by_group[p.group], key=lambda s: s.offset)
            starts = [s.offset for s in slots]
            a = lo
            while a < lo + p.length:
                s = slots[np.searchsorted(starts, a, side="right") - 1]
                end = s.offset + math.prod(s.shape)
                assert s.offset <= a < end, f"piece element {a} outside every parameter"
                b = min(end, lo + p.length)
                assert old_at[s.name].offset + (a - s.offset) == src + (a - lo)  # same element
                covered[p.group].append((a, b))
                a = b
    total = 0
    for g, slots in by_group.items():
        params = sorted((s.offset, s.offset + math.prod(s.shape)) for s in slots)
        merged = sorted(covered[g])
        # exactly once: sorted pieces abut and their union is the union of the parameters
        assert all(x[1] <= y[0] for x, y in itertools.pairwise(merged)), "an element written twice"
        joined = []
        for a, b in merged:
            if joined and joined[-1][1] == a:
                joined[-1] = (joined[-1][0], b)
            else:
                joined.append((a, b))
        expect = []
        for a, b in params:
            if expect and expect[-1][1] == a:
                expect[-1] = (expect[-1][0], b)
            else:
                expect.append((a, b))
        assert joined == expect, f"group {g}: elements missing"
        total += sum(b - a for a, b in merged)
    return total


@pytest.mark.parametrize("round_robin", [False, True])
def test_vit_large_momentum_shards_reslice_from_512_to_384_ranks(round_robin: bool) -> None:
    groups = vit_large_encoder_groups()
    old = zero2_layout(groups, 512, round_robin=round_robin)
    new = zero2_layout(groups, 384, round_robin=round_robin)
    for layout in (old, new):  # padded to 2 x world, cut into equal slices holding everything
        for g, params in enumerate(groups):
            numel = sum(math.prod(s) for _, s in params)
            flat = layout.partition_sizes[g] * layout.world_size
            assert flat % (2 * layout.world_size) == 0 and numel <= flat < numel + 2 * layout.world_size
    pieces = reslice_plan(old, new)
    assert sorted(pieces) == list(range(384))
    assert check_every_element_once(old, new, pieces) == sum(math.prod(s) for g in groups for _, s in g)
    # Each new rank reads 2 or 3 old shards per group, not all 512.
    reads = [len({p.old_rank for p in ps}) for ps in pieces.values()]
    assert max(reads) <= 3 * len(groups)
    one = reslice_plan(old, new, [200])  # a rank asks for its own pieces only
    assert one == {200: pieces[200]}


def test_zero2_layout_reproduces_deepspeed_rules_on_a_small_example() -> None:
    """Offsets and slice sizes worked out by hand from stage_1_and_2.py's rules."""
    groups = [[("a", (3,)), ("b", (2, 2)), ("c", (5,))], [("d", (1,))]]
    plain = zero2_layout(groups, 3)
    assert [s.offset for s in plain.slots] == [0, 3, 7, 0]
    assert plain.partition_sizes == (4, 2)  # 12 -> 12 (multiple of 6) / 3; 1 -> 6 / 3
    robin = zero2_layout(groups, 2, round_robin=True)  # buckets i % 2: a, c | b
    assert [s.offset for s in robin.slots] == [0, 8, 3, 0]
    aligned = zero2_layout(groups, 1, parameter_alignment=True)  # 16 bytes of bf16 = 8 elements
    assert [s.offset for s in aligned.slots] == [0, 8, 16, 0] and aligned.partition_sizes == (22, 2)


def test_reslice_moves_real_tensors_like_consolidate_then_slice() -> None:
    """The plan applied to real fp32 shards (3 ranks -> 2 and -> 5) equals the reference way:
    consolidate all old shards into full tensors, lay them out anew, cut."""
    gen = torch.Generator().manual_seed(0)
    groups = [[("w", (7, 3)), ("b", (7,)), ("v", (4, 5))], [("n", (9,)), ("m", (2,))]]
    full = {name: torch.randn(shape, generator=gen) for g in groups for name, shape in g}
    for old_world, new_world, robin in [(3, 2, False), (3, 5, True), (2, 3, True)]:
        old = zero2_layout(groups, old_world, round_robin=robin)
        shards = []
        for r in range(old_world):
            ema = []
            for g, size in enumerate(old.partition_sizes):
                flat = torch.zeros(size * old_world)
                for s in (s for s in old.slots if s.group == g):
                    flat[s.offset: s.offset + full[s.name].numel()] = full[s.name].reshape(-1)
                ema.append(flat[r * size: (r + 1) * size].clone())
            shards.append({"ema": ema, "rank": r, "world_size": old_world,
                           "partition_sizes": list(old.partition_sizes),
                           "slots": [(s.name, s.group, s.offset, s.shape) for s in old.slots]})
        assert ShardLayout.of_state(shards[0]) == old
        reference = consolidate_shards(shards)
        assert all(torch.equal(reference[k], v) for k, v in full.items())
        new = zero2_layout(groups, new_world, round_robin=not robin)
        for rank, pieces in reslice_plan(old, new).items():
            got = reslice(pieces, new.partition_sizes, shards.__getitem__)
            for g, size in enumerate(new.partition_sizes):
                flat = torch.zeros(size * new_world)
                for s in (s for s in new.slots if s.group == g):
                    flat[s.offset: s.offset + reference[s.name].numel()] = reference[s.name].reshape(-1)
                assert torch.equal(got[g], flat[rank * size: (rank + 1) * size])


def test_reslice_refuses_another_model() -> None:
    layout = zero2_layout([[("w", (4,)), ("b", (2,))]], 2)
    other = ShardLayout(2, layout.partition_sizes, (ParamSlot("w", 0, 0, (4,)), ParamSlot("x", 0, 4, (2,))))
    with pytest.raises(ValueError, match=r"does not match this model .*'b', 'x'"):
        reslice_plan(layout, other)
