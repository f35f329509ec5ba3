"""Config -> DeepSpeed JSON: batch sizes, accumulation, clipping and precision agree."""

from __future__ import annotations

import json

import pytest
from distributed import deepspeed_cmd, run

from bootmae_ds.config import ConfigError, load_config
from bootmae_ds.runtime.ds_config import build_ds_config, resolve_precision


def test_batch_sizes_accumulation_and_precision() -> None:
    cfg = load_config("vit_base_800ep", ["optim.clip_grad=3.0"])
    ds = build_ds_config(cfg, world_size=8, precision="bf16")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4096, 256, 2)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 8 * ds["gradient_accumulation_steps"]
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["gradient_clipping"] == 3.0
    fp32 = build_ds_config(load_config("demo"), world_size=2, precision="fp32")
    assert "bf16" not in fp32 and fp32["gradient_accumulation_steps"] == 1 and fp32["gradient_clipping"] == 0.0
    json.dumps(ds)


def test_precision_auto_follows_the_accelerator() -> None:
    cfg = load_config("demo")
    assert resolve_precision(cfg, "cpu") == "fp32" and resolve_precision(cfg, "cuda") == "bf16"
    assert resolve_precision(load_config("demo", ["run.precision=bf16"]), "cpu") == "bf16"


def test_world_size_that_does_not_divide_and_broken_template(tmp_path) -> None:
    with pytest.raises(ConfigError, match="x 3"):
        build_ds_config(load_config("demo"), world_size=3, precision="fp32")
    (tmp_path / "zero2_fp32.json").write_text("{oops")
    with pytest.raises(ConfigError, match="zero2_fp32.json.*not valid JSON"):
        build_ds_config(load_config("demo"), 1, "fp32", template_dir=tmp_path)
    with pytest.raises(ConfigError, match="zero2_bf16.json.*missing"):
        build_ds_config(load_config("demo"), 1, "bf16", template_dir=tmp_path)


@pytest.mark.slow
def test_bf16_gradients_are_reduced_in_fp32(tmp_path) -> None:
    """DeepSpeed really reduces the bf16 run's gradients in fp32 with our template (its default
    would be bf16): every tensor its communication layer reduces, recorded on 2 CPU ranks."""
    seen = {}
    for mode in ("template", "without"):
        out = tmp_path / f"{mode}.json"
        proc = run(deepspeed_cmd("tests/dist_scripts/comm_dtype.py", mode, str(out)), timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        seen[mode] = json.loads(out.read_text())
    template, without = seen["template"], seen["without"]
    assert template["engine_dtype"] == "torch.float32" and without["engine_dtype"] == "torch.bfloat16"
    reduced = lambda s: [d for dtypes in s["seen"].values() for d in dtypes]  # noqa: E731
    assert "torch.bfloat16" in reduced(without)  # the gradients, without the setting
    assert "torch.bfloat16" not in reduced(template)
    assert reduced(template).count("torch.float32") == reduced(without).count("torch.float32") + \
        reduced(without).count("torch.bfloat16")  # the same reductions, each in fp32
