"""Encoder export: real checkpoints in, timm's ViT out (strict load, equal features, fp32 sources),
world-size independence, official checkpoints, and refusals that write nothing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
from distributed import ROOT, cpu_env, deepspeed_cmd, run
from safetensors.torch import load_file

from bootmae_ds.config import load_config
from bootmae_ds.interop.encoders import ExportError, from_run
from bootmae_ds.models import build_model
from bootmae_ds.runtime.sharded_ema import consolidate_shards

TAG = "step_00000002"
TINY = ["--config", "demo", "--max-steps", "2", "--set", "model.depth=2", "model.feature_decoder.context_block=1",
        "data.micro_batch_size=8", "data.global_batch_size=16", "data.num_workers=1"]
_spec = importlib.util.spec_from_file_location("export_cli", ROOT / "launchers" / "export.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def _pretrain(out: Path, *extra: str, ranks: int = 1) -> Path:
    args = ["--output-dir", str(out), *TINY, *extra]
    cmd = deepspeed_cmd("launchers/pretrain.py", *args, ranks=ranks) if ranks > 1 else \
        [sys.executable, "launchers/pretrain.py", *args]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """Two bf16 steps on one process: the module weights are bf16, masters and EMA fp32."""
    return _pretrain(tmp_path_factory.mktemp("export") / "run", "run.precision=bf16",
                     "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]")


def _export(*args: str) -> Path:
    assert cli.main([str(a) for a in args]) == 0
    return Path(args[args.index("--out") + 1])


def _timm_model(out: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    """The exported architecture, loaded strictly."""
    config = json.loads((out / "config.json").read_text())
    state = load_file(out / "model.safetensors")
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(state, strict=True)
    return model, state, config


def _assert_same_features(model: torch.nn.Module, encoder: torch.nn.Module, img_size: int, n: int = 3) -> None:
    images = torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = encoder.eval().forward_features(images)
        theirs = model.fc_norm(model.forward_features(images))  # fc_norm is our final norm
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _our_encoder(run_dir: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Our encoder with ``state`` (fp32, encoder names); its own sin-cos pos_embed."""
    encoder = build_model(load_config(run_dir / "config.yaml")).encoder
    encoder.load_state_dict({**state, "pos_embed": encoder.pos_embed}, strict=True)
    return encoder


def _reference_state(run_dir: Path, which: str, tag: str = TAG) -> dict[str, torch.Tensor]:
    """The fp32 encoder straight from the checkpoint files, without bootmae_ds.interop."""
    tag_dir = run_dir / "checkpoints" / tag
    if which == "momentum":
        world = json.loads((tag_dir / "manifest.json").read_text())["world_size"]
        return consolidate_shards([torch.load(tag_dir / f"momentum_rank{r}.pt") for r in range(world)])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag)
    return {k[8:]: v for k, v in full.items() if k.startswith("encoder.") and k != "encoder.pos_embed"}


def _as_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the timm renaming (qkv.bias -> q_bias/v_bias, fc_norm -> norm)."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert not k.any(), f"{key}: the k part must be zero"
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q, v
        else:
            out[key.replace("fc_norm.", "norm.")] = value
    return out


@pytest.mark.parametrize("which", ["online", "momentum"])
def test_export_loads_strictly_into_timm_with_equal_features(bf16_run, tmp_path, which) -> None:
    out = _export(bf16_run, "--which", which, "--out", tmp_path / "out")
    model, state, config = _timm_model(out)
    assert config["model_args"]["global_pool"] == "avg" and config["model_args"]["fc_norm"] is True
    assert config["bootmae"]["which"] == which and config["bootmae"]["step"] == 2
    assert load_config(bf16_run / "config.yaml").fingerprint() in (out / "README.md").read_text()
    reference = _reference_state(bf16_run, which)
    exported = _as_ours(state)
    assert all(v.dtype == torch.float32 for v in exported.values())
    for key, value in reference.items():
        assert torch.equal(exported[key], value.float()), key
    _assert_same_features(model, _our_encoder(bf16_run, reference), img_size=32)
    # fp32, not a bf16 copy: values exist that bf16 cannot hold
    assert any(not torch.equal(v, v.bfloat16().float()) for k, v in exported.items() if k.endswith("qkv.weight"))
    if which == "online":  # and the masters round to the bf16 module weights DeepSpeed saved
        module = torch.load(bf16_run / "checkpoints" / TAG / "mp_rank_00_model_states.pt",
                            weights_only=False)["module"]
        for key, value in reference.items():
            assert module[f"encoder.{key}"].dtype == torch.bfloat16
            assert torch.equal(exported[key].bfloat16(), module[f"encoder.{key}"]), key
    else:
        online = _reference_state(bf16_run, "online")
        assert not torch.equal(online["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])


def test_one_line_timm_loads(bf16_run, tmp_path) -> None:
    out = _export(bf16_run, "--out", tmp_path / "out")
    _, state, config = _timm_model(out)
    args = {k: v for k, v in config["model_args"].items() if k not in ("num_classes", "global_pool")}
    file = str(out / "model.safetensors")
    models = [
        timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay={"file": file},
                          num_classes=10, global_pool="avg", **args),
        # num_classes=0 in the overlay keeps timm from loading strictly when K equals its default 1000
        timm.create_model(config["architecture"], pretrained=True, num_classes=1000, global_pool="avg",
                          pretrained_cfg_overlay={"file": file, "num_classes": 0}, **args),
        timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=7),
    ]
    for model in models:
        own = model.state_dict()
        assert set(own) - set(state) == {"head.weight", "head.bias"}
        for key, value in state.items():
            assert torch.equal(own[key], value), key
    assert models[2].pretrained_cfg["mean"] == list(load_config(bf16_run / "config.yaml").data.mean)
    # and the line config.json documents, with K = 1000 (where timm would otherwise load strictly)
    line = config["bootmae"]["load"].replace("DIR", str(out)).replace("=K", "=1000")
    model = eval(line, {"timm": timm})  # our own generated line
    assert model.head.out_features == 1000 and torch.equal(model.fc_norm.weight, state["fc_norm.weight"])
    assert list(model.pretrained_cfg["std"]) == [0.229, 0.224, 0.225]


def test_run_checkpoints_or_tag_dir_all_name_the_same_export(bf16_run) -> None:
    runs = [bf16_run, bf16_run / "checkpoints", bf16_run / "checkpoints" / TAG]
    exports = [from_run(r, which="momentum") for r in runs]
    assert {e.provenance["tag"] for e in exports} == {TAG}
    assert {e.provenance["run_dir"] for e in exports} == {str(bf16_run.resolve())}
    assert torch.equal(exports[1].encoder.norm.weight, exports[2].encoder.norm.weight)


@pytest.mark.slow
def test_two_rank_checkpoint_exports_like_one_rank(tmp_path) -> None:
    two = _pretrain(tmp_path / "two", ranks=2)  # fp32: DeepSpeed's module copy is the master
    # The same state saved by one rank: resume the 2-rank checkpoint resized, with no step left.
    one = _pretrain(tmp_path / "one", "checkpoint.allow_resize=true", "--resume", str(two / "checkpoints" / TAG))
    assert json.loads((two / "checkpoints" / TAG / "manifest.json").read_text())["world_size"] == 2
    assert json.loads((one / "checkpoints" / TAG / "manifest.json").read_text())["world_size"] == 1
    module = torch.load(two / "checkpoints" / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    shards = [torch.load(two / "checkpoints" / TAG / f"momentum_rank{r}.pt") for r in range(2)]
    for which, reference in (("online", {k[8:]: v for k, v in module.items() if k.startswith("encoder.")}),
                             ("momentum", consolidate_shards(shards))):
        a = _as_ours(_timm_model(_export(two, "--which", which, "--out", tmp_path / f"two_{which}"))[1])
        b = _as_ours(_timm_model(_export(one, "--which", which, "--out", tmp_path / f"one_{which}"))[1])
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (which, key)
            if key != "pos_embed":
                assert torch.equal(a[key], reference[key]), (which, key)


def _fake_official(path: Path) -> dict:
    """A released-layout file with random weights of the official ViT-B shapes."""
    rows = [line.split("\t") for line in (ROOT / "tests/data/official_bootmae_base_state_dict.tsv")
            .read_text().strip().splitlines()[1:]]
    g = torch.Generator().manual_seed(0)

    def fake(shape: str, key: str) -> torch.Tensor:
        value = 0.02 * torch.randn([int(s) for s in shape.split("x")], generator=g)
        return value + 1 if "norm" in key and key.endswith("weight") else value

    model = {k: fake(shape, k) for k, shape in rows}
    # The EMA differs in the encoder; decoders share storage to keep the file small.
    ema = {k: v if k.startswith(("decode", "lm_head", "down", "mask_token", "de_pos")) else fake(shape, k)
           for (k, shape), v in zip(rows, model.values())}
    blob = {"model": model, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}
    torch.save(blob, path)
    return blob


def test_official_checkpoint_export(tmp_path) -> None:
    from bootmae_ds.interop.official import load_official_state_dict

    path = tmp_path / "BootMAE_Base_800_PT.pth"
    blob = _fake_official(path)
    for which, source in (("online", blob["model"]), ("momentum", blob["model_ema"])):
        out = _export("--official", path, "--arch", "base", "--which", which, "--out", tmp_path / which)
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == "vit_base_patch16_224" and config["bootmae"]["epoch"] == 799
        # ViT-B/16 needs nothing beyond the documented one-liner
        model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=10, global_pool="avg",
                                  pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
        assert torch.equal(model.cls_token, source["cls_token"]) and torch.equal(model.pos_embed, source["pos_embed"])
        ours = load_official_state_dict(blob, "base", use_ema=which == "momentum").encoder
        _assert_same_features(model, ours, img_size=224, n=2)


def test_refusals_write_nothing(bf16_run, tmp_path, capsys, monkeypatch) -> None:
    def refused(*args: object, match: str) -> None:
        assert cli.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))

    refused(tmp_path / "nope", "--out", tmp_path / "out", match=str(tmp_path / "nope"))
    refused(bf16_run, "--tag", "step_00000009", "--out", tmp_path / "out", match=f"among ['{TAG}']")
    refused("--official", tmp_path / "nope.pth", "--out", tmp_path / "out", match="nope.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + bytes(100))
    refused("--official", tmp_path / "cut.pth", "--out", tmp_path / "out", match="cut.pth")
    broken = tmp_path / "broken"
    shutil.copytree(bf16_run, broken)
    shutil.copytree(broken / "checkpoints" / TAG, broken / "checkpoints" / "step_00000003")
    (broken / "checkpoints" / "step_00000003" / "manifest.json").unlink()  # a save that never finished
    refused(broken, "--tag", "step_00000003", "--out", tmp_path / "out", match="incomplete checkpoint")
    shard = broken / "checkpoints" / TAG / "momentum_rank0.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    refused(broken, "--which", "momentum", "--out", tmp_path / "out", match=f"{shard}: truncated")
    # a failure while writing leaves neither the directory nor the staging area
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    refused(bf16_run, "--out", tmp_path / "out", match="No space left")
    monkeypatch.undo()
    # an existing non-empty directory needs --force, which replaces only the export files
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("old")
    assert cli.main([str(bf16_run), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "config.json").read_text() == "old"
    assert cli.main([str(bf16_run), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text())
    _timm_model(out)


def test_cli_exit_status_in_a_process(bf16_run, tmp_path) -> None:
    ok = run([sys.executable, "launchers/export.py", str(bf16_run), "--which", "momentum", "--out",
              str(tmp_path / "out")], env=cpu_env())
    assert ok.returncode == 0 and f"{TAG} (step 2)" in ok.stdout, ok.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    bad = run([sys.executable, "launchers/export.py", str(bf16_run), "--tag", "nope", "--out",
               str(tmp_path / "out2")], env=cpu_env())
    assert bad.returncode == 2 and "nope: no such checkpoint" in bad.stderr and not (tmp_path / "out2").exists()
    with pytest.raises(ExportError, match="which='teacher'"):
        from_run(bf16_run, which="teacher")
