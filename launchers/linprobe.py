"""Linear probing of a pre-trained BootMAE encoder: the official protocol, distributed.

    deepspeed --num_gpus 8 launchers/linprobe.py --config vit_base --output-dir runs/b800_lin \\
        --set init.source=runs/b800 data.train=/shards/train/manifest.json data.val=/shards/val/manifest.json
    deepspeed --num_gpus 8 launchers/linprobe.py --config vit_large --output-dir runs/official_l_lin \\
        --set init.source=BootMAE_Large_800_PT.pth data.train=... data.val=...
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/linprobe.py --config demo --output-dir runs/demo_lin \\
        --set init.source=runs/demo                                  # the digits, on CPU
    python launchers/linprobe.py --config demo --output-dir runs/demo_lin_cached --cached-features \\
        --set init.source=runs/demo                                  # features once, head on them

Presets: bootmae_ds/presets/linprobe/ (vit_base, vit_large = the official scripts, demo). Every
step re-augments its images through the frozen encoder; top-1/top-5 on data.val every
eval.every_epochs epochs; the best probe is kept in OUTPUT/best/ (timm layout). Exit status 75
means "preempted after saving a checkpoint": run the same command again.
``--eval-only --weights RUN/best`` scores a probe (or any classifier launchers/finetune.py reads)
on data.val in the evaluation view of data.eval_crop_pct, into OUTPUT/eval_only.{json,md}.
``--cached-features`` (= ``--set mode=cached_features``) is the small-data yardstick instead:
features of centre crops extracted once, the same head and recipe trained on them, no checkpoints.
"""

from __future__ import annotations

import sys

from bootmae_ds.config import load_linprobe_config
from bootmae_ds.runtime.launch import eval_only_error, eval_only_flags, parse_args, training_main

CACHED = "--cached-features"
WEIGHTS = "a probe's RUN/best (or any mean-pooled ViT classifier file, as launchers/finetune.py --eval-only reads)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cached = CACHED in argv
    args = parse_args(f"linear probing of a BootMAE encoder ({CACHED}: on features extracted once)", "vit_base",
                      [a for a in argv if a != CACHED], extra=eval_only_flags(WEIGHTS),
                      doc="docs/evaluation.md#linear-probing")
    if (status := eval_only_error(args)) is not None:
        return status
    if cached:
        args.set = [*args.set, "mode=cached_features"]

    def job():
        if args.eval_only:
            from bootmae_ds.evaluation.classify import evaluate_weights

            return lambda cfg, out, _steps, _resume: evaluate_weights(cfg, out, args.weights, cfg.data.eval_crop_pct)
        from bootmae_ds.linprobe.trainer import linprobe

        return linprobe

    return training_main(args, load_linprobe_config, job)


if __name__ == "__main__":
    raise SystemExit(main())
