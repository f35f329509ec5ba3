"""Reading released ``.pth`` files without running code from them.

``torch.load(weights_only=True)`` unpickles tensors and plain Python containers only. Released
checkpoints often carry more in their ``meta``/``args``: mmseg and mmcv store NumPy scalars, dtypes
and arrays (an mIoU as ``numpy.float64``, a class palette as an array), BEiT-style trainers an
``argparse.Namespace``. Exactly those are allowed here (torch's safe-globals list), under both the
NumPy 2 names (``numpy._core``) and the NumPy 1 names (``numpy.core``) older files were written
with; anything else is refused with the name of the class, and nothing is executed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import InputError

_MULTIARRAY = getattr(np, "_core", np.core).multiarray  # NumPy 2 moved numpy.core to numpy._core


def _numpy_globals() -> list[Any]:
    """NumPy's scalar/array reconstructors and dtype classes, under their NumPy 2 and 1 names."""
    out: list[Any] = [np.ndarray, np.dtype]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(_MULTIARRAY, name)
        out += [fn, (fn, f"numpy.core.multiarray.{name}")]
    # dtype objects pickle through their class (numpy.dtypes.Float64DType, ...) on some versions
    out += [t for t in vars(getattr(np, "dtypes", np)).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return out


SAFE_GLOBALS: list[Any] = [*_numpy_globals(), argparse.Namespace]


class UnsafeFileError(InputError, ValueError):
    """A file that needs more than tensors, containers, NumPy values and Namespaces to unpickle."""


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with :data:`SAFE_GLOBALS` allowed.

    Raises :class:`UnsafeFileError` naming the class a file would need (one line), and
    FileNotFoundError for a missing file; other read failures come back as ``UnsafeFileError``
    saying the file is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged or unsafe files
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text:
            with open(path, "rb") as f:
                try:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
                except Exception:  # noqa: BLE001 - a damaged archive
                    names = []
            allowed = {getattr(g, "__module__", "") + "." + getattr(g, "__qualname__", "") for g in SAFE_GLOBALS
                       if not isinstance(g, tuple)} | {g[1] for g in SAFE_GLOBALS if isinstance(g, tuple)}
            extra = [n for n in names if n not in allowed] or ["an object torch does not load safely"]
            raise UnsafeFileError(f"{path}: refused to unpickle {', '.join(extra[:3])} (only tensors, plain Python "
                                  f"values, NumPy scalars/dtypes/arrays and argparse.Namespace are read); re-save "
                                  f"the {what} with its state dict only") from None
        raise UnsafeFileError(f"{path}: unreadable {what} ({type(err).__name__}: {text.splitlines()[0] if text else ''}"
                              f"); is it truncated, or not a torch file?") from None
