"""Stable seeds for per-epoch, per-worker and per-sample RNGs (no torch import: the shard
builder uses this module too and should start fast)."""

from __future__ import annotations

import hashlib


def mix_seed(*parts: int | str) -> int:
    """A 64-bit seed from integers and strings, stable across processes (``hash()`` is salted)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
