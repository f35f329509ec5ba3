"""Watching a run's health: loss spikes against a running median, damaged data the loader met,
and the NaN-injection drill (``debug.nan_steps``) that the fault tests use. The rewind itself is
in ``run.py``."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import torch.distributed as dist


class SpikeDetector:
    """Flags a loss above ``factor`` x the median of the last ``window`` finite losses.

    Only finite losses enter the window (non-finite steps are the skip counter's business), and
    a spike enters it too, so that a lasting level shift stops being flagged once it dominates.
    """

    def __init__(self, factor: float | None, window: int, warmup: int = 10) -> None:
        self.factor, self.warmup = factor, warmup
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, loss: float) -> float | None:
        """The loss / median ratio when ``loss`` is a spike, else None."""
        if self.factor is None or loss != loss or loss in (float("inf"), float("-inf")):
            return None
        ratio = None
        if len(self.recent) >= self.warmup:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                ratio = loss / median
        self.recent.append(loss)
        return ratio

    def state_dict(self) -> list[float]:
        return list(self.recent)

    def load_state_dict(self, losses: list[float]) -> None:
        self.recent.clear()
        self.recent.extend(losses)


class DataFaults:
    """What the loader reported during one optimizer step (``corrupt``, ``filled`` and
    ``damaged_shards`` of each micro-batch and, from a mixture of sources, its samples and
    replaced samples per source), summed over ranks into the metrics row."""

    def __init__(self) -> None:
        self.corrupt, self.filled, self.damaged = 0, 0, []
        # per mixture source, in the loader's order (the same on every rank: the all-reduce
        # adds them position by position)
        self.sources: dict[str, int] = {}
        self.source_corrupt: dict[str, int] = {}

    def add(self, batch: dict[str, Any]) -> None:
        self.corrupt += int(batch.get("corrupt", 0))
        self.filled += int(batch.get("filled", 0))
        self.damaged += [d for d in batch.get("damaged_shards", []) if d not in self.damaged]
        for name, n in batch.get("source_samples", {}).items():
            self.sources[name] = self.sources.get(name, 0) + int(n)
        for name, n in batch.get("source_corrupt", {}).items():
            self.source_corrupt[name] = self.source_corrupt.get(name, 0) + int(n)

    def counts(self) -> list[float]:
        """The numbers to all-reduce with the step's losses: corrupt, filled, newly damaged shards,
        then (a mixture) the samples and the replaced samples of each source."""
        per_source = [*self.sources.values(), *(self.source_corrupt.get(n, 0) for n in self.sources)]
        return [float(self.corrupt), float(self.filled), float(len(self.damaged)), *map(float, per_source)]

    def report(self, row: dict, summed: list[float], is_main: bool, totals: dict[str, int] | None = None) -> None:
        """Fill the row from the all-reduced ``counts()``; name new damaged shards (a collective,
        entered by every rank only when some rank met one, which all ranks know from the sum).
        A mixture's row gets ``samples_<source>`` and ``corrupt_<source>`` of the step and, added
        to ``totals`` (the run state's, saved in checkpoints), ``samples_<source>_total``."""
        row["corrupt_samples"], row["filled_samples"] = int(summed[0]), int(summed[1])
        k = len(self.sources)
        for i, name in enumerate(self.sources):
            row[f"samples_{name}"], row[f"corrupt_{name}"] = int(summed[3 + i]), int(summed[3 + k + i])
            if totals is not None:
                totals[name] = totals.get(name, 0) + row[f"samples_{name}"]
                row[f"samples_{name}_total"] = totals[name]
        if summed[2] > 0:
            names: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(names, self.damaged)
            row["damaged_shards"] = sorted({n for ranks in names for n in ranks or []})
            if is_main:
                print(f"warning: damaged shard(s) {', '.join(row['damaged_shards'])}: their unreadable samples "
                      f"are replaced; run data_prep/verify_shards.py and rebuild them", flush=True)


def watch(row: dict, spikes: SpikeDetector, step: int, rewinds: int, is_main: bool) -> None:
    """Mark a metrics row with a loss spike (and warn on the console) and the rewinds so far."""
    ratio = spikes.observe(row["loss"])
    if ratio is not None:
        row["loss_spike"] = ratio
        if is_main:
            print(f"warning: loss spike at step {step}: {row['loss']:.4g} is {ratio:.1f}x the running "
                  f"median of the last {len(spikes.recent) - 1} steps", flush=True)
    if rewinds:
        row["rewinds"] = rewinds


def poisoned_batches(nan_steps: list[int], accum: int, batches_per_epoch: int) -> frozenset[tuple[int, int]]:
    """The (epoch, micro-batch index) positions that optimizer steps ``nan_steps`` consume in an
    uninterrupted run: the data a NaN drill poisons. Tied to data positions, not step numbers,
    so a run that rewinds past them does not meet them again."""
    out = set()
    for step in nan_steps:
        for micro in range(accum):
            ordinal = step * accum + micro
            out.add((ordinal // batches_per_epoch, ordinal % batches_per_epoch))
    return frozenset(out)
