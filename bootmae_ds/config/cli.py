"""``bootmae-config``: print a resolved config, or every field of a tree with its meaning."""

from __future__ import annotations

import argparse
import sys

from .base import ConfigError, describe
from .detect import DetectConfig, load_detect_config
from .finetune import FinetuneConfig, load_finetune_config
from .linprobe import LinprobeConfig, load_linprobe_config
from .pretrain import BootMAEConfig, load_config
from .segment import SegmentConfig, load_segment_config


def main(argv: list[str] | None = None) -> int:
    """`bootmae-config [CONFIG] [--set k=v ...] [--finetune | --linprobe | --segment | --detect]`: print the resolved config or the field list."""
    parser = argparse.ArgumentParser(description=main.__doc__,
                                     epilog="docs: docs/configuration.md (every key), docs/getting-started.md")
    parser.add_argument("config", nargs="?", default=None, help="preset name or YAML path")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--describe", action="store_true", help="list every field")
    parser.add_argument("--reference", action="store_true",
                        help="every job's keys as Markdown: bootmae-config --reference > docs/configuration.md")
    job = parser.add_mutually_exclusive_group()
    job.add_argument("--finetune", action="store_true", help="a fine-tuning config (presets/finetune/)")
    job.add_argument("--linprobe", action="store_true", help="a linear-probing config (presets/linprobe/)")
    job.add_argument("--segment", action="store_true", help="a segmentation config (presets/segment/)")
    job.add_argument("--detect", action="store_true", help="a detection config (presets/detect/)")
    args = parser.parse_args(argv)
    if args.reference:
        from .reference import reference  # only here: it reads every preset folder
        print(reference(), end="")
        return 0
    if args.describe:
        print(describe(FinetuneConfig if args.finetune else LinprobeConfig if args.linprobe
                       else SegmentConfig if args.segment else DetectConfig if args.detect else BootMAEConfig))
        return 0
    try:
        if args.finetune:
            cfg = load_finetune_config(args.config or "vit_base", args.set)
        elif args.linprobe:
            cfg = load_linprobe_config(args.config or "vit_base", args.set)
        elif args.segment:
            cfg = load_segment_config(args.config or "ade20k_base", args.set)
        elif args.detect:
            cfg = load_detect_config(args.config or "coco_base", args.set)
        else:
            cfg = load_config(args.config or "vit_base_800ep", args.set)
        print(cfg.to_yaml(), end="")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
