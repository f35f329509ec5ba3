"""Run by tests/test_gpu.py (one process, a world of one, on the accelerator DeepSpeed picks) and
by tests/test_momentum.py (on 2 CPU ranks, inside tests/dist_scripts/ema_check.py's bf16 launch:
:func:`engine_facts`), so its first run is not on a GPU.

The bf16 ZeRO-2 engine of our template with gradient accumulation 2: records how DeepSpeed
accumulates and reduces the gradients, and checks the sharded EMA against an unsharded fp32
reference EMA of the encoder over a few steps (one of them non-finite, hence skipped). The
reference is computed on the EMA's device with ``torch.lerp`` (the EMA uses ``_foreach_lerp_``):
kernels for one formula may round differently across devices and vector widths, so it is held
to 1 ulp, and whether it is bitwise equal is recorded beside. Run as a script, rank 0 writes the
facts as JSON to argv[1].
"""

import copy
import json
import sys

import deepspeed
import torch

from bootmae_ds.config import load_config
from bootmae_ds.data.masking import MaskGenerator
from bootmae_ds.models import build_model
from bootmae_ds.runtime.dist import DistInfo, init_distributed
from bootmae_ds.runtime.ds_config import build_ds_config
from bootmae_ds.runtime.optim import build_optimizer, set_hyperparameters
from bootmae_ds.runtime.sharded_ema import ShardedEMA, gather_full_fp32


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of ``a`` from ``b`` in units of ``b``'s last place (fp32)."""
    spacing = torch.nextafter(b.abs(), torch.tensor(float("inf"), device=b.device)) - b.abs()
    return ((a - b).abs() / spacing).max().item()


def engine_facts(info: DistInfo) -> dict:
    """The facts, the same on every rank (collectives inside: call it on all ranks)."""
    cfg = load_config("demo", ["model.depth=2", "model.feature_decoder.context_block=1",
                               "data.micro_batch_size=4", f"data.global_batch_size={8 * info.world_size}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    teacher = copy.deepcopy(model.encoder)
    ds_config = build_ds_config(cfg, info.world_size, "bf16")
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg, info.device.type),
                                      config=ds_config)
    zero = engine.optimizer
    ema = ShardedEMA(engine, teacher, "encoder.", torch.bfloat16)

    def encoder_fp32() -> dict[str, torch.Tensor]:
        """The encoder's fp32 master weights, whole, on the EMA's device (a collective)."""
        parts = [zero.single_partition_of_fp32_groups[g] for g in ema.group_ids]
        return {k: v.to(parts[0].device) for k, v in gather_full_fp32(parts, ema.slots).items()}

    reference = encoder_fp32()
    masks = MaskGenerator.from_config(cfg)
    facts: dict = {"device": str(info.device), "world_size": info.world_size,
                   "accum_steps": engine.gradient_accumulation_steps(),
                   "param_dtype": str(next(engine.module.parameters()).dtype),
                   "grad_accum_dtype": str(zero.gradient_accumulation_dtype),
                   "separate_grad_accum": bool(zero.use_separate_grad_accum),
                   "communication_dtype": str(engine.communication_data_type), "applied": []}
    momenta = [0.9, 0.5, 0.99, 0.7]
    for step, m in enumerate(momenta):
        set_hyperparameters(zero, 1e-3, 0.05)
        for micro in range(2):
            g = torch.Generator().manual_seed(100 * step + micro)
            x = torch.randn(4, 3, 32, 32, generator=g).to(info.device, torch.bfloat16)
            out = engine(x, masks.batch(4, step * 10 + micro).to(info.device))
            loss = out.pixels.float().square().mean() + out.features.float().square().mean()
            if step == 2:
                loss = loss * float("nan")  # a non-finite step: skipped, the EMA must not move
            engine.backward(loss)
            if micro == 0:  # inside the accumulation window: the buffers holding the reduced gradient
                held = []
                for value in zero.averaged_gradients.values():
                    flat = getattr(value, "flat_partition", None)
                    held += [flat] if flat is not None else [t for t in (value or []) if isinstance(t, torch.Tensor)]
                held += [p.grad_accum for grp in zero.bit16_groups for p in grp
                         if getattr(p, "grad_accum", None) is not None]
                facts.setdefault("held_grad_dtypes", sorted({str(t.dtype) for t in held}))
            engine.step()
        facts["applied"].append(bool(engine.was_step_applied()))
        if engine.was_step_applied():
            ema.update(m)
            ema.gather()
            online = encoder_fp32()
            for name, ref in reference.items():
                torch.lerp(ref, online[name], 1 - m, out=ref)
    full = {k: v.to(reference[k].device) for k, v in ema.full_state().items()}
    facts["reference_device"] = str(next(iter(reference.values())).device)
    facts["ema_exact"] = all(torch.equal(full[k], v) for k, v in reference.items())
    facts["ema_max_err"] = max((full[k] - v).abs().max().item() for k, v in reference.items())
    facts["ema_max_ulps"] = max(ulps(full[k], v) for k, v in reference.items())
    return facts


if __name__ == "__main__":
    out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    info = init_distributed()
    facts = engine_facts(info)
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump(facts, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
