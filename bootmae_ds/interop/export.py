"""Export a pre-trained encoder as timm's ``VisionTransformer``: fp32 safetensors weights, a timm
``config.json`` and a provenance ``README.md`` (sources: ``bootmae_ds.interop.encoders``).

Our key names are timm's but for ``attn.{q_bias,v_bias}`` (folded into ``attn.qkv.bias`` with a
zero k part) and the final LayerNorm ``norm``, stored as ``fc_norm``: the export is timm's
``global_pool="avg", fc_norm=True`` layout, the mean-pool + LayerNorm head of the official BootMAE
fine-tuning. timm builds that very layout for ``global_pool="avg"``, so the one-line
``pretrained=True`` load fills every encoder weight (only the new classifier starts fresh) and a
strict ``load_state_dict`` into the exported architecture (``num_classes=0``) uses every key.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig
from ..models import VisionTransformerEncoder
from .encoders import EncoderExport, ExportError

WEIGHTS, CONFIG, README = "model.safetensors", "config.json", "README.md"
TIMM_LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon; config.json cannot carry another one


def to_timm_state_dict(encoder: VisionTransformerEncoder, head: torch.nn.Linear | None = None,
                       fc_norm: torch.nn.LayerNorm | None = None) -> dict[str, torch.Tensor]:
    """Our encoder's (and a classifier head's) weights in timm's
    ``VisionTransformer(global_pool="avg", fc_norm=True)`` keys. ``fc_norm``: a classifier's own
    pooled-feature norm, written instead of the encoder's final norm."""
    out: dict[str, torch.Tensor] = {}
    if head is not None:
        out["head.weight"] = head.weight.detach().float().contiguous().clone()
        out["head.bias"] = head.bias.detach().float().contiguous().clone()
    if fc_norm is not None:
        out["fc_norm.weight"] = fc_norm.weight.detach().float().contiguous().clone()
        out["fc_norm.bias"] = fc_norm.bias.detach().float().contiguous().clone()
    state = encoder.state_dict()
    if fc_norm is not None:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    for key, value in state.items():
        if key.endswith(".attn.q_bias"):
            v_bias = state[key.replace("q_bias", "v_bias")]
            value = torch.cat([value, torch.zeros_like(value), v_bias])  # timm's k bias is a zero slot
            key = key.replace("q_bias", "qkv.bias")
        elif key.endswith(".attn.v_bias"):
            continue
        elif key.startswith("norm."):
            key = "fc_norm." + key[len("norm."):]
        out[key] = value.detach().float().contiguous().clone()
    return out


def timm_model_args(cfg: BootMAEConfig) -> dict[str, Any]:
    """Keyword arguments that make timm's ViT the exported architecture (no classifier)."""
    m = cfg.model
    return {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans,
            "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
            "mlp_ratio": m.mlp_ratio, "qkv_bias": m.qkv_bias, "class_token": True,
            "global_pool": "avg", "fc_norm": True, "num_classes": 0}


def timm_model_name(cfg: BootMAEConfig) -> tuple[str, bool]:
    """A timm registry name for the architecture, and whether it alone describes it exactly."""
    import timm

    m = cfg.model
    name = f"vit_{m.size}_patch{m.patch_size}_{m.img_size}"
    if not (m.size and name in timm.list_models()):
        return "vit_base_patch16_224", False  # any registered ViT will do: the kwargs override it all
    return name, (m.in_chans, m.mlp_ratio, m.qkv_bias) == (3, 4.0, True)


def timm_config(exp: EncoderExport) -> dict[str, Any]:
    """timm's hub ``config.json`` layout (so ``local-dir:DIR`` loads) plus a ``bootmae`` section."""
    cfg, m = exp.cfg, exp.cfg.model
    if m.norm_eps != TIMM_LN_EPS:
        raise ExportError(f"model.norm_eps={m.norm_eps}: timm's ViT uses {TIMM_LN_EPS}; no exact export")
    classes = exp.head.out_features if exp.head is not None else 0
    args = timm_model_args(cfg) | {"num_classes": classes}
    name, exact = timm_model_name(cfg)
    extra = "" if exact else "".join(f", {k}={v!r}" for k, v in args.items()
                                     if k not in ("global_pool", "fc_norm", "num_classes"))
    k = classes or "K"
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    # timm's ViT-B/L/H registry entries already say mean = std = 0.5 (the BootMAE default)
    norm = "" if mean == std == [0.5] * 3 else f", mean={tuple(mean)}, std={tuple(std)}"
    return {
        "architecture": name, "num_classes": classes, "num_features": m.embed_dim, "global_pool": "avg",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [m.in_chans, m.img_size, m.img_size], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": 0.875, "mean": mean, "std": std,
            "num_classes": classes, "first_conv": "patch_embed.proj", "classifier": "head"},
        "bootmae": {
            **exp.provenance,
            "names": {
                "norm": ("the classifier's own LayerNorm of the pooled tokens is timm's fc_norm"
                         if exp.fc_norm is not None else
                         "our final LayerNorm (on every token) is timm's fc_norm (after mean pooling); "
                         "fc_norm(forward_features(x)) gives our normalised tokens"),
                "blocks.*.attn.qkv.bias": "our q_bias and v_bias with a zero k part between them",
                "pos_embed": "our fixed 2-D sin-cos table (zero cls slot); timm's is learnable",
                "data.mean/std": "pretrained_cfg.mean/std"},
            # num_classes=0 in the overlay: timm loads strictly (and fails on the missing head)
            # when num_classes equals the registry weights' 1000.
            "load": f"timm.create_model({name!r}, pretrained=True, num_classes={k}, global_pool='avg', "
                    f"pretrained_cfg_overlay=dict(file='DIR/{WEIGHTS}', num_classes={classes}{norm}){extra})",
        },
    }


def readme_text(exp: EncoderExport, config: dict[str, Any]) -> str:
    p, pre = exp.provenance, config["pretrained_cfg"]
    if p["source"] == "run":
        origin = f"run `{p['run_dir']}`, checkpoint `{p['tag']}` (step {p['step']}, {p['world_size']} rank(s))"
    elif p["source"] in ("finetune", "linprobe"):
        job = "fine-tuning" if p["source"] == "finetune" else f"linear-probing (first {p['depth']} blocks)"
        origin = (f"{job} run `{p['run_dir']}`, epoch {p['epoch']} (step {p['step']}): top-1 "
                  f"{p['top1']:.2f}% on `{p['val']}`; encoder from {p['init']}")
    else:
        origin = f"official `{p['file']}` (arch {p['arch']}, epoch {p['epoch']})"
    what = f"{p['num_classes']}-class classifier" if p["source"] in ("finetune", "linprobe") else "encoder"
    args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
    init = p.get("started_from")  # a run that started from other weights (init.source)
    started = (f"- pre-training started from: `{init['source']}` ({init['kind']}, sha256 `{init['sha256']}`, "
               f"parts {', '.join(init['loaded'] or [])})\n") if init else ""
    return (
        f"# BootMAE {p['which']} {what} (fp32)\n\n- source: {origin}\n- weights: {p['which']}\n{started}"
        f"- config fingerprint: `{p['fingerprint']}`\n- exported {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"\n\ntimm `{config['architecture']}` with {args}; inputs normalised with mean {pre['mean']}, std "
        f"{pre['std']}. DIR is this directory.\n\n```python\nimport timm\n"
        f"model = timm.create_model(\"local-dir:DIR\", pretrained=True, num_classes=K)\n"
        f"model = {config['bootmae']['load']}\n```\n\n"
        "The final LayerNorm is stored as `fc_norm`, which timm applies after mean-pooling the patch tokens "
        "with `global_pool=\"avg\"` (the official BootMAE fine-tuning head), so every weight loads; "
        "`model.fc_norm(model.forward_features(x))` equals the pre-training encoder's output. The q/v "
        "biases are folded into `qkv.bias` with a zero k part.\n")


# -- writing ---------------------------------------------------------------------------------
def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force`` (which replaces only the exported files)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; pass another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: not empty; pass another --out, or --force to replace its export files")


def write_export(exp: EncoderExport, out: Path, force: bool = False) -> Path:
    """Write weights, config and README into ``out`` all at once: staged beside it, then renamed."""
    from safetensors.torch import save_file

    out = Path(out)
    check_out_dir(out, force)
    state = to_timm_state_dict(exp.encoder, exp.head, exp.fc_norm)
    config = timm_config(exp)
    stage = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        meta = {"format": "pt", **{k: str(v) for k, v in exp.provenance.items()}}
        (stage / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        save_file(state, str(stage / WEIGHTS), metadata=meta)
        shutil.copymode(stage / CONFIG, stage / WEIGHTS)  # safetensors writes 0600; honour the umask
        (stage / README).write_text(readme_text(exp, config))
        if not out.exists() or not any(out.iterdir()):
            os.replace(stage, out)  # a rename onto a missing or empty directory: all or nothing
        else:  # --force into a non-empty directory: replace our files, leave the others alone
            for name in (WEIGHTS, CONFIG, README):
                os.replace(stage / name, out / name)
    except OSError as err:
        raise ExportError(f"{out}: cannot write the export ({err}); fix that and run again") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
