"""Data: WebDataset shards (build, verify), the streaming loader, and the demo digits.

The loader's entry point is :func:`bootmae_ds.data.loader.build_train_loader`. It is imported
lazily so that the shard builder (``bootmae_ds.data.builder``) starts without torch.
"""

from typing import Any

__all__ = ["TrainLoader", "build_train_loader"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bootmae_ds.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'bootmae_ds.data' has no attribute {name!r}")
