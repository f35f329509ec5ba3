"""Schedules against hand-computed values; weight-decay grouping."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_config

from bootmae_ds.config import load_config
from bootmae_ds.models import build_model
from bootmae_ds.pretrain.schedules import PretrainSchedules as Schedules
from bootmae_ds.runtime.optim import param_groups, set_hyperparameters


def test_official_vit_base_schedule_values() -> None:
    s = Schedules(load_config("vit_base_800ep"), steps_per_epoch=312)  # 1.28M / 4096
    assert s.peak_lr == pytest.approx(2.4e-3) and s.warmup_steps == 40 * 312 and s.total_steps == 800 * 312
    assert s.lr(0) == 0.0
    assert s.lr(6239) == pytest.approx(2.4e-3 * 6239 / 12479)
    assert s.lr(12479) == pytest.approx(2.4e-3) and s.lr(12480) == pytest.approx(2.4e-3)
    mid = 12480 + (249600 - 12480) // 2
    assert s.lr(mid) == pytest.approx(1e-4 + 0.5 * (2.4e-3 - 1e-4))
    assert s.lr(249599) == pytest.approx(1e-4, rel=1e-6) and s.lr(10**7) == pytest.approx(1e-4)
    assert s.weight_decay(0) == s.weight_decay(100000) == 0.05
    # momentum: 0.999 -> 0.9999 over 100 epochs, -> 0.99999 by epoch 400 (dynamic), per epoch
    assert s.momentum(0) == pytest.approx(0.999) and s.momentum(311) == pytest.approx(0.999)
    assert s.momentum(312 * 50) == pytest.approx(0.999 + 0.5 * 0.0009)
    assert s.momentum(312 * 100) == pytest.approx(0.9999)
    assert s.momentum(312 * 250) == pytest.approx(0.9999 + 0.5 * 0.00009)
    assert s.momentum(312 * 700) == pytest.approx(0.99999)
    # feature weight: (epoch + 1) / 200, full from epoch 199 on
    assert s.feature_weight(0) == pytest.approx(1 / 200) and s.feature_weight(312 * 99) == pytest.approx(0.5)
    assert s.feature_weight(312 * 199) == 1.0 and s.feature_weight(312 * 500) == 1.0


def test_weight_decay_cosine_and_non_dynamic_momentum() -> None:
    s = Schedules(tiny_config("optim.weight_decay_end=0.25", "optim.weight_decay=0.05",
                              "momentum.mid_epoch=4"), steps_per_epoch=10)
    total = s.total_steps
    assert s.weight_decay(0) == pytest.approx(0.05) and s.weight_decay(total) == pytest.approx(0.25)
    assert s.weight_decay(total // 2) == pytest.approx(0.15)
    assert s.momentum(2 * 10) == pytest.approx(0.99 + 0.5 * 0.009) and s.momentum(5 * 10) == pytest.approx(0.999)
    assert s.momentum(39 * 10) == pytest.approx(0.999)  # demo: no dynamic stage


def test_teacher_policies() -> None:
    hard = Schedules(tiny_config("momentum.policy=hard_copy", "momentum.copy_every_epochs=2"), steps_per_epoch=5)
    assert [hard.momentum(k) for k in range(12)] == [1.0] * 9 + [0.0] + [1.0] * 2
    warm = Schedules(tiny_config("momentum.policy=ema_after_warmup", "momentum.warmup_epochs=3"), steps_per_epoch=5)
    assert warm.momentum(14) == 0.0 and warm.feature_weight(14) == 0.0
    assert warm.momentum(15) == pytest.approx(warm.ema_momentum(3)) and warm.feature_weight(15) > 0
    frozen = Schedules(tiny_config("momentum.policy=frozen", "momentum.teacher_path=x.safetensors"), 5)
    assert frozen.momentum(0) == 1.0
    none = Schedules(tiny_config("loss.feature_ramp_fraction=0", "loss.feature_weight=1.0"), 5)
    assert none.feature_weight(0) == 1.0


def test_weight_decay_groups() -> None:
    model = build_model(tiny_config())
    groups = {g["name"]: g for g in param_groups(model)}
    assert set(groups) == {"encoder_decay", "encoder_no_decay", "decoder_decay", "decoder_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for k in ("encoder_no_decay", "decoder_no_decay") for p in groups[k]["params"]}
    decay = {names[id(p)] for k in ("encoder_decay", "decoder_decay") for p in groups[k]["params"]}
    assert "encoder.cls_token" in no_decay and "pixel_decoder.mask_token" in no_decay
    assert "encoder.blocks.0.attn.q_bias" in no_decay and "encoder.blocks.0.norm1.weight" in no_decay
    assert "pixel_decoder.head.bias" in no_decay and "encoder.blocks.0.mlp.fc1.bias" in no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.patch_embed.proj.weight" in decay
    assert all(not n.endswith("pos_embed") for n in decay | no_decay)  # frozen, not optimised
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert all(n.startswith("encoder.") for p in groups["encoder_decay"]["params"] for n in [names[id(p)]])

    class _Opt:
        param_groups = list(groups.values())
    set_hyperparameters(_Opt, lr=0.1, weight_decay=0.05)
    assert groups["encoder_decay"]["weight_decay"] == 0.05 and groups["decoder_no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 0.1 for g in groups.values())
    assert math.isclose(sum(p.numel() for g in groups.values() for p in g["params"]),
                        sum(p.numel() for p in model.parameters() if p.requires_grad))
