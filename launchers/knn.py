"""k-NN accuracy of a pre-trained encoder on frozen features (k=20, cosine, T=0.07).

    python launchers/knn.py runs/demo                               # latest checkpoint, online encoder
    python launchers/knn.py runs/b800 --which momentum --bank /shards/train/manifest.json \\
        --queries /shards/val/manifest.json --bank-limit 100000
    python launchers/knn.py --official BootMAE_Base_800_PT.pth --arch base --bank ... --queries ...
    python launchers/knn.py --random-init --config demo              # the baseline

Prints one JSON line with top-1 / top-5 (%), exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="weighted k-NN evaluation of a BootMAE encoder")
    p.add_argument("run", nargs="?", type=Path, help="run directory (the pre-training --output-dir)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--which", default="online", choices=("online", "momentum"))
    p.add_argument("--official", type=Path, default=None, help="a released BootMAE_*_PT.pth")
    p.add_argument("--arch", default="base", choices=("base", "large"))
    p.add_argument("--random-init", action="store_true", help="a freshly initialised encoder of --config")
    p.add_argument("--config", default="demo", help="config for --random-init")
    p.add_argument("--bank", default="demo", help="labelled bank: a data.train spec, 'demo' or 'demo-test'")
    p.add_argument("--queries", default="demo-test", help="labelled queries (same forms as --bank)")
    p.add_argument("--bank-limit", type=int, default=None)
    p.add_argument("--query-limit", type=int, default=None)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    args = p.parse_args(argv)
    if sum([args.run is not None, args.official is not None, args.random_init]) != 1:
        p.error("give exactly one of: a run directory, --official FILE, --random-init")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from bootmae_ds.config import ConfigError, load_config
    from bootmae_ds.data.shards import ShardError
    from bootmae_ds.export import ExportError, from_official, from_run
    from bootmae_ds.knn import KnnMonitor
    from bootmae_ds.models import build_model

    try:
        if args.random_init:
            cfg = load_config(args.config)
            torch.manual_seed(cfg.run.seed)
            encoder, source = build_model(cfg).encoder, f"random init of {args.config}"
        else:
            exp = from_official(args.official, args.arch, args.which) if args.official else \
                from_run(args.run, args.tag, args.which)
            cfg, encoder, source = exp.cfg, exp.encoder, str(args.official or args.run)
        if torch.cuda.is_available():
            encoder = encoder.cuda()
        monitor = KnnMonitor(cfg, args.bank, args.queries, args.bank_limit, args.query_limit, args.k,
                             args.temperature)
        scores = monitor(encoder)
    except (ConfigError, ExportError, ShardError, FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"source": source, "which": None if args.random_init else args.which,
                      "bank": args.bank, "queries": args.queries, "k": args.k, **scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
