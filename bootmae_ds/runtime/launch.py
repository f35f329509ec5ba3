"""The command line shared by the training launchers (``launchers/pretrain.py``, ``finetune.py``):
parse, validate the config before anything heavy, print it, train, map bad input to status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, InputError


def parse_args(description: str, default_config: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="preset name or YAML path")
    parser.add_argument("--output-dir", required=True, type=Path, help="run directory")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint) | never | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def training_main(args: argparse.Namespace, load: Callable[[str, list[str]], Any],
                  train: Callable[[], Callable[..., int]]) -> int:
    """Load and print the config, then ``train()(cfg, output_dir, max_steps, resume)``.

    ``train`` returns the training function when called, so DeepSpeed (seconds to import) is
    imported only after the config validated."""
    try:
        cfg = load(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if os.environ.get("RANK", "0") == "0":
        print(cfg.to_yaml(), end="", flush=True)
    try:
        return train()(cfg, args.output_dir, args.max_steps, args.resume)
    except (InputError, FileNotFoundError) as err:  # bad config, checkpoint, shard, path, environment
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
