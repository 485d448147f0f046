"""Time the wanrt Triton kernels against PyTorch on a CUDA GPU and measure their error.

    python benchmarks/gpu_kernels.py            # 720p (L = 75,600) and 480p (L = 32,760), ~1-2 min on an H100
    python benchmarks/gpu_kernels.py --quick    # L = 8,192 only, seconds

Attention: batch 1, H = 40, D = 128, bf16, the Wan2.1-14B self-attention at 1280x720x81 (21x45x80
latent tokens) and 832x480x81 (21x30x52). Rows: PyTorch SDPA as the model calls it, PyTorch SDPA
restricted to its flash backend, our flash kernel, sage with FP8 P.V (sm89+ only) and sage with FP16
P.V. On Hopper PyTorch's default SDPA backend is cuDNN attention, faster than its FlashAttention-2
backend; both rows are shown. TFLOP/s counts 4 * L^2 * H * D per forward (two L x L x D matmuls per
head, 2 flops per multiply-add). Errors are against fp32 attention of the same bf16 inputs (so they
measure the kernel, not the input rounding) on `--ref-rows` query rows spread over the sequence: full
fp32 attention at 75k tokens would need 40 x 75,600^2 x 4 B = 900 GB of scores.

Fused kernels at the 720p token count (C = 5120): norm_modulate on the fp32 residual stream and
qk_norm_rope on a bf16 projection with an fp32 weight, as the DiT calls them; GB/s = bytes read + written
once (what a single-pass kernel must move) / time, for ours and for the torch reference.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

H, D = 40, 128
SIZES = {"720p": 75_600, "480p": 32_760}
QUICK = {"quick": 8_192}


def _time_ms(fn, iters: int) -> float:
    """Median wall time of `fn` on the GPU in ms, after one warm-up call (which also JIT-compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention (IEEE fp32 matmuls, no TF32) of query rows `rows` against all keys; (1, R, H, D)."""
    out = torch.empty(1, rows.numel(), H, D, device=q.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for h0 in range(0, H, 4):  # 4 heads at a time: 4 x R x L fp32 scores (1.2 GB at 720p)
            hs = slice(h0, h0 + 4)
            qh = q[0, rows, hs].float().transpose(0, 1)  # (4, R, D)
            kh, vh = k[0, :, hs].float().transpose(0, 1), v[0, :, hs].float().transpose(0, 1)  # (4, L, D)
            p = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(D), dim=-1)
            out[0, :, hs] = (p @ vh).transpose(0, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def _sdpa_default(q, k, v):
    """What the "sdpa" seam runs: PyTorch picks the backend (cuDNN attention on an H200 with torch 2.11)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # FlashAttention-2, the backend our kernel is built like
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def bench_attention(label: str, length: int, iters: int, ref_rows: int, table: list) -> None:
    from wanrt.kernels import triton_attention, triton_sage

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, length, H, D, device="cuda", generator=g).bfloat16() for _ in range(3))
    rows = torch.linspace(0, length - 1, min(ref_rows, length), device="cuda").long()
    ref = _reference_rows(q, k, v, rows)
    impls = {"sdpa (default backend)": _sdpa_default, "sdpa (flash backend)": _sdpa_flash,
             "wanrt flash": triton_attention.flash_attention}
    if triton_sage.fp8_supported(q.device):
        impls["wanrt sage fp8 P.V"] = lambda q, k, v: triton_sage.sage_attention(q, k, v, pv="fp8")
    impls["wanrt sage fp16 P.V"] = lambda q, k, v: triton_sage.sage_attention(q, k, v, pv="fp16")
    flops = 4 * length**2 * H * D
    for name, fn in impls.items():
        ms = _time_ms(lambda fn=fn: fn(q, k, v), iters)
        err = (fn(q, k, v)[:, rows].float() - ref).abs()
        rel = (err.norm() / ref.norm()).item()
        table.append((f"attn {label}", name, f"{ms:9.2f}", f"{flops / ms / 1e9:8.1f} TFLOP/s",
                      f"{err.max().item():.2e}", f"{err.mean().item():.2e}", f"{rel:.2e}"))


def bench_fused(length: int, iters: int, table: list) -> None:
    from wanrt.kernels import triton_fused
    from wanrt.kernels.fused import _norm_modulate_ref, _qk_norm_rope_ref

    c = H * D
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, length, c, device="cuda", generator=g)  # fp32 residual stream
    shift, scale = (torch.randn(1, 1, c, device="cuda", generator=g) * 0.1 for _ in range(2))
    nbytes = x.numel() * (4 + 4)  # read fp32 x, write fp32 out
    cases = [("norm_modulate", nbytes, lambda: triton_fused.norm_modulate(x, shift, scale, 1e-6),
              lambda: _norm_modulate_ref(x, shift, scale, 1e-6))]
    xb = x.bfloat16()  # q/k projection output
    w = torch.rand(c, device="cuda", generator=g) + 0.5
    angles = torch.rand(length, D // 2, device="cuda", generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    nbytes = xb.numel() * (2 + 4) + 2 * cos.numel() * 4  # read bf16 x + cos/sin, write fp32 out
    cases.append(("qk_norm_rope", nbytes, lambda: triton_fused.qk_norm_rope(xb, w, 1e-6, cos, sin, H),
                  lambda: _qk_norm_rope_ref(xb, w, 1e-6, cos, sin, H)))
    for name, nbytes, ours, theirs in cases:
        err = (ours() - theirs()).abs()
        for impl, fn in (("wanrt triton", ours), ("torch reference", theirs)):
            ms = _time_ms(fn, iters)
            table.append((f"{name} L={length}", impl, f"{ms:9.3f}", f"{nbytes / ms / 1e6:8.1f} GB/s",
                          f"{err.max().item():.2e}" if impl == "wanrt triton" else "-",
                          f"{err.mean().item():.2e}" if impl == "wanrt triton" else "-", "-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (L = 8,192), not 720p/480p")
    parser.add_argument("--ref-rows", type=int, default=1024, help="query rows checked against fp32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine.")
    import triton

    from wanrt.kernels import triton_attention

    if triton_attention.INTERPRET:
        sys.exit("TRITON_INTERPRET is set: unset it to time compiled kernels.")
    dev = torch.cuda.get_device_properties(0)
    print(f"{dev.name} (sm{dev.major}{dev.minor}), torch {torch.__version__}, triton {triton.__version__}; "
          f"attention B=1 H={H} D={D} bf16")
    table: list[tuple] = []
    sizes = QUICK if args.quick else SIZES
    for label, length in sizes.items():
        iters = 10 if args.quick else (3 if length > 50_000 else 5)  # ~0.3 s per 720p call on an H100
        bench_attention(label, length, iters, args.ref_rows, table)
        torch.cuda.empty_cache()  # this size's q/k/v/outputs (~4 GB at 720p) are gone with the call
    bench_fused(next(iter(sizes.values())), 20, table)

    head = ("case", "implementation", "ms", "throughput", "max err", "mean err", "rel L2")
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
