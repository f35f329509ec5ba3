"""Fine-tuning: layer-wise lr decay, reproducible augmentation, held-out split over ranks, and real
2-rank DeepSpeed runs from a pre-training checkpoint (metrics, best export into timm, exact resume)."""

from __future__ import annotations

import copy
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from distributed import deepspeed_cmd, run
from safetensors.torch import load_file

from bootmae_ds.config import ConfigError, load_config, load_finetune_config
from bootmae_ds.data.demo import ensure_demo_shards
from bootmae_ds.data.labelled import LabelledTransform, _EvalShare, check_labels, load_images
from bootmae_ds.data.sources import TarSource
from bootmae_ds.finetune.augment import DeviceAugment
from bootmae_ds.models import ViTClassifier, build_model
from bootmae_ds.runtime.optim import layer_decay_groups

FINETUNE = ["--config", "demo", "--set", "schedule.steps_per_epoch=4", "schedule.epochs=3", "data.micro_batch_size=8",
            "data.global_batch_size=16", "data.num_workers=1", "data.val_limit=120", "logging.every_steps=1"]


def _classifier(depth: int = 3) -> ViTClassifier:
    cfg = load_config("demo", [f"model.depth={depth}"])
    return ViTClassifier(build_model(cfg).encoder, num_classes=10)


def test_layer_decay_scales_follow_beit_numbering():
    model, decay = _classifier(depth=3), 0.5
    groups = layer_decay_groups(model, decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decays = {id(p): g["apply_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in scale
            continue
        # BEiT: embeddings are layer 0, block i is layer i+1, norm and head are layer depth+1
        layer = 0 if name.split(".")[1] in ("cls_token", "pos_embed", "patch_embed") else \
            int(name.split(".")[2]) + 1 if name.startswith("encoder.blocks.") else 4
        assert scale[id(p)] == pytest.approx(decay ** (4 - layer)), name
        assert decays[id(p)] == (p.ndim > 1 and name != "encoder.cls_token"), name


def test_classifier_has_a_fresh_fc_norm_and_a_frozen_position_embedding_by_default():
    from bootmae_ds.finetune.model import build_classifier

    encoder = build_model(load_config("demo")).encoder
    with torch.no_grad():
        encoder.norm.weight.uniform_(0.5, 1.5)
        encoder.norm.bias.uniform_(-1, 1)
    pretrained = (encoder.norm.weight.clone(), encoder.norm.bias.clone())
    fresh = ViTClassifier(copy.deepcopy(encoder), num_classes=10)
    assert torch.equal(fresh.fc_norm.weight, torch.ones(96)) and torch.equal(fresh.fc_norm.bias, torch.zeros(96))
    kept = ViTClassifier(encoder, num_classes=10, fc_norm="encoder")
    assert torch.equal(kept.fc_norm.weight, pretrained[0]) and torch.equal(kept.fc_norm.bias, pretrained[1])
    # the encoder's own norm is gone from both: no parameter without a gradient in the optimizer
    for model in (fresh, kept):
        assert not any(n.startswith("encoder.norm.") for n, _ in model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = fresh.encoder(x).z[:, 1:].mean(dim=1)  # no final norm left in the encoder
        torch.testing.assert_close(fresh.forward_pooled(x), torch.nn.functional.layer_norm(tokens, (96,), eps=1e-6))
    model, _, _ = build_classifier(load_finetune_config("demo"))
    assert not model.encoder.pos_embed.requires_grad and model.encoder.cls_token.requires_grad
    trained, _, _ = build_classifier(load_finetune_config("demo", ["model.train_pos_embed=true"]))
    assert trained.encoder.pos_embed.requires_grad


def test_labelled_transform_is_a_function_of_epoch_and_key():
    source = TarSource.from_manifest(ensure_demo_shards() / "test" / "manifest.json")
    _, raw = next(source.read(0, 0, 1, lambda _: True))
    t = LabelledTransform(32, 0, load_finetune_config("demo").augment, (0.5, 0.5, 0.5))
    random.seed(123)
    before = (random.random(), np.random.get_state()[1][:4].copy(), torch.get_rng_state())
    random.seed(123)
    a, mask = t(raw.data, 0, raw.key)
    b, _ = t(raw.data, 0, raw.key)
    c, _ = t(raw.data, 1, raw.key)
    assert mask is None and a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the worker's own generators are left as they were
    assert random.random() == before[0] and torch.equal(torch.get_rng_state(), before[2])


def test_device_augment_targets_and_bad_labels():
    cfg = load_finetune_config("demo", ["augment.mixup=0", "augment.cutmix=0", "augment.reprob=0",
                                        "augment.label_smoothing=0.1"])
    aug = DeviceAugment(cfg, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x, t = aug(images, torch.tensor([0, 3, 9, 3]), list("abcd"))
    assert torch.allclose(x, images.float() / 127.5 - 1, atol=1e-6)
    expected = torch.full((4, 10), 0.01)
    expected[[0, 1, 2, 3], [0, 3, 9, 3]] = 0.91
    assert torch.allclose(t, expected)
    with pytest.raises(ValueError, match="sample c: label 10 outside 0..9"):  # on the host, before the copy
        check_labels(torch.tensor([0, 1, 10, 2]), 10, list("abcd"))
    mixing = DeviceAugment(load_finetune_config("demo"), (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    _, soft = mixing(images, torch.tensor([0, 3, 9, 3]), list("abcd"))
    assert torch.allclose(soft.sum(dim=1), torch.ones(4)) and (soft > 0.5).sum() <= 4


def test_eval_share_gives_every_image_to_exactly_one_rank_and_worker():
    source = TarSource.from_manifest(ensure_demo_shards() / "test" / "manifest.json")
    full = load_images(source, 32, crop_pct=0.875)
    seen = []
    for rank in range(3):
        share = _EvalShare(source, 32, 0.875, rank, 3, batch_size=16, limit=None)
        for worker in range(2):
            share_iter = _iter_as_worker(share, worker, 2)
            seen += [(img, int(lab)) for b in share_iter for img, lab in zip(b["images"], b["labels"])]
    assert len(seen) == len(full.labels) == source.num_samples
    assert sorted(lab for _, lab in seen) == sorted(full.labels.tolist())
    assert torch.stack([img for img, _ in seen]).sum() == full.images.sum()


def _iter_as_worker(share: _EvalShare, worker: int, workers: int):
    import torch.utils.data._utils.worker as w

    class Info:
        id, num_workers = worker, workers

    old = w._worker_info
    w._worker_info = Info()
    try:
        yield from share
    finally:
        w._worker_info = old


def test_bad_finetune_config_names_the_field():
    with pytest.raises(ConfigError, match="data.micro_batch_size=7: must be even"):
        load_finetune_config("demo", ["augment.mixup=0.8", "data.micro_batch_size=7", "data.global_batch_size=14"])
    with pytest.raises(ConfigError, match="schedule.warmup_epochs"):
        load_finetune_config("demo", ["schedule.warmup_epochs=10"])


# -- real runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(demo_pretrain_run) -> Path:
    return demo_pretrain_run


def test_cpu_ranks_leave_no_shared_memory_behind(pretrained):
    # DeepSpeed's CPU backend would leave a ~69 MB /dev/shm buffer per rank after every run
    assert json.loads((pretrained / "shm_left.json").read_text()) == []


def _finetune(out: Path, pretrained: Path, *extra: str) -> list[dict]:
    args = ["--output-dir", str(out), *FINETUNE, f"init.source={pretrained}", "init.which=momentum", *extra]
    proc = run(deepspeed_cmd("launchers/finetune.py", *args))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(pretrained, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ft") / "full"
    return out, _finetune(out, pretrained)


def test_finetune_evaluates_each_epoch_and_exports_the_best_to_timm(full_run, pretrained):
    out, rows = full_run
    assert [r["step"] for r in rows] == list(range(1, 13))
    evals = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and all("eval_ema_top1" in r for r in evals)
    best = json.loads((out / "best" / "metrics.json").read_text())
    scores = [(r[f"eval_{'' if best['which'] == 'online' else 'ema_'}top1"], r["step"]) for r in evals]
    assert best["top1"] == max(max(r["eval_top1"], r["eval_ema_top1"]) for r in evals)
    init = json.loads((out / "init.json").read_text())
    assert init["source"] == "run" and init["which"] == "momentum" and Path(init["run_dir"]) == pretrained.resolve()
    # the exported classifier, run by timm on the held-out images, scores what the run measured
    config = json.loads((out / "best" / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(load_file(out / "best" / "model.safetensors"), strict=True)
    val = load_images(TarSource.from_manifest(ensure_demo_shards() / "test" / "manifest.json"), 32, 120, 1.0)
    with torch.no_grad():
        logits = model(val.images.float() / 127.5 - 1)
    top1 = 100 * (logits.argmax(1) == val.labels).float().mean().item()
    assert top1 == pytest.approx(best["top1"], abs=1e-6), scores
    assert (out / "tensorboard").is_dir() and (out / "checkpoints" / "latest").read_text().strip() == "step_00000012"


@pytest.mark.extended  # CI: the same JobTrainer resume in test_segment_run, test_detect, test_linprobe
def test_finetune_resume_continues_exactly(full_run, pretrained, tmp_path):
    _, full = full_run
    out = tmp_path / "resumed"
    first = _finetune(out, pretrained, "--max-steps", "6")  # stops mid-epoch 2, checkpoint at step 6
    assert [r["step"] for r in first] == list(range(1, 7))
    second = _finetune(out, pretrained)
    rows = second[len(first):]
    assert [r["step"] for r in rows] == list(range(7, 13))
    for key in ("loss", "lr", "grad_norm", "eval_top1", "eval_ema_top1"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in full[6:]], key


@pytest.mark.slow
def test_labels_beyond_the_classes_stop_the_run_on_the_host_naming_the_sample(tmp_path):
    # the demo digits have 10 classes; the check runs on each batch before it goes to the device
    out = tmp_path / "bad"
    proc = run([sys.executable, "launchers/finetune.py", "--output-dir", str(out), *FINETUNE, "init.source=random",
                "model.num_classes=5"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"error: sample \S+: label [5-9] outside 0..4; set model.num_classes", proc.stderr), proc.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step_*"))


def test_config_cli_prints_and_checks_finetune_configs(capsys):
    from bootmae_ds.config.cli import main

    assert main(["--finetune", "demo", "--set", "model.num_classes=3"]) == 0
    assert "num_classes: 3" in capsys.readouterr().out
    assert main(["--finetune", "demo", "--set", "optim.layer_decay=2"]) == 2
    assert "optim.layer_decay=2" in capsys.readouterr().err
