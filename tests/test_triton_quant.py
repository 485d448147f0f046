"""The one-pass per-token e4m3 quantisation kernel (kernels/triton_quant.py) against the torch reference:
bit-identical values and scales (under TRITON_INTERPRET=1 on the CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from wanrt.kernels import fp8  # noqa: E402
from wanrt.kernels.triton_attention import INTERPRET  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not set: the kernel cannot run here", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 300])
def test_quantize_rows_equals_the_torch_reference(dtype, width):
    from wanrt.kernels import triton_quant  # noqa: F401  (registers wanrt::quantize_rows)

    g = torch.Generator().manual_seed(width)
    # rows spanning 10 decades, a zero row, and a strided view (every other column of a wider tensor)
    base = torch.randn(33, 2 * width, generator=g) * torch.logspace(-6, 4, 33)[:, None]
    base[5] = 0
    x = base[:, ::2].to(DEVICE, dtype)
    q, s = torch.ops.wanrt.quantize_rows(x)
    q0, s0 = fp8.quantize_rowwise_torch(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (33, 1)
    assert torch.equal(s, s0)
    assert torch.equal(q.float(), q0.float())  # every e4m3 value identical (exactness is the contract)
    assert q.float().abs().amax(-1)[torch.arange(33) != 5].eq(fp8.FP8_MAX).all()


@pytest.mark.gpu
@pytest.mark.parametrize("width", [5120, 13824])
def test_quantize_rows_on_cuda_at_the_14b_widths(width):
    """Compiled kernel (Triton's default fp32 division is approximate: the kernel must use div_rn)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, width, device="cuda", generator=g) * 3
    q, s = fp8.quantize_rowwise(x)  # CUDA, 2-D: the Triton kernel
    q0, s0 = fp8.quantize_rowwise_torch(x)
    assert torch.equal(s, s0) and torch.equal(q.float(), q0.float())
