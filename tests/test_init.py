"""Continued pre-training (init.*) and the export to the official layout.

Sources are random-valued files in the released layouts (key lists in tests/data/*.tsv): a BootMAE
.pth, MAE's .pth with its decoder, a timm ViT state dict, and a bootmae-ds run. For each the
converted forward is compared with the file's own computation (bench/reference_bootmae.py, timm's
ViT, a re-statement of MAE's decoder), and real 2-rank deepspeed runs check that the weights at
step 0 are the file's, bit for bit: the lr of step 0 is 0 (warm-up), so the checkpoint after step 1
still holds them and the momentum encoder has taken exactly one EMA step from the file's EMA.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from distributed import ROOT, cpu_env, deepspeed_cmd, run
from reference_bootmae import official_forward, official_target_features
from safetensors.torch import load_file, save_file

from bootmae_ds.config import load_config
from bootmae_ds.interop.encoders import ExportError, run_model_state
from bootmae_ds.interop.official import official_to_ours, ours_to_official, read_official_checkpoint
from bootmae_ds.interop.official_export import official_state
from bootmae_ds.interop.pretrain_init import (
    InitError,
    fit_table,
    initial_weights,
    read_initial_state,
    table_layout,
)
from bootmae_ds.models import build_model, sincos_2d
from bootmae_ds.pretrain.losses import patchify
from bootmae_ds.runtime.sharded_ema import consolidate_shards

DATA = Path(__file__).resolve().parent / "data"
OFFICIAL_DEMO = [  # the demo encoder with the official decoders (the feature predictor reuses pos_embed)
    "model.depth=2", "model.pixel_decoder.depth=2", "model.pixel_decoder.context=true",
    "model.pixel_decoder.context_block=0", "model.pixel_decoder.pos_embed_visible=false",
    "model.feature_decoder.context_block=1", "model.feature_decoder.dim=null"]
# data.num_workers=0: no fork server to start (~2 s a launch); workers run in test_faults and others.
RUN = ["data.micro_batch_size=8", "data.global_batch_size=16", "data.num_workers=0", "logging.every_steps=1",
       "logging.knn_every_steps=null", "checkpoint.every_steps=1", "checkpoint.keep_last=5"]
_spec = importlib.util.spec_from_file_location("export_cli", ROOT / "launchers" / "export.py")
export_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_cli)


# -- files in the released layouts -------------------------------------------------------------
def _tsv(name: str) -> dict[str, list[int]]:
    lines = [line for line in (DATA / name).read_text().splitlines() if line and not line.startswith("#")]
    return {k: [int(s) for s in shape.split("x")] for k, shape in (line.split("\t") for line in lines[1:])}


def _pattern(keys) -> set[str]:
    """Key names with block indices erased: the layout, whatever the depth."""
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def _random(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights: norms near 1, everything else (biases included) clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        value = 0.05 * torch.randn(shape, generator=g)
        out[k] = value + 1 if "norm" in k and k.endswith("weight") else value
    return out


def _sincos_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BootMAE's fixed sin-cos tables where a released file has them (random ones are no file's)."""
    for key in [k for k in state if k.endswith("pos_embed")]:
        n, dim = state[key].shape[1] - 1, state[key].shape[2]
        side = math.isqrt(n)
        state[key] = sincos_2d((side, side), dim)
    return state


def _mae_table(dim: int, side: int) -> torch.Tensor:
    """MAE's util/pos_embed.get_2d_sincos_pos_embed, re-stated in numpy float64 as MAE computes it."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)))  # w first

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), emb])).float()[None]


def _ours_to_mae(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Our MAE-style model's weights in MAE's key layout (a re-statement, not the package's
    mapping), each fused qkv bias with a random, non-zero k part."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.startswith("feature_decoder.") or key.endswith("v_bias"):
            continue
        name = key.replace("encoder.", "", 1) if key.startswith("encoder.") else (
            key.replace("pixel_decoder.blocks.", "decoder_blocks.").replace("pixel_decoder.embed.", "decoder_embed.")
            .replace("pixel_decoder.norm.", "decoder_norm.").replace("pixel_decoder.head.", "decoder_pred.")
            .replace("pixel_decoder.mask_token", "mask_token").replace("pixel_decoder.pos_embed", "decoder_pos_embed"))
        if key.endswith("q_bias"):
            k_part = 0.5 * torch.randn(value.shape, generator=g)
            value = torch.cat([value, k_part, state[key.replace("q_bias", "v_bias")]])
            name = name.replace("q_bias", "qkv.bias")
        out[name] = value.clone()
    return out


def _official_file(path: Path, cfg, seed: int) -> dict:
    """A demo-size file in the released BootMAE layout: model, a different model_ema, epoch, args."""
    state = _sincos_tables(_random({k: list(v.shape) for k, v in build_model(cfg).state_dict().items()}, seed))
    model = ours_to_official(state, cfg)
    assert _pattern(model) == _pattern(_tsv("official_bootmae_base_state_dict.tsv"))  # the released layout
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + 1))
           if "pos_embed" not in k else v for k, v in model.items()}
    blob = {"model": model, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4),
            "optimizer": {"state": {}}}
    torch.save(blob, path)
    return blob


# -- the released layouts, at their real sizes ---------------------------------------------------
def _released(name: str, shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Every key of a released file at its real shape, one distinct value per key, stored as a
    broadcast scalar: a ViT-L file of a few kB that still names every key and shape."""
    return {k: torch.full((1,), shift + 0.001 * (i + 1)).expand(shape) for i, (k, shape) in enumerate(_tsv(name).items())}


def _shapes(cfg) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no init, no random numbers
        return {k: v.shape for k, v in build_model(cfg).state_dict().items()}


@pytest.mark.parametrize("arch", ["base", "large"])
def test_released_files_fit_the_presets_key_for_key(tmp_path, arch) -> None:
    """The released BootMAE file of each size into continue_base's recipe at that size (every key
    of model and model_ema used, official export gives the same keys and values back), MAE's
    file with its decoder into mae_base_800ep, and MAE's encoder-only file into BootMAE."""
    official = _released(f"official_bootmae_{arch}_state_dict.tsv")
    official |= _sincos_tables({k: official[k].clone() for k in ("pos_embed", "de_pos_embed")})
    path = tmp_path / "BootMAE_PT.pth"
    ema = official | {k: v for k, v in _released(f"official_bootmae_{arch}_state_dict.tsv", shift=1.0).items()
                      if k.startswith(("blocks", "norm", "cls", "patch"))}  # the EMA differs in the encoder
    torch.save({"model": official, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}, path)
    size = ["model.size=large"] if arch == "large" else []
    cfg = load_config("continue_base", [*size, f"init.source={path}"])
    state = read_initial_state(cfg.init, cfg, _shapes(cfg))
    p = state.provenance
    assert (p["kind"], p["weights"], p["teacher"], p["epoch"]) == ("bootmae", "model", "model_ema encoder", 799)
    assert p["loaded"] == ["encoder", "pixel_decoder", "feature_decoder", "momentum_encoder"] and p["fresh"] == []
    assert p["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(state.teacher["blocks.0.attn.q_bias"], ema["blocks.0.attn.q_bias"])
    back = ours_to_official(state.model, cfg)  # the official layout of what was loaded
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
    mae = _released(f"mae_{arch}_state_dict.tsv")
    mae["pos_embed"], mae["decoder_pos_embed"] = (_mae_table(v.shape[-1], 14) for v in
                                                  (mae["pos_embed"], mae["decoder_pos_embed"]))
    torch.save({"model": mae}, tmp_path / "mae_visualize.pth")
    cfg = load_config("mae_base_800ep", [*size, f"init.source={tmp_path / 'mae_visualize.pth'}"])
    state = read_initial_state(cfg.init, cfg, _shapes(cfg))
    assert state.provenance["kind"] == "mae" and state.provenance["loaded"] == ["encoder", "pixel_decoder"]
    assert torch.equal(state.model["encoder.pos_embed"], mae["pos_embed"])  # carried, not recomputed
    torch.save({"model": {k: v for k, v in mae.items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "mae_pretrain.pth")
    cfg = load_config("vit_base_800ep", [*size, f"init.source={tmp_path / 'mae_pretrain.pth'}"])
    state = read_initial_state(cfg.init, cfg, _shapes(cfg))
    assert state.provenance["fresh"] == ["pixel_decoder", "feature_decoder"]
    dim = cfg.model.embed_dim  # fresh decoders take MAE's column-first order
    assert torch.equal(state.model["pixel_decoder.pos_embed"], sincos_2d((14, 14), 512, layout="col_first"))
    assert torch.equal(state.model["feature_decoder.pos_embed"], sincos_2d((14, 14), dim, layout="col_first"))


# -- forward parity with each source's own computation (demo size) --------------------------------
def test_bootmae_file_forward_and_teacher_equal_the_files(tmp_path) -> None:
    """Our converted model's forward equals the official computation on the file's model weights,
    and the momentum encoder's targets equal it on model_ema's."""
    cfg = load_config("demo", OFFICIAL_DEMO)
    path = tmp_path / "BootMAE_demo.pth"
    blob = _official_file(path, cfg, seed=0)
    cfg = load_config("demo", [*OFFICIAL_DEMO, f"init.source={path}"])
    model = build_model(cfg).eval()
    state = read_initial_state(cfg.init, cfg, {k: v.shape for k, v in model.state_dict().items()})
    assert model.load_state_dict(state.model, strict=False).missing_keys == []
    teacher = copy.deepcopy(model.encoder)
    teacher.load_state_dict(state.teacher | {"pos_embed": model.encoder.pos_embed}, strict=True)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    for b in range(2):
        mask[b, torch.randperm(64, generator=g)[:48]] = True
    shuffle = torch.argsort(mask.float() * 2 + torch.rand(mask.shape, generator=g), dim=1)  # visible first
    with torch.no_grad():
        ours = model(images, mask)
        ref_image, ref_feat = official_forward(blob["model"], images, shuffle, 48, patch=4, depth=2, heads=4,
                                               feature_blocks=(0, 1))
        target = teacher.target_features(images)
        ref_target = official_target_features(blob["model_ema"], images, patch=4, depth=2, heads=4)
        online_target = official_target_features(blob["model"], images, patch=4, depth=2, heads=4)
    torch.testing.assert_close(ours.pixels, patchify(ref_image, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.features, ref_feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target, ref_target, atol=1e-5, rtol=1e-5)
    assert ref_feat.abs().mean() > 0.1 and (ref_target - online_target).abs().mean() > 1e-3


def test_mae_file_forward_equals_timm_and_maes_decoder(tmp_path) -> None:
    """MAE's encoder + decoder (demo size, non-zero k biases): our encoder equals timm's ViT on the
    same weights (dropping the k bias is exact), our pixel prediction equals MAE's decoder, and
    MAE's column-first tables are carried bit for bit."""
    cfg = load_config("demo", ["model.depth=2", "model.pixel_head_bias=per_value"])
    ours = _random({k: list(v.shape) for k, v in build_model(cfg).state_dict().items()}, seed=1)
    mae = _ours_to_mae(ours, seed=2)
    mae["pos_embed"], mae["decoder_pos_embed"] = _mae_table(96, 8), _mae_table(64, 8)
    assert table_layout(mae["pos_embed"]) == "col_first" and table_layout(sincos_2d((8, 8), 96)) == "row_first"
    assert not torch.allclose(mae["pos_embed"], sincos_2d((8, 8), 96), atol=0.1)  # the orders differ
    path = tmp_path / "mae.pth"
    torch.save({"model": mae}, path)
    cfg = load_config("demo", ["model.depth=2", "model.pixel_head_bias=per_value", f"init.source={path}"])
    model = build_model(cfg).eval()
    state = read_initial_state(cfg.init, cfg, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(state.model, strict=False)
    p = state.provenance
    assert (p["kind"], p["loaded"], p["fresh"], state.teacher) == ("mae", ["encoder", "pixel_decoder"],
                                                                   ["feature_decoder"], None)
    assert torch.equal(model.encoder.pos_embed, mae["pos_embed"])
    assert torch.equal(model.feature_decoder.pos_embed, sincos_2d((8, 8), 64, layout="col_first"))
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96,
                            depth=2, num_heads=4, num_classes=0).eval()
    vit.load_state_dict({k: v for k, v in mae.items() if not k.startswith(("decoder", "mask_token"))}, strict=True)
    decoder = torch.nn.ModuleList(timm.models.vision_transformer.Block(
        64, 4, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)) for _ in range(8))
    decoder.load_state_dict({k[len("decoder_blocks."):]: v for k, v in mae.items() if k.startswith("decoder_blocks.")})
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids_shuffle = torch.argsort(torch.rand(2, 64, generator=g), dim=1)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask.scatter_(1, ids_shuffle[:, :16], False)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(images).z, vit.forward_features(images), atol=1e-5, rtol=1e-5)
        # MAE's forward_encoder + forward_decoder (models_mae.py), re-stated on timm's modules
        x = vit.patch_embed(images) + mae["pos_embed"][:, 1:]
        x = torch.gather(x, 1, ids_shuffle[:, :16, None].expand(-1, -1, 96))
        x = torch.cat([(mae["cls_token"] + mae["pos_embed"][:, :1]).expand(2, -1, -1), x], dim=1)
        x = vit.norm(vit.blocks(x))
        y = x @ mae["decoder_embed.weight"].t() + mae["decoder_embed.bias"]
        y_ = torch.cat([y[:, 1:], mae["mask_token"].expand(2, 48, -1)], dim=1)
        y_ = torch.gather(y_, 1, torch.argsort(ids_shuffle, dim=1)[:, :, None].expand(-1, -1, 64))
        y = torch.cat([y[:, :1], y_], dim=1) + mae["decoder_pos_embed"]
        for block in decoder:
            y = block(y)
        y = torch.nn.functional.layer_norm(y, (64,), mae["decoder_norm.weight"], mae["decoder_norm.bias"], 1e-6)
        ref = (y @ mae["decoder_pred.weight"].t() + mae["decoder_pred.bias"])[:, 1:]
        pixels = model(images, mask).pixels
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(pixels, ref, atol=1e-5, rtol=1e-5)


# -- tables and refusals -----------------------------------------------------------------------
def test_position_tables_are_recomputed_or_resampled_for_another_grid() -> None:
    row, col = sincos_2d((8, 8), 96), _mae_table(96, 8)
    assert torch.equal(fit_table(col, (8, 8))[0], col)  # same grid: untouched
    assert torch.equal(fit_table(row, (10, 10))[0], sincos_2d((10, 10), 96))
    assert torch.equal(fit_table(col, (10, 10))[0], sincos_2d((10, 10), 96, layout="col_first"))
    learned = 0.02 * torch.randn(1, 65, 96, generator=torch.Generator().manual_seed(0))
    out, how = fit_table(learned, (10, 10))
    assert "bicubic" in how and torch.equal(out, timm.layers.resample_abs_pos_embed(learned, [10, 10], [8, 8], 1))


def test_bad_sources_are_refused_by_name(tmp_path) -> None:
    cfg = load_config("demo", OFFICIAL_DEMO)
    good = tmp_path / "demo_bootmae.pth"
    blob = _official_file(good, cfg, seed=4)

    def refused(overrides: list[str], match: str, base: list[str] = OFFICIAL_DEMO) -> None:
        c = load_config("demo", [*base, *overrides])
        with pytest.raises(InitError, match=match) as err:
            read_initial_state(c.init, c, {k: v.shape for k, v in build_model(c).state_dict().items()})
        assert "\n" not in str(err.value)

    refused([f"init.source={tmp_path / 'nope.pth'}"], "nope.pth': no such file")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    refused([f"init.source={cut}"], "cut.pth.*cannot read it")
    refused([f"init.source={good}", "model.depth=3"], r"encoder does not fit.*missing \['encoder.blocks.2")
    refused([f"init.source={good}", "model.embed_dim=128"], "shape mismatch encoder")
    missing = tmp_path / "missing.pth"
    torch.save({"model": {k: v for k, v in blob["model"].items() if k != "blocks.1.mlp.fc2.bias"}}, missing)
    refused([f"init.source={missing}"], r"missing \['encoder.blocks.1.mlp.fc2.bias'\]")
    extra = tmp_path / "extra.pth"
    torch.save({"model": {**blob["model"], "blocks.0.attn.relative_position_bias_table": torch.zeros(3)}}, extra)
    refused([f"init.source={extra}"], "relative_position_bias_table")
    refused([f"init.source={good}", "init.sha256=" + "a" * 64], "differs from init.sha256")
    refused([f"init.source={good}", "init.kind=mae"], "init.kind=mae but it holds BootMAE keys")
    refused([f"init.source={good}", "model.pixel_head_bias=per_value"], "pixel_decoder does not fit.*init.decoders=false")
    other = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    refused([f"init.source={other}"], r"neither a BootMAE nor an MAE/timm ViT state dict \(keys \['fc.weight'\]")
    timm_file = tmp_path / "vit.safetensors"
    vit = timm.create_model("vit_base_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=4)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(timm_file))
    refused([f"init.source={timm_file}", "init.which=momentum"], "has no momentum encoder", base=["model.depth=2"])
    ok = load_config("demo", ["model.depth=2", f"init.source={timm_file}"])
    state = read_initial_state(ok.init, ok, {k: v.shape for k, v in build_model(ok).state_dict().items()})
    assert state.provenance["kind"] == "timm" and "head.weight" in state.provenance["unused"]
    # a decoder that does not fit is taken or refused whole; init.decoders=false takes the encoder alone
    lone = load_config("demo", [*OFFICIAL_DEMO, f"init.source={good}", "model.pixel_head_bias=per_value",
                                "init.decoders=false"])
    state = read_initial_state(lone.init, lone, {k: v.shape for k, v in build_model(lone).state_dict().items()})
    assert state.provenance["loaded"] == ["encoder", "momentum_encoder"]
    assert state.provenance["fresh"] == ["pixel_decoder", "feature_decoder"]


def test_a_bad_source_stops_the_launcher_with_status_2(tmp_path) -> None:
    cut = tmp_path / "BootMAE_cut.pth"
    _official_file(cut, load_config("demo", OFFICIAL_DEMO), seed=9)
    cut.write_bytes(cut.read_bytes()[:4096])
    proc = run(["python", "launchers/pretrain.py", "--config", "demo", "--output-dir", str(tmp_path / "run"),
                "--max-steps", "1", "--set", *RUN, *OFFICIAL_DEMO, f"init.source={cut}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "BootMAE_cut.pth" in errors[0] and "cannot read it" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "init.json").exists()


def test_a_resumed_run_takes_its_recorded_tables_not_the_source(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("demo", ["model.depth=2", f"init.source={tmp_path / 'gone.pth'}"])  # the file is gone
    model = build_model(cfg)
    tables = {n: torch.randn(p.shape) for n, p in model.named_parameters() if not p.requires_grad}
    save_file(tables, str(run_dir / "init_frozen.safetensors"))
    recorded = cfg.init.model_copy(update={"kind": "mae", "sha256": "a" * 64, "loaded": ["encoder"]})
    (run_dir / "init.json").write_text(json.dumps({"config": recorded.model_dump(mode="json")}))
    tag = run_dir / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "manifest.json").write_text("{}")
    assert initial_weights(cfg, model, run_dir, run_dir / "checkpoints", "auto", True) is not None
    assert all(torch.equal(model.get_parameter(n), t) for n, t in tables.items())
    assert cfg.init.sha256 == "a" * 64 and "sha256: " + "a" * 64 in (run_dir / "config.yaml").read_text()
    # a run that started from a random init cannot be resumed with init.source set ...
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / "step_00000001").mkdir(parents=True)
    (fresh / "checkpoints" / "step_00000001" / "manifest.json").write_text("{}")
    with pytest.raises(InitError, match="started without init"):
        initial_weights(cfg, model, fresh, fresh / "checkpoints", "auto", True)
    # ... and a fresh random start moves an earlier run's record aside (renamed, not deleted)
    plain = load_config("demo", ["model.depth=2"])
    assert initial_weights(plain, model, run_dir, tmp_path / "no_checkpoints", "auto", True) is None
    assert not (run_dir / "init.json").exists() and (run_dir / "init.json.previous").is_file()


# -- real runs -----------------------------------------------------------------------------------
def _pretrain(out: Path, steps: int, *overrides: str, ranks: int = 2, env: dict | None = None) -> str:
    args = ["--config", "demo", "--output-dir", str(out), "--max-steps", str(steps), "--set", *RUN, *overrides]
    proc = run(deepspeed_cmd("launchers/pretrain.py", *args, ranks=ranks), env=env or cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _fp32(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """ZeRO's fp32 masters of a checkpoint, read with DeepSpeed's own tool."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag, exclude_frozen_parameters=True)


def _momentum(run_dir: Path, tag: str, ranks: int = 2) -> dict[str, torch.Tensor]:
    return consolidate_shards([torch.load(run_dir / "checkpoints" / tag / f"momentum_rank{r}.pt") for r in range(ranks)])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _finetune_view(blob: dict, depth: int, dim: int, grid: int) -> dict[str, torch.Tensor]:
    """What the official code paths take from a file, re-stated from their rules (not copied):
    run_class_finetuning.py --model_key model and Segmentation's mmcv_custom load_checkpoint both
    pick 'model' ('state_dict' first for the latter), strip 'module.' / keep only 'encoder.'-prefixed
    keys when the file's keys say so, drop relative_position_index, bicubically resize pos_embed
    to their grid, then load non-strictly into a BEiT ViT. Returns what that ViT receives."""
    assert "state_dict" not in blob and "model" in blob
    sd = dict(blob["model"])
    assert not any("encoder." in k for k in sd) and not next(iter(sd)).startswith("module.")
    sd = {k: v for k, v in sd.items() if "relative_position_index" not in k}
    side = math.isqrt(sd["pos_embed"].shape[1] - 1)
    if side != grid:
        tokens = sd["pos_embed"][:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        tokens = torch.nn.functional.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
        sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    wanted = {"cls_token": [1, 1, dim], "pos_embed": [1, 1 + grid * grid, dim]}
    for i in range(depth):  # the BEiT block of modeling_finetune_bootmae.py / Segmentation/backbone/beit.py
        b = f"blocks.{i}."
        wanted |= {b + "norm1.weight": [dim], b + "norm1.bias": [dim], b + "attn.qkv.weight": [3 * dim, dim],
                   b + "attn.q_bias": [dim], b + "attn.v_bias": [dim], b + "attn.proj.weight": [dim, dim],
                   b + "attn.proj.bias": [dim], b + "norm2.weight": [dim], b + "norm2.bias": [dim],
                   b + "mlp.fc1.weight": [4 * dim, dim], b + "mlp.fc1.bias": [4 * dim],
                   b + "mlp.fc2.weight": [dim, 4 * dim], b + "mlp.fc2.bias": [dim]}
    assert {k: list(sd[k].shape) for k in wanted if k in sd} == wanted  # every backbone weight arrives
    return {k: sd[k] for k in wanted}


@pytest.mark.slow
def test_continue_from_a_bootmae_file_then_export_official(tmp_path) -> None:
    """2 ranks, bf16: step 0 starts from the file's fp32 weights exactly (not their bf16 rounding)
    and from its model_ema; then it trains. Export to the official layout and back is identical;
    the official code paths' key rules pass; the run itself is a source for another run."""
    cfg = load_config("demo", OFFICIAL_DEMO)
    source = tmp_path / "BootMAE_demo.pth"
    blob = _official_file(source, cfg, seed=5)
    out = tmp_path / "run"
    log = _pretrain(out, 3, *OFFICIAL_DEMO, "mask.strategy=block", "loss.pixel_norm=per_channel",
                    "loss.weighted_mask=true", "loss.feature_weight=1.0", "run.precision=bf16", f"init.source={source}")
    assert "init: " in log and "loaded encoder, pixel_decoder, feature_decoder, momentum_encoder" in log
    run_cfg = load_config(out / "config.yaml")
    assert run_cfg.init.sha256 == hashlib.sha256(source.read_bytes()).hexdigest() and run_cfg.init.kind == "bootmae"
    online, ema = official_to_ours(blob["model"], run_cfg), official_to_ours(blob["model_ema"], run_cfg)
    after_1 = _fp32(out, "step_00000001")
    assert after_1.keys() == {k for k in online if not k.endswith("pos_embed")}
    assert all(torch.equal(after_1[k], online[k]) for k in after_1)  # fp32 exactly, though the module is bf16
    m = run_cfg.momentum.start  # one EMA step from model_ema towards the (unchanged) online encoder
    for k, v in _momentum(out, "step_00000001").items():
        assert torch.equal(v, torch.lerp(ema[f"encoder.{k}"], online[f"encoder.{k}"], 1 - m)), k
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    after_3 = _fp32(out, "step_00000003")
    assert all(not torch.equal(after_3[k], online[k]) for k in after_3 if k.endswith("qkv.weight"))  # it trained
    # --format official: model and model_ema in the released keys, weights_only, back identical
    assert export_cli.main([str(out), "--format", "official", "--out", str(tmp_path / "b.pth")]) == 0
    file = torch.load(tmp_path / "b.pth", map_location="cpu", weights_only=True)  # no safe_globals needed
    assert read_official_checkpoint(tmp_path / "b.pth")["model"].keys() == file["model"].keys()  # --official's reader
    assert file.keys() == {"model", "model_ema", "epoch", "step", "args"} and file["step"] == 3
    assert file["model"].keys() == blob["model"].keys() == file["model_ema"].keys()
    assert file["args"]["provenance"]["started_from"]["sha256"] == run_cfg.init.sha256
    state = run_model_state(out / "checkpoints" / "step_00000003", run_cfg)
    imported = official_to_ours(file["model"], run_cfg)
    assert imported.keys() == state.keys() and all(torch.equal(imported[k], state[k].float()) for k in state)
    assert all(torch.equal(imported[k], after_3[k]) for k in after_3)
    momentum = _momentum(out, "step_00000003")
    imported_ema = official_to_ours(file["model_ema"], run_cfg)
    assert all(torch.equal(imported_ema[f"encoder.{k}"], v) for k, v in momentum.items())
    assert all(torch.equal(imported_ema[k], after_3[k]) for k in after_3 if not k.startswith("encoder."))
    assert torch.equal(_finetune_view(file, 2, 96, 8)["blocks.1.attn.q_bias"], after_3["encoder.blocks.1.attn.q_bias"])
    _finetune_view(file, 2, 96, 32)  # the Segmentation config's 512 px / 16: pos_embed resized
    # every export names the weights the run started from
    assert export_cli.main([str(out), "--out", str(tmp_path / "timm")]) == 0
    started = json.loads((tmp_path / "timm" / "config.json").read_text())["bootmae"]["started_from"]
    assert started["source"] == str(source) and started["sha256"] == run_cfg.init.sha256
    # another bootmae-ds run as the source: weights only, the teacher from its momentum shards
    nxt = load_config("demo", [*OFFICIAL_DEMO, f"init.source={out}", "init.tag=step_00000003"])
    state2 = read_initial_state(nxt.init, nxt, {k: v.shape for k, v in build_model(nxt).state_dict().items()})
    assert state2.provenance["kind"] == "run" and state2.provenance["teacher"] == "momentum shards"
    assert all(torch.equal(state2.model[k], after_3[k]) for k in after_3)
    assert all(torch.equal(state2.teacher[k], v) for k, v in momentum.items())
    assert torch.equal(state2.model["encoder.pos_embed"], blob["model"]["pos_embed"])  # the file's table, kept
    # what the official layout cannot hold is refused, naming the field; an existing file needs --force
    with pytest.raises(ExportError, match="model.feature_decoder.dim=64"):
        official_state(build_model(load_config("demo")).state_dict(), load_config("demo"))
    mae_head = load_config("demo", ["model.feature_decoder.dim=null", "model.pixel_head_bias=per_value"])
    with pytest.raises(ExportError, match="model.pixel_head_bias=per_value"):
        official_state(build_model(mae_head).state_dict(), mae_head)
    before = (tmp_path / "b.pth").stat().st_mtime_ns
    assert export_cli.main([str(out), "--format", "official", "--out", str(tmp_path / "b.pth")]) == 2
    assert (tmp_path / "b.pth").stat().st_mtime_ns == before
    # a checkpoint saved before model.pixel_head_bias existed still exports (new fields at their default)
    manifest = out / "checkpoints" / "step_00000003" / "manifest.json"
    saved = json.loads(manifest.read_text())
    del saved["config"]["model"]["pixel_head_bias"]
    manifest.write_text(json.dumps(saved))
    assert export_cli.main([str(out), "--out", str(tmp_path / "old")]) == 0


@pytest.mark.slow
def test_continue_from_an_mae_file(tmp_path) -> None:
    """2 ranks: MAE's encoder and decoder (demo size) under BootMAE's feature branch; the momentum
    encoder starts as a copy of the encoder; the csv tracker holds metrics.jsonl's rows. (wandb and
    MLflow are read back in tests/test_trackers.py: their imports cost a 2-rank run ~10 s more;
    a resume without the source file: test_a_resumed_run_takes_its_recorded_tables_not_the_source.)"""
    cfg = load_config("demo", ["model.depth=2", "model.feature_decoder.context_block=1",
                               "model.pixel_head_bias=per_value"])
    ours = _random({k: list(v.shape) for k, v in build_model(cfg).state_dict().items()}, seed=6)
    ours["encoder.pos_embed"], ours["pixel_decoder.pos_embed"] = _mae_table(96, 8), _mae_table(64, 8)
    mae = _ours_to_mae(ours, seed=7)
    assert _pattern(mae) == _pattern(_tsv("mae_base_state_dict.tsv"))  # MAE's released layout
    source = tmp_path / "mae_demo.pth"
    torch.save({"model": mae}, source)
    out = tmp_path / "run"
    common = ["model.depth=2", "model.feature_decoder.context_block=1", "model.pixel_head_bias=per_value",
              "logging.trackers=[csv]"]
    log = _pretrain(out, 2, *common, f"init.source={source}")
    assert "warning: MAE's weights were trained on inputs normalised with ImageNet's mean/std" in log
    after_1 = _fp32(out, "step_00000001")
    for key, value in after_1.items():
        if key.startswith(("encoder.", "pixel_decoder.")):
            assert torch.equal(value, ours[key]), key  # the k part of qkv.bias dropped, the rest as in the file
    assert {k for k in after_1 if k.startswith("feature_decoder.")}  # fresh, and trained like the rest
    for k, v in _momentum(out, "step_00000001").items():
        assert torch.equal(v, ours[f"encoder.{k}"]), k  # a copy of the encoder: the EMA of equals is itself
    frozen = load_file(out / "init_frozen.safetensors")
    assert torch.equal(frozen["encoder.pos_embed"], mae["pos_embed"])  # MAE's table, column first
    assert torch.equal(frozen["feature_decoder.pos_embed"], sincos_2d((8, 8), 64, layout="col_first"))
    run_cfg = load_config(out / "config.yaml")
    assert run_cfg.init.kind == "mae" and run_cfg.init.loaded == ["encoder", "pixel_decoder"]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    with (out / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["loss"])) for r in table] == [(r["step"], r["loss"]) for r in rows]


@pytest.mark.slow
# CI: test_position_tables_are_recomputed_or_resampled_for_another_grid (the resampling) and
# test_continue_from_a_bootmae_file_then_export_official (a file continued, then exported); ~18 s.
@pytest.mark.extended
def test_continue_from_a_timm_state_dict_at_another_size(tmp_path) -> None:
    """2 ranks: a timm ViT (learned position table, k biases, a classifier head) as safetensors,
    continued at 40 px instead of its 32: the table is resampled bicubically, the rest is the file's."""
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=96,
                            depth=2, num_heads=4, num_classes=10)
    g = torch.Generator().manual_seed(8)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in vit.state_dict().items()}
    source = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    out = tmp_path / "run"
    log = _pretrain(out, 2, "model.depth=2", "model.feature_decoder.context_block=1", "model.img_size=40",
                    f"init.source={source}")
    assert "resampled bicubic 8x8 -> 10x10" in log and "head.weight" in log.split("unused")[1]
    after_1 = _fp32(out, "step_00000001")
    for i in range(2):
        q, _, v = state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        assert torch.equal(after_1[f"encoder.blocks.{i}.attn.q_bias"], q)
        assert torch.equal(after_1[f"encoder.blocks.{i}.attn.v_bias"], v)
        assert torch.equal(after_1[f"encoder.blocks.{i}.mlp.fc1.weight"], state[f"blocks.{i}.mlp.fc1.weight"])
    assert torch.equal(after_1["encoder.norm.weight"], state["norm.weight"])
    table = timm.layers.resample_abs_pos_embed(state["pos_embed"], [10, 10], [8, 8], num_prefix_tokens=1)
    assert torch.equal(load_file(out / "init_frozen.safetensors")["encoder.pos_embed"], table)
    momentum = _momentum(out, "step_00000001")
    assert all(torch.equal(v, after_1[f"encoder.{k}"]) for k, v in momentum.items())
    # the export carries the run's resampled learned table, not a sin-cos one
    assert export_cli.main([str(out), "--out", str(tmp_path / "timm")]) == 0
    assert torch.equal(load_file(tmp_path / "timm" / "model.safetensors")["pos_embed"], table)
