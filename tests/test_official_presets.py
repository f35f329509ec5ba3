"""The evaluation presets against the official BootMAE commands, number by number.

OFFICIAL holds what each script of github.com/LightDXY/BootMAE runs (its flags, else the defaults
of the Python entry point it calls); the resolved presets must give the same numbers, except the
deviations listed (and justified) in the presets themselves.
"""

from __future__ import annotations

import pytest

from bootmae_ds.config import load_config, load_finetune_config, load_linprobe_config
from bootmae_ds.runtime.schedules import Schedules

# scripts/finetune/bash_fine_BootMAE_{Base,Large}_800.sh -> run_class_finetuning.py
_FT_DEFAULTS = {"update_freq": 1, "drop_path": 0.1, "weight_decay": 0.05, "mixup": 0.8, "cutmix": 1.0,
                "ema": 0.9998, "smoothing": 0.1, "reprob": 0.25, "aa": "rand-m9-mstd0.5-inc1", "min_lr": 1e-6,
                "init_scale": 0.001, "gpus": 8}
FINETUNE = {
    "vit_base": _FT_DEFAULTS | {"per_gpu": 256, "lr": 5e-3, "epochs": 100, "warmup_epochs": 20,
                                "layer_decay": 0.6, "arch": "base"},
    "vit_large": _FT_DEFAULTS | {"per_gpu": 128, "lr": 1.5e-3, "epochs": 50, "warmup_epochs": 5,
                                 "layer_decay": 0.75, "arch": "large"},
}
# scripts/linear/bash_linear_BootMAE_{Base,Large}_800.sh -> main_linprobe.py (8 GPUs, as its README)
_LP_DEFAULTS = {"gpus": 8, "per_gpu": 1024, "accum_iter": 2, "weight_decay": 0.0, "warmup_epochs": 10,
                "min_lr": 0.0, "head_std": 0.01, "crop_scale": (0.08, 1.0)}
LINPROBE = {
    "vit_base": _LP_DEFAULTS | {"depth": 10, "epochs": 90, "blr": 0.1, "arch": "base"},
    "vit_large": _LP_DEFAULTS | {"depth": 18, "epochs": 50, "blr": 0.07, "arch": "large"},
}


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetune_presets_resolve_to_the_official_commands(name) -> None:
    o, c = FINETUNE[name], load_finetune_config(name)
    batch = o["gpus"] * o["per_gpu"] * o["update_freq"]
    assert c.data.global_batch_size == batch and c.data.micro_batch_size == o["per_gpu"]
    assert c.data.grad_accum_steps(o["gpus"]) == o["update_freq"]
    assert Schedules(c, 100).peak_lr == pytest.approx(o["lr"], rel=1e-12)  # the script's absolute lr
    assert (c.schedule.epochs, c.schedule.warmup_epochs) == (o["epochs"], o["warmup_epochs"])
    assert (c.optim.layer_decay, c.model.drop_path, c.optim.weight_decay) == (o["layer_decay"], o["drop_path"],
                                                                               o["weight_decay"])
    assert c.optim.min_lr == o["min_lr"] and getattr(c.optim, "weight_decay_end", None) is None  # constant wd
    a = c.augment
    assert (a.mixup, a.cutmix, a.label_smoothing, a.reprob, a.auto_augment) == (
        o["mixup"], o["cutmix"], o["smoothing"], o["reprob"], o["aa"])
    assert c.ema.enabled and c.ema.decay == o["ema"] and c.model.head_init_scale == o["init_scale"]
    # the official model: fixed sin-cos positions that are not trained, a fresh fc_norm
    assert not c.model.train_pos_embed and c.model.fc_norm == "fresh"
    assert c.init.arch == o["arch"] and load_config(c.init.config).model.size == o["arch"]


@pytest.mark.parametrize("name", sorted(LINPROBE))
def test_linprobe_presets_resolve_to_the_official_commands(name) -> None:
    o, c = LINPROBE[name], load_linprobe_config(name)
    batch = o["gpus"] * o["per_gpu"] * o["accum_iter"]
    assert c.data.global_batch_size == batch == 16384 and c.data.micro_batch_size == o["per_gpu"]
    assert c.data.grad_accum_steps(o["gpus"]) == o["accum_iter"]
    assert c.optim.base_lr * batch / c.optim.lr_batch_divisor == pytest.approx(o["blr"] * batch / 256)
    assert (c.model.depth, c.schedule.epochs, c.schedule.warmup_epochs) == (o["depth"], o["epochs"], o["warmup_epochs"])
    assert (c.optim.weight_decay, c.optim.min_lr, c.model.head_init_std) == (o["weight_decay"], o["min_lr"], o["head_std"])
    assert (c.optim.momentum, c.optim.trust_coefficient, c.optim.clip_grad) == (0.9, 0.001, None)  # MAE's LARS
    assert c.data.crop_scale == o["crop_scale"] and c.data.hflip and c.data.interpolation == "bicubic"
    assert c.data.eval_crop_pct == 224 / 256 and c.mode == "official"
    assert c.init.arch == o["arch"] and load_config(c.init.config).model.size == o["arch"]


def test_pretraining_presets_use_the_papers_batch_for_both_sizes() -> None:
    # "Both ViT-B and ViT-L model are trained for 800 epochs with batch size set to 4096" and warm
    # up to 2.4e-3 (paper Sec. 4.1); min lr: 1e-4 (base script), 1e-5 (large script: the default)
    for name, min_lr in (("vit_base_800ep", 1e-4), ("vit_large_800ep", 1e-5)):
        c = load_config(name)
        assert c.data.global_batch_size == 4096 and Schedules(c, 100).peak_lr == pytest.approx(2.4e-3)
        assert (c.schedule.epochs, c.schedule.warmup_epochs, c.optim.min_lr) == (800, 40, min_lr)
