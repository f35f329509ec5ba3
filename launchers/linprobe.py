"""Linear-probe accuracy of a pre-trained encoder (frozen; BatchNorm + linear head on the
mean-pooled tokens of one block; SGD, lr = blr x batch / 256, cosine).

    python launchers/linprobe.py runs/demo                                     # demo train -> demo test
    python launchers/linprobe.py runs/b800 --block 9 --train /shards/train/manifest.json \\
        --val /shards/val/manifest.json --train-limit 100000
    python launchers/linprobe.py --random-init --config demo                   # the baseline

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

    p = argparse.ArgumentParser(description="linear probing of a BootMAE encoder")
    add_encoder_args(p)
    p.add_argument("--train", default="demo", help="labelled training images (a data.train spec or 'demo')")
    p.add_argument("--val", default="demo-test", help="labelled evaluation images")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--block", type=int, default=None, help="1-based block to pool (default: last + final norm)")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--blr", type=float, default=0.1, help="base lr per 256 images")
    args = p.parse_args(argv)
    check_encoder_args(p, args)

    from bootmae_ds.config import ConfigError
    from bootmae_ds.data.labelled import load_images, open_eval_source
    from bootmae_ds.data.shards import ShardError
    from bootmae_ds.evaluation.encoder_args import load_eval_encoder
    from bootmae_ds.evaluation.linprobe import ProbeSettings, linear_probe
    from bootmae_ds.interop.encoders import ExportError

    try:
        cfg, encoder, source = load_eval_encoder(args)
        if args.block is not None and not 1 <= args.block <= cfg.model.depth:
            raise ValueError(f"--block {args.block}: the encoder has blocks 1..{cfg.model.depth}")
        size = cfg.model.img_size
        train = load_images(open_eval_source(args.train, cfg), size, args.train_limit)
        val = load_images(open_eval_source(args.val, cfg), size, args.val_limit)
        settings = ProbeSettings(block=args.block, epochs=args.epochs, batch_size=args.batch_size, base_lr=args.blr,
                                 seed=cfg.run.seed)
        scores = linear_probe(encoder, train, val, cfg.data.mean, cfg.data.std, settings)
    except (ConfigError, ExportError, ShardError, FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"source": source, "train": args.train, "val": args.val, "block": args.block, **scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
