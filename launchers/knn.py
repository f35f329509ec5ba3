"""k-NN accuracy of a pre-trained encoder on frozen features (k=20, cosine, T=0.07, as DINO).

Every rank extracts the features of its share of the bank and the queries (bf16 on GPUs), the
shares are gathered in sample order and rank 0 votes, so the whole ImageNet training set can be
the bank:

    deepspeed --num_gpus 8 launchers/knn.py runs/b800 --which momentum \\
        --bank /shards/train/manifest.json --queries /shards/val/manifest.json
    deepspeed --num_gpus 8 launchers/knn.py --official BootMAE_Base_800_PT.pth --arch base --bank ... --queries ...
    python launchers/knn.py runs/demo                                # one process; demo train -> demo test
    python launchers/knn.py --random-init --config demo              # the baseline

Prints one JSON line with top-1 / top-5 (%) (rank 0), exit status 2 on bad input.
``--save-features FILE`` writes the gathered features and labels (torch.save, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from bootmae_ds.evaluation.encoder_args import add_encoder_args, check_encoder_args

    p = argparse.ArgumentParser(description="weighted k-NN evaluation of a BootMAE encoder",
                                epilog="docs: docs/evaluation.md#k-nn")
    add_encoder_args(p)
    p.add_argument("--bank", default="demo", help="labelled bank: a data.train spec, 'demo' or 'demo-test'")
    p.add_argument("--queries", default="demo-test", help="labelled queries (same forms as --bank)")
    p.add_argument("--bank-limit", type=int, default=None, help="the bank's first N images (default: all)")
    p.add_argument("--query-limit", type=int, default=None)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per forward")
    p.add_argument("--num-workers", type=int, default=4, help="decoding workers per rank")
    p.add_argument("--crop-pct", type=float, default=None, help="shorter side to size/crop_pct (bicubic), centre "
                   "crop; default: the encoder config's logging.knn_crop_pct (0.875; the demo's 1.0)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="encoder precision; auto = bf16 on GPUs, fp32 on CPU")
    p.add_argument("--save-features", default=None, help="write the gathered features here (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    check_encoder_args(p, args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    import torch
    import torch.distributed as dist

    from bootmae_ds.config import InputError
    from bootmae_ds.data.labelled import open_eval_source
    from bootmae_ds.evaluation.encoder_args import load_eval_encoder
    from bootmae_ds.evaluation.features import Normalise, extract_set_features
    from bootmae_ds.evaluation.knn import knn_accuracy, pooled_tokens
    from bootmae_ds.runtime.dist import init_distributed

    try:
        info = init_distributed()
        try:
            cfg, encoder, source = load_eval_encoder(args)
            on_gpu = info.accelerator != "cpu"
            dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and on_gpu) else torch.float32
            encoder = encoder.to(info.device, dtype).eval()
            normalise = Normalise(cfg.data.mean, cfg.data.std, info.device, dtype)
            crop_pct = args.crop_pct or cfg.logging.knn_crop_pct
            sets = {}
            for name, spec, limit in (("bank", args.bank, args.bank_limit), ("queries", args.queries, args.query_limit)):
                sets[name] = extract_set_features(pooled_tokens(encoder), open_eval_source(spec, cfg), normalise,
                                              cfg.model.img_size, crop_pct, args.batch_size, limit, args.num_workers)
            if info.is_main:
                bank, queries = sets["bank"], sets["queries"]
                scores = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels, k=args.k,
                                      temperature=args.temperature)
                if args.save_features:
                    torch.save({k: v.cpu() for k, v in {
                        "bank": bank.features, "bank_labels": bank.labels, "queries": queries.features,
                        "query_labels": queries.labels}.items()}, args.save_features)
                print(json.dumps({"source": source, "bank": args.bank, "queries": args.queries, "k": args.k,
                                  "bank_size": len(bank.labels), "query_size": len(queries.labels),
                                  "ranks": info.world_size, **scores}), flush=True)
            dist.barrier()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
