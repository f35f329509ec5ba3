"""Where loader workers come from: multiprocessing's fork server, never a fork of a training rank.

A rank is multi-threaded (the tracker's writer, the process group's threads, loader queue feeders).
CPython 3.11 clears the other threads' states in a forked child before it re-initialises the
interpreter's thread-list lock, so a fork taken while another thread holds that lock leaves the
child waiting forever in ``PyOS_AfterFork_Child`` and the rank waiting on it. Seen here in a
fine-tuning rank's evaluation loader (gdb: the worker stuck in ``_PyThreadState_DeleteExcept``),
in a segmentation evaluation at an epoch boundary and in a segmentation run's training loader at
the start of its 7th epoch (it forked its workers at every epoch start then).

Workers are therefore forked from the fork server: one single-threaded process per rank, started
by fork+exec (``_posixsubprocess``: no Python runs in the child before the exec, so this is safe in
a threaded process), that imports torch and the data modules once; a worker then starts in
milliseconds and gets its dataset pickled. Evaluation loaders start their workers per evaluation;
the training loader starts its workers once per run (``TrainLoader``: persistent workers) and starts
the server when it is built, so that its imports overlap the rank's own set-up. The server costs
a rank one such import per start: measured 2.8-2.9 s of CPU, USS 13 MB, PSS 164-283 MB (RSS 688 MB,
mostly torch's shared libraries) on a shared 2-core machine (``python bench/worker_start.py``).

A script that builds a loader with workers must keep its work under ``if __name__ ==
"__main__":``, as with any ``spawn``/``forkserver`` start: each worker imports the main module.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import multiprocessing as mp
import os
import select
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from typing import Any

from torch.utils.data import IterableDataset

# Imported once by the fork server, hence by every worker before it unpickles its dataset.
PRELOAD = ("torch", "numpy", "PIL.Image", "torchvision.transforms.v2.functional", "bootmae_ds.data.loader",
           "bootmae_ds.data.labelled")


# The signals that ask a rank to checkpoint and stop (runtime.run.Preemption). SLURM sends them to
# every process of a job step, workers included: a forked worker shared its rank's handler, but a
# fork-server worker is a fresh interpreter, where either signal's default action ends it, and the
# rank then fails on a dead worker instead of saving (seen in the SLURM preemption test). The
# server (a disposition its exec keeps) and its workers (owner_watch) ignore them: they end with
# their rank.
RANK_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def forkserver_context(*objects: object) -> BaseContext:
    """The fork server's context, the server started. The first call of a process fixes what the
    server preloads: :data:`PRELOAD` and the modules defining the classes of ``objects`` (what a
    worker imports to unpickle them); modules of later objects are imported by each worker."""
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # not started yet
        forkserver.set_forkserver_preload(sorted({*PRELOAD, *(type(o).__module__ for o in objects)}))
        _start_server()
    return mp.get_context("forkserver")


def _start_server() -> None:
    """Start the fork server with :data:`RANK_SIGNALS` ignored (inherited by every worker)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal needs the main thread
        forkserver.ensure_running()
        return
    kept = {sig: signal.signal(sig, signal.SIG_IGN) for sig in RANK_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def eval_worker_options(dataset: object, num_workers: int) -> dict[str, Any]:
    """The DataLoader arguments that start an evaluation loader's workers over ``dataset``: from
    the fork server, each ending with this rank (:func:`owner_watch`); none when the main process
    reads (no workers)."""
    if not num_workers:
        return {}
    return {"multiprocessing_context": forkserver_context(dataset), "worker_init_fn": owner_watch()}


def train_worker_context(dataset: object) -> BaseContext:
    """The fork server's context for a training dataset (a dataclass: its source and transform,
    often defined by a job's module, are preloaded too), and the server started now: its imports
    then overlap with the rank's own set-up instead of delaying the first step."""
    held = [getattr(dataset, f.name) for f in dataclasses.fields(dataset)] if dataclasses.is_dataclass(dataset) else []
    context = forkserver_context(dataset, *held)
    _start_server()  # a no-op when it runs; started again (signals ignored) if it died
    return context


def owner_watch() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that ends a fork-server worker when the process that started
    it (this one) ends, and leaves :data:`RANK_SIGNALS` to that process (torch's worker loop has
    just installed a SIGTERM handler that ends the worker when anyone but its parent, here the fork
    server, sends it).

    torch's worker watches its parent, which is the fork server here, and every worker holds the
    server's "alive" pipe open (multiprocessing lets the server live while any client does): a
    rank killed with SIGKILL left its server and workers running forever (seen in the kill drill).
    """
    return functools.partial(_watch, os.getpid())


def _watch(owner: int, worker_id: int) -> None:
    for sig in RANK_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        fd = os.pidfd_open(owner)  # Linux >= 5.3; readable once the owner has exited
    except (AttributeError, OSError):  # elsewhere torch's parent watch is all there is
        return

    def wait() -> None:
        watch = select.poll()  # poll, not select: any fd number
        watch.register(fd, select.POLLIN)
        watch.poll()
        os._exit(1)  # nobody is left to hand batches to, or to shut this worker down

    threading.Thread(target=wait, name="owner-watch", daemon=True).start()


def shut_down(it: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's workers and join its index queues' feeder threads."""
    shutdown = getattr(it, "_shutdown_workers", None)  # multiprocess iterators only
    if shutdown is not None:
        shutdown()
        for queue in getattr(it, "_index_queues", []):
            thread = getattr(queue, "_thread", None)
            if thread is not None:
                thread.join(timeout=30)


@dataclasses.dataclass
class Positioned(IterableDataset):
    """The dataset as the persistent workers hold it: every iteration reads its epoch and start
    micro-batch from ``position``, shared memory the loader writes before it starts the epoch.

    Why shared memory: a persistent worker holds its own copy of the dataset (unpickled once), so
    the main process cannot change it, and an IterableDataset gets no per-epoch argument (the
    index a worker receives is always None). The DataLoader re-creates each worker's iterator
    only after the worker has taken the epoch's resume message from its queue, and the loader
    writes the position before it sends that message, so each epoch reads the right values; a
    shared array is the whole channel, with no extra process or protocol to keep alive."""

    dataset: Any  # StreamingDataset or any dataclass with ``epoch`` and ``start`` fields
    position: Any  # multiprocessing RawArray("q", 2): [epoch, start]

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.position[0], self.position[1]  # read now, not at the first next()
        return iter(dataclasses.replace(self.dataset, epoch=epoch, start=start))


# Loaders whose workers are running, closed at interpreter exit. Registered after torch's own
# exit hook (torch.utils.data is imported above), so it runs first, while torch still shuts
# workers down in order.
close_at_exit: weakref.WeakSet[Any] = weakref.WeakSet()  # of objects with close()
atexit.register(lambda: [loader.close() for loader in list(close_at_exit)])
