"""Pre-train BootMAE with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 launchers/pretrain.py --config vit_base_800ep --output-dir runs/b800
    python launchers/pretrain.py --config demo --output-dir runs/demo          # one process
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/pretrain.py --config demo --output-dir runs/demo

Exit status 75 means "preempted after saving a checkpoint": run the same command again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bootmae_ds.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="BootMAE pre-training")
    parser.add_argument("--config", default="vit_base_800ep", help="preset name or YAML path")
    parser.add_argument("--output-dir", required=True, type=Path, help="run directory")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint) | never | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if os.environ.get("RANK", "0") == "0":
        print(cfg.to_yaml(), end="", flush=True)
    # Imported after validation: DeepSpeed takes seconds to import.
    from bootmae_ds.checkpoint import CheckpointError
    from bootmae_ds.data.shards import ShardError
    from bootmae_ds.dist import DistributedSetupError
    from bootmae_ds.trainer import pretrain

    try:
        return pretrain(cfg, args.output_dir, args.max_steps, args.resume)
    except (CheckpointError, ConfigError, DistributedSetupError, ShardError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
