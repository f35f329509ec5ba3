"""The detector of a config: the pre-trained ViT as a four-level pyramid, torchvision's FPN, and
torchvision's Mask R-CNN (RPN, RoIAlign box and mask heads, their losses, resizing and batching).

    model, pre, provenance = build_detector(cfg, num_classes=80)
    losses = model(images, targets)     # training: {loss_classifier, loss_box_reg, loss_mask, ...}
    outputs = model.eval()(images)      # [{boxes, labels, scores, masks}] at each image's own size

``images`` are float [3, H, W] in [0, 1] of any size: torchvision's transform normalises them
with the pre-training mean/std, resizes to the config's shorter / longer side (bilinear; masks
nearest), and pads a batch to a multiple of ``size_divisible``; predictions come back at each
image's own size.

Precision. The backbone (ViT, pyramid, FPN) runs under bf16 autocast when the run's precision is
bf16; the RPN and RoI heads, the box coding and every loss stay fp32, because bf16 keeps 8 bits of
mantissa: torchvision's box decoding casts the proposals to the regression's dtype, and a
coordinate near 1,000 px in bf16 is rounded to a multiple of 4-8 px. Their weights (a few % of
the FLOPs) are fp32 as well; on GPUs cuDNN runs fp32 convolutions on TF32 tensor cores.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import BootMAEConfig, ConfigError
from ..config.detect import DetectConfig
from ..interop.transfer import load_transfer_encoder
from ..models import VisionTransformerEncoder, ViTPyramid

LEVELS = ("0", "1", "2", "3")  # the FPN outputs RoIAlign reads; "pool" (stride 64) feeds only the RPN
BACKBONE = "backbone.body."  # the ViT pyramid's parameter names in the detector (layer-wise lr decay)


class PyramidFPN(nn.Module):
    """ViT pyramid -> FPN with a max-pooled fifth level: ``OrderedDict`` of ``0 .. 3, pool`` at
    strides 4, 8, 16, 32, 64, ``fpn_channels`` each, fp32 (``out_channels`` is what torchvision's
    detectors read)."""

    def __init__(self, pyramid: ViTPyramid, fpn_channels: int, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.body = pyramid
        self.fpn = FeaturePyramidNetwork(list(pyramid.out_channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.autocast_dtype = autocast_dtype

    @property
    def strides(self) -> tuple[int, ...]:
        return (*self.body.strides, 2 * self.body.strides[-1])

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        dtype = self.autocast_dtype
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features = self.body(images)  # 4 x [B, C_i, H / s_i, W / s_i]
            out = self.fpn(OrderedDict(zip(LEVELS, features)))
        return OrderedDict((k, v.float()) for k, v in out.items())


def build_mask_rcnn(backbone: PyramidFPN, cfg: DetectConfig, num_classes: int, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> MaskRCNN:
    """torchvision's Mask R-CNN on ``backbone`` with the config's heads, sizes and thresholds
    (``num_classes`` objects plus the background)."""
    m, d = cfg.model, cfg.data
    sizes = tuple((m.anchor_scale * s,) for s in backbone.strides)
    anchors = AnchorGenerator(sizes, (tuple(m.anchor_ratios),) * len(sizes))
    C, rpn, roi = backbone.out_channels, m.rpn, m.roi
    return MaskRCNN(
        backbone, num_classes=None, min_size=d.min_size, max_size=d.max_size, image_mean=list(mean),
        image_std=list(std), size_divisible=d.size_divisible,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train, rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.fg_iou_thresh, rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image, rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(C * 7 * 7, roi.box_head_dim),
        box_predictor=FastRCNNPredictor(roi.box_head_dim, num_classes + 1),
        box_score_thresh=roi.score_thresh, box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_image, box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh, box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(C, [roi.mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(roi.mask_head_channels, roi.mask_head_channels, num_classes + 1),
    )


def build_pyramid(encoder: VisionTransformerEncoder, pre: BootMAEConfig, cfg: DetectConfig,
                  sync_bn: bool = False) -> ViTPyramid:
    """The segmentation backbone on ``encoder`` (its weights; fresh layer scales, relative position
    tables and pyramid ops) with the tables and the position embedding kept for the pre-training
    grid: every input resamples the embedding to its own grid and reads its offsets from the tables."""
    m = cfg.model
    if cfg.data.size_divisible % pre.model.patch_size:
        raise ConfigError(f"data.size_divisible={cfg.data.size_divisible}: must be a multiple of the encoder's "
                          f"patch size {pre.model.patch_size}")
    if max(m.out_indices) >= pre.model.depth:
        raise ConfigError(f"model.out_indices={m.out_indices}: the encoder has blocks 0..{pre.model.depth - 1}")
    norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
    return ViTPyramid.from_encoder(encoder, pre.model.img_size, drop_path_rate=m.drop_path, init_values=m.layer_scale,
                                   use_rel_pos_bias=m.rel_pos_bias, out_indices=m.out_indices, norm_layer=norm)


def build_detector(cfg: DetectConfig, num_classes: int, autocast_dtype: torch.dtype | None = None,
                   sync_bn: bool = False) -> tuple[MaskRCNN, BootMAEConfig, dict[str, Any]]:
    """The Mask R-CNN of ``cfg`` on the ``init`` encoder; its pre-training config and provenance.
    Fresh parts (layer scales, tables, pyramid ops, FPN, heads) are drawn from ``run.seed``."""
    encoder, pre, provenance = load_transfer_encoder(cfg.init, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    backbone = PyramidFPN(build_pyramid(encoder.float(), pre, cfg, sync_bn), cfg.model.fpn_channels, autocast_dtype)
    mean = cfg.data.mean or pre.data.mean
    std = cfg.data.std or pre.data.std
    model = build_mask_rcnn(backbone, cfg, num_classes, mean, std)
    return model, pre, provenance

