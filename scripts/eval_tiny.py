#!/usr/bin/env python3
"""Held-out quality of the tiny FLF2V model: does it fill in the motion between the given frames?

    python scripts/eval_tiny.py                          # 20 held-out clips, 4 / 10 / 50 steps, the shipped model
    python scripts/eval_tiny.py --steps 4 --clips 5 --ckpt_dir tiny-random   # the random model, for contrast
    python scripts/eval_tiny.py --demo docs/tiny_demo.png                    # also render the demo strip
    python scripts/eval_tiny.py --targets                # the issue-18 targets at 64x64, 64x48, 48x64, 96x64
    python scripts/eval_tiny.py --targets --first_clip 20 --model_only   # model selection on 20 other clips

Clips are 17 frames at 64x64 from seeds never used in training (wanrt.tiny.data.heldout_seeds), generated
through the public pipeline with the defaults of `wanrt generate` (UniPC, shift 16, the official negative
prompt, the checkpoint's guide scale: 2.0 for the trained model, 5.0 for tiny-random; --guide_scale and --shift
override them; the `--first_clip 40` sweep behind the 2.0 is at TRAINED_SAMPLE in wanrt/models/tiny.py).
Reports PSNR of the first/last/middle frames, the object's centroid path error in pixels, and the same for a
static baseline (the first frame repeated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wanrt.pipeline import FLF2VPipeline  # noqa: E402
from wanrt.tiny import data, evaluate  # noqa: E402

COLUMNS = ("psnr_first", "psnr_last", "min_psnr_first", "min_psnr_last", "psnr_middle", "centroid_error",
           "static_psnr_middle", "static_centroid_error", "missing")


def demo_strip(pipe, path: Path, steps: int, seed: int) -> None:
    """The built-in demo (what `wanrt generate --ckpt_dir tiny --size 64*64` makes, at 17 frames) plus two
    held-out clips, each row: generated frames; the rows of held-out clips are followed by their truth."""
    from PIL import Image

    from wanrt.samples import SAMPLE_PROMPT, sample_frames

    first, last = sample_frames()
    demo = pipe(first, last, SAMPLE_PROMPT, max_area=64 * 64, frame_num=17, sample_steps=steps, seed=seed,
                progress=False).frames
    rows = [demo]
    for s in data.heldout_seeds(3)[1:]:
        clip = data.make_clip(s)
        rows += [evaluate.generate(pipe, clip, steps, seed=seed), clip.frames]
    wide = max(r.shape[2] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, 0), (0, wide - r.shape[2]), (0, 0)), constant_values=255) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(evaluate.strip(rows, every=2, scale=2)).save(path)
    print(f"wrote {path}")



def targets(pipe, args) -> dict:
    """Held-out single disks/squares on gradients, 17 frames, 20 steps, at every trained size: no cross-faded
    frame, colour within 40/255, centroid error <= 20% of the start-end distance and first/last >= 25 dB on
    every clip."""
    out = {}
    print(f"{'size':>11} {'clips':>5} {'min first':>9} {'min last':>8} {'crossfaded':>10} {'max colour':>10} "
          f"{'max rel. centroid':>17} {'pass':>5}")
    seeds = data.heldout_seeds(args.clips, args.first_clip)
    for w, h in evaluate.TARGET_SIZES:
        for kind in ("model",) if args.model_only else ("vae",) if args.vae_only else ("model", "vae"):
            summary, scores = evaluate.targets(pipe, seeds, w, h, args.target_steps, vae_only=kind == "vae",
                                               seed=args.seed, guide_scale=args.guide_scale, shift=args.shift,
                                               solver=args.solver)
            ok = [evaluate.meets_targets(s) for s in scores]
            summary["clips_passing"] = int(sum(ok))
            name = f"{w}x{h}" + ("" if kind == "model" else " vae")
            out[name] = {"summary": summary, "clips": [s.as_dict() for s in scores]}
            print(f"{name:>11} {len(scores):>5} {summary['min_psnr_first']:>9.1f} {summary['min_psnr_last']:>8.1f} "
                  f"{summary['crossfaded']:>10d} {summary['max_color_error']:>10.1f} "
                  f"{summary['max_relative_centroid_error']:>17.2f} {sum(ok):>2d}/{len(ok)}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default="tiny")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 10, 50])
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--first_clip", type=int, default=0, help="skip this many held-out seeds (20: the selection set)")
    p.add_argument("--guide_scale", type=float, help="default: the model's (wanrt generate's)")
    p.add_argument("--shift", type=float, help="default: the model's (16)")
    p.add_argument("--solver", default="unipc", help="unipc, dpm++ or euler (wanrt generate's default: unipc)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the summary (and per-clip scores) here")
    p.add_argument("--demo", help="write a PNG strip of the demo and two held-out clips here")
    p.add_argument("--demo_steps", type=int, default=10)
    p.add_argument("--targets", action="store_true", help="only the issue-18 targets table (see targets())")
    p.add_argument("--target_steps", type=int, default=20)
    only = p.add_mutually_exclusive_group()
    only.add_argument("--model_only", action="store_true", help="--targets without the VAE-alone rows")
    only.add_argument("--vae_only", action="store_true",
                   help="--targets with only the VAE-alone rows (encode + decode the truth: selects decoders)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FLF2VPipeline.from_pretrained(args.ckpt_dir, device="cpu")
    args.guide_scale = pipe.config.sample.guide_scale if args.guide_scale is None else args.guide_scale
    args.shift = pipe.config.sample.shift if args.shift is None else args.shift
    if args.targets:
        result = targets(pipe, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "targets": result}, indent=2))
        return
    seeds = data.heldout_seeds(args.clips, args.first_clip)
    results = {}
    print(f"{args.ckpt_dir}: {len(seeds)} held-out clips, 17 frames 64x64, guide {args.guide_scale}, "
          f"shift {args.shift}")
    print(f"{'steps':>5} " + " ".join(f"{c:>21}" for c in COLUMNS) + f" {'s/clip':>7}")
    for steps in args.steps:
        t0 = time.perf_counter()
        summary, scores = evaluate.evaluate(pipe, seeds, steps, guide_scale=args.guide_scale, shift=args.shift,
                                            seed=args.seed, solver=args.solver)
        summary["seconds_per_clip"] = (time.perf_counter() - t0) / len(seeds)
        results[steps] = {"summary": summary, "clips": [s.as_dict() for s in scores]}
        print(f"{steps:>5} " + " ".join(f"{summary[c]:>21.2f}" for c in COLUMNS)
              + f" {summary['seconds_per_clip']:>7.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if args.demo:
        demo_strip(pipe, Path(args.demo), args.demo_steps, args.seed)


if __name__ == "__main__":
    main()
