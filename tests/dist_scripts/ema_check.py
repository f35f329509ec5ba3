"""Run by tests/test_momentum.py under `deepspeed --num_gpus 2` (CPU ranks).

Trains a tiny BootMAE for a few steps with ZeRO-2 and keeps, beside the sharded momentum
encoder, an unsharded fp32 reference EMA of the full online encoder (gathered every step).
Writes what it found to the JSON path given as argv[2]; given a third path, then runs
engine_facts.py's checks on the same ranks and writes their facts there.
"""

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from bootmae_ds.config import load_config
from bootmae_ds.data.masking import MaskGenerator
from bootmae_ds.models import build_model
from bootmae_ds.runtime.dist import init_distributed
from bootmae_ds.runtime.ds_config import build_ds_config
from bootmae_ds.runtime.optim import build_optimizer, param_groups, set_hyperparameters
from bootmae_ds.runtime.sharded_ema import ShardedEMA, consolidate_shards, zero2_layout

precision, out_path, *facts_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
info = init_distributed()
cfg = load_config("demo", ["model.depth=2", "model.feature_decoder.context_block=1",
                           "data.micro_batch_size=4", "data.global_batch_size=8"])
torch.manual_seed(0)
model = build_model(cfg)
teacher = copy.deepcopy(model.encoder)
ds_config = build_ds_config(cfg, info.world_size, precision)
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg, "cpu"), config=ds_config)
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
momentum = ShardedEMA(engine, teacher, "encoder.", dtype)
zero = engine.optimizer
# The layout computed from shapes alone (what re-slicing plans use) must be the engine's.
names = {id(p): n for n, p in engine.module.named_parameters()}
encoder_groups = [[(names[id(p)][len("encoder."):], tuple(p.shape)) for p in g["params"]]
                  for g in param_groups(engine.module) if g["name"].startswith("encoder")]
layout_match = zero2_layout(encoder_groups, info.world_size) == momentum.layout


@torch.no_grad()
def full_online_fp32() -> dict[str, torch.Tensor]:
    """The full fp32 master weights of the encoder, gathered from every rank's slices."""
    flats = []
    for g, size in zip(momentum.group_ids, momentum.partition_sizes):
        buf = torch.empty(info.world_size * size)
        dist.all_gather_into_tensor(buf, zero.single_partition_of_fp32_groups[g])
        flats.append(buf)
    return {s.name: flats[s.group][s.offset: s.offset + torch.Size(s.shape).numel()].view(s.shape).clone()
            for s in momentum.slots}


reference = full_online_fp32()
masks = MaskGenerator.from_config(cfg)
momenta = [0.9, 0.5, 0.99, 0.7, 0.95, 0.8]
applied = []
for step, m in enumerate(momenta):
    set_hyperparameters(engine.optimizer, 1e-3, 0.05)
    g = torch.Generator().manual_seed(100 * step + info.rank)
    x = torch.randn(4, 3, 32, 32, generator=g).to(engine.module.encoder.cls_token.dtype)
    out = engine(x, masks.batch(4, step * 10 + info.rank))
    loss = out.pixels.float().square().mean() + out.features.float().square().mean()
    if step == 3:
        loss = loss * float("nan")  # a non-finite step: skipped, the EMA must not move
    engine.backward(loss)
    engine.step()
    applied.append(engine.was_step_applied())
    if engine.was_step_applied():
        momentum.update(m)
        momentum.gather()
        online = full_online_fp32()
        for name, ref in reference.items():
            torch.lerp(ref, online[name], 1 - m, out=ref)

shards = [None] * info.world_size
dist.all_gather_object(shards, momentum.state_dict())
consolidated = consolidate_shards(shards)
exact = all(torch.equal(consolidated[k], v) for k, v in reference.items())
max_err = max((consolidated[k] - v).abs().max().item() for k, v in reference.items())
target = dict(momentum.target.named_parameters())
target_match = all(torch.equal(target[k], v.to(dtype)) for k, v in reference.items())
frozen_match = torch.equal(target["pos_embed"], engine.module.encoder.pos_embed.detach().to(dtype))
encoder_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad)
changed = any(not torch.equal(reference[k], v) for k, v in full_online_fp32().items())
result = {"rank": info.rank, "exact": exact, "max_err": max_err, "target_match": target_match,
          "frozen_match": frozen_match, "applied": applied, "local_bytes": momentum.local_bytes,
          "encoder_fp32_bytes": 4 * encoder_numel, "keys": sorted(consolidated) == sorted(reference),
          "ema_differs_from_online": changed, "layout_match": layout_match}
results = [None] * info.world_size
dist.all_gather_object(results, result)
if info.rank == 0:
    with open(out_path, "w") as f:
        json.dump(results, f)
if facts_path:  # the GPU run's engine_facts.py on these CPU ranks, in this launch (a launch costs more)
    from engine_facts import engine_facts

    facts = engine_facts(info)
    if info.rank == 0:
        with open(facts_path[0], "w") as f:
            json.dump(facts, f)
dist.barrier()
dist.destroy_process_group()
