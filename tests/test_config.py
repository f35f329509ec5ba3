"""Config: presets validate and match the official recipes; bad configs name the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from bootmae_ds.config import (
    BootMAEConfig,
    ConfigError,
    build_config,
    describe,
    load_config,
    pretrain_presets,
)


def test_presets_all_validate() -> None:
    assert {"demo", "vit_base_800ep", "vit_large_800ep", "mae_base_800ep"} <= set(pretrain_presets())
    for name in pretrain_presets():
        assert isinstance(load_config(name), BootMAEConfig)


def test_base_preset_is_the_official_recipe_and_the_default() -> None:
    cfg = load_config("vit_base_800ep")
    assert cfg.model.model_dump(exclude={"size"}) == BootMAEConfig().model.model_dump(exclude={"size"})
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (768, 12, 12)
    assert cfg.model.num_patches == 196 and cfg.mask.num_masked == 147
    assert (cfg.mask.block_budget, cfg.mask.max_block_patches, cfg.mask.min_block_patches) == (120, 60, 16)
    assert cfg.optim.base_lr * cfg.data.global_batch_size / cfg.optim.lr_batch_divisor == pytest.approx(2.4e-3)
    assert (cfg.optim.min_lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-4, (0.9, 0.95), 0.05)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (800, 40)
    assert (cfg.momentum.start, cfg.momentum.mid, cfg.momentum.end, cfg.momentum.dynamic) == (0.999, 0.9999, 0.99999, True)
    assert cfg.loss.weighted_mask and cfg.loss.pixel_norm == "per_channel" and cfg.loss.feature_weight == 1.0
    assert cfg.data.mean == cfg.data.std == (0.5, 0.5, 0.5) and cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.model.pixel_decoder.dim == 512 and cfg.model.pixel_decoder.context_block == 0
    assert cfg.model.resolve_block(cfg.model.feature_decoder.context_block) == 11


def test_large_and_mae_presets() -> None:
    large = load_config("vit_large_800ep")
    assert (large.model.embed_dim, large.model.depth, large.model.num_heads) == (1024, 24, 16)
    assert large.model.resolve_block(large.model.feature_decoder.context_block) == 23
    assert not large.momentum.dynamic
    mae = load_config("mae_base_800ep")
    assert not mae.model.feature_decoder.enabled and mae.model.pixel_decoder.depth == 8
    assert mae.mask.strategy == "random" and not mae.model.pixel_decoder.context


def test_size_shorthand() -> None:
    large = load_config("vit_base_800ep", ["model.size=large"]).model
    assert (large.embed_dim, large.depth, large.num_heads, large.size) == (1024, 24, 16, "large")
    custom = load_config("vit_base_800ep", ["model.size=small", "model.depth=6"]).model
    assert (custom.embed_dim, custom.depth, custom.num_heads, custom.size) == (384, 6, 6, None)
    # an override of the size replaces dims pinned by the file (the demo pins 96/4/4)
    demo = load_config("demo", ["model.size=small"]).model
    assert (demo.embed_dim, demo.depth, demo.num_heads, demo.size) == (384, 12, 6, "small")


def test_dotted_overrides_parse_yaml_values() -> None:
    cfg = load_config("demo", ["optim.base_lr=1e-4", "model.depth=6", "data.crop_scale=[0.3, 0.9]",
                               "optim.clip_grad=null", "run.name=x"])
    assert cfg.optim.base_lr == 1e-4 and cfg.model.depth == 6
    assert cfg.data.crop_scale == (0.3, 0.9) and cfg.optim.clip_grad is None and cfg.run.name == "x"


def test_yaml_round_trip_and_base_inheritance(tmp_path) -> None:
    cfg = load_config("demo", ["model.depth=3"])
    path = tmp_path / "run.yaml"
    cfg.save(path)
    assert load_config(path) == cfg
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "run.yaml", "optim": {"base_lr": 0.5}}))
    loaded = load_config(child)
    assert loaded.optim.base_lr == 0.5 and loaded.model.depth == 3


BAD = [
    (["model.img_size=30"], "model.img_size=30", "divisible by model.patch_size"),
    (["mask.num_masked=64"], "mask.num_masked=64", "below the 64 patches"),
    (["mask.strategy=block", "mask.num_masked=30"], "mask.block_budget=40", "must not exceed mask.num_masked=30"),
    (["mask.strategy=block", "mask.min_block_patches=30"], "mask.min_block_patches=30", "max_block_patches"),
    (["model.feature_decoder.context_block=4"], "model.feature_decoder.context_block=4", "[-4, 3]"),
    (["model.pixel_decoder.context_block=-5"], "model.pixel_decoder.context_block=-5", "encoder block"),
    (["data.micro_batch_size=0"], "data.micro_batch_size=0", "greater than or equal to 1"),
    (["data.global_batch_size=48"], "data.global_batch_size=48", "multiple of data.micro_batch_size"),
    (["model.num_heads=5"], "model.embed_dim=96", "divisible by model.num_heads=5"),
    (["model.embed_dim=90", "model.num_heads=3"], "model.embed_dim=90", "divisible by 4"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas", "[0, 1)"),
    (["data.crop_scale=[0.5, 0.2]"], "data.crop_scale", "low <= high"),
    (["model.feature_decoder.enabled=false"], "loss.feature_weight=0.25", "must be 0"),
    (["loss.feature_weight=0"], "model.feature_decoder.enabled=True", "no loss"),
    (["momentum.policy=frozen"], "momentum.teacher_path", "required"),
    (["schedule.warmup_epochs=50"], "schedule.warmup_epochs=50", "must not exceed"),
    (["model.depht=3"], "model.depht", "unknown field"),
    (["mask.strategy=grid"], "mask.strategy='grid'", "'block' or 'random'"),
    (["optim.base_lr=-1"], "optim.base_lr=-1", "greater than 0"),
]


@pytest.mark.parametrize("overrides,field,rule", BAD, ids=[b[1] for b in BAD])
def test_bad_configs_name_field_value_and_rule(overrides, field, rule) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    assert field in str(info.value) and rule in str(info.value)


def test_bad_sources_and_overrides(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such preset or file.*vit_base_800ep"):
        load_config("vit_tiny_1ep")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("demo", ["model.depth"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("demo", ["model.depth.x=3"])


def test_batch_accumulation_is_checked_against_world_size() -> None:
    data = load_config("vit_base_800ep").data
    assert data.grad_accum_steps(16) == 1 and data.grad_accum_steps(8) == 2
    with pytest.raises(ConfigError, match="data.global_batch_size=4096.*x 3"):
        data.grad_accum_steps(3)


def test_every_field_has_a_description() -> None:
    text = describe(BootMAEConfig)
    assert "# None" not in text and "optim.base_lr" in text
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)
    walk(BootMAEConfig)


def test_cli_prints_config_and_fails_cleanly() -> None:
    ok = subprocess.run([sys.executable, "-m", "bootmae_ds.config", "demo", "--set", "model.depth=2"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and build_config(yaml.safe_load(ok.stdout)).model.depth == 2
    bad = subprocess.run([sys.executable, "-m", "bootmae_ds.config", "demo", "--set", "mask.num_masked=99"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "mask.num_masked=99" in bad.stderr and "Traceback" not in bad.stderr
