"""How evaluation loaders start their workers: from a fork server, never by forking a training rank.

When a rank evaluates it is multi-threaded (the tracker's writer, the process group's threads,
the training loader's queue feeders). CPython 3.11 clears the other threads' states in a forked
child before it re-initialises the interpreter's thread-list lock, so a fork taken while another
thread holds that lock leaves the child waiting forever in ``PyOS_AfterFork_Child`` and the rank
waiting on it. Seen here in a fine-tuning rank's evaluation loader (gdb: the worker stuck in
``_PyThreadState_DeleteExcept``) and in a segmentation evaluation at an epoch boundary.

Evaluation workers are therefore forked from ``multiprocessing``'s fork server: one
single-threaded process per rank that imports torch and the data modules once, so a worker starts
in milliseconds and gets its dataset pickled. The training loader keeps plain ``fork``: it starts
its workers once per epoch, at the top of the loop, and a fork server per rank restart costs a
torch import (measured: the kill-and-resume drill's runs slowed past their time limit with it).
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

# Imported once by the fork server, hence by every worker before it unpickles its dataset.
PRELOAD = ("torch", "numpy", "PIL.Image", "torchvision.transforms.v2.functional", "bootmae_ds.data.loader",
           "bootmae_ds.data.labelled")


def eval_worker_context(dataset: object, num_workers: int) -> BaseContext | None:
    """The ``multiprocessing_context`` of an evaluation DataLoader over ``dataset``: the fork server
    when it has workers, None (the main process reads) when not. The first call of a process fixes
    what the server preloads: :data:`PRELOAD` and the module defining ``dataset``'s class (what a
    worker imports to unpickle it); modules of later datasets are imported by each worker."""
    if not num_workers:
        return None
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # not started yet
        forkserver.set_forkserver_preload(sorted({*PRELOAD, type(dataset).__module__}))
    return mp.get_context("forkserver")
