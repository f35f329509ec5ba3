"""Pre-train BootMAE.

    python launchers/pretrain.py --config demo --output-dir runs/demo [--max-steps N] [--set k=v ...]

Until the DeepSpeed ZeRO-2 engine lands, this validates and saves the run configuration and runs
a single-process forward/loss smoke of it on the bundled digits; it says so when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bootmae_ds.config import ConfigError, load_config
from bootmae_ds.smoke import run_smoke


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="BootMAE pre-training")
    parser.add_argument("--config", default="vit_base_800ep", help="preset name or YAML path")
    parser.add_argument("--output-dir", required=True, type=Path, help="run directory")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke runs)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume", default="auto", help="auto | never | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(args.output_dir / "config.yaml")
    print(cfg.to_yaml(), end="")
    print("NOTE: the DeepSpeed pre-training engine is not built yet; running a single-process "
          "forward/loss smoke of this config on the bundled digits instead.", flush=True)
    history = run_smoke(cfg, args.output_dir, args.max_steps or 30)
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"[smoke] done: loss {first:.4f} -> {last:.4f}; config and smoke_metrics.jsonl in {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
