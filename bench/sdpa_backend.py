"""Which ``scaled_dot_product_attention`` backend ran, read from the profiler's event names.

torch picks the backend per call: on Hopper (sm90) it may prefer cuDNN's fused attention over flash
when its bundled cuDNN is new enough, so the GPU figures (bench/device/run.sh) name the backend
they came from (the env part records it for the ViT-B shapes), and tests/test_gpu.py checks that
*a* fused kernel ran rather than flash by name. The aten op says what was dispatched; the device
kernels say what ran. cuDNN's kernels carry "flash" in their names too
(``cudnn_generated_fort_native_sdpa_sm90_flash_fprop_...``), so a kernel is cuDNN's first.

    python bench/sdpa_backend.py [--shape 256,12,197,64] [--dtype bf16]   # prints the backend
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable

import torch

# The aten op each backend is dispatched to (forward), torch 2.x names.
ATEN_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_attention_math": "math",
}
FUSED = ("flash", "cudnn", "efficient")
RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")  # cudaLaunchKernel, cuLaunchKernelEx: host calls, not kernels


def dispatched(names: Iterable[str]) -> str | None:
    """The backend whose aten op is among the profiler's event ``names`` (None: no SDPA call)."""
    found = {ATEN_OPS[n] for n in names if n in ATEN_OPS}
    if len(found) > 1:
        raise ValueError(f"several SDPA backends in one profile: {sorted(found)}")
    return found.pop() if found else None


def kernel_backend(name: str) -> str | None:
    """The fused backend a device kernel belongs to, from its name (None: not an attention kernel)."""
    low = name.lower()
    if "cudnn" in low and ("sdpa" in low or "fmha" in low or "attn" in low):
        return "cudnn"
    if "flash" in low:
        return "flash"
    if "fmha_cutlass" in low or "memeffattention" in low or "efficient_attention" in low:
        return "efficient"
    return None


def fused_kernels(names: Iterable[str]) -> dict[str, str]:
    """Device kernels among ``names`` -> their backend; aten ops, autograd nodes
    (``ScaledDotProductFlashAttentionBackward0`` names flash whatever ran) and CUDA runtime calls
    are left out."""
    out = {}
    for name in names:
        if name.startswith(("aten::", "autograd::")) or name.endswith("Backward0") or RUNTIME_CALL.match(name):
            continue
        if backend := kernel_backend(name):
            out[name] = backend
    return out


def sdp_backend(name: str):
    """The ``torch.nn.attention.SDPBackend`` that forces backend ``name``."""
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "flash_cpu": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}[name]


def profile_backend(fn: Callable[[], object]) -> dict:
    """Run ``fn`` under the profiler: the backend dispatched, the fused kernels that ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = fused_kernels(e.key for e in events if e.device_type != DeviceType.CPU)
    names = [e.key for e in events]
    return {"dispatched": dispatched(names), "kernels": sorted(kernels),
            "kernel_backends": sorted(set(kernels.values()))}


def attention_backend(shape: tuple[int, int, int, int], dtype: torch.dtype, backward: bool = True) -> dict:
    """What our attention (``models.layers.attend``) runs at ``shape`` [B, H, L, hd] on this
    machine's device, forward and (``backward``) backward."""
    from bootmae_ds.models.layers import attend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))

    def step() -> None:
        out = attend(q, k, v)
        if backward:
            out.float().sum().backward()

    step()  # the first call may pick a kernel (cuDNN's heuristics), outside the profile
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "device": device,
            **profile_backend(step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,12,197,64", help="B,H,L,head_dim (ViT-B/16 at 224 px)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    a = parser.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    print(attention_backend(shape, {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]))


if __name__ == "__main__":
    main()
