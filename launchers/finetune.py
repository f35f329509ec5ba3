"""Fine-tune a pre-trained BootMAE encoder as an image classifier with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/b800_ft \\
        --set init.source=runs/b800 data.train=/shards/train/manifest.json data.val=/shards/val/manifest.json
    deepspeed --num_gpus 8 launchers/finetune.py --config vit_base --output-dir runs/official_ft \\
        --set init.source=BootMAE_Base_800_PT.pth data.train=... data.val=...
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/finetune.py --config demo --output-dir runs/demo_ft \\
        --set init.source=runs/demo

Presets: bootmae_ds/presets/finetune/ (vit_base = the official recipe, vit_large, demo). Top-1/top-5
on data.val every eval.every_epochs epochs; the best classifier is kept in OUTPUT/best/ (timm
layout). Exit status 75 means "preempted after saving a checkpoint": run the same command again.
"""

from __future__ import annotations

from bootmae_ds.config import load_finetune_config
from bootmae_ds.runtime.launch import parse_args, training_main


def _trainer():
    from bootmae_ds.finetune.trainer import finetune

    return finetune


def main(argv: list[str] | None = None) -> int:
    return training_main(parse_args("fine-tune a BootMAE encoder", "vit_base", argv,
                                  doc="docs/evaluation.md#fine-tuning"), load_finetune_config, _trainer)


if __name__ == "__main__":
    raise SystemExit(main())
