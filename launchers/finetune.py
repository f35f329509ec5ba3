"""Fine-tune a pre-trained BootMAE encoder as an image classifier with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/b800_ft \\
        --set init.source=runs/b800 data.train=/shards/train/manifest.json data.val=/shards/val/manifest.json
    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/official_ft \\
        --set init.source=BootMAE_Base_800_PT.pth data.train=... data.val=...
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/finetune.py --config demo --output-dir runs/demo_ft \\
        --set init.source=runs/demo

Presets: bootmae_ds/presets/finetune/ (vit_base = the official recipe, vit_large, demo). Top-1/top-5
on data.val every eval.every_epochs epochs; the best classifier is kept in OUTPUT/best/ (timm
layout). Exit status 75 means "preempted after saving a checkpoint": run the same command again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bootmae_ds.config import ConfigError
from bootmae_ds.finetune.config import load_finetune_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fine-tune a BootMAE encoder")
    parser.add_argument("--config", default="vit_base", help="fine-tuning preset name or YAML path")
    parser.add_argument("--output-dir", required=True, type=Path, help="run directory")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint) | never | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_finetune_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if os.environ.get("RANK", "0") == "0":
        print(cfg.to_yaml(), end="", flush=True)
    from bootmae_ds.checkpoint import CheckpointError
    from bootmae_ds.data.shards import ShardError
    from bootmae_ds.dist import DistributedSetupError
    from bootmae_ds.export import ExportError
    from bootmae_ds.finetune.trainer import finetune

    try:
        return finetune(cfg, args.output_dir, args.max_steps, args.resume)
    except (CheckpointError, ConfigError, DistributedSetupError, ExportError, ShardError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
