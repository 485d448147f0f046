"""GPU only: the whole FLF2V pipeline on CUDA with the built-in trained tiny model, every runtime option
against the fp32 CUDA run without CUDA graphs on the same inputs and the same noise.

    python benchmarks/gpu_pipeline.py [--steps 10] [--frame_num 17] [--json out.json]

Rows: fp32 eager with and without CUDA graphs (graphs must not change the result), fp32 with cuDNN's TF32
convolutions (PyTorch's default, so also the official code's) turned off, the official bf16 precision
map with PyTorch SDPA, our Triton flash attention + fused norm/RoPE kernels, and sage (8-bit) attention.
For each: PSNR and mean |delta| of the uint8 frames vs the reference, wall time of a warm call, and the
denoising loop's time per step (the step is what CUDA graphs replay: the tiny model is launch-bound, so
this is where graph replay shows).

The fp32 CPU video is printed for scale only: like the official code, the pipeline draws the initial
noise from a generator on its own device, and CUDA's generator gives other numbers than the CPU's for
the same seed, so CPU vs CUDA compares two different samples, not two precisions (measured on an H200:
37.9 dB, mean |delta| 1.86 of 255, whatever the GPU precision).
"""


from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--frame_num", type=int, default=17)
    ap.add_argument("--size", default="64*64")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_pipeline.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2

    from wanrt import FLF2VPipeline
    from wanrt.metrics import psnr
    from wanrt.samples import SAMPLE_PROMPT, sample_frames

    w, h = (int(v) for v in args.size.split("*"))
    first, last = sample_frames()
    kw = dict(max_area=w * h, frame_num=args.frame_num, sample_steps=args.steps, seed=0, progress=False)

    ref = FLF2VPipeline.from_pretrained("tiny", device="cpu", dtype=torch.float32)(first, last, SAMPLE_PROMPT, **kw)
    variants = [
        ("fp32 sdpa, no CUDA graphs", dict(dtype=torch.float32, cuda_graphs=False)),
        ("fp32 sdpa, CUDA graphs", dict(dtype=torch.float32)),
        ("fp32 sdpa, CUDA graphs, cuDNN TF32 off", dict(dtype=torch.float32, tf32=False)),
        ("bf16 map sdpa, no CUDA graphs", dict(cuda_graphs=False)),
        ("bf16 map sdpa, CUDA graphs", dict()),
        ("bf16 map flash+triton, CUDA graphs", dict(attention="flash", kernels="triton")),
        ("bf16 map sage+triton, CUDA graphs", dict(attention="sage", kernels="triton")),
    ]
    rows, gpu_ref = [], None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tiny {args.size} x {args.frame_num} "
          f"frames, {args.steps} steps; reference: the first row (fp32 on CUDA, no graphs)")
    for name, opts in variants:
        tf32 = opts.pop("tf32", True)  # PyTorch's default: TF32 in cuDNN convolutions (the VAE), not in matmuls
        torch.backends.cudnn.allow_tf32 = tf32
        pipe = FLF2VPipeline.from_pretrained("tiny", device="cuda", **opts)
        pipe(first, last, SAMPLE_PROMPT, **kw)  # warm-up: Triton JIT, graph capture, cuDNN plans
        torch.cuda.synchronize()
        video = pipe(first, last, SAMPLE_PROMPT, **kw)
        if gpu_ref is None:
            gpu_ref = video
        diff = np.abs(video.frames.astype(np.float64) - gpu_ref.frames.astype(np.float64))
        row = dict(variant=name, psnr_vs_ref=round(float(psnr(video.frames, gpu_ref.frames)), 2),
                   mean_abs_pixel=round(float(diff.mean()), 4),
                   psnr_vs_cpu_fp32_other_noise=round(float(psnr(video.frames, ref.frames)), 2),
                   total_s=round(video.timings["total"], 4),
                   step_ms=round(1000 * video.timings["denoise"] / args.steps, 3),
                   peak_mib=round(max(video.memory.values(), default=0) / 2**20, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del pipe
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.empty_cache()
    head = list(rows[0])
    widths = [max(len(str(r[k])) for r in [dict(zip(head, head)), *rows]) for k in head]
    for r in [dict(zip(head, head)), *rows]:
        print("  ".join(str(r[k]).ljust(wd) for k, wd in zip(head, widths)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
