"""GPU only: the full-size DiT CFG step (random 14B weights, batch 2, 1280*720 x 81 = 75,600 tokens, the
official bf16 precision map) with each attention / fused-kernel choice of the eager path:

    python benchmarks/gpu_dit_kernels.py [--layers 40] [--json out.json]

Rows: PyTorch SDPA + torch elementwise (the default), our Triton flash attention + fused norm/RoPE
kernels, and sage (INT8 Q/K, FP8 P.V on sm89+) + fused kernels. Each variant gets one warm-up call
(Triton JIT) and `--repeat` timed calls; the error column is the relative L2 distance of the step's
output from the default variant's on the same inputs (bf16 SDPA itself differs from fp32 by ~3e-3
relative on the tiny model, see tests/test_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

VARIANTS = (("sdpa", "torch"), ("flash", "triton"), ("sage", "triton"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_dit_kernels.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2

    from wanrt.bench.flops import dit_forward_flops
    from wanrt.bench.random import dit_step
    from wanrt.kernels import attention, fused

    w, h = (int(v) for v in args.size.split("*"))
    cfg, module, inputs = dit_step(w, h, args.frame_num, layers=args.layers, device="cuda")
    flops = dit_forward_flops(cfg, h, w, args.frame_num, batch=2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.layers}-block 14B DiT, "
          f"{w}*{h} x {args.frame_num}, batch 2 (one CFG step), bf16 precision map", flush=True)
    rows, ref = [], None
    for attn, kern in VARIANTS:
        with torch.no_grad(), attention.use(attn), fused.use(kern):
            module(*inputs)  # warm-up (Triton JIT)
            times = []
            for _ in range(args.repeat):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = module(*inputs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        out = out.float()
        if ref is None:
            ref = out
        rel = ((out - ref).norm() / ref.norm()).item()
        row = dict(attention=attn, kernels=kern, step_s=round(min(times), 3),
                   tflops=round(flops / min(times) / 1e12, 1), rel_l2_vs_sdpa=float(f"{rel:.3e}"),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["step_s"]
    for r in rows:
        print(f"{r['attention']:>6} + {r['kernels']:<7} {r['step_s']:8.3f} s/step  {base / r['step_s']:5.2f}x  "
              f"{r['tflops']:6.1f} TFLOP/s  rel L2 vs sdpa {r['rel_l2_vs_sdpa']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "layers": args.layers, "size": [w, h],
                                               "frame_num": args.frame_num, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
