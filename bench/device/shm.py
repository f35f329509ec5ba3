"""``/dev/shm`` made large enough for the end-to-end parts' loader workers before any part starts.

Each loader worker hands its batches to the trainer through shared memory: at the device run's
micro-batch 256 of 224-px uint8 images (38.5 MB) and torch's prefetch of 2 batches per worker,
15 workers keep about 1.2 GB there. A container's ``/dev/shm`` is often 64 MB, and a worker that
cannot allocate its batch there dies with a bus error, losing both end-to-end parts and the loader
part. So, before the parts: if it is too small, remount it larger (the device tool's commands run
as root), else run fewer workers, and the report says which (``report["shm"]``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

SHM = Path("/dev/shm")
PREFETCH = 2  # torch DataLoader's prefetch_factor default, per worker
MARGIN = 1.5  # the masks, the pinned copies in flight, another process's segments


def batch_bytes(batch: int, img: int) -> int:
    """Bytes of one micro-batch of uint8 RGB images (what a worker puts into shared memory)."""
    return batch * 3 * img * img


def need_bytes(workers: int, batch: int, img: int) -> int:
    return int(workers * PREFETCH * batch_bytes(batch, img) * MARGIN)


def free_bytes(path: Path = SHM) -> int:
    return shutil.disk_usage(path).free if path.exists() else 0


def remount(size_bytes: int, path: Path = SHM) -> str | None:
    """Make ``path`` a tmpfs of ``size_bytes`` (remounted if mounted); the error, or None."""
    size = f"size={-(-size_bytes // 2**30)}G"
    cmd = ["mount", "-o", f"remount,{size}", str(path)] if path.exists() else \
        ["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(path)]
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{' '.join(cmd)}: {err}"
    return None if proc.returncode == 0 else f"{' '.join(cmd)}: {(proc.stderr or proc.stdout).strip()}"


def ensure(workers: int, batch: int, img: int, *, free: Callable[[], int] = free_bytes,
           grow: Callable[[int], str | None] = remount, root: bool | None = None) -> dict:
    """Room in ``/dev/shm`` for ``workers`` loader workers: as it is, remounted (as root), or
    fewer workers. The entry for the report, ``workers`` the number to run."""
    need = need_bytes(workers, batch, img)
    out = {"need_gib": round(need / 2**30, 2), "free_gib": round(free() / 2**30, 2), "workers_wanted": workers}
    if free() >= need:
        return out | {"action": "none", "workers": workers}
    root = os.geteuid() == 0 if root is None else root
    if root:
        error = grow(2 * need)  # room to spare: one remount, not one per part
        out["remount_error"] = error
        if error is None and free() >= need:
            return out | {"action": "remounted", "free_gib_after": round(free() / 2**30, 2), "workers": workers}
    per_worker = need_bytes(1, batch, img)
    fewer = max(1, min(workers, free() // per_worker))
    why = "remount failed" if root else "not root: no remount"
    return out | {"action": f"fewer workers ({why})", "workers": int(fewer),
                  "free_gib_after": round(free() / 2**30, 2)}
