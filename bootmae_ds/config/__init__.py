"""Configuration: one validated pydantic tree per job, YAML presets with dotted overrides.

    from bootmae_ds.config import load_config, load_finetune_config
    cfg = load_config("vit_base_800ep", ["optim.base_lr=1e-4"])      # pre-training
    ft = load_finetune_config("vit_base", ["init.source=runs/b800"])  # fine-tuning
    lp = load_linprobe_config("vit_base", ["init.source=runs/b800"])  # linear probing
    det = load_detect_config("coco_base", ["init.source=runs/b800"])  # detection (Mask R-CNN)
    seg = load_segment_config("ade20k_base", ["init.source=runs/b800"])  # segmentation

``base`` holds what the trees share (sections, YAML, overrides, errors), ``common`` the shared
sections, and one module per job holds its tree and its presets' folder.
"""

from .base import ConfigError, InputError, describe
from .detect import DetectConfig, load_detect_config
from .finetune import FinetuneConfig, load_finetune_config
from .linprobe import LinprobeConfig, load_linprobe_config
from .pretrain import BootMAEConfig, build_config, load_config, pretrain_presets
from .segment import SegmentConfig, load_segment_config

__all__ = [
    "BootMAEConfig", "ConfigError", "DetectConfig", "FinetuneConfig", "InputError", "LinprobeConfig",
    "SegmentConfig", "build_config", "describe", "load_config", "load_detect_config", "load_finetune_config",
    "load_linprobe_config", "load_segment_config", "pretrain_presets",
]
