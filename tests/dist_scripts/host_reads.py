"""Run by tests/test_host_reads.py: a short run of one job (argv[3], default pretrain) in this
process (a world of one, on the accelerator DeepSpeed picks) with every way of reading a tensor's
value on the host, and every collective, recorded when the project's own code calls it
(DeepSpeed's own are left out). Every job runs the one loop of ``runtime.trainer.JobTrainer``.

On a GPU each such read waits for the device's queue to drain, so the step path must have none
per micro-batch and exactly one per optimizer step. Evaluation and checkpoints read their tensors
by design and are left out. Writes JSON to argv[1]:
``{"steps": N, "micro_batches": M, "events": [{"kind", "what", "where", "phase"}, ...]}``.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import bootmae_ds
from bootmae_ds.config import load_config, load_detect_config, load_finetune_config, load_linprobe_config
from bootmae_ds.config.segment import load_segment_config
from bootmae_ds.runtime.prefetch import DevicePrefetcher
from bootmae_ds.runtime.trainer import JobTrainer

OURS = Path(bootmae_ds.__file__).parent
TORCH = Path(torch.__file__).parent
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "barrier", "all_gather_object", "broadcast_object_list")

events: list[dict[str, str]] = []
phase = {"name": None}  # "micro" inside a micro-batch, "step" for the rest of the loop, None elsewhere


def _caller() -> str | None:
    """The innermost frame outside torch and this file, if it is the project's step code. The
    data layer is left out: it works on host tensors by design, before they reach the device."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        if path == Path(__file__) or TORCH in path.parents:
            continue
        if OURS in path.parents and OURS / "data" not in path.parents:
            return f"{path.relative_to(OURS.parent)}:{frame.lineno} {frame.name}"
        return None  # DeepSpeed's, the data layer's, or the standard library's
    return None


def _record(kind: str, what: str) -> None:
    if phase["name"] is None:
        return
    where = _caller()
    if where is not None:
        events.append({"kind": kind, "what": what, "where": where, "phase": phase["name"]})


def _wrap(owner, name: str, kind: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        _record(kind, name)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


for name in HOST_READS:
    _wrap(torch.Tensor, name, "host_read")
for name in COLLECTIVES:
    _wrap(dist, name, "collective")


def _in_phase(name: str, method):
    def wrapper(*args, **kwargs):
        previous, phase["name"] = phase["name"], name
        try:
            return method(*args, **kwargs)
        finally:
            phase["name"] = previous
    return wrapper


T = JobTrainer  # the loop every job runs
T.train = _in_phase("step", T.train)
T._micro_batch = _in_phase("micro", T._micro_batch)  # the job's micro_step, the backward pass, the sums
T._save = _in_phase(None, T._save)  # type: ignore[arg-type]  # checkpoints read their tensors by design
T._maybe_evaluate = _in_phase(None, T._maybe_evaluate)  # type: ignore[arg-type]  # so does evaluation
# the loader's batch is checked on the host (label ranges) before it is copied: no device involved
DevicePrefetcher._fetch = _in_phase(None, DevicePrefetcher._fetch)  # type: ignore[arg-type]


def main() -> None:
    out, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    job = sys.argv[3] if len(sys.argv) > 3 else "pretrain"
    steps = 3
    # 2 micro-batches of 4 per optimizer step, no trackers, no checkpoint before the final one
    COMMON = ["data.micro_batch_size=4", "data.global_batch_size=8", "data.num_workers=1", "logging.trackers=[]",
              "checkpoint.every_steps=1000"]
    DOWNSTREAM = ["init.source=random", "init.config=demo", *COMMON]
    if job == "pretrain":
        from bootmae_ds.pretrain.trainer import pretrain as run_job

        cfg = load_config("demo", ["model.depth=2", "model.feature_decoder.context_block=1", "data.train=synthetic",
                                   "data.num_samples=64", "logging.knn_every_steps=null",
                                   "logging.preview_every_steps=1000", "momentum.input_fraction=0.5", *COMMON])
    elif job == "finetune":
        from bootmae_ds.finetune.trainer import finetune as run_job

        cfg = load_finetune_config("demo", ["schedule.steps_per_epoch=3", "schedule.epochs=2", "data.val_limit=8",
                                            *DOWNSTREAM])
    elif job == "linprobe":
        from bootmae_ds.linprobe.trainer import linprobe as run_job

        cfg = load_linprobe_config("demo", ["data.train=synthetic", "data.num_samples=64", "schedule.steps_per_epoch=3",
                                            "schedule.epochs=2", "schedule.warmup_epochs=1", "data.val_limit=8",
                                            *DOWNSTREAM])
    elif job == "segment":
        from bootmae_ds.segment.trainer import segment as run_job

        cfg = load_segment_config("demo", ["schedule.iters=3", "schedule.warmup_iters=1", "data.val_limit=2",
                                           "data.num_samples=16", *DOWNSTREAM])
    else:
        from bootmae_ds.detect.trainer import detect as run_job

        cfg = load_detect_config("demo", ["schedule.steps_per_epoch=3", "schedule.epochs=2", "data.val_limit=2",
                                          "data.eval_batch_size=1", "schedule.decay_epochs=[1]", "model.fpn_channels=16", "model.roi.box_head_dim=32",
                                          "model.roi.mask_head_channels=16", f"data.cache_dir={run_dir.parent / 'cache'}",
                                          *DOWNSTREAM])
    status = run_job(cfg, run_dir, max_steps=steps, resume="never")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out.write_text(json.dumps({"status": status, "steps": len(rows), "micro_batches": 2 * len(rows),
                               "events": events}, indent=1))


if __name__ == "__main__":  # evaluation loaders start workers from a fork server, which imports this
    main()
