"""Run by tests/test_ds_config.py under `deepspeed --num_gpus 2` (CPU ranks).

Builds the bf16 ZeRO-2 engine from our DeepSpeed template, with the template's
``communication_data_type`` or without it (argv[1] = "template" | "without"), runs two optimizer
steps and records the dtype of every tensor that DeepSpeed's communication layer reduces during
backward and step (the gradient reduce-scatter / all-reduce). Writes {op: [dtypes]} to argv[2].
"""

import json
import sys
from collections import defaultdict

import deepspeed
import deepspeed.comm as ds_comm
import torch

from bootmae_ds.config import load_config
from bootmae_ds.data.masking import MaskGenerator
from bootmae_ds.models import build_model
from bootmae_ds.runtime.dist import init_distributed
from bootmae_ds.runtime.ds_config import build_ds_config
from bootmae_ds.runtime.optim import build_optimizer, set_hyperparameters

mode, out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
info = init_distributed()
cfg = load_config("demo", ["model.depth=1", "model.feature_decoder.context_block=0",
                           "data.micro_batch_size=4", "data.global_batch_size=8"])
torch.manual_seed(0)
model = build_model(cfg)
ds_config = build_ds_config(cfg, info.world_size, "bf16")
assert ds_config.get("communication_data_type") == "fp32", ds_config  # what the template says
if mode == "without":
    del ds_config["communication_data_type"]
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg, "cpu"), config=ds_config)

seen: dict[str, list[str]] = defaultdict(list)
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_fn",
              "reduce_scatter_tensor", "inference_all_reduce")


def recording(name, real):
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if tensors:
            seen[name].append(str(tensors[0].dtype))
        return real(*args, **kwargs)
    return wrapper


for name in REDUCTIONS:  # ZeRO calls these through `deepspeed.comm` at call time
    if hasattr(ds_comm, name):
        setattr(ds_comm, name, recording(name, getattr(ds_comm, name)))

masks = MaskGenerator.from_config(cfg)
for step in range(2):
    set_hyperparameters(engine.optimizer, 1e-3, 0.05)
    g = torch.Generator().manual_seed(100 * step + info.rank)
    x = torch.randn(4, 3, 32, 32, generator=g).to(torch.bfloat16)
    out = engine(x, masks.batch(4, step * 10 + info.rank))
    engine.backward(out.pixels.float().square().mean() + out.features.float().square().mean())
    engine.step()
if info.rank == 0:
    with open(out_path, "w") as f:
        json.dump({"seen": seen, "engine_dtype": str(engine.communication_data_type)}, f)
ds_comm.destroy_process_group()
