"""MAE's and timm's ViT key layouts, mapped onto our BootMAE model.

MAE's encoder keys (``facebookresearch/mae`` ``models_mae.py``; the released
``mae_pretrain_vit_*.pth`` hold only these, under ``model``) are timm's ``VisionTransformer``
keys, so one mapping reads MAE encoders, timm ViT state dicts and our own exports (which write
our final norm as ``fc_norm``). MAE's decoder (``mae_visualize_vit_large.pth`` holds it) maps onto
an MAE-style pixel regressor: no context, positions on every token, a pixel head with one bias
per value (``model.pixel_head_bias=per_value``, as the ``mae_base_800ep`` preset has).
Key layout: ``../shared/reference/mae_{base,large}_state_dict.tsv``.

Every key maps one to one (an unknown key is an error) but for one part that is dropped, exactly:
``qkv.bias`` has a k part and our attention has q and v biases only. A k bias adds ``q . b_k`` to
every logit of a query, the same for all keys, and softmax is invariant to that shift, so dropping
it leaves every output unchanged (``tests/test_init.py`` checks the forward against timm's and a
re-statement of MAE's decoder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..config import InputError

# timm / MAE encoder names -> ours; the attention biases are split separately.
_ENCODER = [
    (re.compile(r"^cls_token$"), "encoder.cls_token"),
    (re.compile(r"^pos_embed$"), "encoder.pos_embed"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"encoder.patch_embed.proj.\1"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"),
     r"encoder.blocks.\1.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$"), r"encoder.blocks.\1.attn.qkv.weight"),
    (re.compile(r"^(?:norm|fc_norm)\.(weight|bias)$"), r"encoder.norm.\1"),
]
_DECODER = [
    (re.compile(r"^mask_token$"), "pixel_decoder.mask_token"),
    (re.compile(r"^decoder_pos_embed$"), "pixel_decoder.pos_embed"),
    (re.compile(r"^decoder_embed\.(weight|bias)$"), r"pixel_decoder.embed.\1"),
    (re.compile(r"^decoder_blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"),
     r"pixel_decoder.blocks.\1.\2.\3"),
    (re.compile(r"^decoder_blocks\.(\d+)\.attn\.qkv\.weight$"), r"pixel_decoder.blocks.\1.attn.qkv.weight"),
    (re.compile(r"^decoder_norm\.(weight|bias)$"), r"pixel_decoder.norm.\1"),
    (re.compile(r"^decoder_pred\.(weight|bias)$"), r"pixel_decoder.head.\1"),
]
_QKV_BIAS = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.attn\.qkv\.bias$")
# Keys a timm classifier or MAE file may hold that a pre-training model has no place for.
_IGNORED = re.compile(r"^head\.(weight|bias)$")
DECODER_PREFIXES = ("mask_token", "decoder_")


class LayoutError(InputError, ValueError):
    """A state dict that is not in the MAE / timm ViT layout; the message names the keys."""


def has_mae_decoder(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(DECODER_PREFIXES) for k in state)


def is_timm_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """MAE / timm ViT keys: a fused ``qkv.bias`` (ours and the official BootMAE have q/v biases)."""
    return "blocks.0.attn.qkv.weight" in state and "blocks.0.attn.q_bias" not in state


def to_ours(state: Mapping[str, torch.Tensor], decoders: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MAE / timm keys -> our BootMAE keys (encoder, and MAE's decoder when ``decoders``).

    Returns the converted tensors and the source keys not used (a classifier head, a decoder
    not asked for); any key of another layout raises ``LayoutError``.
    """
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    unknown: list[str] = []
    if "norm.weight" in state and "fc_norm.weight" in state:
        raise LayoutError("both norm.* and fc_norm.* are present: a timm classifier with two final norms "
                          "has no place in our encoder (its final norm is one LayerNorm)")
    for key, value in state.items():
        is_decoder = key.startswith(DECODER_PREFIXES)
        if is_decoder and not decoders:
            unused.append(key)
            continue
        if _IGNORED.match(key):
            unused.append(key)
            continue
        qkv = _QKV_BIAS.match(key)
        if qkv:
            where = "encoder" if qkv.group(1) == "blocks" else "pixel_decoder"
            if value.dim() != 1 or value.numel() % 3:
                raise LayoutError(f"{key}: shape {tuple(value.shape)}, expected a fused [3 x width] bias")
            q, _k, v = value.chunk(3)  # the k part is dropped: softmax ignores a per-query constant
            out[f"{where}.blocks.{qkv.group(2)}.attn.q_bias"] = q.clone()
            out[f"{where}.blocks.{qkv.group(2)}.attn.v_bias"] = v.clone()
            continue
        for pattern, target in _ENCODER + _DECODER:
            if pattern.match(key):
                out[pattern.sub(target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise LayoutError(f"keys not in the MAE / timm ViT layout: {sorted(unknown)[:8]}"
                          f"{' ...' if len(unknown) > 8 else ''} (layer scale, register or distillation "
                          f"tokens have no place in our encoder)")
    return out, unused
