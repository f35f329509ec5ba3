"""UperNet and the auxiliary FCN head, as mmsegmentation 0.x builds them (same parameter names, so
a released mmseg checkpoint's ``decode_head.*`` and ``auxiliary_head.*`` load strictly).

- ``ConvModule``: conv without bias, BatchNorm (``bn``), ReLU; convs start Kaiming-normal (fan out,
  ReLU gain), BN at (1, 0).
- UperNet (``UPerHead``): pyramid pooling on the last level (``psp_modules``: adaptive average
  pools of ``pool_scales`` then 1x1 ConvModules, upsampled back and concatenated with the input,
  fused by a 3x3 ``bottleneck``), 1x1 ``lateral_convs`` on the other levels, a top-down path
  (each level plus its upsampled coarser neighbour), 3x3 ``fpn_convs``, everything upsampled to
  stride 4 and fused by the 3x3 ``fpn_bottleneck``; then Dropout2d and the 1x1 ``conv_seg``
  (weights ~ N(0, 0.01), bias 0). Upsampling is bilinear with ``align_corners=False``.
- ``FCNHead``: ``num_convs`` 3x3 ConvModules (``convs``) on one level, Dropout2d, ``conv_seg``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (mmseg's ``resize`` as the official config uses it)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """mmcv's ConvModule with a BatchNorm and ReLU: ``relu(bn(conv(x)))``, conv without bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DecodeHead(nn.Module):
    """What every mmseg head ends with: Dropout2d, then the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x) if self.dropout is not None else x)


class UPerHead(DecodeHead):
    """UperNet over the 4 pyramid levels ``[B, C_i, H_i, W_i]`` -> logits ``[B, K, H_0, W_0]``."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(m(x), x.shape[2:]) for m in self.psp_modules]  # each [B, C, H, W]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser level, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(x, size) for x in outs[1:]]  # all at stride 4
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    """``num_convs`` 3x3 ConvModules on pyramid level ``in_index`` -> logits at that level's size."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 num_convs: int = 1, dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(inputs[self.in_index]))
