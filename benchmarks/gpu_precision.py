"""The 14B DiT step at Hopper speed, measured in one process (issue 14): FP8 GEMMs, 8-bit attention, fusion.

    python benchmarks/gpu_precision.py --out benchmarks/results/h200-2026-12-02     # GPU, ~4-5 minutes
    python benchmarks/gpu_precision.py --dry-run --out /tmp/x                        # CPU, toy sizes, seconds

Parts (each writes its JSON into --out as soon as it is done, so a timeout keeps what finished):
1. gemm.json: the DiT's GEMMs at the real shapes (M = 2 x 75,600 = 151,200 tokens; K, N = 5120 -> 5120
   (q/k/v/o), 5120 -> 13824 and 13824 -> 5120 (FFN)): bf16 matmul vs torch._scaled_mm e4m3 with a
   tensor-wise and with row-wise scales, each timed with and without quantising the activation
   (what a real call pays), TFLOP/s and rel. L2 vs the bf16 GEMM;
2. attention.json: self-attention at the real shape (B = 2, L = 75,600, H = 40, D = 128): PyTorch SDPA
   (cuDNN on Hopper), our Triton flash (bf16) and sage (INT8 Q.K, FP8 P.V) kernels, TFLOP/s, error vs fp32
   on sampled query rows;
3. profile-2-blocks.json: `wanrt bench --profile`'s per-op-class breakdown of a 2-block full-width DiT
   step (eager bf16 and fp8 + fused + sage + our Triton norm kernels);
4. dit-step.json (`wanrt bench` schema): full 40-block CFG steps (runtime.step.CFGStep, random 14B weights
   made on the GPU, 1280*720 x 81), one model transformed in place between rows so it is built once:
   eager bf16 (the reference), eager+fused, eager+fused+fp8, eager+fused+fp8+sage, and that with +triton
   (the Triton norm/RoPE kernels; the norms and the GELU emit e4m3 rows for the FP8 GEMMs); s/step, x eager,
   rel. L2 / PSNR / max error vs eager (--variants picks rows; --layers N writes dit-step-N-blocks.json).
   (AOTInductor rows: gpu_all.sh's `wanrt bench` step.)

--dry-run: the same code on the CPU with the tiny config at a toy size (FP8 GEMMs emulated, no Triton
attention, no _scaled_mm rows); tests/test_gpu_script.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

REAL = dict(width=1280, height=720, frame_num=81)
TOY = dict(width=64, height=48, frame_num=9)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int = 3) -> float:
    """Median seconds of `fn` after one untimed warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return ((a - ref).norm() / ref.norm()).item()


def write(out: Path, name: str, doc) -> None:
    (out / name).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / name}", flush=True)


# ------------------------------------------------------------------------------------------- 1. GEMMs


def gemm_cases(x: torch.Tensor, w: torch.Tensor, native: bool) -> dict:
    """name -> callable computing x @ w.T (x: bf16 activations, w: bf16 weight) one way."""
    from wanrt.kernels import fp8

    wq_r, sw_r = fp8.quantize_rowwise(w)
    wq_t, sw_t = fp8.quantize_tensorwise(w)
    cases = {"bf16 matmul": lambda: x @ w.t()}
    if native:
        xq_t, sx_t = fp8.quantize_tensorwise(x)
        xq_r, sx_r = fp8.quantize_rowwise(x)
        for fast in (False, True):
            tag = " fast-accum" if fast else ""
            cases[f"_scaled_mm tensor-wise{tag} (GEMM only)"] = lambda fast=fast: torch._scaled_mm(
                xq_t, wq_t.t(), scale_a=sx_t, scale_b=sw_t, out_dtype=torch.bfloat16, use_fast_accum=fast)
            cases[f"_scaled_mm row-wise{tag} (GEMM only)"] = lambda fast=fast: torch._scaled_mm(
                xq_r, wq_r.t(), scale_a=sx_r, scale_b=sw_r.view(1, -1), out_dtype=torch.bfloat16,
                use_fast_accum=fast)
        cases["tensor-wise incl. quantising x"] = lambda: _tensorwise_incl_quant(x, wq_t, sw_t)
    # the eager FP8Linear call as the DiT runs it (row-wise, x quantised per token inside the call)
    cases["row-wise incl. quantising x (FP8Linear)"] = lambda: fp8.scaled_mm(
        *fp8.quantize_rowwise(x), wq_r, sw_r, None, torch.bfloat16)
    return cases


def bench_gemm(device, tokens: int, dim: int, ffn: int, iters: int) -> list[dict]:
    from wanrt.kernels import fp8

    native = fp8.native_supported(device)
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for k, n, what in ((dim, dim, "q/k/v/o"), (dim, ffn, "ffn.0"), (ffn, dim, "ffn.2")):
        x = torch.randn(tokens, k, device=device, generator=g).bfloat16()
        w = (torch.randn(n, k, device=device, generator=g) / math.sqrt(k)).bfloat16()
        flops = 2 * tokens * n * k
        ref = x @ w.t()
        for name, fn in gemm_cases(x, w, native).items():
            s = timed(fn, device, iters)
            rows.append({"gemm": what, "m": tokens, "k": k, "n": n, "case": name, "ms": round(s * 1e3, 3),
                         "tflops": round(flops / s / 1e12, 1), "rel_l2_vs_bf16": float(f"{rel_l2(fn(), ref):.3e}")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _tensorwise_incl_quant(x, wq_t, sw_t):
    from wanrt.kernels import fp8

    xq, sx = fp8.quantize_tensorwise(x)
    return torch._scaled_mm(xq, wq_t.t(), scale_a=sx, scale_b=sw_t, out_dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------- 2. attention


def bench_attention(device, batch: int, length: int, heads: int, head_dim: int, iters: int,
                    ref_rows: int) -> list[dict]:
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(batch, length, heads, head_dim, device=device, generator=g).bfloat16() for _ in range(3))
    rows_idx = torch.linspace(0, length - 1, min(ref_rows, length), device=device).long()
    # fp32 reference of the sampled query rows (batch 0), 4 heads at a time
    ref = torch.empty(rows_idx.numel(), heads, head_dim, device=device)
    for h0 in range(0, heads, 4):
        hs = slice(h0, h0 + 4)
        qh = q[0, rows_idx, hs].float().transpose(0, 1)
        kh, vh = k[0, :, hs].float().transpose(0, 1), v[0, :, hs].float().transpose(0, 1)
        p = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        ref[:, hs] = (p @ vh).transpose(0, 1)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    impls = {"sdpa (cuDNN on Hopper)": sdpa}
    if device.type == "cuda":
        from wanrt.kernels import triton_attention, triton_sage

        impls["wanrt flash bf16"] = triton_attention.flash_attention
        pv = "fp8" if triton_sage.fp8_supported(device) else "fp16"
        impls[f"wanrt sage int8 Q.K + {pv} P.V"] = lambda q, k, v: triton_sage.sage_attention(q, k, v, pv=pv)
    flops = 4 * batch * length * length * heads * head_dim
    out = []
    for name, fn in impls.items():
        s = timed(lambda fn=fn: fn(q, k, v), device, iters)
        got = fn(q, k, v)[0, rows_idx].float()
        out.append({"case": name, "batch": batch, "length": length, "heads": heads, "head_dim": head_dim,
                    "ms": round(s * 1e3, 2), "tflops": round(flops / s / 1e12, 1),
                    "rel_l2_vs_fp32": float(f"{rel_l2(got, ref):.3e}")})
        print(json.dumps(out[-1]), flush=True)
    return out


# ------------------------------------------------------------------------------------------- 3-4. DiT steps


def make_dit(cfg, device, layers: int | None, seed: int = 0):
    """Random weights (bf16 precision map) made on the device, as `wanrt bench --ckpt_dir random:` does."""
    import dataclasses

    from wanrt.bench.random import random_models

    if layers is not None:
        cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, num_layers=layers))
    return cfg, random_models(cfg, device=device, dtype=torch.bfloat16, seed=seed, components=("dit",))


def transform(models, variant: str) -> None:
    """Turn the model in place into `variant` (the transforms are cumulative: fused, then fp8)."""
    from wanrt.kernels import fp8
    from wanrt.kernels.fusion import fuse_projections, is_fused

    if "fused" in variant and not is_fused(models.dit):
        fuse_projections(models.dit)
    if "fp8" in variant and not fp8.is_quantized(models.dit):
        fp8.quantize_blocks(models.dit.blocks)
        fuse_projections(models.dit)  # re-fuse: no-op when already fused


def _attention_of(variant: str) -> str:
    return "sage" if "sage" in variant.split("+") else "sdpa"


def _kernels_of(variant: str) -> str:
    """+triton: our fused norm/RoPE kernels (with fp8: the norms and GELU emit e4m3 rows for the FP8 GEMMs)."""
    return "triton" if "triton" in variant.split("+") else "torch"


def step_rows(cfg, models, device, size, variants, repeat: int, warmup: int, profile: bool, on_row=None):
    """(rows, device info): the bench's dit_step case for each variant, the model transformed between them.

    `warmup` untimed calls for the first variant and for each variant that brings a new attention kernel
    (Triton JIT); the others reuse warm kernels and allocator pools (at 14B a call is ~15-30 s, and the
    lease is short). on_row(rows, info) after each variant, so a timeout keeps the finished rows."""
    from wanrt.bench.flops import component_flops
    from wanrt.bench.hardware import describe
    from wanrt.bench.runner import Row, _compare, make_inputs, quality

    info = describe(device)
    inputs = make_inputs(cfg, size["width"], size["height"], size["frame_num"], seed=0)
    flops = component_flops("dit_step", cfg, size["height"], size["width"], size["frame_num"], 2)
    rows, ref, seen = [], None, set()
    for variant in variants:
        try:
            row, out = _one_variant(variant, models, inputs, device, info, flops, repeat, warmup, profile, seen)
        except Exception as e:  # noqa: BLE001 - recorded in the row; the next variants still run
            row = Row(variant, "dit_step", status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      device=info.label, flops=flops, peak_tflops=info.peak_bf16_tflops)
            print(f"{variant}: {row.status}", flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(rows, info)
            continue
        if ref is None:
            ref = out
            row.speedup_vs_eager = 1.0
        else:
            row.psnr, row.max_abs_err, row.rel_l2 = _compare(out, ref, "dit_step")
            row.quality = quality(row)
            if rows and rows[0].ok:
                row.speedup_vs_eager = round(rows[0].median_s / row.median_s, 4)
        rows.append(row)
        print(f"{variant}: {row.median_s:.3f} s/step, rel L2 vs eager {row.rel_l2}, gate {row.quality}", flush=True)
        if on_row is not None:
            on_row(rows, info)
    return rows, info


def _one_variant(variant, models, inputs, device, info, flops, repeat, warmup, profile, seen):
    """Transform the model into `variant`, time its step, profile it; -> (row, output on the CPU)."""
    from wanrt.bench.runner import Row, _dit_step_case
    from wanrt.kernels import attention, fused
    from wanrt.runtime.backends import eager

    transform(models, variant)
    kernels = (_attention_of(variant), _kernels_of(variant))
    new_kernel = kernels not in seen
    seen.add(kernels)
    calls_before = warmup if new_kernel else 0
    row = Row(variant, "dit_step", device=info.label, flops=flops, peak_tflops=info.peak_bf16_tflops)
    case = _dit_step_case(eager(models).dit, inputs, device)
    row.shape = case.shape
    with torch.no_grad(), attention.use(kernels[0]), fused.use(kernels[1]):
        for r in range(calls_before + repeat):
            case.reset()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = case.call()
            _sync(device)
            if r >= calls_before:
                row.times_s.append(time.perf_counter() - t0)
        if profile:
            from wanrt.bench.profile import profile_call

            case.reset()
            row.profile = profile_call(case.call, device)
    if device.type == "cuda":
        row.memory = {"kind": "cuda", "peak_bytes": torch.cuda.max_memory_allocated(device), "delta_bytes": 0,
                      "load_bytes": torch.cuda.memory_allocated(device)}
    return row, out.detach().float().cpu()


def check_variants(spec: str, known: list[str]) -> list[str]:
    """--variants: a comma list of rows from `known` (this device's rows), the eager reference first."""
    chosen = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen or chosen[0] != "eager":
        raise SystemExit(f"error: --variants {spec!r}: give 'eager' first, then rows of {', '.join(known[1:])}"
                         + (f" (unknown here: {', '.join(unknown)})" if unknown else ""))
    return chosen


def report_json(rows, info, cfg, size, variants, repeat, warmup, command, notes) -> dict:
    from wanrt.bench import flops as flops_mod
    from wanrt.bench.hardware import versions
    from wanrt.bench.report import _clean
    from wanrt.bench.runner import Report

    settings = {"command": command, "ckpt_dir": "random:" + cfg.name, "config": cfg.name,
                "size": [size["width"], size["height"]], "frame_num": size["frame_num"],
                "latent": list(flops_mod.latent_shape(size["height"], size["width"], size["frame_num"])),
                "tokens": flops_mod.dit_tokens(cfg, size["height"], size["width"], size["frame_num"]),
                "precision": "bf16 (eager) / fp8 (+fp8 rows)", "backends": list(variants), "components": ["dit_step"],
                "repeat": repeat, "warmup": warmup, "interleave": False, "sample_steps": 0, "seed": 0,
                "engine_dir": None, "layers": cfg.dit.num_layers,
                "dit_step": "CFGStep.step(): batch-2 DiT + guidance + UniPC update; one model transformed in place "
                            "between rows (fused, then fp8), no CUDA graph"}
    return _clean(Report(rows, info, versions(), settings, notes).to_dict())


# ------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny config, toy sizes: checks the script")
    ap.add_argument("--parts", default="gemm,attention,profile,steps")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the full step (default: all 40)")
    ap.add_argument("--variants", default=None,
                    help="comma list of step rows, a subset of the default (eager first): e.g. "
                         "eager,eager+fused+fp8,eager+fused+fp8+sage+triton")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    from wanrt.models.config import WanConfig

    if args.dry_run:
        device, cfg, size = torch.device("cpu"), WanConfig.tiny(), TOY
        iters, length, ref_rows = 1, 256, 64
    else:
        if not torch.cuda.is_available():
            print("error: gpu_precision.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
        device, cfg, size = torch.device("cuda"), WanConfig.flf2v_14b(), REAL
        iters, length, ref_rows = 3, 75_600, 512
    d = cfg.dit
    from wanrt.bench.flops import dit_tokens

    tokens = 2 * dit_tokens(cfg, size["height"], size["width"], size["frame_num"])  # batch 2: 151,200 at 720p
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}: "
          f"{cfg.name}, {size}", flush=True)
    command = " ".join(["python", "benchmarks/gpu_precision.py", *sys.argv[1:]])
    if "gemm" in parts:
        write(out, "gemm.json", {"command": command, "rows": bench_gemm(device, tokens, d.dim, d.ffn_dim, iters)})
    if "attention" in parts:
        batch = 2
        write(out, "attention.json", {"command": command, "rows": bench_attention(
            device, batch, length, d.num_heads, d.head_dim, 2 if device.type == "cuda" else 1, ref_rows)})
    with contextlib.suppress(AttributeError):
        torch.cuda.empty_cache()
    if "profile" in parts:
        cfg2, models = make_dit(cfg, device, 2)
        rows, info = step_rows(cfg2, models, device, size, ("eager", "eager+fused+fp8+sage+triton"
                                                            if device.type == "cuda" else "eager+fused+fp8+triton"),
                               1, 1, profile=True)
        write(out, "profile-2-blocks.json", report_json(rows, info, cfg2, size, [r.backend for r in rows], 1, 1,
                                                        command, ["2-block DiT, per-op-class profile"]))
        del models
        with contextlib.suppress(AttributeError):
            torch.cuda.empty_cache()
    if "steps" in parts:
        variants = ["eager", "eager+fused", "eager+fused+fp8"]
        if device.type == "cuda":
            variants.append("eager+fused+fp8+sage")
        variants.append(variants[-1] + "+triton")  # the norms/GELU quantising for the FP8 GEMMs (exact)
        if args.variants:
            variants = check_variants(args.variants, variants)
        name = "dit-step.json" if args.layers is None else f"dit-step-{args.layers}-blocks.json"
        cfg40, models = make_dit(cfg, device, args.layers)
        notes = ["random weights; rows share one model transformed in place (fusion and fp8 are load-time "
                 "transforms); eager+fused+fp8 is the fp8 GEMM row (fusion is exact, tests/test_fusion.py); "
                 "warm-up calls only before a variant that brings a new attention kernel"]

        def save(done, info):
            write(out, name, report_json(done, info, cfg40, size, [r.backend for r in done], args.repeat,
                                         args.warmup, command, notes))

        rows, info = step_rows(cfg40, models, device, size, variants, args.repeat, args.warmup, profile=False,
                               on_row=save)
        for r in rows:
            print(f"{r.backend:>24} {r.median_s:9.3f} s/step  {r.speedup_vs_eager or 1:5.2f}x eager  "
                  f"rel L2 {r.rel_l2 if r.rel_l2 is not None else 0:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
