"""Linear probing: the head learns what is linearly separable, features come from the chosen block."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config
from distributed import run

from bootmae_ds.data.labelled import LabelledImages
from bootmae_ds.evaluation.knn import extract_features
from bootmae_ds.evaluation.linprobe import ProbeSettings, probe_accuracy, train_probe
from bootmae_ds.models import build_model


def _blobs(n: int, seed: int, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(centers), (n,), generator=g)
    return centers[labels] + 0.5 * torch.randn(n, centers.shape[1], generator=g), labels


def test_probe_separates_separable_features_and_not_random_labels() -> None:
    centers = torch.randn(4, 12, generator=torch.Generator().manual_seed(0)) * 3
    x, y = _blobs(400, 1, centers)
    xv, yv = _blobs(200, 2, centers)
    settings = ProbeSettings(epochs=30, batch_size=64)
    assert probe_accuracy(train_probe(x, y, 4, settings), xv, yv)["top1"] > 97
    noise = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(3))
    assert probe_accuracy(train_probe(x, noise, 4, settings), xv, yv)["top1"] < 50


def test_block_features_pool_the_requested_block() -> None:
    cfg = tiny_config()
    encoder = build_model(cfg).encoder
    data = LabelledImages(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    x = (data.images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        out = encoder(x, None, return_blocks=(1,))
        last = encoder.forward_features(x)
    torch.testing.assert_close(extract_features(encoder, data.images, cfg.data.mean, cfg.data.std, block=2),
                               out.block_outputs[1][:, 1:].mean(dim=1))
    torch.testing.assert_close(extract_features(encoder, data.images, cfg.data.mean, cfg.data.std, block=None),
                               last[:, 1:].mean(dim=1))


def test_cli_random_init_and_bad_block() -> None:
    proc = run(["python", "launchers/linprobe.py", "--random-init", "--config", "demo", "--epochs", "10", "--batch-size", "64",
                "--train-limit", "400", "--val-limit", "200"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 50 < result["top1"] <= result["top5"] <= 100  # 10 classes: far above chance (10%)
    bad = run(["python", "launchers/linprobe.py", "--random-init", "--config", "demo", "--block", "9"])
    assert bad.returncode == 2 and "--block 9" in bad.stderr and "Traceback" not in bad.stderr
