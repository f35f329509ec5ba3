"""COCO evaluation of an instance-segmentation model: every image of a split scored once over the
ranks, detections gathered on rank 0, scored by pycocotools' COCOeval (bbox and segm).

    scores = evaluate_detector(model, split, rank, world, batch_size=1, num_workers=2, device=device)
    scores["metrics"]   # {"box_ap": 48.5, "box_ap50": ..., "mask_ap": ..., ...} on every rank
    scores["summary"]   # COCOeval's printed tables (rank 0; "" elsewhere)

The model is anything with torchvision's detection interface: ``model(list of float [3, H, W] in
[0, 1]) -> list of {boxes [N, 4] xyxy, labels [N], scores [N], masks [N, 1, H, W] probabilities}``
at each image's own size. APs are in percent (the paper's unit); COCOeval's -1 (no ground truth in
that area range) becomes None.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..data.coco import CocoSplit, load_coco_api
from ..data.detection import eval_batches
from ..runtime.dist import gather_to_main

STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # COCOeval.stats[0:6]
KINDS = {"bbox": "box", "segm": "mask"}


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, category_ids: list[int],
                    mask_threshold: float) -> list[dict[str, Any]]:
    """One image's detections in COCO's result format: ``bbox`` [x, y, w, h], ``score``,
    ``category_id`` (label i -> ``category_ids[i - 1]``) and ``segmentation`` as compressed RLE of
    the mask thresholded at ``mask_threshold``."""
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu()
    if not len(boxes):
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    results = []
    masks = None
    if "masks" in output:
        binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy()  # [N, H, W]
        masks = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for k in range(len(scores)):
        result = {"image_id": int(image_id), "category_id": int(category_ids[labels[k] - 1]),
                  "bbox": [float(v) for v in xywh[k]], "score": float(scores[k])}
        if masks is not None:
            result["segmentation"] = {"size": [int(v) for v in masks[k]["size"]],
                                      "counts": masks[k]["counts"].decode("ascii")}
        results.append(result)
    return results


def coco_scores(gt: Any, results: list[dict[str, Any]], image_ids: list[int],
                kinds: tuple[str, ...] = ("bbox", "segm")) -> tuple[dict[str, float | None], str]:
    """COCOeval of ``results`` against the ``gt`` COCO object over ``image_ids``: the metrics
    (``box_ap``, ``box_ap50``, ..., ``mask_apl``, in %) and COCOeval's printed summary."""
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float | None] = {}
    text = io.StringIO()
    if not results:  # pycocotools cannot load an empty result list: nothing detected scores 0
        for kind in kinds:
            metrics |= {f"{KINDS[kind]}_{s}": 0.0 for s in STATS}
        return metrics, "no detections: every AP is 0\n"
    with contextlib.redirect_stdout(text):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys (id, area) to the dicts it gets
        for kind in kinds:
            print(f"== {kind} ({'boxes' if kind == 'bbox' else 'masks'}) ==")
            ev = COCOeval(gt, dt, kind)
            ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            metrics |= {f"{KINDS[kind]}_{s}": (None if v < 0 else 100.0 * float(v)) for s, v in zip(STATS, ev.stats)}
    return metrics, text.getvalue()


@torch.no_grad()
def predict_share(model: torch.nn.Module, split: CocoSplit, rank: int, world_size: int, batch_size: int,
                  num_workers: int, device: torch.device, mask_threshold: float) -> tuple[list[dict], list[int]]:
    """This rank's share of ``split`` (images rank, rank + world, ...): COCO results and the ids scored."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    for batch in eval_batches(split, rank, world_size, batch_size, num_workers):
        images = [im.to(device, non_blocking=True).float().div_(255) for im in batch["images"]]
        for output, image_id in zip(model(images), batch["keys"]):
            results += to_coco_results(output, image_id, split.category_ids, mask_threshold)
            seen.append(int(image_id))
    model.train(was_training)
    return results, seen


def evaluate_detector(model: torch.nn.Module, split: CocoSplit, rank: int, world_size: int, batch_size: int,
                      num_workers: int, device: torch.device, mask_threshold: float = 0.5) -> dict[str, Any]:
    """Score ``split`` (every image once over the ranks; a collective): ``{"metrics", "summary",
    "detections", "images", "results"}``; the metrics on every rank, the summary and the results
    (every detection in COCO's result format, in rank order) on rank 0."""
    results, seen = predict_share(model, split, rank, world_size, batch_size, num_workers, device, mask_threshold)
    gathered = gather_to_main((results, seen))
    payload: list[Any] = [None]
    if gathered is not None:  # rank 0
        all_results = [r for share, _ in gathered for r in share]
        ids = sorted(i for _, share in gathered for i in share)
        if ids != sorted(split.image_ids.tolist()):
            raise RuntimeError(f"evaluation covered {len(ids)} images ({len(set(ids))} distinct) of the "
                               f"{len(split)} in {split.json_path.name}: each must be scored exactly once")
        metrics, summary = coco_scores(load_coco_api(split.json_path), all_results, ids)
        payload = [{"metrics": metrics, "summary": summary, "detections": len(all_results), "images": len(ids)}]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    out = dict(payload[0])
    out["results"] = all_results if gathered is not None else []
    if gathered is None:
        out["summary"] = ""
    return out
