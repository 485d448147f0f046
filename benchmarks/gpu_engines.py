"""GPU only: build the AOTInductor DiT step at 1280*720x81 with random 14B weights and time it against
eager PyTorch (bf16, the official precision map), one batch-2 CFG DiT call per step.

    python benchmarks/gpu_engines.py                  # full 40 blocks (AOTI compile takes minutes)
    python benchmarks/gpu_engines.py --layers 8       # 8 of the 40 identical blocks, to fit a short lease
    python benchmarks/gpu_engines.py --quick          # 480x272x17, 4 blocks: a smoke test

With --layers < 40 the step time is for that many blocks (printed with the per-block figure and the
40-block extrapolation, clearly labelled). Also checks AOTI vs eager output (relative error) on the
same inputs. Prints a compact table and writes JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1280*720")
    ap.add_argument("--frame_num", type=int, default=81)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_engines.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    if args.quick:
        args.size, args.frame_num, args.layers = "480*272", 17, 4

    from wanrt.bench.flops import dit_forward_flops
    from wanrt.bench.random import dit_step
    from wanrt.engine.aoti import AOTIGraph, compile_package
    from wanrt.export.specs import Target, graph_specs

    w, h = (int(v) for v in args.size.split("*"))
    device = torch.device("cuda")
    t0 = time.perf_counter()
    cfg, module, inputs = dit_step(w, h, args.frame_num, layers=args.layers, device=device)
    spec = graph_specs(cfg, Target(w, h, args.frame_num))["dit"]
    print(f"random {args.layers}-block 14B-width DiT on {torch.cuda.get_device_name()} in "
          f"{time.perf_counter() - t0:.1f} s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": [w, h],
               "frame_num": args.frame_num, "layers": args.layers, "batch": 2}

    with torch.no_grad():
        module(*inputs)  # warm-up
        eager_t = timed(lambda: module(*inputs), args.repeat)
        ref = module(*inputs)
    results["eager_s"] = eager_t
    print(f"eager bf16 step: min {min(eager_t):.3f} s  (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dit.pt2"
        t0 = time.perf_counter()
        compile_package(module, spec, path, device)
        results["aoti_compile_s"] = round(time.perf_counter() - t0, 1)
        print(f"AOTInductor compile: {results['aoti_compile_s']} s, package {path.stat().st_size / 2**30:.2f} GiB")
        graph = AOTIGraph(path, spec, device)
        graph(*inputs)
        aoti_t = timed(lambda: graph(*inputs), args.repeat)
        out = graph(*inputs)[0]
    results["aoti_s"] = aoti_t
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    results["aoti_vs_eager_rel_l2"] = err
    flops = dit_forward_flops(cfg, h, w, args.frame_num, batch=2)
    results["flops_per_step"] = flops
    print(f"\n{'backend':<8} {'s/step':>9} {'speedup':>8} {'TFLOP/s':>8}   ({args.layers} blocks, 1280x720 grid "
          f"{'matches' if (w, h, args.frame_num) == (1280, 720, 81) else 'differs'})")
    for name, t in (("eager", eager_t), ("aoti", aoti_t)):
        print(f"{name:<8} {min(t):9.3f} {min(eager_t) / min(t):8.2f} {flops / min(t) / 1e12:8.1f}")
    if args.layers != 40:
        per = {n: min(t) / args.layers for n, t in (("eager", eager_t), ("aoti", aoti_t))}
        print("extrapolated to 40 blocks (per-block time x 40, embeddings ignored): "
              + ", ".join(f"{n} {v * 40:.2f} s" for n, v in per.items()))
    print(f"AOTI vs eager output: rel L2 {err:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
