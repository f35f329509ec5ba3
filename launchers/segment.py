"""Semantic segmentation transfer (UperNet, the official ADE20K recipe) with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 launchers/segment.py --config ade20k_base --output-dir runs/b800_seg \\
        --set init.source=runs/b800 data.train=/data/ADEChallengeData2016 data.val=/data/ADEChallengeData2016
    deepspeed --num_gpus 8 launchers/segment.py --config ade20k_base --output-dir runs/released_seg \\
        --eval-only --weights BootMAE_Base_800_UperNet.pth --set data.val=/data/ADEChallengeData2016
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/segment.py --config demo --output-dir runs/demo_seg \\
        --set init.source=runs/demo

Presets: bootmae_ds/presets/segment/ (ade20k_base = the official recipe, ade20k_base_ms its
multi-scale + flip evaluation, demo). mIoU/mAcc/aAcc on data.val every eval.every_steps and at the
end; the best segmentor is kept in OUTPUT/best/model.pth (mmseg layout). Exit status 75 means
"preempted after saving a checkpoint": run the same command again.
"""

from __future__ import annotations

from bootmae_ds.config.segment import load_segment_config
from bootmae_ds.runtime.launch import eval_only_error, eval_only_flags, parse_args, training_main

WEIGHTS = "a segmentation checkpoint: a released mmseg .pth (BootMAE_Base_800_UperNet.pth) or RUN/best/model.pth"


def main(argv: list[str] | None = None) -> int:
    args = parse_args("semantic segmentation on a BootMAE encoder", "ade20k_base", argv, extra=eval_only_flags(WEIGHTS),
                      doc="docs/segmentation.md")
    if (status := eval_only_error(args)) is not None:
        return status

    def job():
        if args.eval_only:
            from bootmae_ds.segment.evaluate import evaluate_weights

            return lambda cfg, out, _max_steps, _resume: evaluate_weights(cfg, out, args.weights)
        from bootmae_ds.segment.trainer import segment

        return segment

    return training_main(args, load_segment_config, job)


if __name__ == "__main__":
    raise SystemExit(main())
