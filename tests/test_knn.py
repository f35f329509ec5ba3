"""k-NN monitor: the vote against a brute-force reference; features and images end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from bootmae_ds.data.labelled import eval_transform
from bootmae_ds.evaluation.knn import extract_features, knn_accuracy, knn_predict
from bootmae_ds.models import build_model


def _brute_force(bank, bank_labels, queries, k, temperature, num_classes):
    """Sort every similarity by hand, vote with exp(sim / T) over the k nearest."""
    out = []
    for q in queries.tolist():
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for i, b in enumerate(bank.tolist()):
            bn = math.sqrt(sum(v * v for v in b))
            sims.append((sum(x * y for x, y in zip(q, b)) / (qn * bn), i))
        sims.sort(reverse=True)
        votes = [0.0] * num_classes
        for sim, i in sims[:k]:
            votes[int(bank_labels[i])] += math.exp(sim / temperature)
        out.append(votes)
    return torch.tensor(out)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 1.0)])
def test_weighted_vote_matches_brute_force(k, temperature) -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_predict(bank, labels, queries, k=k, temperature=temperature, num_classes=4, chunk=7)
    ref = _brute_force(bank, labels, queries, k, temperature, 4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_accuracy_on_separable_and_random_labels() -> None:
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 16, generator=g) * 5
    labels = torch.arange(5).repeat_interleave(40)
    bank = centers[labels] + torch.randn(200, 16, generator=g)
    q_labels = torch.arange(5).repeat_interleave(10)
    queries = centers[q_labels] + torch.randn(50, 16, generator=g)
    assert knn_accuracy(bank, labels, queries, q_labels)["top1"] == 100.0
    shuffled = labels[torch.randperm(200, generator=g)]
    acc = knn_accuracy(bank, shuffled, queries, q_labels)
    assert acc["top1"] < 60 and acc["top5"] == 100.0  # 5 classes: top-5 always hits


def test_features_are_mean_pooled_normalised_tokens() -> None:
    cfg = tiny_config()
    encoder = build_model(cfg).encoder
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = extract_features(encoder, images, cfg.data.mean, cfg.data.std, batch_size=2)
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = encoder.forward_features(x)[:, 1:].mean(dim=1)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert encoder.training  # restored


def test_eval_transform_keeps_exact_sizes_and_centre_crops_others() -> None:
    # crop_pct 1.0 (the demo presets') keeps an image of the crop size whole; the official 0.875
    # resizes every image (32 -> 36, then the centre 32), as build_transform(is_train=False) does
    img = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 32, 32).to(torch.uint8)
    assert torch.equal(eval_transform(img, 32, 1.0), img)
    assert not torch.equal(eval_transform(img, 32), img)
    wide = torch.zeros(3, 300, 400, dtype=torch.uint8)
    assert eval_transform(wide, 224).shape == (3, 224, 224)


def test_cli_on_a_run_a_random_init_and_bad_input(demo_pretrain_run, tmp_path) -> None:
    import json

    from distributed import run

    # the shared 2-rank run: its momentum encoder is consolidated from both ranks' shards
    for args in ([str(demo_pretrain_run), "--which", "momentum"], ["--random-init", "--config", "demo"]):
        proc = run(["python", "launchers/knn.py", *args, "--bank-limit", "300", "--query-limit", "100"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert 10 < result["top1"] <= result["top5"] <= 100  # 10 digit classes: far above chance
    bad = run(["python", "launchers/knn.py", str(tmp_path / "nope")])
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.extended  # CI: features gathered over ranks in test_linprobe; 2 ranks score like 1 in segment/detect
def test_distributed_knn_equals_one_process(tmp_path) -> None:
    import json

    from distributed import deepspeed_cmd, run

    from bootmae_ds.data.demo import ensure_demo_shards
    from bootmae_ds.data.labelled import load_images
    from bootmae_ds.data.sources import TarSource

    args = ["--random-init", "--config", "demo", "--num-workers", "1", "--batch-size", "128"]
    one = run(["python", "launchers/knn.py", *args, "--save-features", str(tmp_path / "one.pt")])
    two = run(deepspeed_cmd("launchers/knn.py", *args, "--save-features", str(tmp_path / "two.pt")))
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stdout[-3000:]
    r1, r2 = (json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("{")))
              for p in (one, two))
    assert (r1["ranks"], r2["ranks"]) == (1, 2) and r1["bank_size"] == r2["bank_size"] == 1500
    assert (r1["top1"], r1["top5"]) == (r2["top1"], r2["top5"])
    f1, f2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key in ("bank_labels", "query_labels"):
        assert torch.equal(f1[key], f2[key]), key
    for key in ("bank", "queries"):
        torch.testing.assert_close(f1[key], f2[key], rtol=1e-5, atol=1e-5)
    # and they are the monitor's features of the same encoder, images in shard order
    cfg = tiny_config()
    torch.manual_seed(cfg.run.seed)
    encoder = build_model(cfg).encoder
    bank = load_images(TarSource.from_manifest(ensure_demo_shards() / "train" / "manifest.json"), 32, crop_pct=1.0)
    assert torch.equal(f2["bank_labels"], bank.labels)
    expected = extract_features(encoder, bank.images, cfg.data.mean, cfg.data.std)
    torch.testing.assert_close(f2["bank"], expected, rtol=1e-5, atol=1e-5)
