"""Semantic segmentation, in one process: the official recipe's values, the released checkpoint's
layout and computation, sliding windows, scores, loss, schedule, augmentation, bad input."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_pyramid import TINY, _randomised, official_index, reference_forward

from bootmae_ds.config import ConfigError, load_segment_config
from bootmae_ds.data.segmentation import SegmentationDataError, open_segmentation_source, scan_pairs
from bootmae_ds.evaluation.segmentation import confusion_matrix, segmentation_scores
from bootmae_ds.models.pyramid import ViTPyramid
from bootmae_ds.segment.augment import hsv_to_rgb, rgb_to_hsv
from bootmae_ds.segment.data import (
    PAD,
    LabelError,
    SegTrainTransform,
    check_labels,
    device_batch,
    eval_views,
    reduce_zero_label,
    rescale_size,
    setr_scale,
)
from bootmae_ds.segment.model import (
    Segmentor,
    WeightsError,
    cross_entropy,
    load_weights,
    predict,
    slide_logits,
    window_boxes,
)
from bootmae_ds.segment.trainer import poly_lr

# Segmentation/configs/bootmae/BootMAE_Base_800_PT.py (LightDXY/BootMAE), value by value.
OFFICIAL = {
    "backbone": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4, "qkv_bias": True,
                 "use_abs_pos_emb": True, "use_rel_pos_bias": True, "img_size": 512, "init_values": 1,
                 "drop_path_rate": 0.1, "out_indices": [3, 5, 7, 11]},
    "decode_head": {"in_channels": [768] * 4, "pool_scales": (1, 2, 3, 6), "channels": 768, "dropout_ratio": 0.1,
                    "num_classes": 150, "align_corners": False, "loss_weight": 1.0},
    "auxiliary_head": {"in_channels": 768, "in_index": 2, "channels": 256, "num_convs": 1, "concat_input": False,
                       "dropout_ratio": 0.1, "num_classes": 150, "loss_weight": 0.4},
    "norm_cfg": "SyncBN",
    "test_cfg": {"mode": "slide", "crop_size": (512, 512), "stride": (341, 341)},
    "img_norm_cfg": {"mean": [127.5] * 3, "std": [127.5] * 3},
    "train_pipeline": {"reduce_zero_label": True, "img_scale": (2048, 512), "ratio_range": (0.5, 2.0),
                       "crop_size": (512, 512), "cat_max_ratio": 0.75, "flip_prob": 0.5, "photometric": True,
                       "pad_size": (512, 512), "seg_pad_val": 255},
    "test_pipeline": {"img_scale": (2048, 512), "flip": False, "keep_ratio": True},
    "data": {"samples_per_gpu": 2, "workers_per_gpu": 2, "gpus": 8, "img_dir": "images/training",
             "val_img_dir": "images/validation"},
    "optimizer": {"lr": 4e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "num_layers": 12, "layer_decay_rate": 0.65},
    "optimizer_config": {"grad_clip": 3},
    "lr_config": {"policy": "poly", "warmup": "linear", "warmup_iters": 1500, "warmup_ratio": 1e-6, "power": 1.0,
                  "min_lr": 0.0},
    "runner": {"max_iters": 160000}, "checkpoint_config": {"interval": 16000}, "evaluation": {"interval": 16000},
    "ms_test": {"img_ratios": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True},
}


def test_ade20k_base_is_the_official_config() -> None:
    from bootmae_ds.config import load_config

    cfg = load_segment_config("ade20k_base")
    o, m, d = OFFICIAL, cfg.model, cfg.data
    enc = load_config(cfg.init.config).model  # the encoder the backbone is made of (init.source=random)
    b = o["backbone"]
    assert (enc.patch_size, enc.embed_dim, enc.depth, enc.num_heads, enc.mlp_ratio, enc.qkv_bias) == (
        b["patch_size"], b["embed_dim"], b["depth"], b["num_heads"], b["mlp_ratio"], b["qkv_bias"])
    assert (m.img_size, m.layer_scale, m.drop_path, list(m.out_indices), m.rel_pos_bias) == (
        b["img_size"], b["init_values"], b["drop_path_rate"], b["out_indices"], b["use_rel_pos_bias"])
    h, a = o["decode_head"], o["auxiliary_head"]
    assert (m.pool_scales, m.channels, m.dropout, m.num_classes) == (
        h["pool_scales"], h["channels"], h["dropout_ratio"], h["num_classes"])
    assert (m.aux_head, m.aux_in_index, m.aux_channels, m.aux_num_convs, m.dropout, m.aux_loss_weight) == (
        True, a["in_index"], a["channels"], a["num_convs"], a["dropout_ratio"], a["loss_weight"])
    assert m.sync_bn == "auto" and m.loss_average == "all_pixels"  # SyncBN on GPUs; mmseg 0.x's mean
    assert (m.img_size, m.img_size, cfg.eval.stride) == (*o["test_cfg"]["crop_size"], o["test_cfg"]["stride"][0])
    assert [x * 255 for x in d.mean] == o["img_norm_cfg"]["mean"] and [x * 255 for x in d.std] == o["img_norm_cfg"]["std"]
    t = o["train_pipeline"]
    assert (d.reduce_zero_label, d.img_scale, d.ratio_range, d.cat_max_ratio, d.hflip, d.photometric) == (
        t["reduce_zero_label"], t["img_scale"], t["ratio_range"], t["cat_max_ratio"], t["flip_prob"], t["photometric"])
    assert d.ignore_index == t["seg_pad_val"] and (m.img_size, m.img_size) == t["crop_size"] == t["pad_size"]
    assert cfg.eval.ratios == [] and cfg.eval.flip is o["test_pipeline"]["flip"]
    assert (d.micro_batch_size, d.num_workers, d.global_batch_size) == (
        o["data"]["samples_per_gpu"], o["data"]["workers_per_gpu"], o["data"]["samples_per_gpu"] * o["data"]["gpus"])
    assert (d.train_split, d.val_split) == ("training", "validation")
    p, s = cfg.optim, cfg.schedule
    assert (p.lr, p.betas, p.weight_decay, p.layer_decay, p.clip_grad) == (
        o["optimizer"]["lr"], o["optimizer"]["betas"], o["optimizer"]["weight_decay"],
        o["optimizer"]["layer_decay_rate"], o["optimizer_config"]["grad_clip"])
    assert (p.layer_decay_num_layers or enc.depth) == o["optimizer"]["num_layers"]
    lr = o["lr_config"]
    assert (s.warmup_iters, s.warmup_ratio, s.power, p.min_lr, s.iters) == (
        lr["warmup_iters"], lr["warmup_ratio"], lr["power"], lr["min_lr"], o["runner"]["max_iters"])
    assert cfg.checkpoint.every_steps == o["checkpoint_config"]["interval"] == cfg.eval.every_steps
    ms = load_segment_config("ade20k_base_ms")
    assert ms.eval.ratios == o["ms_test"]["img_ratios"] and ms.eval.flip is True
    with pytest.raises(ConfigError, match="eval.stride"):
        load_segment_config("demo", ["eval.stride=65"])


def official_keys(depth: int, levels: int = 4, pools: int = 4, aux_convs: int = 1) -> set[str]:
    """The released mmseg file's keys, from the official backbone and mmseg 0.x's UPerHead/FCNHead."""
    conv = lambda p: {f"{p}.conv.weight", *(f"{p}.bn.{b}" for b in
                      ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))}
    keys = {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
            "backbone.patch_embed.proj.bias", "backbone.fpn1.0.weight", "backbone.fpn1.0.bias",
            "backbone.fpn1.3.weight", "backbone.fpn1.3.bias", "backbone.fpn2.0.weight", "backbone.fpn2.0.bias",
            *(f"backbone.fpn1.1.{b}" for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))}
    for i in range(depth):
        keys |= {f"backbone.blocks.{i}.{k}" for k in (
            "gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
            "attn.relative_position_bias_table", "attn.relative_position_index", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias")}
    for head in ("decode_head", "auxiliary_head"):
        keys |= {f"{head}.conv_seg.weight", f"{head}.conv_seg.bias"}
    for j in range(pools):
        keys |= conv(f"decode_head.psp_modules.{j}.1")
    keys |= conv("decode_head.bottleneck") | conv("decode_head.fpn_bottleneck")
    for j in range(levels - 1):
        keys |= conv(f"decode_head.lateral_convs.{j}") | conv(f"decode_head.fpn_convs.{j}")
    for j in range(aux_convs):
        keys |= conv(f"auxiliary_head.convs.{j}")
    return keys


def _tiny_segmentor(**model: object) -> Segmentor:
    cfg = load_segment_config("demo", [f"model.{k}={v}" for k, v in
                                       {"num_classes": 5, "channels": 16, "aux_channels": 8, **model}.items()])
    return Segmentor(ViTPyramid(64, 16, **TINY), cfg)


def reference_segmentor(sd: dict[str, torch.Tensor], backbone_out: list[torch.Tensor]) -> torch.Tensor:
    """mmseg 0.x's UPerHead (eval mode) written out on the state dict ``sd``."""
    def cm(x: torch.Tensor, p: str) -> torch.Tensor:
        w = sd[f"{p}.conv.weight"]
        x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        x = F.batch_norm(x, sd[f"{p}.bn.running_mean"], sd[f"{p}.bn.running_var"], sd[f"{p}.bn.weight"],
                         sd[f"{p}.bn.bias"], False, 0.0, 1e-5)
        return F.relu(x)

    up = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=False)
    top = backbone_out[3]
    psp = [top] + [up(cm(F.adaptive_avg_pool2d(top, s), f"decode_head.psp_modules.{j}.1"), top.shape[2:])
                   for j, s in enumerate((1, 2, 3, 6))]
    lat = [cm(backbone_out[j], f"decode_head.lateral_convs.{j}") for j in range(3)]
    lat.append(cm(torch.cat(psp, 1), "decode_head.bottleneck"))
    for i in (3, 2, 1):
        lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1].shape[2:])
    outs = [cm(lat[j], f"decode_head.fpn_convs.{j}") for j in range(3)] + [lat[3]]
    outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
    x = cm(torch.cat(outs, 1), "decode_head.fpn_bottleneck")
    return F.conv2d(x, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


def test_released_checkpoint_layout_loads_strictly_and_computes_as_mmseg(tmp_path) -> None:
    with torch.device("meta"):  # the released ViT-B UperNet: every key of the file, nothing more
        big = Segmentor(ViTPyramid(512), load_segment_config("ade20k_base"))
    ours = set(big.state_dict()) | {f"backbone.blocks.{i}.attn.relative_position_index" for i in range(12)}
    assert ours == official_keys(12)
    assert big.state_dict()["decode_head.bottleneck.conv.weight"].shape == (768, 768 + 4 * 768, 3, 3)
    assert big.state_dict()["auxiliary_head.conv_seg.weight"].shape == (150, 256, 1, 1)
    # A tiny model in the same layout: a file of random weights, loaded into a fresh model.
    source = _randomised(_tiny_segmentor()).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state |= {f"backbone.blocks.{i}.attn.relative_position_index": official_index(4, 4) for i in range(4)}
    assert set(state) == official_keys(4)
    path = tmp_path / "released.pth"
    torch.save({"meta": {"CLASSES": ["a"] * 5}, "state_dict": state}, path)
    model = _tiny_segmentor().double().eval()
    assert load_weights(model, path) == {"CLASSES": ["a"] * 5}
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits, aux = model(images)
        file = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
        expected = reference_segmentor(file, reference_forward(model.backbone, images))
    assert aux is None and torch.allclose(logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())
    model.train()
    assert model(images)[1].shape == (2, 5, 4, 4)  # the FCN head on stride 16, training only
    # Refused, by name: another class count, a damaged file, a wrong relative position index.
    with pytest.raises(WeightsError, match="decode_head.conv_seg.weight"):
        load_weights(_tiny_segmentor(num_classes=6), path)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cut.pth: unreadable"):
        load_weights(model, tmp_path / "cut.pth")
    state["backbone.blocks.1.attn.relative_position_index"] = official_index(2, 8)
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError, match="blocks.1.attn.relative_position_index"):
        load_weights(model, path)


def test_sliding_windows() -> None:
    # mmseg's grid: 683 wide at stride 341 -> 2 columns, the last moved back to end at the border
    assert window_boxes(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert window_boxes(300, 700, 512, 341) == [(0, 300, 0, 512), (0, 300, 188, 700)]
    assert len(window_boxes(1024, 1024, 512, 341)) == 9
    model = _randomised(_tiny_segmentor()).eval()
    one = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # one window covers the image: the whole-image forward
        whole = F.interpolate(model(one)[0], size=(64, 64), mode="bilinear", align_corners=False)
        assert torch.allclose(slide_logits(model, one, 64, 43), whole, atol=1e-5)
        wide = torch.randn(1, 3, 64, 96)  # windows at x 0..64 and 32..96, overlap averaged
        left, right = (F.interpolate(model(wide[..., a:a + 64])[0], size=(64, 64), mode="bilinear",
                                     align_corners=False) for a in (0, 32))
        expected = torch.zeros(1, 5, 64, 96)
        expected[..., :32], expected[..., 64:] = left[..., :32], right[..., 32:]
        expected[..., 32:64] = (left[..., 32:] + right[..., :32]) / 2
        assert torch.allclose(slide_logits(model, wide, 64, 43, per_forward=1), expected, atol=1e-5)


def test_scores_against_a_hand_built_confusion_matrix() -> None:
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255], [0, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1], [3, 1, 2, 3]])
    m = confusion_matrix(pred, label, 4)
    assert m.tolist() == [[1, 1, 0, 1], [0, 3, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]  # rows: label
    s = segmentation_scores(m + confusion_matrix(pred, label, 4))  # matrices of two "ranks" add up
    # IoU: class 0: 2 / (6 + 4 - 2); 1: 6 / (6 + 8 - 6); 2: 4 / (6 + 4 - 4); class 3 never labelled: 0 / 2
    iou = [2 / 8, 6 / 8, 4 / 6, 0.0]
    assert s.iou == pytest.approx([100 * v for v in iou])
    assert s.acc[:3] == pytest.approx([100 / 3, 100.0, 200 / 3]) and math.isnan(s.acc[3])
    assert s.miou == pytest.approx(100 * sum(iou) / 4) and s.macc == pytest.approx((100 / 3 + 100 + 200 / 3) / 3)
    assert s.aacc == pytest.approx(100 * 12 / 18) and s.pixels == 18
    absent = segmentation_scores(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))  # class 2: no label, no pred
    assert math.isnan(absent.iou[2]) and absent.miou == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


def test_loss_averages_like_mmseg_0x() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 6, 6))
    labels[0, :2] = 255
    up = F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels.clamp(max=3), reduction="none") * (labels != 255)
    assert cross_entropy(logits, labels, 255, "all_pixels") == pytest.approx(float(per_pixel.sum() / 72))
    assert cross_entropy(logits, labels, 255, "labelled_pixels") == pytest.approx(float(per_pixel.sum() / 60))


def test_poly_schedule_is_mmcvs() -> None:
    cfg = load_segment_config("ade20k_base")

    def mmcv(it: int) -> float:  # PolyLrUpdaterHook with warmup='linear' (mmcv 1.3)
        regular = (4e-4 - 0) * (1 - it / 160000) ** 1.0 + 0
        if it >= 1500:
            return regular
        return regular * (1 - (1 - it / 1500) * (1 - 1e-6))

    for it in (0, 1, 750, 1499, 1500, 80000, 159999):
        assert poly_lr(it, cfg) == pytest.approx(mmcv(it), rel=1e-12)
    assert poly_lr(160000, cfg) == 0.0


def _encoded(image: np.ndarray, label: np.ndarray) -> tuple[bytes, bytes]:
    a, b = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(a, format="PNG")
    Image.fromarray(label, mode="L").save(b, format="PNG")
    return a.getvalue(), b.getvalue()


def test_train_transform_is_seeded_and_keeps_image_and_labels_together() -> None:
    assert reduce_zero_label(torch.tensor([0, 1, 2, 150, 255], dtype=torch.uint8)).tolist() == [255, 0, 1, 149, 255]
    assert rescale_size(400, 600, (2048, 512)) == (512, 768) and rescale_size(100, 900, (2048, 512)) == (228, 2048)
    assert setr_scale(400, 600, 256, 512) == (512, 768) and setr_scale(400, 600, 896, 512) == (896, 1344)
    # Image colour encodes the class (blocks of 8 px), so every kept pixel must still agree.
    classes = np.kron(np.arange(1, 13).reshape(3, 4), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)  # 24x32
    image = np.stack([classes * 20, np.zeros_like(classes), 255 - classes * 20], -1).astype(np.uint8)
    data = _encoded(image, classes)
    t = SegTrainTransform(crop=32, seed=0, img_scale=(64, 24), photometric=False)
    img, lab = t(data, 0, "a")
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and lab.dtype == torch.int16
    pad = lab == PAD
    assert img[:, pad].eq(0).all()
    lf = lab.float()[None, None]
    inner = (F.max_pool2d(lf, 3, 1, 1) == -F.max_pool2d(-lf, 3, 1, 1))[0, 0] & ~pad  # away from class borders
    agree = (img[0, inner].float() / 20 - 1).round().long() == lab[inner].long()
    assert inner.sum() > 100 and agree.float().mean() > 0.99
    again = t(data, 0, "a")
    assert torch.equal(again[0], img) and torch.equal(again[1], lab)
    other = [t(data, e, k) for e, k in ((1, "a"), (0, "b"))]
    assert any(not torch.equal(o[0], img) for o in other)
    photo = SegTrainTransform(crop=32, seed=0, img_scale=(64, 24))(data, 0, "a")
    assert torch.equal(photo[1], lab) and not torch.equal(photo[0], img)  # colours only
    # cat_max_ratio: a crop where one class covers >= 75% of the labelled pixels is redrawn.
    mostly = np.ones((64, 64), dtype=np.uint8)
    mostly[:, 48:] = 2
    t = SegTrainTransform(crop=32, seed=0, img_scale=(64, 64), ratio_range=(1.0, 1.0), hflip=0, photometric=False)
    for key in map(str, range(8)):
        values, counts = torch.unique(t(_encoded(np.zeros((64, 64, 3), np.uint8), mostly), 0, key)[1],
                                      return_counts=True)
        assert len(values) == 2 and counts.max() / counts.sum() < 0.75
    x = torch.randint(0, 256, (3, 7, 9)).float()
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-3)


def test_device_batch_zeroes_padding_after_normalising() -> None:
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    labels = torch.tensor([[[3, PAD], [255, 0]]], dtype=torch.int16)
    x, y = device_batch(images, labels, torch.tensor([0.5] * 3), torch.tensor([0.5] * 3), 255)
    assert x[0, :, 0, 1].eq(0).all() and x[0, :, 0, 0].eq(1).all()
    assert y.tolist() == [[[3, 255], [255, 0]]] and y.dtype == torch.int64


def _ade_folder(root, pairs: dict[str, tuple[tuple[int, int], tuple[int, int] | None]]) -> None:
    for split in ("training",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for name, (size, label_size) in pairs.items():
            Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / split / f"{name}.jpg")
            if label_size is not None:
                Image.fromarray(np.ones(label_size, np.uint8), mode="L").save(root / "annotations" / split / f"{name}.png")


def test_bad_data_is_named(tmp_path) -> None:
    _ade_folder(tmp_path / "ok", {"a": ((20, 30), (20, 30)), "b": ((16, 16), (16, 16))})
    assert scan_pairs(tmp_path / "ok", "training") == ["images/training/a.jpg", "images/training/b.jpg"]
    _ade_folder(tmp_path / "lost", {"a": ((20, 30), (20, 30)), "b": ((16, 16), None)})
    with pytest.raises(SegmentationDataError, match=r"images/training/b.jpg: no label map .*b.png \(1 of 2"):
        scan_pairs(tmp_path / "lost", "training")
    _ade_folder(tmp_path / "size", {"a": ((20, 30), (20, 31))})
    with pytest.raises(SegmentationDataError, match=r"annotations/training/a.png: label map of 31x20 for an image of 30x20"):
        open_segmentation_source(str(tmp_path / "size"), "training", 0)
    with pytest.raises(SegmentationDataError, match="no such directory or manifest"):
        open_segmentation_source(str(tmp_path / "nowhere"), "training", 0)
    labels = torch.tensor([[[0, 4], [255, PAD]], [[1, 7], [0, 0]]], dtype=torch.int16)
    with pytest.raises(LabelError, match="sample k1: label 7 beyond model.num_classes=5"):
        check_labels({"masks": labels, "keys": ["k0", "k1"]}, 5, 255)
    check_labels({"masks": labels.clamp(max=4), "keys": ["k0", "k1"]}, 5, 255)


def test_segmentation_shards_round_trip(tmp_path) -> None:
    from bootmae_ds.data.builder import BuildOptions, build_shards
    from bootmae_ds.data.shards import verify_manifest

    root = tmp_path / "ade"
    _ade_folder(root, {f"im{i}": ((12 + i, 20), (12 + i, 20)) for i in range(5)})
    manifest = build_shards(root, tmp_path / "shards", BuildOptions(segmentation="training", shard_samples=2),
                            progress=False)
    assert manifest.total_samples == 5 and all(not p for p in verify_manifest(manifest.path).values())
    folder = open_segmentation_source(str(root), "training", None)
    shards = open_segmentation_source(str(tmp_path / "shards"), "training", None)
    from_folder = {r.data for s in range(len(folder.shards)) for _, r in folder.read(s, 0, folder.shards[s].count, lambda _: True)}
    from_shards = {r.data for s in range(len(shards.shards)) for _, r in shards.read(s, 0, shards.shards[s].count, lambda _: True)}
    assert from_folder == from_shards and len(from_folder) == 5


def test_multi_scale_and_flip_average_the_views_probabilities() -> None:
    model = _randomised(_tiny_segmentor()).eval()
    cfg = load_segment_config("demo", ["model.num_classes=5", "model.channels=16", "model.aux_channels=8",
                                       "eval.flip=true", "eval.ratios=[1.0,1.5]"])
    image = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    views = eval_views(image, cfg)  # SETR's resize: short side max(64, ratio x 64), aspect kept
    assert [tuple(v.shape[-2:]) for v in views] == [(64, 107), (96, 160)]

    def normalise(v: torch.Tensor) -> torch.Tensor:
        return (v.float()[None] / 255 - 0.5) / 0.5

    probs = torch.zeros(1, 5, 48, 80)
    for v in views:  # mmseg's aug_test: softmax of each view at the original size, flips flipped back
        for flip in (False, True):
            x = normalise(v).flip(-1) if flip else normalise(v)
            p = F.interpolate(slide_logits(model, x, 64, 43), size=(48, 80), mode="bilinear",
                              align_corners=False).softmax(1)
            probs += p.flip(-1) if flip else p
    assert torch.equal(predict(model, views, (48, 80), cfg, normalise), probs[0].argmax(0))
    single = load_segment_config("demo", ["model.num_classes=5"])
    assert [tuple(v.shape[-2:]) for v in eval_views(image, single)] == [(64, 107)]


def test_an_mae_or_timm_file_becomes_the_backbone(tmp_path) -> None:
    import timm

    from bootmae_ds.segment.model import build_segmentor

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=16,
                            embed_dim=96, depth=4, num_heads=4).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # k biases too: dropping them must change nothing
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "mae.pth")
    # the file's architecture (init.config): the demo encoder with 16-px patches at 64 px
    (tmp_path / "arch.yaml").write_text("base: demo\nmodel: {img_size: 64, patch_size: 16}\nmask: {num_masked: 8}\n")
    cfg = load_segment_config("demo", [f"init.source={tmp_path / 'mae.pth'}", f"init.config={tmp_path / 'arch.yaml'}"])
    model, _, provenance = build_segmentor(cfg)
    assert provenance["source"] == "timm" and provenance["unused"] == []
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # gamma 1 and zero tables: the backbone's blocks are timm's blocks
        ours = model.backbone.eval()(images)[2]  # stride 16: block 3's tokens as they are
        theirs = ref.blocks[:3](ref._pos_embed(ref.patch_embed(images)))[:, 1:]
    assert torch.allclose(ours, theirs.transpose(1, 2).reshape(2, 96, 4, 4), atol=1e-5)
