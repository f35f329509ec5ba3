"""``RUN/best/``: the detector with the best box AP so far, whole, loadable without the run.

    model, cfg, categories = load_best("runs/coco/best")     # torchvision MaskRCNN, eval mode
    outputs = model([image_float_0_1])                        # labels i -> categories[i - 1]

Files: ``model.safetensors`` (the detector's state dict, fp32), ``config.yaml`` (the run's detect
config, resolved), ``pretrain.yaml`` (the encoder's architecture), ``categories.json`` (label i ->
COCO category id and name), ``metrics.json`` (the scores and where it came from),
``detections.json`` (its detections of the evaluation images in COCO's result format, which
pycocotools' ``loadRes`` reads) and a README.
Written into a staging directory beside ``best`` and renamed into place: a reader never sees half
a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import BootMAEConfig, DetectConfig, InputError, load_config
from ..config.detect import load_detect_config
from ..data.coco import CocoSplit
from ..models import build_model
from .model import PyramidFPN, build_mask_rcnn, build_pyramid

WEIGHTS, CONFIG, PRETRAIN, CATEGORIES, METRICS, DETECTIONS, README = (
    "model.safetensors", "config.yaml", "pretrain.yaml", "categories.json", "metrics.json", "detections.json",
    "README.md")


def write_best(out: Path, model: torch.nn.Module, state: dict[str, torch.Tensor], cfg: DetectConfig,
               pre: BootMAEConfig, split: CocoSplit, provenance: dict[str, Any],
               detections: list[dict[str, Any]]) -> Path:
    """Write ``state`` (checked strictly against ``model``, the fp32 CPU copy) and its description
    into ``out`` at once."""
    from safetensors.torch import save_file

    model.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    stage = out.parent / f".{out.name}.stage-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    save_file(tensors, str(stage / WEIGHTS), metadata={"format": "pt"})
    cfg.save(stage / CONFIG)
    pre.save(stage / PRETRAIN)
    categories = [{"label": i + 1, "id": c, "name": n}
                  for i, (c, n) in enumerate(zip(split.category_ids, split.category_names))]
    (stage / CATEGORIES).write_text(json.dumps(categories, indent=1) + "\n")
    (stage / METRICS).write_text(json.dumps(provenance, indent=1, default=str) + "\n")
    (stage / DETECTIONS).write_text(json.dumps(detections))
    (stage / README).write_text(
        f"# Mask R-CNN on a BootMAE ViT (bootmae-ds)\n\nBest box AP of run {provenance.get('run_dir')} "
        f"after step {provenance.get('step')}: box AP {provenance.get('eval_box_ap')}, mask AP "
        f"{provenance.get('eval_mask_ap')} on {provenance.get('images')} images of {split.json_path}.\n\n"
        "```python\nfrom bootmae_ds.detect.best import load_best\nmodel, cfg, categories = load_best(DIR)\n"
        "outputs = model([image])  # float [3, H, W] in [0, 1]; labels i -> categories[i - 1]\n```\n")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_best(path: str | Path) -> tuple[torch.nn.Module, DetectConfig, list[dict[str, Any]]]:
    """The detector kept in ``path`` (a ``RUN/best`` directory) in eval mode, its config and categories."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [n for n in (WEIGHTS, CONFIG, PRETRAIN, CATEGORIES) if not (path / n).is_file()]
    if missing:
        raise InputError(f"{path}: not a detector directory (missing {missing}); pass a run's best/ directory")
    cfg = load_detect_config(path / CONFIG)
    pre = load_config(path / PRETRAIN)
    categories = json.loads((path / CATEGORIES).read_text())
    encoder = build_model(pre).encoder
    backbone = PyramidFPN(build_pyramid(encoder, pre, cfg), cfg.model.fpn_channels)
    model = build_mask_rcnn(backbone, cfg, len(categories), cfg.data.mean, cfg.data.std)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval(), cfg, categories
