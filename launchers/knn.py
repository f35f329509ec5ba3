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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from bootmae_ds.evaluation.encoder_args import add_encoder_args, check_encoder_args

    p = argparse.ArgumentParser(description="weighted k-NN evaluation of a BootMAE encoder")
    add_encoder_args(p)
    p.add_argument("--bank", default="demo", help="labelled bank: a data.train spec, 'demo' or 'demo-test'")
    p.add_argument("--queries", default="demo-test", help="labelled queries (same forms as --bank)")
    p.add_argument("--bank-limit", type=int, default=None)
    p.add_argument("--query-limit", type=int, default=None)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    args = p.parse_args(argv)
    check_encoder_args(p, args)

    from bootmae_ds.config import ConfigError
    from bootmae_ds.data.shards import ShardError
    from bootmae_ds.evaluation.encoder_args import load_eval_encoder
    from bootmae_ds.evaluation.knn import KnnMonitor
    from bootmae_ds.interop.encoders import ExportError

    try:
        cfg, encoder, source = load_eval_encoder(args)
        monitor = KnnMonitor(cfg, args.bank, args.queries, args.bank_limit, args.query_limit, args.k,
                             args.temperature)
        scores = monitor(encoder)
    except (ConfigError, ExportError, ShardError, FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"source": source, "bank": args.bank, "queries": args.queries, "k": args.k, **scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
