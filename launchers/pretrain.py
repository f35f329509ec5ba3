"""Pre-train BootMAE with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 launchers/pretrain.py --config vit_base_800ep --output-dir runs/b800
    python launchers/pretrain.py --config demo --output-dir runs/demo          # one process
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/pretrain.py --config demo --output-dir runs/demo

Exit status 75 means "preempted after saving a checkpoint": run the same command again.
"""

from __future__ import annotations

from bootmae_ds.config import load_config as load_tree
from bootmae_ds.runtime.launch import parse_args, training_main


def _trainer():
    from bootmae_ds.pretrain.trainer import pretrain

    return pretrain


def load_config(source: str, overrides: list[str]):
    """The config, and a stat of each local path a mixture lists: before any process group or
    model is built."""
    from bootmae_ds.data.mixture import check_entries_exist

    return check_entries_exist(load_tree(source, overrides))


def main(argv: list[str] | None = None) -> int:
    return training_main(parse_args("BootMAE pre-training", "vit_base_800ep", argv, doc="docs/pretraining.md"), load_config, _trainer)


if __name__ == "__main__":
    raise SystemExit(main())
