"""Object detection and instance segmentation (Mask R-CNN + FPN) on a pre-trained BootMAE ViT.

    deepspeed --num_gpus 8 launchers/detect.py --config coco_base --output-dir runs/coco \\
        --set init.source=runs/b800 data.root=/data/coco
    deepspeed --num_gpus 8 launchers/detect.py --config coco_base --output-dir runs/coco_official \\
        --set init.source=BootMAE_Base_800_PT.pth data.root=/data/coco
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/detect.py --config demo --output-dir runs/demo_det \\
        --set init.source=runs/demo

Presets: bootmae_ds/presets/detect/ (coco_base = the paper's recipe, demo). COCOeval box and mask AP
of the validation split every eval.every_epochs epochs and at the end; the best detector is kept
in OUTPUT/best/. Exit status 75 means "preempted after saving a checkpoint": run the same command
again; 2 means bad input (config, COCO json, images), named on one line.
"""

from __future__ import annotations

from bootmae_ds.config import load_detect_config
from bootmae_ds.runtime.launch import parse_args, training_main


def _trainer():
    from bootmae_ds.detect.trainer import detect

    return detect


def main(argv: list[str] | None = None) -> int:
    return training_main(parse_args("detection / instance segmentation with Mask R-CNN", "coco_base", argv,
                                    doc="docs/detection.md"),
                         load_detect_config, _trainer)


if __name__ == "__main__":
    raise SystemExit(main())
