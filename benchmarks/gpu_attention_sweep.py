"""GPU only: tile configs of our Triton attention kernels at the 14B self-attention shape (B 2, L 75,600,
H 40, D 128), against PyTorch SDPA (cuDNN on Hopper), to pick the defaults from measurements.

    python benchmarks/gpu_attention_sweep.py --json sweep.json [--budget 120]
    TRITON_INTERPRET=1 python benchmarks/gpu_attention_sweep.py --dry-run     # CPU: toy shape, two configs

Each row: kernel, tile config, median ms of 3 calls after a warm-up (the JIT compile), TFLOP/s, rel. L2 vs
fp32 on sampled query rows. Configs that fail to compile (shared memory) are recorded with the error.
The sweep stops starting new configs when --budget seconds are spent, keeping what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

# (BLOCK_M, BLOCK_N, num_warps, num_stages), sage_config's / flash_config's default first. On an H200
# (2026-12-04, 12 sage configs) 64x128 / 4 warps / 3 stages won (328 ms) over 128x128 / 8 / 3 (349 ms) and the
# old default 128x64 / 8 / 3 (417 ms); the list now holds the winner's neighbours and the runner-up.
SAGE = [
    (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 2), (64, 128, 8, 3), (64, 256, 4, 2),
    (64, 256, 4, 3), (64, 256, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 256, 8, 2), (128, 128, 4, 4),
]
FLASH = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 128, 4, 2), (64, 256, 4, 2), (128, 128, 8, 4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    from wanrt.kernels import triton_attention, triton_sage

    if args.dry_run:
        device, (b, length, h, d), ref_rows, iters = torch.device("cpu"), (1, 70, 2, 40), 16, 1
        sage, flash = [(32, 32, 4, 1)], [(32, 32, 4, 1)]
    else:
        if not torch.cuda.is_available():
            print("error: gpu_attention_sweep.py needs a CUDA GPU (or --dry-run under TRITON_INTERPRET=1)",
                  file=sys.stderr)
            return 2
        device, (b, length, h, d), ref_rows, iters = torch.device("cuda"), (2, 75_600, 40, 128), 256, 3
        sage, flash = SAGE, FLASH
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(b, length, h, d, device=device, generator=g).bfloat16() for _ in range(3))
    idx = torch.linspace(0, length - 1, min(ref_rows, length), device=device).long()
    p = torch.softmax(q[0, idx].float().transpose(0, 1) @ k[0].float().permute(1, 2, 0) / math.sqrt(d), dim=-1)
    ref = (p @ v[0].float().transpose(0, 1)).transpose(0, 1)  # (rows, H, D)
    del p
    flops = 4 * b * length * length * h * d

    def sdpa(q, k, v):
        import torch.nn.functional as F

        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    cases = [("sdpa", None, sdpa)]
    pv = "fp8" if triton_sage.fp8_supported(device) else "fp16"
    for bm, bn, w, s in sage:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        cases.append((f"sage {pv}", cfg,
                      lambda q, k, v, cfg=cfg: triton_sage.sage_attention(q, k, v, pv=pv, config=cfg)))
    for bm, bn, w, s in flash:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        cases.append(("flash bf16", cfg,
                      lambda q, k, v, cfg=cfg: triton_attention.flash_attention(q, k, v, config=cfg)))
    rows, t_start = [], time.perf_counter()
    for name, cfg, fn in cases:
        if time.perf_counter() - t_start > args.budget:
            print(f"budget spent: {name} {cfg} not run", flush=True)
            continue
        row = {"kernel": name, "config": cfg, "shape": [b, length, h, d]}
        try:
            got = fn(q, k, v)  # warm-up (JIT)
            times = []
            for _ in range(iters):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(q, k, v)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = sorted(times)[len(times) // 2] * 1e3
            err = ((got[0, idx].float() - ref).norm() / ref.norm()).item()
            row.update(ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1), rel_l2_vs_fp32=float(f"{err:.3e}"))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a stop
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
