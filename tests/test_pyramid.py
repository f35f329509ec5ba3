"""The dense-transfer backbone (``models/pyramid.py``) and the official layer-decay groups, against
independent re-statements of the official BEiT segmentation backbone and its optimizer constructor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from bootmae_ds.models import build_model
from bootmae_ds.models.pyramid import (
    ViTPyramid,
    drop_relative_position_index,
    relative_position_bias,
    relative_position_index,
)
from bootmae_ds.runtime.optim import backbone_layer_decay_groups

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "out_indices": (0, 1, 2, 3), "drop_path_rate": 0.0}


def official_index(wh: int, ww: int) -> torch.Tensor:
    """BEiT's relative position index, written out position by position."""
    n = wh * ww
    num = (2 * wh - 1) * (2 * ww - 1)
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dr, dc = i // ww - j // ww, i % ww - j % ww
            index[i + 1, j + 1] = (dr + wh - 1) * (2 * ww - 1) + (dc + ww - 1)
    index[0, :], index[:, 0], index[0, 0] = num, num + 1, num + 2
    return index


def test_the_relative_position_index_works_with_a_timm_without_its_device_argument() -> None:
    """A GPU machine's preinstalled timm may predate ``device=``: the index is then made on the CPU
    and moved (``meta`` stands for the GPU), and equals BEiT's either way."""
    from timm.layers.pos_embed_rel import gen_relative_position_index

    def older_timm(q_size, k_size=None, class_token=False):  # the signature before ``device``
        return gen_relative_position_index(q_size, k_size, class_token=class_token)

    moved = relative_position_index((3, 4), torch.device("meta"), older_timm)
    assert moved.device.type == "meta" and moved.shape == (13, 13)
    assert torch.equal(relative_position_index((3, 4), None, older_timm), official_index(3, 4))
    assert torch.equal(relative_position_index((3, 4), torch.device("cpu")), official_index(3, 4))


def reference_forward(model: ViTPyramid, images: torch.Tensor) -> list[torch.Tensor]:
    """The official ``BEiT.forward_features`` at the table's grid, re-stated with explicit attention."""
    B = images.shape[0]
    gh, gw = model.grid_size
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(B, -1, -1), x], 1) + model.pos_embed
    index = official_index(gh, gw)
    feats = []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        qkv = h @ a.qkv.weight.t() + torch.cat([a.q_bias, torch.zeros_like(a.v_bias), a.v_bias])
        q, k, v = qkv.reshape(B, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * a.head_dim ** -0.5) @ k.transpose(-2, -1)
        rel = a.relative_position_bias_table[index.view(-1)].view(gh * gw + 1, gh * gw + 1, -1)
        attn = (logits + rel.permute(2, 0, 1)[None]).softmax(-1)
        x = x + blk.gamma_1 * a.proj((attn @ v).transpose(1, 2).reshape(B, -1, model.embed_dim))
        x = x + blk.gamma_2 * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        if i in model.out_indices:
            feats.append(x[:, 1:].permute(0, 2, 1).reshape(B, -1, gh, gw))
    return [op(f) for op, f in zip([model.fpn1, model.fpn2, model.fpn3, model.fpn4], feats)]


def _randomised(model: nn.Module) -> nn.Module:
    """Every parameter and BN statistic random (zero tables and unit scales would hide mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("patch", [16, 8, 4])
def test_forward_matches_the_official_backbone(patch) -> None:
    model = _randomised(ViTPyramid(64, patch, **TINY)).double().eval()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours, ref = model(images), reference_forward(model, images)
    assert [tuple(o.shape) for o in ours] == [(2, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    for o, r in zip(ours, ref):
        assert torch.allclose(o, r, atol=1e-10)


def test_official_key_names_and_shapes() -> None:
    with torch.device("meta"):
        model = ViTPyramid(512)  # the official ViT-B at 512 px
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 1025, 768)
    assert sd["blocks.11.attn.relative_position_bias_table"].shape == (63 * 63 + 3, 12)
    assert sd["blocks.3.gamma_2"].shape == (768,)
    assert {k.rsplit(".", 1)[0] for k in sd if k.startswith("fpn")} == {"fpn1.0", "fpn1.1", "fpn1.3", "fpn2.0"}
    assert "blocks.0.attn.relative_position_index" not in sd  # a constant, recomputed
    small = ViTPyramid((48, 80), 16, **TINY)  # a 3x5 grid
    assert torch.equal(small.blocks[0].attn.relative_position_index, official_index(3, 5))
    assert small.blocks[0].gamma_1.eq(1).all() and small.blocks[0].attn.relative_position_bias_table.eq(0).all()
    # Official files carry the index buffers: checked against ours and dropped, then a strict load.
    official = {**small.state_dict(), **{f"blocks.{i}.attn.relative_position_index": official_index(3, 5)
                                         for i in range(4)}}
    small.load_state_dict(drop_relative_position_index(official, small), strict=True)
    official["blocks.2.attn.relative_position_index"] = official_index(5, 3)
    with pytest.raises(ValueError, match="blocks.2.attn.relative_position_index: .* 3x5 patch grid"):
        drop_relative_position_index(official, small)
    assert [b.drop_path.drop_prob for b in model.blocks[1:]] == pytest.approx(
        torch.linspace(0, 0.1, 12)[1:].tolist())


def test_other_input_sizes_read_the_tables_they_need() -> None:
    torch.manual_seed(0)
    table = torch.randn(7 * 9 + 3, 2)  # built for a 4x5 grid
    big = relative_position_bias(table, (4, 5), (4, 5))
    # A smaller grid (3x2) sees exactly the biases its offsets have in the 4x5 grid.
    small = relative_position_bias(table, (4, 5), (3, 2))
    keep = torch.tensor([0] + [1 + r * 5 + c for r in range(3) for c in range(2)])
    assert torch.equal(small, big[:, keep][:, :, keep])
    # A larger grid (6x5): offsets the table has are unchanged, farther rows take the edge's bias.
    large = relative_position_bias(table, (4, 5), (6, 5))
    pos = lambda r, c: 1 + r * 5 + c
    assert torch.equal(large[:, pos(3, 4), pos(0, 0)], big[:, pos(3, 4), pos(0, 0)])
    assert torch.equal(large[:, pos(5, 4), pos(0, 0)], big[:, pos(3, 4), pos(0, 0)])  # offset 5 -> 3
    assert torch.equal(large[:, 0], torch.cat([big[:, 0, :1], big[:, 0, 1:2].expand(-1, 30)], 1))
    # The backbone runs at any multiple of the patch size and propagates gradients to the tables.
    model = ViTPyramid(64, 16, **TINY)
    out = model(torch.randn(1, 3, 48, 80))
    assert [tuple(o.shape[2:]) for o in out] == [(12, 20), (6, 10), (3, 5), (1, 2)]
    sum(o.sum() for o in out).backward()
    assert model.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 40, 64))
    # A block may serve two levels (encoders of fewer than 4 blocks): level 4 pools level 3's block.
    twin = ViTPyramid(64, 16, **{**TINY, "out_indices": (1, 1, 3, 3)}).eval()
    feats = twin(torch.randn(1, 3, 64, 64))
    assert torch.equal(feats[3], F.max_pool2d(feats[2], 2))
    with pytest.raises(ValueError, match="non-decreasing"):
        ViTPyramid(64, 16, **{**TINY, "out_indices": (1, 0, 2, 3)})


def test_from_encoder_carries_the_pretrained_blocks() -> None:
    cfg = tiny_config("model.img_size=64", "model.patch_size=16",
                      "mask.num_masked=8")  # 96 wide, 4x4 grid
    enc16 = build_model(cfg).encoder.eval()
    with torch.no_grad():
        for p in enc16.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    backbone = ViTPyramid.from_encoder(enc16, 64, out_indices=(0, 1, 2, 3), drop_path_rate=0.0).eval()
    images = torch.randn(2, 3, 64, 64)
    blocks = enc16(images, return_blocks=(2,)).block_outputs  # gamma 1, zero tables: the same blocks
    feats = backbone(images)
    assert torch.allclose(feats[2], blocks[2][:, 1:].transpose(1, 2).reshape(2, 96, 4, 4), atol=1e-5)
    assert torch.equal(backbone.pos_embed.detach(), enc16.pos_embed.detach())
    # At 128 px the sin-cos table is resampled bicubically (align_corners=False) to the 8x8 grid.
    big = ViTPyramid.from_encoder(enc16, 128, out_indices=(0, 1, 2, 3))
    grid = enc16.pos_embed[:, 1:].reshape(1, 4, 4, 96).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(big.pos_embed[:, 1:].detach(), expect.reshape(1, 64, 96), atol=1e-6)
    assert torch.equal(big.pos_embed[:, :1].detach(), enc16.pos_embed[:, :1])
    assert big.pos_embed.requires_grad and big.blocks[3].drop_path.drop_prob == pytest.approx(0.1)


def official_layer_id(name: str, num_max_layer: int) -> int:
    """``get_num_layer_for_vit`` of the official constructor, as written there."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    if name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.blocks"):
        return int(name.split(".")[2]) + 1
    return num_max_layer - 1


def test_layer_decay_groups_follow_the_official_constructor() -> None:
    model = nn.Module()
    model.backbone = ViTPyramid(64, 16, **TINY)
    model.decode_head = nn.Sequential(nn.Conv2d(32, 4, 1), nn.BatchNorm2d(4))
    model.backbone.blocks[0].norm1.weight.requires_grad_(False)  # frozen: left out
    groups = backbone_layer_decay_groups(model, num_layers=4, layer_decay=0.65)
    seen = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = g
    num_layers = 4 + 2
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in seen
            continue
        g = seen[id(p)]
        layer = official_layer_id(name, num_layers)
        no_decay = len(p.shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        assert g["lr_scale"] == pytest.approx(0.65 ** (num_layers - layer - 1)), name
        assert g["apply_decay"] is (not no_decay) and g["name"] == f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
    by_name = dict(model.named_parameters())
    assert seen[id(by_name["backbone.pos_embed"])]["apply_decay"]  # the full name escapes the exemption
    assert seen[id(by_name["decode_head.0.weight"])]["lr_scale"] == 1.0
    assert seen[id(by_name["backbone.patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.65 ** 5)
