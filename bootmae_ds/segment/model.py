"""The segmentor (mmseg's EncoderDecoder: ``backbone``, ``decode_head``, ``auxiliary_head``), its loss,
sliding-window inference, and loading released mmseg checkpoints.

- Backbone: :class:`bootmae_ds.models.pyramid.ViTPyramid` made from the ``init`` encoder (any
  source: a run, an official ``.pth``, an MAE / timm file, an export, random:
  ``interop/transfer.py``), heads from :mod:`.heads`.
- Loss: each head's logits are upsampled (bilinear) to the label size and scored by cross-entropy
  with ``ignore_index``; mmseg 0.x averages over every pixel, ignored ones counting zero
  (``model.loss_average``); the auxiliary loss is weighted ``model.aux_loss_weight``.
- Inference (mmseg's ``slide_inference``): windows of ``model.img_size`` every ``eval.stride``
  pixels, the last row/column moved back to end at the border, logits of overlapping windows
  averaged, then upsampled to the original image size. With several scales and/or flips, the
  softmax probabilities of every view are averaged (mmseg's ``aug_test``).
- ``load_weights``: a released mmseg checkpoint (``state_dict`` of ``backbone.*``, ``decode_head.*``,
  ``auxiliary_head.*``; ``BootMAE_Base_800_UperNet.pth``) or one of our ``RUN/best/model.pth``,
  loaded strictly: every key used, every shape checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BootMAEConfig, InputError
from ..config.segment import SegmentConfig
from ..interop.safe_load import UnsafeFileError, safe_torch_load
from ..interop.transfer import load_transfer_encoder
from ..models.pyramid import ViTPyramid, drop_relative_position_index
from .heads import FCNHead, UPerHead, resize


class WeightsError(InputError, ValueError):
    """A weights file that does not fit the segmentor; names the file and the keys."""


class Segmentor(nn.Module):
    """Backbone -> UperNet (+ the FCN head in training). ``forward`` gives the heads' logits."""

    def __init__(self, backbone: ViTPyramid, cfg: SegmentConfig) -> None:
        super().__init__()
        m = cfg.model
        self.num_classes = m.num_classes
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.out_channels, m.channels, m.num_classes, m.pool_scales, m.dropout)
        self.auxiliary_head = FCNHead(backbone.out_channels[m.aux_in_index], m.aux_channels, m.num_classes,
                                      m.aux_in_index, m.aux_num_convs, m.dropout) if m.aux_head else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``images [B, 3, H, W]`` -> (UperNet logits ``[B, K, H/4, W/4]``, FCN logits at its
        level's stride, or None in eval mode / without the head)."""
        features = self.backbone(images)
        aux = self.auxiliary_head(features) if self.auxiliary_head is not None and self.training else None
        return self.decode_head(features), aux

    def encode_decode(self, images: torch.Tensor) -> torch.Tensor:
        """UperNet logits upsampled to the input size ``[B, K, H, W]``."""
        return resize(self.decode_head(self.backbone(images)), images.shape[2:])


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: str) -> torch.Tensor:
    """Per-pixel cross-entropy of ``logits [B, K, h, w]`` upsampled to ``labels [B, H, W]`` (fp32)."""
    logits = resize(logits.float(), labels.shape[-2:])
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # [B, H, W]
    if average == "all_pixels":
        return loss.mean()
    return loss.sum() / (labels != ignore_index).sum().clamp(min=1)


def segmentation_loss(outputs: tuple[torch.Tensor, torch.Tensor | None], labels: torch.Tensor,
                      cfg: SegmentConfig) -> dict[str, torch.Tensor]:
    """``loss`` (the sum that is trained on), ``loss_decode`` and ``loss_aux`` (unweighted)."""
    m, ignore = cfg.model, cfg.data.ignore_index
    out = {"loss_decode": cross_entropy(outputs[0], labels, ignore, m.loss_average)}
    total = out["loss_decode"]
    if outputs[1] is not None:
        out["loss_aux"] = cross_entropy(outputs[1], labels, ignore, m.loss_average)
        total = total + m.aux_loss_weight * out["loss_aux"]
    return {"loss": total, **out}


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows ``(y1, y2, x1, x2)``: a grid every ``stride``, the last window of each
    row and column shifted back to end at the border; a side shorter than ``crop`` is one window."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


@torch.no_grad()
def slide_logits(model: Segmentor, image: torch.Tensor, crop: int, stride: int, per_forward: int = 8) -> torch.Tensor:
    """Logits ``[1, K, H, W]`` of a normalised ``image [1, 3, H, W]`` by sliding windows (fp32 sums).
    Windows of one size are batched ``per_forward`` at a time (BN is in eval mode: the same result)."""
    _, _, H, W = image.shape
    boxes = window_boxes(H, W, crop, stride)
    logits = torch.zeros(1, model.num_classes, H, W, device=image.device)
    count = torch.zeros(1, 1, H, W, device=image.device)
    for i in range(0, len(boxes), per_forward):
        chunk = boxes[i:i + per_forward]
        windows = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = model.encode_decode(windows).float()  # [n, K, h, w]
        for (y1, y2, x1, x2), o in zip(chunk, out):
            logits[0, :, y1:y2, x1:x2] += o
            count[0, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict(model: Segmentor, views: list[torch.Tensor], size: tuple[int, int], cfg: SegmentConfig,
            normalise: Any) -> torch.Tensor:
    """Class map ``[H, W]`` of one image from its resized uint8 ``views`` (on the device): sliding
    logits at the original ``size``; several views or a flip average their softmax probabilities."""
    crop, stride, per = cfg.model.img_size, cfg.eval.stride, cfg.eval.windows_per_forward
    flips = (False, True) if cfg.eval.flip else (False,)
    if len(views) == 1 and not cfg.eval.flip:
        return resize(slide_logits(model, normalise(views[0]), crop, stride, per), size)[0].argmax(0)
    probs = None
    for view in views:
        x = normalise(view)
        for flip in flips:
            logits = slide_logits(model, x.flip(-1) if flip else x, crop, stride, per)
            p = resize(logits, size).softmax(1)
            p = p.flip(-1) if flip else p
            probs = p if probs is None else probs + p
    return probs[0].argmax(0)  # type: ignore[index]


def build_segmentor(cfg: SegmentConfig) -> tuple[Segmentor, BootMAEConfig, dict[str, Any]]:
    """The segmentor of ``cfg`` on the ``init`` encoder, its pre-training config and provenance."""
    encoder, pre, provenance = load_transfer_encoder(cfg.init, cfg.run.seed)
    m = cfg.model
    try:
        backbone = ViTPyramid.from_encoder(encoder.float(), m.img_size, drop_path_rate=m.drop_path,
                                           init_values=m.layer_scale, use_rel_pos_bias=m.rel_pos_bias,
                                           out_indices=m.out_indices)
    except ValueError as err:
        raise InputError(f"init.source={cfg.init.source!r}: {err} (model.out_indices, model.img_size)") from None
    torch.manual_seed(cfg.run.seed)  # the heads' initialisation
    return Segmentor(backbone, cfg), pre, provenance


def load_weights(model: Segmentor, path: str | Path) -> dict[str, Any]:
    """Load a segmentation checkpoint into ``model`` strictly (see the module docstring); returns
    the file's ``meta`` (empty when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; pass a released mmseg checkpoint or RUN/best/model.pth")
    try:
        blob = safe_torch_load(path, "segmentation checkpoint")  # mmseg's meta may hold NumPy values
    except UnsafeFileError as err:
        raise WeightsError(str(err)) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: no state_dict of tensors (an mmseg checkpoint holds 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        state = drop_relative_position_index(state, model.backbone, prefix="backbone.")
    except ValueError as err:
        raise WeightsError(f"{path}: {err}; build the model at the file's model.img_size") from None
    if model.auxiliary_head is None:  # a file with the training-only head still fits a model without
        state = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise WeightsError(f"{path}: does not fit the segmentor of this config (missing {missing[:4]}, "
                           f"unexpected {extra[:4]}, shapes {shapes[:3]}); check model.* (num_classes, "
                           f"img_size, channels) and init.arch / init.config (the architecture)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return dict(blob.get("meta") or {}) if isinstance(blob, dict) else {}
