"""The encoder an evaluation command looks at: a run's checkpoint, an official file or a random
initialisation, chosen by the same command-line flags in every evaluation launcher."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import BootMAEConfig


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", type=Path, help="run directory (the pre-training --output-dir)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--which", default="online", choices=("online", "momentum"))
    parser.add_argument("--official", type=Path, default=None, help="a released BootMAE_*_PT.pth")
    parser.add_argument("--arch", default="base", choices=("base", "large"))
    parser.add_argument("--random-init", action="store_true", help="a freshly initialised encoder of --config")
    parser.add_argument("--config", default="demo", help="config for --random-init")


def check_encoder_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if sum([args.run is not None, args.official is not None, args.random_init]) != 1:
        parser.error("give exactly one of: a run directory, --official FILE, --random-init")


def load_eval_encoder(args: argparse.Namespace) -> tuple[BootMAEConfig, torch.nn.Module, str]:
    """(config, fp32 encoder on the CPU, description) for the parsed flags."""
    from ..config import load_config
    from ..interop.encoders import from_official, from_run
    from ..models import build_model

    if args.random_init:
        cfg = load_config(args.config)
        torch.manual_seed(cfg.run.seed)
        cfg_encoder, source = (cfg, build_model(cfg).encoder), f"random init of {args.config}"
    else:
        exp = from_official(args.official, args.arch, args.which) if args.official else \
            from_run(args.run, args.tag, args.which)
        cfg_encoder, source = (exp.cfg, exp.encoder), f"{args.official or args.run} ({args.which})"
    cfg, encoder = cfg_encoder
    return cfg, encoder, source
