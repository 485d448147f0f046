"""CPU denoise time of one request at guidance 1.0 (CFG-free: one batch-1 DiT call per step) against
guidance 5.0 (CFG: one batch-2 call per step), same frames, prompt, seed, sampler and steps.

The two settings are run alternately `--repeats` times and the median denoise time of each is printed,
so a busy machine slows both alike.

    python benchmarks/cfg_free_cpu.py                       # the trained tiny model, 64x64 x 17 frames
    python benchmarks/cfg_free_cpu.py --ckpt tiny --size 128*128 --steps 8
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="tiny")
    ap.add_argument("--size", default="64*64")
    ap.add_argument("--frame_num", type=int, default=17)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.samples import SAMPLE_PROMPT, sample_frames

    w, h = (int(v) for v in args.size.split("*"))
    pipe = FLF2VPipeline.from_pretrained(args.ckpt, device="cpu", dtype=torch.float32)
    first, last = sample_frames()
    kw = dict(max_area=w * h, frame_num=args.frame_num, sample_steps=args.steps, sample_solver="euler",
              sample_shift=5.0, seed=0, progress=False)
    times: dict[float, list[float]] = {1.0: [], 5.0: []}
    pipe(first, last, SAMPLE_PROMPT, guide_scale=5.0, **kw)  # warm-up (allocator, text cache)
    for _ in range(args.repeats):
        for g in times:
            times[g].append(pipe(first, last, SAMPLE_PROMPT, guide_scale=g, **kw).timings["denoise"])
    med = {g: statistics.median(t) for g, t in times.items()}
    print(f"torch threads {torch.get_num_threads()}, {args.ckpt} {w}x{h} x {args.frame_num} frames, "
          f"{args.steps} euler steps, {args.repeats} runs each")
    for g, t in times.items():
        print(f"guidance {g}: denoise median {med[g]:.3f} s (runs: {', '.join(f'{v:.3f}' for v in t)})")
    print(f"ratio guidance 1.0 / 5.0: {med[1.0] / med[5.0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
