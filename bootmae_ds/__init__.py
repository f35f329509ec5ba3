"""bootmae-ds: BootMAE pre-training of Vision Transformers at scale with DeepSpeed."""

__version__ = "0.1.0"
