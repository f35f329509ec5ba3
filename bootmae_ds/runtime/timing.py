"""Timing a training step honestly on an asynchronous device, without adding syncs.

A CUDA step returns to the host long before its kernels finish, so a host clock read right after
``engine.step()`` measures how fast kernels were *queued*. The trainers read the step's numbers
back once per optimizer step (``JobTrainer.step_row``); that read waits for every kernel queued
before it (forward, backward, optimizer, momentum update), so :class:`StepClock` stops there.
Sub-intervals (the momentum update) are timed with CUDA events, read only after that sync.
"""

from __future__ import annotations

import time

import torch


class StepClock:
    """Wall seconds of one optimizer step: from ``restart()`` to ``lap()``, where ``lap`` is
    called right after the step's one device read (so the device's work is inside)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def restart(self) -> None:
        """The next step starts now (called after the logging and evaluation of the last one)."""
        self.started = time.perf_counter()

    def lap(self) -> float:
        """Seconds since ``restart``."""
        return time.perf_counter() - self.started


class DeviceTimer:
    """Elapsed device time between ``start()`` and ``stop()``: CUDA events on a GPU (recording
    them does not sync; read ``seconds()`` after a sync), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self._host = [0.0, 0.0]

    def start(self) -> None:
        self._mark(0)

    def stop(self) -> None:
        self._mark(1)

    def _mark(self, which: int) -> None:
        if self._events is not None:
            self._events[which].record()
        else:
            self._host[which] = time.perf_counter()

    def seconds(self) -> float:
        """The timed interval (on CUDA, waits for the stop event if it has not run yet)."""
        if self._events is not None:
            return self._events[0].elapsed_time(self._events[1]) / 1000
        return self._host[1] - self._host[0]


def host_values_on(values: list[float], device: torch.device) -> torch.Tensor:
    """``values`` as an fp32 tensor on ``device`` without stalling it: a plain host-to-device
    copy of pageable memory waits for the device's queue, a pinned non-blocking one does not."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
