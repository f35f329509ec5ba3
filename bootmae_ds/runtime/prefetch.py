"""The next micro-batch on its way to the device while the current one computes.

DeepSpeed's optimizer step waits for the device (its overflow check reads the gradient norm),
so a copy issued after ``engine.step()`` would find the device idle. ``prefetch()`` is called
between ``backward`` and ``step``: the host fetches the next batch from the loader and, on CUDA,
copies its tensors on a side stream while the backward pass still runs. On CPU the batch only
moves ahead in the host iterator; nothing changes but the order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

Batch = dict[str, Any]


class DevicePrefetcher:
    """Iterate ``batches`` with ``keys`` already on ``device``, one batch held ahead on demand.

    ``wait_s`` accumulates the time spent waiting for the host loader (data-wait in metrics).
    ``check(batch)``, if given, validates each batch on the host before its copy (a label range
    test on the device would make the host wait for the device).
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device, keys: tuple[str, ...],
                 check: Callable[[Batch], None] | None = None) -> None:
        self.batches, self.device, self.keys, self.check = batches, device, keys, check
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait_s = 0.0
        self._iter: Iterator[Batch] | None = None
        self._ahead: Batch | None = None
        self._done = False

    def _fetch(self) -> Batch | None:
        start = time.perf_counter()
        try:
            batch = next(self._iter)  # type: ignore[arg-type]
        except StopIteration:
            self._done = True
            return None
        finally:
            self.wait_s += time.perf_counter() - start
        if self.check is not None:
            self.check(batch)
        if self.stream is None:
            return batch | {k: batch[k].to(self.device) for k in self.keys if k in batch}
        with torch.cuda.stream(self.stream):  # pinned host memory: the copies run asynchronously
            return batch | {k: batch[k].to(self.device, non_blocking=True) for k in self.keys if k in batch}

    def prefetch(self) -> None:
        """Start bringing the next batch over (call once the current one's work is enqueued)."""
        if self._iter is not None and self._ahead is None and not self._done:
            self._ahead = self._fetch()

    def __iter__(self) -> Iterator[Batch]:
        self._iter, self._ahead, self._done = iter(self.batches), None, False
        while True:
            batch = self._ahead if self._ahead is not None else (None if self._done else self._fetch())
            self._ahead = None
            if batch is None:
                return
            if self.stream is not None:
                # the compute stream must not read the tensors before the side stream wrote them,
                # and the side stream must not reuse their memory while compute still reads them
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                for k in self.keys:
                    if k in batch:
                        batch[k].record_stream(torch.cuda.current_stream(self.device))
            yield batch
