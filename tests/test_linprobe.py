"""Linear probing: LARS against a hand-written update, the official schedule, the probe's pooling,
norms and head against a plain re-computation, the block choice, the training augmentation, the
cached-feature mode, and real 2-rank DeepSpeed runs (exact resume after preemption, each held-out
image counted once, host memory independent of the training set's size)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import timm
import torch
from distributed import ROOT, cpu_env, deepspeed_cmd, run
from safetensors.torch import load_file

from bootmae_ds.config import ConfigError, load_linprobe_config
from bootmae_ds.data.demo import ensure_demo_shards
from bootmae_ds.data.labelled import load_images
from bootmae_ds.data.sources import TarSource
from bootmae_ds.evaluation.lars import LARS
from bootmae_ds.evaluation.linprobe import probe_lr, train_on_features
from bootmae_ds.linprobe.data import ProbeTransform, single_draw_crop
from bootmae_ds.linprobe.model import build_probe
from bootmae_ds.models import build_model


# -- LARS ------------------------------------------------------------------------------------
def _norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def _hand_lars(w: list[float], b: list[float], grads: list[tuple[list[float], list[float]]], lr: float, wd: float,
               momentum: float, eta: float) -> tuple[list[float], list[float]]:
    """LARS written out on Python floats: the weight's update (+ wd * w) scaled to eta * |w| / |update|,
    the bias plain, both through momentum."""
    mu_w, mu_b = [0.0] * len(w), [0.0] * len(b)
    for gw, gb in grads:
        dw = [g + wd * x for g, x in zip(gw, w)]
        pn, un = _norm(w), _norm(dw)
        q = eta * pn / un if pn > 0 and un > 0 else 1.0
        mu_w = [momentum * m + q * d for m, d in zip(mu_w, dw)]
        mu_b = [momentum * m + g for m, g in zip(mu_b, gb)]
        w = [x - lr * m for x, m in zip(w, mu_w)]
        b = [x - lr * m for x, m in zip(b, mu_b)]
    return w, b


@pytest.mark.parametrize("zero_weight", [False, True])
def test_lars_matches_a_hand_written_update(zero_weight) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(3, 4) if zero_weight else torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = w.double()
    b = torch.randn(3, generator=g, dtype=torch.float64)
    grads = [(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
             for _ in range(3)]
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = LARS([pw, pb], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    for gw, gb in grads:
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
        assert not opt.last_step_skipped
        # the gradients' global norm, left on the device for DeepSpeed's get_global_grad_norm()
        norm = opt._global_grad_norm
        assert torch.is_tensor(norm) and norm.item() == pytest.approx(_norm(gw.flatten().tolist() + gb.tolist()),
                                                                     rel=1e-12)
    hw, hb = _hand_lars(w.flatten().tolist(), b.tolist(), [(gw.flatten().tolist(), gb.tolist()) for gw, gb in grads],
                        lr=0.5, wd=0.1, momentum=0.9, eta=0.01)
    torch.testing.assert_close(pw.detach().flatten(), torch.tensor(hw, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pb.detach(), torch.tensor(hb, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the bias got no weight decay: with zero gradients it moves only by its momentum
    before = pb.detach().clone()
    pw.grad, pb.grad = torch.zeros_like(pw), torch.zeros_like(pb)
    mu_b = opt.state[pb]["mu"].clone()
    opt.step()
    torch.testing.assert_close(pb.detach(), before - 0.5 * 0.9 * mu_b)


def test_lars_skips_a_non_finite_step_entirely() -> None:
    pw, pb = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = LARS([pw, pb], lr=1.0)
    pw.grad, pb.grad = torch.ones(2, 2), torch.ones(2)
    opt.step()
    state = (pw.detach().clone(), pb.detach().clone(), opt.state[pw]["mu"].clone())
    pw.grad, pb.grad = torch.full((2, 2), float("nan")), torch.ones(2)
    opt.step()
    assert opt.last_step_skipped
    assert torch.equal(pw, state[0]) and torch.equal(pb, state[1]) and torch.equal(opt.state[pw]["mu"], state[2])


def test_schedule_is_maes_per_step_warmup_and_cosine() -> None:
    # 4 steps per epoch, 2 warm-up epochs of 10, peak 1, floor 0.1: the formula by hand
    lr = [probe_lr(s, 4, 1.0, 0.1, 2, 10) for s in (0, 1, 4, 8, 24, 39)]
    assert lr[:4] == [0.0, 1 / 8, 0.5, 1.0]
    assert lr[4] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr[5] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (39 / 4 - 2) / 8)))


# -- the probe -------------------------------------------------------------------------------
def test_probe_pools_the_chosen_block_and_normalises_without_affine() -> None:
    cfg = load_linprobe_config("demo", ["model.depth=2"])
    probe, pre, _ = build_probe(cfg)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.linear.weight", "head.linear.bias"]
    assert len(probe.encoder.blocks) == 2
    torch.manual_seed(cfg.run.seed)
    full = build_model(pre).encoder.eval()  # the same random init, all 4 blocks
    head = probe.head.eval()
    with torch.no_grad():
        head.bn.running_mean.uniform_(-1, 1)
        head.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        tokens = full(x, None, return_blocks=(1,)).block_outputs[1]  # block 2, before any norm
        pooled = tokens[:, 1:].mean(dim=1)
        mean, var = pooled.mean(dim=1, keepdim=True), pooled.var(dim=1, unbiased=False, keepdim=True)
        normed = (pooled - mean) / torch.sqrt(var + 1e-6)  # LayerNorm, no affine
        bn = (normed - head.bn.running_mean) / torch.sqrt(head.bn.running_var + 1e-6)  # BatchNorm, no affine
        expected = bn @ head.linear.weight.T + head.linear.bias
        torch.testing.assert_close(probe.forward_pooled(x), normed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probe(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.folded()(normed), expected, rtol=1e-5, atol=1e-5)
        # another block is another feature
        deeper, _, _ = build_probe(load_linprobe_config("demo", ["model.depth=3"]))
        assert not torch.allclose(deeper.forward_pooled(x), normed, atol=1e-3)
    with pytest.raises(ConfigError, match=r"model.depth=5: .* has 4 blocks"):
        build_probe(load_linprobe_config("demo", ["model.depth=5"]))


def test_head_weights_start_as_the_official_probe() -> None:
    probe, _, _ = build_probe(load_linprobe_config("vit_base", ["init.config=demo", "model.depth=4"]))
    w = probe.head.linear.weight
    assert w.std().item() == pytest.approx(0.01, rel=0.2) and torch.count_nonzero(probe.head.linear.bias) == 0
    assert not probe.head.bn.affine and probe.head.bn.eps == 1e-6
    assert torch.equal(probe.fc_norm.weight, torch.ones(96)) and torch.equal(probe.fc_norm.bias, torch.zeros(96))


def test_training_crop_is_one_draw_and_a_function_of_epoch_and_key() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = [single_draw_crop(g, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    assert all(0 <= t and 0 <= left and 0 < h <= 30 and 0 < w <= 40 and t + h <= 30 and left + w <= 40
               for t, left, h, w in boxes)
    # one draw, clamped to the image: large areas with a tall aspect hit the full height, which
    # torchvision's 10-try loop would have rejected and redrawn instead
    assert any(h == 30 for _, _, h, _ in boxes)
    areas = [h * w / 1200 for _, _, h, w in boxes]
    assert min(areas) < 0.1 and max(areas) > 0.9
    source = TarSource.from_manifest(ensure_demo_shards() / "test" / "manifest.json")
    _, raw = next(source.read(0, 0, 1, lambda _: True))
    t = ProbeTransform(32, seed=0)
    a, mask = t(raw.data, 0, raw.key)
    assert mask is None and a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, t(raw.data, 0, raw.key)[0]) and not torch.equal(a, t(raw.data, 1, raw.key)[0])


def test_cached_training_learns_separable_features_and_not_random_labels() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 12, generator=g) * 3
    labels = torch.randint(0, 4, (600,), generator=g)
    x = centers[labels] + 0.5 * torch.randn(600, 12, generator=g)
    xv, yv = x[400:], labels[400:]
    # LARS moves the weight by about lr x 0.001 of its norm per step (x10 through momentum): 60
    # steps need the large lr (20) that the official 7,000 steps at lr 6.4 do not
    kw = {"epochs": 20, "warmup_epochs": 2, "global_batch": 128, "micro_batch": 64, "base_lr": 40.0}
    head = train_on_features(x[:400], labels[:400], 4, **kw)
    assert (head(xv).argmax(1) == yv).float().mean() > 0.97
    noise = torch.randint(0, 4, (400,), generator=g)
    assert (train_on_features(x[:400], noise, 4, **kw)(xv).argmax(1) == yv).float().mean() < 0.5


# -- launcher runs -----------------------------------------------------------------------------
# 3 steps per epoch over synthetic images (labels i % 10), evaluation on 150 demo test digits.
PROBE = ["--config", "demo", "--set", "data.train=synthetic", "schedule.steps_per_epoch=3", "schedule.epochs=4",
         "schedule.warmup_epochs=1", "eval.every_epochs=1", "optim.base_lr=8", "data.micro_batch_size=8",
         "data.global_batch_size=32", "data.num_workers=1", "data.val_limit=150", "data.eval_batch_size=32",
         "logging.every_steps=1", "checkpoint.every_steps=1000"]


class TreeMemory:
    """Samples the summed resident memory of a process and all its descendants (ranks, loader
    workers) every 50 ms; ``peak`` is the largest sum seen."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    total += p.memory_info().rss
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _probe(out: Path, *extra: str, samples: int = 10_000, memory: bool = False) -> tuple[int, str, int]:
    cmd = deepspeed_cmd("launchers/linprobe.py", "--output-dir", str(out), *PROBE, f"data.num_samples={samples}",
                        *extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeMemory(proc.pid) if memory else None
    log, _ = proc.communicate(timeout=400)
    return proc.returncode, log, sampler.stop() if sampler else 0


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, list[dict], int]:
    out = tmp_path_factory.mktemp("lp") / "full"
    status, log, peak = _probe(out, memory=True)
    assert status == 0, log[-3000:]
    return out, _rows(out), peak


def test_probe_run_evaluates_every_image_once_and_exports_the_best_to_timm(full_run) -> None:
    out, rows, _ = full_run
    assert [r["step"] for r in rows] == list(range(1, 13))
    evals = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12] and all(r["eval_images"] == 150 for r in evals)
    assert [r["lr"] for r in rows[:4]] == [probe_lr(s, 3, 8 * 32 / 256, 0.0, 1, 4) for s in range(4)]
    # the head's real gradient norm (LARS computes it; DeepSpeed computes none without clipping)
    norms = [r["grad_norm"] for r in rows]
    assert all(0 < n < float("inf") for n in norms) and len(set(norms)) == len(norms), norms
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["top1"] == max(r["eval_top1"] for r in evals) and best["depth"] == 4
    # the exported probe, run by timm on the same 150 images on one process, scores what the two
    # ranks measured together: every image was counted, and counted once
    config = json.loads((out / "best" / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(load_file(out / "best" / "model.safetensors"), strict=True)
    val = load_images(TarSource.from_manifest(ensure_demo_shards() / "test" / "manifest.json"), 32, 150, 1.0)
    with torch.no_grad():
        logits = model(val.images.float() / 127.5 - 1)
    top1 = 100 * (logits.argmax(1) == val.labels).float().mean().item()
    assert top1 == pytest.approx(best["top1"], abs=1e-6)
    assert (out / "tensorboard").is_dir() and (out / "checkpoints" / "latest").read_text().strip() == "step_00000012"


# CI: the same JobTrainer.train resume in test_detect (a transfer job), test_pretrain (bf16, engine
# states compared) and test_slurm (SIGUSR1 -> 75 -> requeue; SIGTERM takes the same handler,
# runtime.run.Preemption); ~35 s on 2 cores.
@pytest.mark.extended
def test_probe_resumes_exactly_after_preemption(full_run, tmp_path) -> None:
    _, full, _ = full_run
    out = tmp_path / "preempted"
    cmd = deepspeed_cmd("launchers/linprobe.py", "--output-dir", str(out), *PROBE, "data.num_samples=10000")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(_rows(out)) >= 1):
            time.sleep(0.05)
        trainers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "--local_rank" in " ".join(p.cmdline())]  # ranks and their data workers
        ranks = [p for p in trainers if p.ppid() not in {t.pid for t in trainers}]
        assert len(ranks) == 2
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75 and "preempted: checkpoint saved at step" in log, log[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 1 <= saved < 12 and _rows(out)[-1]["step"] == saved
    status, log, _ = _probe(out)
    assert status == 0 and f"resumed from {out / 'checkpoints' / f'step_{saved:08d}'}" in log, log[-3000:]
    rows = _rows(out)[saved:]
    assert [r["step"] for r in rows] == list(range(saved + 1, 13))
    for key in ("loss", "lr", "eval_top1", "eval_loss"):
        assert [r.get(key) for r in rows] == [r.get(key) for r in full[saved:]], key  # bitwise


def test_probe_memory_does_not_grow_with_the_training_set(full_run, tmp_path) -> None:
    # The same run over a training set 4x larger. Held in memory, the extra 30,000 images would
    # add 92 MB decoded at 32 px (4.5 GB at 224 px); a streaming probe adds only the loader's
    # per-position bookkeeping. The summed RSS of the ranks and workers varies by about 8 MB
    # between identical runs.
    _, _, small = full_run
    status, log, large = _probe(tmp_path / "large", samples=40_000, memory=True)
    assert status == 0, log[-3000:]
    print(f"peak RSS of the process tree: {small / 2**20:.1f} MiB (10,000 images), {large / 2**20:.1f} MiB (40,000)")
    assert large - small < 25 * 2**20, (small / 2**20, large / 2**20)


def test_cached_features_mode_and_bad_input(tmp_path) -> None:
    out = tmp_path / "cached"
    proc = run(["python", "launchers/linprobe.py", "--cached-features", "--config", "demo", "--output-dir", str(out),
                "--set", "schedule.epochs=20", "schedule.warmup_epochs=2", "eval.every_epochs=5", "data.val_limit=200",
                "data.global_batch_size=64", "data.micro_batch_size=32", "data.num_workers=0"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "cached_features" and result["depth"] == 4
    assert 50 < result["top1"] <= result["top5"] <= 100  # 10 digit classes: far above chance
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["step"] for r in rows if "eval_top1" in r] == [5, 10, 15, 20] and rows[-1]["eval_images"] == 200
    assert json.loads((out / "best" / "metrics.json").read_text())["top1"] == result["best_top1"]
    bad = run(["python", "launchers/linprobe.py", "--cached-features", "--config", "demo", "--output-dir",
               str(tmp_path / "bad"), "--set", "model.depth=9"])
    assert bad.returncode == 2 and "model.depth=9" in bad.stderr and "Traceback" not in bad.stderr
