"""`wanrt bench`: every backend against eager PyTorch, side by side: time, FLOP/s, memory and quality.

    wanrt bench --ckpt_dir tiny                                    # seconds on a CPU
    wanrt bench --ckpt_dir random:small --size 256*256 --frame_num 9 --what dit_step,t5,clip,vae
    wanrt bench --ckpt_dir random:flf2v-14b --backends eager,aoti  # the full-size step on a GPU
    wanrt bench --ckpt_dir DIR --backends eager,onnxruntime,aoti,tensorrt --repeat 5 --json out.json --plot out.png

Python: `wanrt.bench.run(...)` returns a Report (see runner.py for the method: same inputs, warm-up,
interleaved rounds with device synchronisation, per-call peak memory, quality vs eager).
FLOP counts: `wanrt.bench.flops` (`dit_forward_flops(config, height, width, frame_num, batch=1)`, ...).

JSON schema "wanrt.bench/1" (`--json`); times in seconds, memory in bytes, null where not applicable:

    {
      "schema": "wanrt.bench/1",
      "created": "2026-09-01T12:00:00",
      "device": {"type": "cpu"|"cuda", "name": str, "index": int|null, "label": str,
                 "peak_bf16_tflops": float|null,        # dense BF16 datasheet peak; null on CPUs/unknown GPUs
                 "threads": int, "memory_bytes": int|null},
      "versions": {"python": str, "wanrt": str, "torch": str, "onnxruntime": str, ...},  # what imports
      "settings": {"command": str|null, "ckpt_dir": str, "config": str, "size": [W, H], "frame_num": int,
                   "latent": [T, h, w], "tokens": int, "precision": "fp32"|"bf16"|"fp8",
                   "backends": [str], "components": [str], "repeat": int, "warmup": int,
                   "interleave": bool, "sample_steps": int, "seed": int, "engine_dir": str|null,
                   "fp8_keep": int, "profile": bool, "dit_step": str},
      "notes": [str],
      "results": [{                                     # one per (component, backend), all requested
        "backend": "eager"|"onnxruntime"|"aoti"|"tensorrt"|"eager+<option>[+...]",  # options: fp8, fused,
                                                        # sage, flash, triton (runner.EAGER_OPTIONS)
        "component": "dit_step"|"vae_encode"|"vae_decode"|"text_encoder"|"image_encoder"|"e2e",
        "status": "ok" | "unavailable: <reason>" | "failed: <error>",
        "device": str,                                  # = device.label
        "shape": {<input name>: [dims], "output": [dims], ...},
        "times": {"runs_s": [float], "min_s": float, "median_s": float, "max_s": float, "mean_s": float},
        "speedup_vs_eager": float|null,                 # eager median / this median
        "memory": {"kind": "cuda"|"rss"|"rss_lifetime", "peak_bytes": int, "delta_bytes": int,
                   "load_bytes": int, "device_used_bytes": int (cuda only)},
        "flops": int,                                   # analytic, per timed call (wanrt.bench.flops)
        "tflops": float|null,                           # flops / median
        "pct_peak": float|null,                         # 100 * tflops / device.peak_bf16_tflops ("n/a": null)
        "psnr": float|null,                             # dB vs eager; null for eager itself and when identical
        "max_abs_err": float|null,                      # vs eager on the same inputs
        "rel_l2": float|null,                           # ||out - eager|| / ||eager||, same inputs
        "setup_s": float|null,                          # model load, or engine export/build + load
        "profile": null | {"total_s": float, "method": str,   # --profile: one call's profiler self time
                           "classes": {"attention"|"gemm"|"elementwise"|"other":
                                       {"time_s", "calls", "flops", "bytes", "tflops", "gbps", "share"}}}
      }]
    }

Components:
- dit_step: one denoising step as the runtime runs it (CFGStep.step(): batch-2 DiT call, guidance,
  in-place UniPC update); its FLOPs are the batch-2 forward (the eager runtime hoists the context and
  time embeddings out of the loop: < 0.01% of them at 14B);
- vae_encode / vae_decode: the chunked VAE over the whole clip (--what vae is both);
- t5: prompt + negative prompt (batch 2, 512 tokens); clip: the two frames;
- e2e: a whole request with --sample_steps steps (a fresh pipeline per call, so its prompt cache does
  not skip T5 on repeats).
"""

from __future__ import annotations

SCHEMA = "wanrt.bench/1"
REQUIRED_ROW_FIELDS = ("backend", "component", "status", "device", "shape", "times", "speedup_vs_eager", "memory",
                       "flops", "tflops", "pct_peak", "psnr", "max_abs_err", "setup_s")

__all__ = ["REQUIRED_ROW_FIELDS", "SCHEMA", "run"]


def run(*args, **kwargs):
    """See wanrt.bench.runner.run (imported on first use: `import wanrt.bench` stays light)."""
    from .runner import run as _run

    return _run(*args, **kwargs)
