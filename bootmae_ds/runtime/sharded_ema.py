"""An EMA of (part of) a model kept as a sharded, non-trainable replica under ZeRO-2.

ZeRO-2 gives each data-parallel rank the fp32 master slice of every optimizer param group. The
EMA mirrors that layout: each rank keeps the fp32 EMA of exactly the slices its optimizer owns
of the submodule named by a prefix (1/world_size of it), updates it in place after every applied
optimizer step, and all-gathers the slices (in bf16 by default) into one flat buffer per group
whose views are the weights of a full ``target`` module used for no-grad forwards. The fp32 EMA
is never materialised whole on any rank.

Pre-training's momentum encoder is the EMA of ``encoder.``; fine-tuning's model EMA that of the
whole classifier (prefix ``""``).

Another world size moves every slice boundary. :func:`zero2_layout` computes a group's flat
layout and cut exactly as DeepSpeed 0.19.8's ZeRO stage 1/2 does, from parameter shapes alone,
and :func:`reslice_plan` says which (old rank, offset, length) ranges fill each new rank's
slices, so a resized run's rank reads only the 1-3 old shards that hold its part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# torch >= 2.10 renamed the flat all-gather; keep working on older releases too.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter of the EMA'd submodule lives in a group's flat (padded) buffer."""

    name: str  # name inside the submodule, e.g. "blocks.0.attn.qkv.weight" under "encoder."
    group: int  # index among the EMA's groups
    offset: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardLayout:
    """How a sharded EMA's groups are laid out and cut: all a re-slicing needs to know."""

    world_size: int
    partition_sizes: tuple[int, ...]  # per group: elements of each rank's slice
    slots: tuple[ParamSlot, ...]

    @classmethod
    def of_state(cls, state: dict[str, Any]) -> ShardLayout:
        """The layout a :meth:`ShardedEMA.state_dict` was written with."""
        return cls(state["world_size"], tuple(state["partition_sizes"]),
                   tuple(ParamSlot(n, g, o, tuple(shape)) for n, g, o, shape in state["slots"]))


@dataclass(frozen=True)
class Piece:
    """``length`` elements of group ``group``: from ``old_offset`` in old rank ``old_rank``'s
    slice to ``new_offset`` in the new rank's slice."""

    group: int
    old_rank: int
    old_offset: int
    new_offset: int
    length: int


def zero2_layout(
    groups: list[list[tuple[str, tuple[int, ...]]]], world_size: int, *,
    round_robin: bool = False, parameter_alignment: bool = False, element_size: int = 2,
) -> ShardLayout:
    """The flat layout of ZeRO stage 1/2 param groups (``[(name, shape), ...]`` each, trainable
    parameters in the optimizer's order) at ``world_size`` ranks, as DeepSpeed 0.19.8 builds it
    (``DeepSpeedZeroOptimizer.__init__`` in runtime/zero/stage_1_and_2.py):

    - ``round_robin_gradients`` reorders a group: parameter ``i`` goes to bucket ``i % world``,
      buckets laid out in order, each in index order;
    - ``parameter_alignment`` pads each parameter but the last to 16 bytes;
    - the flat buffer is padded at the end to a multiple of ``nccl_start_alignment_factor`` (2)
      x world size, so it splits into ``world_size`` equal slices (``get_data_parallel_partitions``).
    """
    alignment = 2 * world_size
    step = 16 // math.gcd(16, element_size) if parameter_alignment else 1
    sizes, slots = [], []
    for g, params in enumerate(groups):
        order = sorted(range(len(params)), key=lambda i: (i % world_size, i)) if round_robin \
            else range(len(params))
        offsets, offset = {}, 0
        for k, i in enumerate(order):
            offsets[i] = offset
            offset += math.prod(params[i][1])
            if k < len(params) - 1:
                offset += -offset % step
        sizes.append(-(-offset // alignment) * alignment // world_size)
        slots += [ParamSlot(name, g, offsets[i], tuple(shape)) for i, (name, shape) in enumerate(params)]
    return ShardLayout(world_size, tuple(sizes), tuple(slots))


def reslice_plan(old: ShardLayout, new: ShardLayout,
                 ranks: Iterable[int] | None = None) -> dict[int, list[Piece]]:
    """For each new rank (all, or ``ranks``): the pieces of old slices that fill its new slices,
    in new-offset order, contiguous runs merged. Parameters are matched by name, so layouts whose
    parameter order differs (``round_robin_gradients``) map correctly; the new slices' padding is
    in no piece (it stays zero, as DeepSpeed pads)."""
    old_at = {s.name: s for s in old.slots}
    mismatch = sorted({s.name for s in new.slots} ^ set(old_at)) + [
        s.name for s in new.slots
        if s.name in old_at and (old_at[s.name].shape, old_at[s.name].group) != (s.shape, s.group)]
    if mismatch or len(old.partition_sizes) != len(new.partition_sizes):
        raise ValueError(f"sharded EMA of world size {old.world_size} does not match this model "
                         f"(parameters {mismatch[:5]}, groups {len(old.partition_sizes)} -> "
                         f"{len(new.partition_sizes)}); resume with the model config that wrote it")
    wanted = set(range(new.world_size) if ranks is None else ranks)
    out: dict[int, list[Piece]] = {r: [] for r in sorted(wanted)}
    for s in sorted(new.slots, key=lambda s: (s.group, s.offset)):
        size_new, size_old = new.partition_sizes[s.group], old.partition_sizes[s.group]
        a, end = s.offset, s.offset + math.prod(s.shape)  # new flat coordinates
        x = old_at[s.name].offset  # old flat coordinate of element a
        while a < end:
            r, q = a // size_new, x // size_old
            length = min(end - a, (r + 1) * size_new - a, (q + 1) * size_old - x)
            if r in wanted:
                piece = Piece(s.group, q, x - q * size_old, a - r * size_new, length)
                last = out[r][-1] if out[r] else None
                if (last and (last.group, last.old_rank) == (piece.group, q)
                        and last.old_offset + last.length == piece.old_offset
                        and last.new_offset + last.length == piece.new_offset):
                    out[r][-1] = Piece(s.group, q, last.old_offset, last.new_offset, last.length + length)
                else:
                    out[r].append(piece)
            a, x = a + length, x + length
    return out


def reslice(pieces: list[Piece], partition_sizes: Iterable[int],
            open_shard: Callable[[int], dict[str, Any]]) -> list[torch.Tensor]:
    """One new rank's fp32 slices from ``pieces`` of the old shards ``open_shard(old_rank)``
    returns (a :meth:`ShardedEMA.state_dict`); padding stays zero."""
    out = [torch.zeros(n, dtype=torch.float32) for n in partition_sizes]
    for p in pieces:
        src = open_shard(p.old_rank)["ema"][p.group]
        out[p.group][p.new_offset: p.new_offset + p.length] = src[p.old_offset: p.old_offset + p.length]
    return out


class ShardedEMA:
    """EMA of a submodule's ZeRO-2 fp32 partitions plus a gathered full ``target`` copy of it."""

    def __init__(self, engine: Any, target: nn.Module, prefix: str, dtype: torch.dtype = torch.bfloat16) -> None:
        """``target`` is a copy of the submodule named ``prefix`` (``""``: the whole model)."""
        zero = engine.optimizer
        self.zero = zero
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.dtype = dtype
        self.prefix = prefix
        groups = owned_groups(engine, prefix)
        if not groups:
            raise RuntimeError(f"no optimizer param group holds only {prefix!r} parameters: "
                               f"build it with bootmae_ds.runtime.optim")
        self.group_ids = groups
        self.ema = [zero.single_partition_of_fp32_groups[g].detach().clone() for g in groups]
        self.partition_sizes = [e.numel() for e in self.ema]
        device = self.ema[0].device
        self.buffers = [torch.empty(self.world_size * n, dtype=dtype, device=device) for n in self.partition_sizes]
        self.slots = zero_slots(engine, groups, prefix)
        self.target = target.to(device=device).requires_grad_(False).eval()
        self._bind_target(engine.module)
        self.gather()

    def _bind_target(self, module: nn.Module) -> None:
        """Point the target's trainable weights into the gathered buffers; copy frozen ones."""
        own = dict(self.target.named_parameters())
        bound = set()
        for slot in self.slots:
            numel = int(torch.Size(slot.shape).numel())
            own[slot.name].data = self.buffers[slot.group][slot.offset: slot.offset + numel].view(slot.shape)
            bound.add(slot.name)
        for name, param in module.named_parameters():
            if name.startswith(self.prefix) and not param.requires_grad:
                short = name[len(self.prefix):]
                own[short].data = param.detach().to(self.dtype).clone()
                bound.add(short)
        missing = set(own) - bound
        if missing:
            raise RuntimeError(f"target parameters without a source: {sorted(missing)}")
        for name, buf in module.named_buffers():  # e.g. BatchNorm statistics: copied, not averaged
            if name.startswith(self.prefix):
                self.target.get_buffer(name[len(self.prefix):]).copy_(buf)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """``ema = momentum * ema + (1 - momentum) * online`` on this rank's slices, in fp32."""
        if momentum >= 1.0:
            return
        online = [self.zero.single_partition_of_fp32_groups[g] for g in self.group_ids]
        torch._foreach_lerp_(self.ema, online, 1.0 - momentum)

    @torch.no_grad()
    def gather(self) -> None:
        """All-gather every rank's EMA slices into the target's weights."""
        for ema, buf in zip(self.ema, self.buffers):
            _all_gather_flat(buf, ema.to(self.dtype))

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA on every rank (a collective: call it on all ranks)."""
        return gather_full_fp32(self.ema, self.slots)

    @property
    def local_bytes(self) -> int:
        """Bytes of fp32 EMA state held by this rank."""
        return sum(e.numel() * e.element_size() for e in self.ema)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard, with the layout needed to consolidate shards offline."""
        return {
            "ema": [e.detach().cpu().clone() for e in self.ema],
            "rank": self.rank,
            "world_size": self.world_size,
            "partition_sizes": self.partition_sizes,
            "slots": [(s.name, s.group, s.offset, s.shape) for s in self.slots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["partition_sizes"] != self.partition_sizes:
            raise ValueError(
                f"EMA shard from world size {state['world_size']} (partitions "
                f"{state['partition_sizes']}) cannot load into world size {self.world_size} "
                f"(partitions {self.partition_sizes}); consolidate it with "
                f"bootmae_ds.runtime.sharded_ema.consolidate_shards"
            )
        for ema, saved in zip(self.ema, state["ema"]):
            ema.copy_(saved.to(ema.device))
        self.gather()

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.world_size, tuple(self.partition_sizes), tuple(self.slots))

    @torch.no_grad()
    def load_resliced(self, open_shard: Callable[[int], dict[str, Any]]) -> None:
        """Take this rank's slices from the shards of another world size: ``open_shard(r)`` gives
        old rank ``r``'s :meth:`state_dict`. Rank 0's is read for the old layout, then only the
        old shards this rank's :func:`reslice_plan` names (1-3 when the size changes a little),
        not all of them."""
        cache: dict[int, dict[str, Any]] = {}

        def shard(r: int) -> dict[str, Any]:
            if r not in cache:
                cache[r] = open_shard(r)
            return cache[r]

        pieces = reslice_plan(ShardLayout.of_state(shard(0)), self.layout, [self.rank])[self.rank]
        for ema, part in zip(self.ema, reslice(pieces, self.partition_sizes, shard)):
            ema.copy_(part.to(ema.device))
        self.gather()

    @torch.no_grad()
    def load_full(self, full_state: dict[str, torch.Tensor]) -> None:
        """Take this rank's slices of a full fp32 EMA (resharding to a new world size)."""
        missing = {s.name for s in self.slots} - set(full_state)
        if missing:
            raise ValueError(f"full EMA state lacks {sorted(missing)}")
        for k, (ema, size) in enumerate(zip(self.ema, self.partition_sizes)):
            flat = torch.zeros(self.world_size * size, dtype=torch.float32)
            for s in (s for s in self.slots if s.group == k):
                value = full_state[s.name].float().reshape(-1)
                flat[s.offset: s.offset + value.numel()] = value
            ema.copy_(flat[self.rank * size: (self.rank + 1) * size].to(ema.device))
        self.gather()


def owned_groups(engine: Any, prefix: str) -> list[int]:
    """Indices of the ZeRO param groups whose parameters all lie under ``prefix``."""
    names = {p: n for n, p in engine.module.named_parameters()}
    return [i for i, params in enumerate(engine.optimizer.bit16_groups)
            if all(names[p].startswith(prefix) for p in params)]


def zero_slots(engine: Any, groups: list[int], prefix: str) -> list[ParamSlot]:
    """Where each parameter of ``groups`` lies in its group's flat buffer (names without ``prefix``)."""
    zero = engine.optimizer
    names = {p: n for n, p in engine.module.named_parameters()}
    slots = []
    for k, g in enumerate(groups):
        flat = zero.bit16_groups_flat[g]
        for p in zero.bit16_groups[g]:
            offset = (p.data_ptr() - flat.data_ptr()) // p.element_size()
            slots.append(ParamSlot(names[p][len(prefix):], k, offset, tuple(p.shape)))
    return slots


@torch.no_grad()
def gather_full_fp32(partitions: list[torch.Tensor], slots: list[ParamSlot]) -> dict[str, torch.Tensor]:
    """All-gather per-rank fp32 partitions into a full state dict on CPU (every rank must call)."""
    world = dist.get_world_size()
    flats = []
    for part in partitions:
        flat = torch.empty(world * part.numel(), dtype=torch.float32, device=part.device)
        _all_gather_flat(flat, part.float().contiguous())
        flats.append(flat.cpu())
    return {s.name: flats[s.group][s.offset: s.offset + int(torch.Size(s.shape).numel())].view(s.shape).clone()
            for s in slots}


def online_full_state(engine: Any) -> dict[str, torch.Tensor]:
    """The trained model's fp32 master weights, whole, on every rank (a collective)."""
    groups = list(range(len(engine.optimizer.bit16_groups)))
    parts = [engine.optimizer.single_partition_of_fp32_groups[g] for g in groups]
    return gather_full_fp32(parts, zero_slots(engine, groups, ""))


def consolidate_shards(shards: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Join per-rank EMA shards (any world size) into a full fp32 state dict."""
    shards = sorted(shards, key=lambda s: s["rank"])
    world = shards[0]["world_size"]
    if [s["rank"] for s in shards] != list(range(world)):
        raise ValueError(f"need the shards of all {world} ranks, got ranks {[s['rank'] for s in shards]}")
    flats = [torch.cat([s["ema"][g] for s in shards]) for g in range(len(shards[0]["ema"]))]
    out = {}
    for name, group, offset, shape in shards[0]["slots"]:
        numel = int(torch.Size(shape).numel())
        out[name] = flats[group][offset: offset + numel].view(shape).clone()
    return out
