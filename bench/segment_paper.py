"""Memory and compute of the ADE20K recipe on paper: UperNet on ViT-B/16 and ViT-L/16 at 512 px.

    python bench/segment_paper.py [--batch 2] [--gpus 8]

Everything is counted on PyTorch's meta device (no weights, no kernels, seconds on a laptop):
parameters; forward FLOPs per image (torch's FlopCounterMode over the training forward, both
heads; a training step is taken as 3x that); the bytes autograd saves for the backward pass
(saved-tensor hooks over a bf16 forward of ``--batch`` images: an upper bound, as views of one
tensor are counted each time); and the model state of one rank under ZeRO-2 with bf16 weights
(bf16 weights 2 B/param, and, sharded over ``--gpus`` ranks, fp32 master weights 4, Adam moments
8 and fp32 gradients 4 B/param, plus DeepSpeed's two 50M-element fp32 buckets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bootmae_ds.config import load_config, load_segment_config
from bootmae_ds.models.pyramid import ViTPyramid
from bootmae_ds.segment.model import Segmentor, segmentation_loss

GiB = 2**30
# ViT-L: BEiT's UperNet uses blocks 8, 12, 16, 24 and a 1024-wide head; ViT-B is the official config.
ARCHS = {"base": ((3, 5, 7, 11), 768), "large": ((7, 11, 15, 23), 1024)}


def measure(size: str, batch: int, gpus: int, img: int = 512) -> dict[str, float]:
    out_indices, channels = ARCHS[size]
    m = load_config("vit_base_800ep", [f"model.size={size}"]).model
    cfg = load_segment_config("ade20k_base", [f"model.out_indices={list(out_indices)}", f"model.channels={channels}"])
    with torch.device("meta"):
        model = Segmentor(ViTPyramid(img, m.patch_size, 3, m.embed_dim, m.depth, m.num_heads,
                                     out_indices=out_indices), cfg).to(torch.bfloat16).train()
        images = torch.empty(batch, 3, img, img, dtype=torch.bfloat16)
        labels = torch.zeros(batch, img, img, dtype=torch.long)
    params = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        segmentation_loss(model(images), labels, cfg)["loss"]
    flops = counter.get_total_flops() / batch
    buckets = 2 * 50_000_000 * 4
    state = 2 * params + (4 + 8 + 4) * params / gpus + buckets
    return {"params_m": params / 1e6, "backbone_m": backbone / 1e6, "tokens": (img // m.patch_size) ** 2,
            "fwd_gflop": flops / 1e9, "step_gflop": 3 * flops / 1e9, "activations_gib": saved / GiB,
            "state_gib": state / GiB, "total_gib": (saved + state) / GiB}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per GPU (official 2)")
    parser.add_argument("--gpus", type=int, default=8, help="ranks sharing the ZeRO-2 state (official 8)")
    a = parser.parse_args(argv)
    print(f"| UperNet on | params (backbone) | tokens | forward GFLOP/img | step GFLOP/img | saved for backward, "
          f"batch {a.batch} | ZeRO-2 state / rank ({a.gpus} GPUs) | sum |")
    print("|---|---|---|---|---|---|---|---|")
    for size in ARCHS:
        r = measure(size, a.batch, a.gpus)
        print(f"| ViT-{size[0].upper()}/16, 512 px | {r['params_m']:.0f}M ({r['backbone_m']:.0f}M) | {r['tokens']:.0f} | "
              f"{r['fwd_gflop']:.0f} | {r['step_gflop']:.0f} | {r['activations_gib']:.1f} GiB | "
              f"{r['state_gib']:.2f} GiB | {r['total_gib']:.1f} GiB |")


if __name__ == "__main__":
    main()
