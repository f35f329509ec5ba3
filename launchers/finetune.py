"""Fine-tune a pre-trained BootMAE encoder as an image classifier with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/b800_ft \\
        --set init.source=runs/b800 data.train=/shards/train/manifest.json data.val=/shards/val/manifest.json
    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/official_ft \\
        --set init.source=BootMAE_Base_800_PT.pth data.train=... data.val=...
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/finetune.py --config demo --output-dir runs/demo_ft \\
        --set init.source=runs/demo
    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/score_b800_ft \\
        --eval-only --weights BootMAE_Base_800_FT.pth --set data.val=/shards/val/manifest.json

Presets: bootmae_ds/presets/finetune/ (vit_base = the official recipe, vit_large, demo). Top-1/top-5
on data.val every eval.every_epochs epochs; the best classifier is kept in OUTPUT/best/ (timm
layout). ``--eval-only --weights FILE [--ema]`` scores a classifier file (a released BootMAE or
MAE fine-tuned .pth, a timm ViT, a RUN/best) on data.val in the official evaluation view, into
OUTPUT/eval_only.{json,md} (bootmae_ds/evaluation/classify.py). Exit status 75 means "preempted after saving a checkpoint": run the same command again.
"""

from __future__ import annotations

from bootmae_ds.config import load_finetune_config
from bootmae_ds.runtime.launch import eval_only_error, eval_only_flags, parse_args, training_main

WEIGHTS = ("a classifier: BootMAE_{Base,Large}_800_FT.pth, mae_finetuned_vit_{base,large,huge}.pth, a timm ViT "
           "(global_pool='avg') state dict or model.safetensors, or RUN/best")


def main(argv: list[str] | None = None) -> int:
    args = parse_args("fine-tune a BootMAE encoder", "vit_base", argv, extra=eval_only_flags(WEIGHTS, ema=True),
                      doc="docs/evaluation.md#fine-tuning")
    if (status := eval_only_error(args)) is not None:
        return status

    def job():
        if args.eval_only:
            from bootmae_ds.evaluation.classify import evaluate_weights

            return lambda cfg, out, _steps, _resume: evaluate_weights(cfg, out, args.weights,
                                                                      cfg.augment.eval_crop_pct, args.ema)
        from bootmae_ds.finetune.trainer import finetune

        return finetune

    return training_main(args, load_finetune_config, job)


if __name__ == "__main__":
    raise SystemExit(main())
