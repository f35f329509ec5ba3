"""Training-step throughput of our BootMAE against a reference-style step, side by side.

    python bench/step.py --size base --batch 8 --dtype fp32 [--steps 3] [--device cpu|cuda] [--compile]
    python bench/step.py --device cuda --dtype bf16 --batch 256 --only ours,compiled,reference,mae \
        --fractions 0.25 --json step.json          # what bench/device/run.sh measures

One process, no DeepSpeed (the step itself: forward, losses, backward, AdamW, EMA):
- ours: fused qkv + scaled_dot_product_attention, encoder on visible tokens, momentum copy of
  the encoder only, masks made beforehand (they come from loader workers in training);
- reference: the official computation as bench/reference_bootmae.py restates it (explicit
  softmax attention, shuffle/gather token handling, ConvTranspose2d head, image-space weighted
  loss), a momentum copy of the whole model updated tensor by tensor, masks drawn in the step by
  a Python/NumPy loop;
- MAE: our encoder with MAE's 8-block 512-wide decoder and no feature branch, for the momentum
  overhead; and our step with the momentum encoder fed 25/50/75/100% of the patches (Table 5).
Prints img/s, analytic FLOPs per image, achieved FLOP/s against a large GEMM measured in the same
run and dtype, and peak memory on GPUs. ``--only segment`` times a segmentation step instead (UperNet
on the ViT at ``--seg-img`` px, the ADE20K recipe; FLOPs: 3x the counted forward). A part that
fails is recorded under ``errors`` (JSON) and the parts after it still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from masking import reference_mask  # noqa: E402
from reference_bootmae import official_forward, official_target_features  # noqa: E402

from bootmae_ds.config import load_config  # noqa: E402
from bootmae_ds.data.masking import MaskGenerator  # noqa: E402
from bootmae_ds.interop.official import ours_to_official  # noqa: E402
from bootmae_ds.models import build_model, mask_to_ids  # noqa: E402
from bootmae_ds.pretrain.flops import flops_per_image, training_flops_per_image  # noqa: E402
from bootmae_ds.pretrain.losses import feature_loss, pixel_loss  # noqa: E402
from bootmae_ds.runtime.optim import param_groups  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square GEMM in ``dtype`` (the device's practical peak)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    reps = 3 if device.type == "cpu" else 20
    best = float("inf")
    for _ in range(4):  # best of four rounds: the first ones pay for thread and clock warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def timed(step, steps: int, device: torch.device) -> float:
    """Seconds per step after one warm-up step."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def our_step(cfg, batch: int, device, dtype, fraction: float = 1.0, compile: bool = False,
             backend: str = "inductor"):
    """A closure running one BootMAE training step of our implementation."""
    model = build_model(cfg).to(device, dtype).train()
    if compile:
        model.compile(backend=backend)  # what run.compile=true does in the trainer (with inductor)
    teacher = copy.deepcopy(model.encoder).requires_grad_(False).eval() if model.feature_decoder else None
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    masks = MaskGenerator.from_config(cfg).batch(batch, 0).to(device)
    images = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, device=device)
    p = cfg.model.patch_size
    online, shadow = [], []  # the EMA pairs: trainable encoder weights and their momentum copies
    if teacher is not None:
        names = dict(teacher.named_parameters())
        for n, q in model.named_parameters():
            if n.startswith("encoder.") and q.requires_grad:
                online.append(q)
                shadow.append(names[n.removeprefix("encoder.")])

    def step() -> None:
        x = images.to(dtype)
        out = model(x, masks)
        loss = pixel_loss(out.pixels, images, masks, patch_size=p, weighted=cfg.loss.weighted_mask,
                          norm=cfg.loss.pixel_norm)
        if teacher is not None:
            subset = None
            if fraction < 1:
                _, masked = mask_to_ids(masks, cfg.mask.num_masked)
                k = round(fraction * masked.shape[1])
                subset = masked[:, torch.randperm(masked.shape[1], device=device)[:k]].sort(dim=1).values
            with torch.no_grad():
                targets = teacher.target_features(x, subset)
            loss = loss + feature_loss(out.features, targets, masks, weighted=True, subset=subset)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if teacher is not None:
            with torch.no_grad():
                torch._foreach_lerp_(shadow, online, 1e-4)

    return step, model


def reference_step(cfg, batch: int, device, dtype):
    """A closure running one step the way the official code does it (see module docstring)."""
    m = cfg.model
    grid, p, depth, heads = m.img_size // m.patch_size, m.patch_size, m.depth, m.num_heads
    state = {k: v.to(device, dtype) for k, v in ours_to_official(build_model(cfg).state_dict(), cfg).items()}
    params = {k: v.requires_grad_("pos_embed" not in k) for k, v in state.items()}
    ema = {k: v.detach().clone() for k, v in params.items()}  # momentum copy of the whole model
    opt = torch.optim.AdamW([v for v in params.values() if v.requires_grad], lr=1e-4)
    images = torch.randn(batch, 3, m.img_size, m.img_size, device=device)
    rng = random.Random(0)
    mask_len = cfg.mask.num_masked
    ln = torch.nn.LayerNorm(m.embed_dim, eps=1e-6, elementwise_affine=False).to(device)

    def step() -> None:
        masks = torch.stack([torch.from_numpy(reference_mask(grid, mask_len, cfg.mask.block_budget,
                             cfg.mask.min_block_patches, cfg.mask.max_block_patches, rng)) for _ in range(batch)])
        masks = masks.to(device)
        shuffle = torch.argsort(masks.float() * 2 + torch.rand(masks.shape, device=device), dim=1)
        x = images.to(dtype)
        image, feats = official_forward(params, x, shuffle, mask_len, patch=p, depth=depth, heads=heads,
                                        feature_blocks=(0, depth - 1))
        # image-space per-patch per-channel normalisation and weighted mask, as the official loop
        loss_mask = masks.float().view(batch, 1, grid, grid)
        weight = loss_mask * F.avg_pool2d(loss_mask, 3, 1, 1) + loss_mask
        patches = images.view(batch, 3, grid, p, grid, p)
        mean = patches.mean(dim=(3, 5), keepdim=True)
        std = (patches.var(dim=(3, 5), unbiased=False, keepdim=True) + 1e-5).sqrt()
        target = ((patches - mean) / std).view_as(images)
        up = F.interpolate(weight, scale_factor=p, mode="nearest")
        pix = (up * (image.float() - target) ** 2).mean() / F.interpolate(loss_mask, scale_factor=p).mean()
        with torch.no_grad():
            tgt = official_target_features(ema, x, patch=p, depth=depth, heads=heads)
        feat = (weight.view(batch, -1, 1) * (ln(tgt.float()) - ln(feats.float())) ** 2).mean() / loss_mask.mean()
        (pix + feat).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in params.items():  # tensor by tensor, as timm's ModelEma
                ema[k].mul_(0.9999).add_(v.detach(), alpha=1e-4)

    return step


def segment_step(size: str, batch: int, device, dtype, img: int = 512):
    """A closure running one UperNet training step (the official ADE20K recipe's model on the ViT
    of ``size`` at ``img`` px: forward, both losses, backward, AdamW over the official layer-decay
    groups), and the forward FLOPs per image counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from bootmae_ds.config.segment import load_segment_config
    from bootmae_ds.models.pyramid import ViTPyramid
    from bootmae_ds.runtime.optim import backbone_layer_decay_groups
    from bootmae_ds.segment.model import Segmentor, segmentation_loss

    m = load_config("vit_base_800ep", [f"model.size={size}"]).model
    out = (3, 5, 7, 11) if m.depth == 12 else tuple(round(m.depth * k / 12) - 1 for k in (4, 6, 8, 12))
    cfg = load_segment_config("ade20k_base", [f"model.img_size={img}", f"eval.stride={min(img, 341)}",
                                              f"model.out_indices={list(out)}",
                                              f"model.channels={m.embed_dim}"])
    backbone = ViTPyramid(img, m.patch_size, 3, m.embed_dim, m.depth, m.num_heads, out_indices=out)
    model = Segmentor(backbone, cfg).to(device, dtype).train()
    opt = torch.optim.AdamW(backbone_layer_decay_groups(model, m.depth, 0.65), lr=1e-4)
    images = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    labels = torch.randint(0, 150, (batch, img, img), device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)  # the training forward (both heads); BN needs the batch
    flops = float(counter.get_total_flops()) / batch

    def step() -> None:
        segmentation_loss(model(images), labels, cfg)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, flops


PARTS = ("ours", "compiled", "reference", "mae", "fractions", "segment")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base", "large", "huge"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every step timed (e.g. a small image for smoke runs)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend ('eager' checks the tracing only, in seconds: smoke runs)")
    parser.add_argument("--only", default=None, help=f"comma list of parts to time, of {','.join(PARTS)}")
    parser.add_argument("--fractions", default="0.25,0.5,0.75", help="momentum-input fractions to time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="use this peak instead of measuring one")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--seg-img", type=int, default=512, help="image side of the segment part (UperNet)")
    a = parser.parse_args(argv)
    parts = set(a.only.split(",")) if a.only else {p for p in PARTS if p not in ("compiled", "segment") or a.compile}
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)
    size = [f"model.size={a.size}", *a.set]
    base = load_config("vit_base_800ep", size)
    mae = load_config("mae_base_800ep", size)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else matmul_peak(device, dtype)
    print(f"{a.size}, batch {a.batch}, {a.dtype} on {device}: matmul peak {peak / 1e9:.0f} GFLOP/s")
    result: dict = {"size": a.size, "batch": a.batch, "dtype": a.dtype, "device": str(device),
                    "matmul_peak_tflops": peak / 1e12, "steps": {}, "ratios": {}}

    def save() -> None:
        """Every figure so far (after each step timed: a run cut short keeps what it measured)."""
        if a.json:
            tmp = a.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(a.json)

    def report(name: str, seconds: float, flops: float) -> float:
        rate = a.batch / seconds
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        print(f"  {name:34s} {seconds:7.3f} s/step {rate:8.1f} img/s  {flops / 1e9:7.1f} GFLOP/img  "
              f"{rate * flops / 1e9:7.1f} GFLOP/s = {100 * rate * flops / peak:5.1f}% of peak  "
              f"mem {'n/a' if mem is None else f'{mem:.1f} GiB'}")
        result["steps"][name] = {"s_per_step": seconds, "img_per_s": rate, "gflop_per_img": flops / 1e9,
                                 "mfu": rate * flops / peak, "peak_memory_gib": mem}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        save()
        return seconds

    def run_ours(name: str, cfg, fraction: float = 1.0, compile: bool = False) -> float:
        step, model = our_step(cfg, a.batch, device, dtype, fraction, compile=compile, backend=a.compile_backend)
        if compile:
            step()  # compilation happens in the first call, outside the timing
        flops = training_flops_per_image(flops_per_image(model, cfg))
        seconds = report(name, timed(step, a.steps, device), flops)
        del step, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return seconds

    def attempt(name: str, fn) -> None:
        """One part; a failure is recorded (``result["errors"]``) and the next part still runs, so
        one part's error does not cost the figures of those after it."""
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
            result.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[-2000:]
            print(f"  {name}: FAILED: {result['errors'][name]}", file=sys.stderr, flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        if value is not None:
            times[name] = value

    def run_reference() -> float:
        flops = training_flops_per_image(flops_per_image(build_model(base), base))
        return report("reference-style, BootMAE", timed(reference_step(base, a.batch, device, dtype), a.steps, device),
                      flops)

    def run_fraction(fraction: float) -> None:
        cfg = load_config("vit_base_800ep", [*size, f"momentum.input_fraction={fraction}"])
        fractions[fraction] = run_ours(f"ours, momentum input {round(fraction * 100)}%", cfg, fraction)

    def run_segment() -> float:
        seg_step, seg_flops = segment_step(a.size, a.batch, device, dtype, a.seg_img)
        return report(f"segment, UperNet {a.size} {a.seg_img}px", timed(seg_step, a.steps, device), 3 * seg_flops)

    times: dict[str, float] = {}
    fractions: dict[float, float] = {}
    if "ours" in parts:
        attempt("ours", lambda: run_ours("ours, BootMAE", base))
    if "compiled" in parts:
        attempt("compiled", lambda: run_ours("ours, BootMAE, torch.compile", base, compile=True))
    if "reference" in parts:
        attempt("reference", run_reference)
    if "mae" in parts:
        attempt("mae", lambda: run_ours("ours, MAE (8-block decoder)", mae))
    if "fractions" in parts:
        for fraction in (float(f) for f in a.fractions.split(",")):
            attempt(f"fraction {fraction}", lambda f=fraction: run_fraction(f))
    if "segment" in parts:  # only with --only ...,segment: a dense-transfer step, not pre-training's
        attempt("segment", run_segment)
    ratios = {}
    if "ours" in times and "compiled" in times:
        ratios["compiled_vs_eager"] = times["ours"] / times["compiled"]
    if "ours" in times and "reference" in times:
        ratios["ours_vs_reference"] = times["reference"] / times["ours"]
    if "ours" in times and "mae" in times:
        ratios["bootmae_over_mae_step"] = times["ours"] / times["mae"]
        ratios.update({f"bootmae_{round(f * 100)}pct_over_mae_step": t / times["mae"] for f, t in fractions.items()})
    for key, value in ratios.items():
        print(f"{key.replace('_', ' ')}: {value:.2f}x")
    result["ratios"] = ratios
    save()
    return result


if __name__ == "__main__":
    raise SystemExit(1 if main().get("errors") else 0)  # the figures of the parts that ran are written
