"""bench/sdpa_backend.py: which attention backend ran, from the profiler's names. The names of GPU
kernels below are as profiles of torch on H100s print them (flash's and cuDNN's forward and
backward, the memory-efficient forward); the CPU cases run for real. tests/test_gpu.py and the
device run's env part rely on it on a GPU."""

from __future__ import annotations

import pytest
import torch
from sdpa_backend import attention_backend, dispatched, fused_kernels, profile_backend, sdp_backend

CUDNN = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_cudnn_attention", "cudaLaunchKernel",
         "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
         "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1"]
FLASH = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
         "aten::_flash_attention_forward", "cudaLaunchKernel", "cuLaunchKernelEx",
         ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<(int)128, (int)128, (int)64, (int)4, "
          "(bool)0, (bool)0, cutlass::bfloat16_t, Flash_kernel_traits<(int)128, (int)128, (int)64, (int)4, "
          "cutlass::bfloat16_t>>, (bool)0, (bool)1>(pytorch_flash::Flash_fwd_params)"),
         "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "flash_bwd_convert_dq_kernel"]
EFFICIENT = ["aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention_forward",
             "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)"]
MATH_CUDA = ["aten::_scaled_dot_product_attention_math", "aten::_safe_softmax", "aten::bmm",
             "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>(float*, ...)",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"]


def test_the_backend_is_named_from_the_dispatched_op_and_its_kernels() -> None:
    assert dispatched(CUDNN) == "cudnn" and set(fused_kernels(CUDNN).values()) == {"cudnn"}
    # cuDNN's kernels say "flash" too: looking for "flash" in a kernel's name takes cuDNN for flash
    assert all("flash" in name for name in fused_kernels(CUDNN))
    assert dispatched(FLASH) == "flash" and set(fused_kernels(FLASH).values()) == {"flash"}
    assert len(fused_kernels(FLASH)) == 3  # the runtime's launch calls are no kernels
    assert dispatched(EFFICIENT) == "efficient" and set(fused_kernels(EFFICIENT).values()) == {"efficient"}
    assert dispatched(MATH_CUDA) == "math" and fused_kernels(MATH_CUDA) == {}
    autograd = ["autograd::engine::evaluate_function: ScaledDotProductFlashAttentionBackward0",
                "ScaledDotProductFlashAttentionBackward0"]
    assert fused_kernels(autograd) == {}  # host-side nodes named after the op, not kernels
    assert dispatched(["aten::mm"]) is None
    with pytest.raises(ValueError, match="several SDPA backends"):
        dispatched(CUDNN + FLASH)


def test_the_backend_on_this_cpu_is_read_from_a_real_profile() -> None:
    from torch.nn.attention import sdpa_kernel

    ran = attention_backend((2, 3, 17, 42), torch.float32)
    assert ran["dispatched"] == "flash_cpu" and ran["kernel_backends"] == [] and ran["device"] == "cpu"
    q = torch.randn(2, 3, 17, 42)
    with sdpa_kernel(sdp_backend("math")):
        forced = profile_backend(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert forced["dispatched"] == "math"


def test_run_deterministic_takes_attention_to_the_math_backend_on_cuda(monkeypatch) -> None:
    """``run.deterministic`` on a CUDA machine turns flash, cuDNN and memory-efficient attention
    off (their backward is not deterministic at ViT-B sizes). The switches are torch's global ones,
    which the CPU's SDPA obeys too: here the dispatch is seen to move from flash to math."""
    from bootmae_ds.runtime.run import set_deterministic

    cuda = torch.backends.cuda
    q = torch.randn(2, 3, 17, 42)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what it sets, restored after
    set_deterministic(True)  # no CUDA here: attention untouched
    try:
        assert profile_backend(sdpa)["dispatched"] == "flash_cpu"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        set_deterministic(True)
        assert not (cuda.flash_sdp_enabled() or cuda.cudnn_sdp_enabled() or cuda.mem_efficient_sdp_enabled())
        assert cuda.math_sdp_enabled() and torch.are_deterministic_algorithms_enabled()
        monkeypatch.undo()
        assert profile_backend(sdpa)["dispatched"] == "math"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False
        for enable in (cuda.enable_flash_sdp, cuda.enable_cudnn_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_math_sdp):
            enable(True)
