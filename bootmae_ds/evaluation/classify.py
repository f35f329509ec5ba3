"""``launchers/finetune.py`` / ``launchers/linprobe.py --eval-only --weights FILE``: score a
classifier file (a released fine-tuned BootMAE or MAE ``.pth``, a timm ViT, a run's ``RUN/best``)
on ``data.val`` as the official ``run_class_finetuning.py --eval`` does: the official evaluation
view (:func:`bootmae_ds.data.labelled.eval_transform`), every rank of the launch, each image on
exactly one rank, fp32 unless ``run.precision`` says bf16. Top-1, top-5, the mean cross-entropy
and a per-class table go to ``RUN/eval_only.{json,md}``; a known release's published top-1 is
printed beside ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import InputError, load_config
from ..data.labelled import check_labels, eval_batches, open_eval_source
from ..interop.classifiers import ClassifierFile, read_classifier
from ..runtime.run import scoring_ranks
from .features import Normalise


class EvalOnlyError(InputError, ValueError):
    """A file and a config that do not go together; the message says which setting to change."""


def _heads(cfg: Any) -> dict[int, int]:
    """{width: attention heads} of the config's pre-training architecture (when the file cannot say)."""
    try:
        m = load_config(cfg.init.config).model
    except Exception:  # noqa: BLE001 - no readable init.config: the standard ViT of the file's width
        return {}
    return {m.embed_dim: m.num_heads}


def _check(cfg: Any, file: ClassifierFile, val_classes: int | None, weights: str) -> tuple[Any, Any]:
    """The config's image size and class count against the file's; the normalisation to use."""
    if cfg.model.img_size not in (None, file.img_size):
        raise EvalOnlyError(f"{weights}: a {file.img_size} px classifier (its pos_embed grid) and model.img_size="
                            f"{cfg.model.img_size}; set model.img_size={file.img_size} (or null)")
    want, where = (val_classes, "data.val") if val_classes else (cfg.model.num_classes, "model.num_classes")
    if file.num_classes != want:
        raise EvalOnlyError(f"{weights}: its head has {file.num_classes} classes and {where} has {want}; score it "
                            f"on a set of its classes (set data.val / model.num_classes={file.num_classes})")
    mean, std = cfg.data.mean or file.mean, cfg.data.std or file.std
    if mean is None or std is None:
        raise EvalOnlyError(f"{weights}: the file does not say how its inputs are normalised; set data.mean and "
                            f"data.std (timm: the model's pretrained_cfg)")
    return tuple(mean), tuple(std)


@torch.no_grad()
def score(model: torch.nn.Module, batches, normalise: Normalise, num_classes: int,
          device: torch.device) -> dict[str, Any]:
    """Per-class [images, top-1 hits, top-5 hits] and the summed loss over every rank's share."""
    counts = torch.zeros(num_classes, 3, dtype=torch.int64, device=device)
    loss = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in batches:
        labels = batch["labels"].to(device)
        check_labels(batch["labels"], num_classes, None)
        logits = model(normalise(batch["images"])).float()
        hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
        per = torch.stack([torch.ones_like(labels), hits[:, 0].long(), hits.any(dim=1).long()], dim=1)
        counts.index_add_(0, labels, per)
        loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
    dist.all_reduce(counts)
    dist.all_reduce(loss)
    n = int(counts[:, 0].sum())
    if n == 0:
        raise EvalOnlyError("data.val: no images to score")
    c = counts.cpu()
    per_class = [{"class": k, "images": int(c[k, 0]), "top1": 100 * int(c[k, 1]) / max(int(c[k, 0]), 1),
                  "top5": 100 * int(c[k, 2]) / max(int(c[k, 0]), 1)} for k in range(num_classes)]
    return {"images": n, "top1": 100 * int(c[:, 1].sum()) / n, "top5": 100 * int(c[:, 2].sum()) / n,
            "loss": loss.item() / n, "per_class": per_class}


def _markdown(title: str, s: dict[str, Any], official: str) -> str:
    rows = "".join(f"| {r['class']} | {r.get('name', '')} | {r['images']} | {r['top1']:.2f} | {r['top5']:.2f} |\n"
                   for r in s["per_class"])
    return (f"# {title}\n\ntop-1 **{s['top1']:.2f}%**{official}, top-5 {s['top5']:.2f}%, loss {s['loss']:.4f} on "
            f"{s['images']} images\n\n| class | name | images | top-1 % | top-5 % |\n|---|---|---|---|---|\n{rows}")


def evaluate_weights(cfg: Any, run_dir: Path, weights: str | Path, crop_pct: float, ema: bool = False) -> int:
    """Score ``weights`` on ``cfg.data.val`` with the view ``crop_pct``; rank 0 writes
    ``RUN/eval_only.{json,md}`` and prints the scores. Returns the exit status."""
    file = read_classifier(weights, ema=ema, heads=_heads(cfg))  # before any process group: bad input is cheap
    source = open_eval_source(cfg.data.val, cfg)
    classes = getattr(source, "classes", None)
    mean, std = _check(cfg, file, len(classes) if classes else None, str(weights))
    with scoring_ranks(cfg.run.name) as info:
        dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32
        model = file.model.to(info.device, dtype)
        d = cfg.data
        batches = eval_batches(source, file.img_size, crop_pct, info.rank, info.world_size, d.eval_batch_size,
                               d.val_limit, min(d.num_workers, 4))
        s = score(model, batches, Normalise(mean, std, info.device, dtype), file.num_classes, info.device)
        for row, name in zip(s["per_class"], classes or []):
            row["name"] = name  # the set's class names (ImageFolder directories, a manifest's classes.json)
        if info.is_main:
            official = f" (published: {file.release[1]:.1f}%, {file.release[2]})" if file.release else ""
            title = f"{weights} ({file.layout}{', model_ema' if ema else ''}) on {cfg.data.val}"
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "eval_only.md").write_text(_markdown(title, s, official))
            record = {"weights": str(Path(weights).resolve()), "layout": file.layout, "ema": ema, "val": cfg.data.val,
                      "img_size": file.img_size, "crop_pct": crop_pct, "mean": mean, "std": std,
                      "precision": str(dtype).removeprefix("torch."), "world_size": info.world_size,
                      "published_top1": file.release[1] if file.release else None, **s}
            (run_dir / "eval_only.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"eval_top1 {s['top1']:.2f}{official}  eval_top5 {s['top5']:.2f}  eval_loss {s['loss']:.4f}  "
                  f"({s['images']} images, {info.world_size} rank(s), {file.layout} layout)", flush=True)
    return 0
