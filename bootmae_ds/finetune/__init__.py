"""Fine-tuning a pre-trained encoder as an image classifier (``launchers/finetune.py``)."""

from .config import FinetuneConfig, load_finetune_config

__all__ = ["FinetuneConfig", "load_finetune_config"]
