"""Run by tests/test_faults.py under `deepspeed --num_gpus 2` (CPU ranks).

Saves a good checkpoint, then makes one rank's write fail with ENOSPC at three places: inside
DeepSpeed's own save (its optimizer-state file), in our EMA shard, and in rank 0's manifest.
Every rank must get ``CheckpointSaveError`` (no rank left waiting in a collective), the failed
checkpoint's directory must be gone, and the good one and ``latest`` untouched. Writes what it
found to the JSON path given as argv[1].
"""

import copy
import errno
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from bootmae_ds.config import load_config
from bootmae_ds.models import build_model
from bootmae_ds.runtime import checkpoint as ckpt
from bootmae_ds.runtime.dist import init_distributed
from bootmae_ds.runtime.ds_config import build_ds_config
from bootmae_ds.runtime.optim import build_optimizer
from bootmae_ds.runtime.sharded_ema import ShardedEMA

out_path, ckpt_dir = [Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank")]
info = init_distributed()
cfg = load_config("demo", ["model.depth=1", "model.feature_decoder.context_block=0",
                           "data.micro_batch_size=4", "data.global_batch_size=8"])
torch.manual_seed(0)
model = build_model(cfg)
teacher = copy.deepcopy(model.encoder)
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg, "cpu"),
                                  config=build_ds_config(cfg, info.world_size, "fp32"))
ema = ShardedEMA(engine, teacher, "encoder.", torch.float32)
save = lambda step: ckpt.save_checkpoint(engine, ema, ckpt_dir, step, {"step": step}, {"x": 1}, keep_last=5)  # noqa: E731
save(1)

real_save = torch.save


def full_disk(obj, f, *args, **kwargs):
    """torch.save that fails like a full disk when ``f`` is one of the target files."""
    if str(f).endswith(target):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)


cases = {2: ("optim_states.pt", 1), 3: ("momentum_rank1.pt", 1), 4: (ckpt.MANIFEST, 0)}
results = {}
for step, (target, failing_rank) in cases.items():
    if info.rank == failing_rank:
        torch.save = full_disk  # DeepSpeed's checkpoint engine writes through torch.save as well
        real_write = ckpt._write_atomic
        if target == ckpt.MANIFEST:
            def failing_write(path, text, real_write=real_write):
                if path.name == ckpt.MANIFEST:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return real_write(path, text)
            ckpt._write_atomic = failing_write
    try:
        save(step)
        outcome = "saved"
    except ckpt.CheckpointSaveError as err:
        outcome = str(err)
    finally:
        torch.save = real_save
        if target == ckpt.MANIFEST and info.rank == failing_rank:
            ckpt._write_atomic = real_write
    dist.barrier()
    results[step] = {"outcome": outcome, "dir_exists": (ckpt_dir / ckpt.tag_for(step)).exists(),
                     "latest": (ckpt_dir / ckpt.LATEST).read_text().strip(),
                     "good_intact": ckpt.check_integrity(ckpt_dir / ckpt.tag_for(1)) is None}
save(5)  # the storage works again: saving goes on as before
results["after"] = {"complete": [p.name for p in ckpt.complete_tags(ckpt_dir)],
                    "latest": (ckpt_dir / ckpt.LATEST).read_text().strip()}
gathered = [None] * info.world_size
dist.all_gather_object(gathered, results)
if info.rank == 0:
    out_path.write_text(json.dumps(gathered))
dist.destroy_process_group()
