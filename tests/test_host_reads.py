"""A training step never waits for the device per micro-batch: the project's own code reads no
tensor value back to the host there, and each optimizer step has exactly one such read and one
small collective (losses, damaged-data counts, gradient norm and the preemption flag together).

On CPU nothing waits, so the reads are counted instead: ``tests/dist_scripts/host_reads.py``
wraps every host-read method of ``torch.Tensor`` and every ``torch.distributed`` collective and
records the calls made from ``bootmae_ds`` during a real 3-step run with 2 micro-batches a step,
of pre-training (CI) and of each other job (extended: they share the loop the pre-training run
exercises, ``runtime.trainer.JobTrainer``; what differs is their ``micro_step``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
from distributed import run


# The linear probe's LARS decides on the host whether a step's gradients are finite (one read, in
# the optimizer step), as DeepSpeed's own optimizers do for the other jobs out of this count's sight.
OPTIMIZER_READS = {"linprobe": {"step": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("job", ["pretrain", *(pytest.param(j, marks=pytest.mark.extended)
                                               for j in ("finetune", "linprobe", "segment", "detect"))])
def test_one_device_read_and_one_collective_per_optimizer_step(tmp_path, job) -> None:
    out = tmp_path / "reads.json"
    proc = run([sys.executable, "tests/dist_scripts/host_reads.py", str(out), str(tmp_path / "run"), job],
               timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["status"] == 0 and report["steps"] == 3 and report["micro_batches"] == 6
    events = report["events"]
    micro = [e for e in events if e["phase"] == "micro"]
    assert micro == [], micro  # the forward, the losses, the teacher: nothing read, nothing reduced
    reads = Counter(e["where"].split()[-1] for e in events if e["kind"] == "host_read")
    reduces = Counter(e["where"].split()[-1] for e in events if e["what"] == "all_reduce")
    assert reads == {"step_row": 3, **OPTIMIZER_READS.get(job, {})} and reduces == {"step_row": 3}, events
    others = {e["what"] for e in events if e["kind"] == "collective" and e["what"] != "all_reduce"}
    assert others <= {"all_gather", "all_gather_into_tensor"}, events  # the momentum encoder's gather
