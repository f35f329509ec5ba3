"""Detection: the recipe's values, the backbone's levels, COCO reading and its checks, flips with
boxes and masks, the resumable grouped batches, COCOeval against hand computations, and real
2-rank DeepSpeed runs from a pre-training checkpoint (metrics, RUN/best, exact resume, 2 ranks
scoring like 1, bad input with status 2)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import ROOT, cpu_env, deepspeed_cmd, run
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bootmae_ds.config import ConfigError, load_config, load_detect_config
from bootmae_ds.data.coco import CocoError, open_coco_split, read_sample
from bootmae_ds.data.demo_coco import build_demo_coco
from bootmae_ds.data.detection import batches_per_rank, epoch_batches
from bootmae_ds.detect.model import BACKBONE, PyramidFPN, build_pyramid
from bootmae_ds.evaluation.coco import coco_scores
from bootmae_ds.models import build_model
from bootmae_ds.runtime.optim import backbone_layer_decay_groups
from bootmae_ds.runtime.schedules import step_decay_lr

# pycocotools 2.0 under numpy 2 warns on every mask it decodes
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# -- the recipe ------------------------------------------------------------------------------
def test_coco_base_is_the_papers_recipe() -> None:
    """The appendix, value by value ("COCO Object Detection and Instance Segmentation")."""
    c = load_detect_config("coco_base")
    assert (c.data.min_size, c.data.max_size) == (800, 1333)  # single scale, shorter 800, longer <= 1333
    assert (c.schedule.epochs, c.schedule.decay_epochs, c.schedule.decay_factor) == (12, [8, 11], 0.1)  # 1x
    assert (c.optim.lr, c.optim.weight_decay, c.data.global_batch_size) == (4e-4, 0.05, 16)  # AdamW
    assert (c.optim.layer_decay, c.model.drop_path) == (0.75, 0.1)
    assert c.model.out_indices == (3, 5, 7, 11)  # blocks 4, 6, 8, 12
    assert c.data.micro_batch_size == 2 and c.data.grad_accum_steps(8) == 1  # 8 GPUs x 2 images
    assert c.init.config == "vit_base_800ep" and load_config(c.init.config).model.patch_size == 16
    # every other value is the default tree (the preset only spells the recipe out)
    assert c.model_dump(exclude={"data": {"root"}, "run": {"name"}}) == \
        load_detect_config("coco_base", ["data.root=demo", "run.name=detect"]).model_dump(exclude={"data": {"root"}, "run": {"name"}})
    # the lr: warm-up (mmdetection's 500 steps from 0.001), x0.1 after epochs 8 and 11
    lr = [step_decay_lr(s, 4e-4, 100, [8, 11], 0.1, 500, 0.001) for s in (0, 250, 500, 799, 800, 1099, 1100)]
    assert lr == pytest.approx([4e-7, 4e-4 * (1 - 0.5 * 0.999), 4e-4, 4e-4, 4e-5, 4e-5, 4e-6])


def test_layer_decay_of_the_detector_backbone() -> None:
    """Layer decay 0.75 over the 12 blocks: heads and FPN at the full lr, block 12 x0.75, block i
    x0.75^(13-i), the embeddings x0.75^13 (the official constructor's numbering)."""
    cfg = load_detect_config("demo", ["model.out_indices=[0,1,2,3]"])
    pre = load_config("demo")
    encoder = build_model(pre).encoder
    model = torch.nn.ModuleDict({"backbone": torch.nn.ModuleDict({"body": build_pyramid(encoder, pre, cfg)}),
                                 "roi_heads": torch.nn.Linear(4, 4)})
    scale = {id(p): g["lr_scale"] for g in backbone_layer_decay_groups(model, 4, 0.75, BACKBONE) for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["roi_heads.weight"])] == 1.0
    assert scale[id(named["backbone.body.blocks.3.mlp.fc1.weight"])] == pytest.approx(0.75)
    assert scale[id(named["backbone.body.blocks.0.attn.qkv.weight"])] == pytest.approx(0.75 ** 4)
    assert scale[id(named["backbone.body.patch_embed.proj.weight"])] == pytest.approx(0.75 ** 5)


def test_bad_detect_configs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="schedule.decay_epochs"):
        load_detect_config("coco_base", ["schedule.decay_epochs=[11, 8]"])
    with pytest.raises(ConfigError, match="model.out_indices"):
        load_detect_config("coco_base", ["model.out_indices=[5, 3, 7, 11]"])
    with pytest.raises(ConfigError, match="data.min_size"):
        load_detect_config("coco_base", ["data.min_size=1400"])


# -- the backbone ----------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [16, 4])
def test_backbone_levels_have_the_strides_and_channels(patch: int) -> None:
    """Strides 4, 8, 16, 32 (+ 64 for the RPN) of a non-square input, the encoder's width before the
    FPN, the FPN's after; the pre-training grid's position embedding resampled to the input grid."""
    pre = load_config("demo", ["model.depth=4", f"model.patch_size={patch}", "model.img_size=64", "mask.num_masked=8"])
    cfg = load_detect_config("demo", ["model.fpn_channels=24"])
    backbone = PyramidFPN(build_pyramid(build_model(pre).encoder, pre, cfg), 24).eval()
    images = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        levels = backbone.body(images)
        out = backbone(images)
    assert [tuple(f.shape) for f in levels] == [(2, 96, 128 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert list(out) == ["0", "1", "2", "3", "pool"] and backbone.strides == (4, 8, 16, 32, 64)
    sizes = [(128 // s, 96 // s) for s in (4, 8, 16, 32)] + [(2, 2)]  # the fifth: max-pool(1, stride 2) of 4x3
    assert [tuple(f.shape) for f in out.values()] == [(2, 24, *hw) for hw in sizes]
    assert backbone.body.grid_size == (64 // patch,) * 2  # tables and position embedding of pre-training


def test_memory_on_paper_of_global_and_windowed_attention() -> None:
    """docs/detection.md's table: 1333x800 padded to 1344x800 is 50 x 84 = 4,200 patches (4,201 tokens); a
    global ViT-B block keeps a [12, 4201, 4201] bf16 bias; windows of 14 pad the grid to 56 x 84."""
    from bootmae_ds.detect.memory import VIT_B, VIT_L, activation_bytes, padded_grid

    grid = padded_grid(800, 1333)
    assert grid == (50, 84)
    b_global = activation_bytes(VIT_B, grid, 2)
    assert b_global["bias"] == 12 * 2 * 12 * 4201**2 and b_global["index"] == 8 * 4201**2
    assert b_global["tokens"] == 12 * (40 * 4201 * 2 * 768 + 4 * 12 * 4201 * 2)
    b_window = activation_bytes(VIT_B, grid, 2, window=14, global_blocks=4)
    assert b_window["tokens"] == 4 * (40 * 4201 * 2 * 768 + 4 * 12 * 4201 * 2) + 8 * (40 * 4704 * 2 * 768 + 4 * 12 * 4704 * 2)
    assert [round(x["total"] / 1e9, 1) for x in (b_global, b_window)] == [8.3, 5.2]
    large = [activation_bytes(VIT_L, grid, 2), activation_bytes(VIT_L, grid, 2, window=14, global_blocks=4)]
    assert [round(x["total"] / 1e9, 1) for x in large] == [22.0, 11.5]


def test_detector_starts_from_an_export_or_an_mae_style_file(demo_pretrain_run, tmp_path: Path) -> None:
    """Every init source: an export directory (its config.json gives the architecture and mean/std)
    and the same weights as an MAE-style .pth (init.config gives the architecture) carry the run's
    encoder into the backbone bit for bit."""
    from safetensors.torch import load_file

    from bootmae_ds.detect.model import build_detector
    from bootmae_ds.interop.encoders import from_run
    from bootmae_ds.interop.export import write_export

    exp = from_run(demo_pretrain_run)
    write_export(exp, tmp_path / "export")
    torch.save({"model": load_file(str(tmp_path / "export" / "model.safetensors")), "epoch": 3}, tmp_path / "mae.pth")
    for source, extra in ((tmp_path / "export", []), (tmp_path / "mae.pth", [f"init.config={demo_pretrain_run / 'config.yaml'}"])):
        cfg = load_detect_config("demo", [f"init.source={source}", "model.out_indices=[0,0,1,1]", *extra])
        model, pre, provenance = build_detector(cfg, 10)
        body = model.backbone.body.state_dict()
        assert all(torch.equal(v, body[k]) for k, v in exp.encoder.state_dict().items() if k.startswith("blocks.")
                   and not k.endswith("relative_position_index"))
        assert provenance["source"] == ("export" if source.is_dir() else "timm")
        assert pre.data.mean == ((0.5,) * 3 if source.is_dir() else (0.485, 0.456, 0.406))


# -- the demo COCO set and reading ----------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return build_demo_coco(tmp_path_factory.mktemp("cache") / "coco-digits-v1")


def test_demo_json_passes_pycocotools(demo_root: Path) -> None:
    for split in ("train", "val"):
        coco = COCO(str(demo_root / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.cats) == list(range(1, 11)) and len(coco.imgs) in (480, 120)
        for ann in coco.anns.values():
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert mask.sum() == ann["area"] > 0
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (demo_root / split / coco.imgs[ann["image_id"]]["file_name"]).is_file()
        empty = [i for i in coco.imgs if not coco.getAnnIds(imgIds=i)]
        assert empty  # canvases without digits: training drops them, evaluation keeps them
        used = open_coco_split(demo_root, split, train=split == "train")
        assert len(used) == len(coco.imgs) - (len(empty) if split == "train" else 0)


def test_flip_moves_boxes_and_masks_with_the_image(demo_root: Path) -> None:
    split = open_coco_split(demo_root, "train", train=True)
    plain = read_sample(split, 5, epoch=0, seed=0, hflip=0.0)
    flipped = read_sample(split, 5, epoch=0, seed=0, hflip=1.0)
    W = plain["image"].shape[2]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["target"]["masks"], plain["target"]["masks"].flip(-1))
    box = plain["target"]["boxes"]
    assert torch.equal(flipped["target"]["boxes"], torch.stack([W - box[:, 2], box[:, 1], W - box[:, 0], box[:, 3]], 1))
    for mask, b in zip(flipped["target"]["masks"], flipped["target"]["boxes"]):  # the box still frames its mask
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    # the draw is a function of (seed, epoch, image): the same twice, about half of the images, another per epoch
    draws = [[read_sample(split, i, e, 0, 0.5)["image"].equal(read_sample(split, i, e, 0, 0.0)["image"])
              for i in range(40)] for e in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2] and 10 < sum(draws[0]) < 30


def test_epoch_batches_are_disjoint_equal_and_of_one_orientation() -> None:
    flags = (np.random.default_rng(0).random(103) < 0.7).astype(np.uint8)
    for world, batch in ((1, 2), (3, 2), (4, 3)):
        per_rank = [epoch_batches(flags, 0, 5, world, r, batch, group=True) for r in range(world)]
        flat = [int(i) for rank in per_rank for b in rank for i in b]
        assert len(flat) == len(set(flat))  # each image at most once per epoch
        assert all(len(rank) == batches_per_rank(flags, world, batch, True) for rank in per_rank)
        assert all(len(set(flags[b])) == 1 and len(b) == batch for rank in per_rank for b in rank)
        assert len(flat) > len(flags) - world * batch * 2  # only the remainders are left out
    a, b = (epoch_batches(flags, 0, e, 2, 1, 2, True) for e in (5, 6))
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(flags, 0, 5, 2, 1, 2, True)]
    assert [x.tolist() for x in a] != [x.tolist() for x in b]


# -- bad input -----------------------------------------------------------------------------------
def _tiny_coco(root: Path, *, image_file: bool = True, bbox=(2.0, 3.0, 10.0, 12.0), category: int = 7) -> Path:
    """A one-image COCO directory (split 'train') with one polygon annotation."""
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    if image_file:
        from PIL import Image

        Image.new("RGB", (32, 24), (40, 50, 60)).save(root / "train" / "a.png")
    x, y, w, h = bbox
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": category, "bbox": list(bbox), "area": w * h,
                             "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}],
            "categories": [{"id": 7, "name": "thing"}, {"id": 3, "name": "other"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return root


def test_coco_reading_labels_and_polygons(tmp_path: Path) -> None:
    split = open_coco_split(_tiny_coco(tmp_path / "ok"), "train", train=True)
    sample = read_sample(split, 0, 0, 0, 0.0)
    assert split.category_ids == [3, 7] and sample["target"]["labels"].tolist() == [2]  # id 7 -> label 2
    assert sample["target"]["boxes"].tolist() == [[2.0, 3.0, 12.0, 15.0]]
    assert sample["target"]["masks"].sum() == 120 and sample["image"].shape == (3, 24, 32)


@pytest.mark.parametrize("fault, expected", [
    ({"image_file": False}, r"image 1 names .*a\.png, which does not exist"),
    ({"bbox": (25.0, 3.0, 10.0, 12.0)}, r"annotation 9 \(image 1, a\.png\) has bbox .* outside its 32x24 image"),
    ({"category": 99}, r"annotation 9 .* category_id 99, which is not among the categories \[3, 7\]"),
])
def test_bad_coco_is_named(tmp_path: Path, fault: dict, expected: str) -> None:
    with pytest.raises(CocoError, match=expected):
        open_coco_split(_tiny_coco(tmp_path / "bad", **fault), "train", train=True)


def test_launcher_refuses_bad_coco_with_status_2_and_keeps_everything(tmp_path: Path) -> None:
    root = _tiny_coco(tmp_path / "coco", category=99)
    (root / "annotations" / "instances_val.json").write_text((root / "annotations" / "instances_train.json").read_text())
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run's file
    proc = subprocess.run([sys.executable, "launchers/detect.py", "--config", "demo", "--output-dir", str(run_dir),
                           "--set", f"data.root={root}", "data.val=train"], check=False, cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "category_id 99" in errors[0] and "instances_train.json" in errors[0]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"] and (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


# -- COCOeval -------------------------------------------------------------------------------------
def _gt_api(boxes: list[tuple[int, list[float]]], size: int = 40) -> COCO:
    """Ground truth: one square mask per (image id, [x, y, w, h]) on size x size images, category 1."""
    anns, images = [], sorted({i for i, _ in boxes})
    for k, (image_id, (x, y, w, h)) in enumerate(boxes):
        mask = np.zeros((size, size), dtype=np.uint8, order="F")
        mask[int(y):int(y + h), int(x):int(x + w)] = 1
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": k + 1, "image_id": image_id, "category_id": 1, "bbox": [x, y, w, h], "area": w * h,
                     "iscrowd": 0, "segmentation": rle})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": size, "height": size} for i in images], "annotations": anns,
                    "categories": [{"id": 1, "name": "thing"}]}
    coco.createIndex()
    return coco


def test_coco_eval_of_the_ground_truth_is_a_perfect_score(demo_root: Path) -> None:
    from bootmae_ds.data.coco import load_coco_api

    gt = load_coco_api(demo_root / "annotations" / "instances_val.json")
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt.anns.values()]
    before = copy.deepcopy(results)
    metrics, summary = coco_scores(gt, results, sorted(gt.imgs))
    assert results == before  # scored, not changed
    assert metrics["box_ap"] == metrics["mask_ap"] == metrics["box_ap50"] == metrics["mask_ap75"] == 100.0
    assert metrics["box_apm"] is None  # no object of COCO's medium size on 64 px canvases: COCOeval's -1
    assert "Average Precision" in summary and "== segm (masks) ==" in summary


def test_coco_eval_of_shifted_boxes_matches_a_hand_computation() -> None:
    """Image 1: a 10x10 object and a detection shifted 2 px: IoU 80/120 = 0.667, so it matches at
    the IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of 10). Image 2: an object nobody detects. At a
    matching threshold precision is 1 up to recall 0.5: 51 of COCO's 101 recall points, so AP =
    4/10 x 51/101, AP50 = 51/101, AP75 = 0."""
    gt = _gt_api([(1, [10.0, 10.0, 10.0, 10.0]), (2, [5.0, 5.0, 10.0, 10.0])])
    shifted = {"image_id": 1, "category_id": 1, "bbox": [12.0, 10.0, 10.0, 10.0], "score": 0.9}
    metrics, _ = coco_scores(gt, [shifted], [1, 2], kinds=("bbox",))
    assert metrics["box_ap"] == pytest.approx(100 * 4 / 10 * 51 / 101)
    assert metrics["box_ap50"] == pytest.approx(100 * 51 / 101) and metrics["box_ap75"] == 0.0
    assert metrics["box_aps"] == pytest.approx(metrics["box_ap"]) and metrics["box_apl"] is None  # 100 px^2: small
    nothing, text = coco_scores(gt, [], [1, 2])
    assert nothing["box_ap"] == nothing["mask_ap"] == 0.0 and "no detections" in text
    assert math.isclose(4 / 10 * 51 / 101, 0.20198, abs_tol=1e-5)


# -- real runs ---------------------------------------------------------------------------------
# From the session's 2-block demo pre-training run: both pyramid levels of a block pair share it.
TINY = ["model.out_indices=[0,0,1,1]", "model.fpn_channels=16", "model.roi.box_head_dim=32",
        "model.roi.mask_head_channels=16", "model.roi.batch_size_per_image=32", "model.rpn.batch_size_per_image=32",
        "model.rpn.pre_nms_top_n_train=200", "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_train=50",
        "model.rpn.post_nms_top_n_test=50", "model.roi.detections_per_image=20", "data.micro_batch_size=2",
        "data.global_batch_size=4", "data.num_workers=1", "data.val_limit=12", "data.eval_batch_size=1",
        "data.hflip=0.5", "schedule.steps_per_epoch=2", "schedule.epochs=3", "schedule.decay_epochs=[2]",
        "schedule.warmup_steps=2", "logging.every_steps=1"]


def _detect(out: Path, pretrained: Path, cache: Path, *extra: str) -> list[dict]:
    args = ["--output-dir", str(out), "--config", "demo", *extra, "--set", *TINY, f"init.source={pretrained}",
            f"data.cache_dir={cache}"]
    proc = run(deepspeed_cmd("launchers/detect.py", *args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(demo_pretrain_run, demo_root, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("det") / "full"
    return out, _detect(out, demo_pretrain_run, demo_root.parent)


@pytest.mark.slow
def test_detection_run_scores_every_epoch_and_keeps_the_best(full_run, demo_pretrain_run) -> None:
    out, rows = full_run
    assert [r["step"] for r in rows] == list(range(1, 7))
    evals = [r for r in rows if "eval_box_ap" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["eval_images"] == 12 for r in evals)
    assert all(f"eval_{k}_{s}" in r for r in evals for k in ("box", "mask") for s in ("ap", "ap50", "ap75", "aps"))
    assert all(k in rows[0] for k in ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "lr"))
    assert rows[0]["lr"] == pytest.approx(4e-4 * 0.001) and rows[4]["lr"] == pytest.approx(4e-5)  # warm-up, decay
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["eval_box_ap"] == max(r["eval_box_ap"] for r in evals) == evals[-1]["best_box_ap"]
    assert Path(json.loads((out / "init.json").read_text())["run_dir"]) == demo_pretrain_run.resolve()
    summary = (out / "eval" / "step_00000006.txt").read_text()
    assert summary.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2  # bbox and segm
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.slow
def test_one_rank_scores_the_best_detector_like_the_two_ranks_did(full_run, demo_root) -> None:
    """RUN/best loads on its own (no run, no init source), and one process scoring the validation
    images gives what the two ranks measured, each image once."""
    from bootmae_ds.detect.best import load_best
    from bootmae_ds.evaluation.coco import evaluate_detector

    out, _ = full_run
    best = json.loads((out / "best" / "metrics.json").read_text())
    model, cfg, categories = load_best(out / "best")
    assert [c["id"] for c in categories] == list(range(1, 11))
    split = open_coco_split(demo_root, cfg.data.val, train=False, limit=cfg.data.val_limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        scores = evaluate_detector(model, split, 0, 1, 1, 0, torch.device("cpu"), cfg.model.roi.mask_threshold)
    finally:
        torch.set_num_threads(threads)
    assert scores["images"] == 12

    def ordered(results: list[dict]) -> list[dict]:  # the ranks' shares come in rank order
        return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["bbox"]))

    two_ranks = json.loads((out / "best" / "detections.json").read_text())
    assert len(two_ranks) > 12 and ordered(scores["results"]) == ordered(two_ranks)  # boxes, scores, RLE masks
    assert {f"eval_{k}": v for k, v in scores["metrics"].items()} == {k: best[k] for k in best if k.startswith("eval_")}


@pytest.mark.slow
def test_detection_resume_continues_exactly(full_run, demo_pretrain_run, demo_root, tmp_path) -> None:
    _, full = full_run
    out = tmp_path / "resumed"
    first = _detect(out, demo_pretrain_run, demo_root.parent, "--max-steps", "3")  # stops mid-epoch 2
    assert [r["step"] for r in first] == [1, 2, 3]
    rows = _detect(out, demo_pretrain_run, demo_root.parent)[len(first):]
    assert [r["step"] for r in rows] == [4, 5, 6]
    keys = ("loss", "loss_classifier", "loss_mask", "loss_objectness", "lr", "grad_norm", "eval_box_ap", "eval_mask_ap")
    for key in keys:  # bitwise: the data position, flips, drop path and proposal sampling all continue
        assert [r.get(key) for r in rows] == [r.get(key) for r in full[3:]], key


def test_config_cli_prints_and_checks_detect_configs(capsys) -> None:
    from bootmae_ds.config.cli import main

    assert main(["--detect", "demo", "--set", "model.fpn_channels=32"]) == 0
    assert "fpn_channels: 32" in capsys.readouterr().out
    assert main(["--detect", "coco_base", "--set", "optim.layer_decay=2"]) == 2
    assert "optim.layer_decay=2" in capsys.readouterr().err
    assert main(["--detect", "--describe"]) == 0 and "model.rpn.post_nms_top_n_train" in capsys.readouterr().out


def test_unreadable_images_are_replaced_within_the_batch_and_counted(tmp_path: Path) -> None:
    """A damaged file's slot takes the next readable image of its micro-batch; a batch of only
    damaged files takes readable images of later batches: counted, named, and the same every time."""
    from PIL import Image

    from bootmae_ds.data.detection import DetectionDataset

    root = tmp_path / "coco"
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, 7):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(root / "train" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0,
                     "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]})
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    split = open_coco_split(root, "train", train=True)
    data = DetectionDataset(split, rank=0, world_size=1, workers=1, batch_size=2, seed=0, hflip=0.5, group=True)
    plan = epoch_batches(split.flags, 0, 0, 1, 0, 2, True)
    first, second = (split.record(int(i))["file_name"] for i in plan[0])
    (root / "train" / first).write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    batches = list(data)
    assert batches[0]["corrupt"] == 1 and batches[0]["filled"] == 0 and batches[0]["damaged_shards"] == [first]
    assert batches[0]["keys"] == [split.record(int(plan[0][1]))["id"]] * 2
    (root / "train" / second).write_bytes(b"")
    again = list(data)
    assert again[0]["corrupt"] == 2 and again[0]["filled"] == 2
    assert again[0]["keys"] == [split.record(int(i))["id"] for i in plan[1]]  # the next batch's images
    assert [b["keys"] for b in again] == [b["keys"] for b in list(data)]
