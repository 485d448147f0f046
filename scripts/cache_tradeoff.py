#!/usr/bin/env python3
"""Step caching on the trained tiny model: DiT calls saved vs fidelity to the uncached video.

    python scripts/cache_tradeoff.py --clips 8 --json docs/cache_tradeoff.json --plot docs/cache_tradeoff.png
    python scripts/cache_tradeoff.py --replot docs/cache_tradeoff.json --plot docs/cache_tradeoff.png  # no runs

Held-out clips (wanrt.tiny.data.heldout_seeds) at 64x64, 17 frames, 50 UniPC steps (shift 16, guide 5,
the defaults of `wanrt generate`), generated through the public pipeline: once with cache="none" and once
per threshold with cache="teacache". Per threshold: DiT calls and PSNR of the cached video against the
uncached one, for both reuse rules of wanrt/runtime/cache.py ("velocity" and "residual"), so the rule the
runtime uses (cache.REUSE) is the measured winner.
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

from wanrt.metrics import psnr  # noqa: E402
from wanrt.models.config import teacache_config  # noqa: E402
from wanrt.pipeline import FLF2VPipeline  # noqa: E402
from wanrt.runtime import cache  # noqa: E402
from wanrt.tiny import data  # noqa: E402

THRESHOLDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def run(pipe, clip, steps: int, seed: int, **kw):
    f, h, w = clip.frames.shape[:3]
    return pipe(clip.frames[0], clip.frames[-1], clip.prompt, max_area=h * w, frame_num=f, sample_steps=steps,
                seed=seed, progress=False, **kw)


def plot(results: dict, steps: int, default: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for rule, style in (("velocity", "o-"), ("residual", "s--")):
        rows = results[rule]
        saved = [100 * (1 - r["mean_calls"] / steps) for r in rows]
        ax.plot(saved, [r["min_psnr"] for r in rows], style, label=f"reuse {rule}: worst clip")
        ax.plot(saved, [r["mean_psnr"] for r in rows], style, alpha=0.35, label=f"reuse {rule}: mean")
        if rule == cache.REUSE:
            for r, s in zip(rows, saved):
                ax.annotate(f"{r['threshold']:g}", (s, r["min_psnr"]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
    ax.axhline(30, color="grey", lw=0.8, ls=":")
    ax.axvline(40, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"DiT calls saved (% of {steps})")
    ax.set_ylabel("PSNR vs uncached video (dB)")
    ax.set_title(f"TeaCache on the tiny model (held-out clips; default threshold {default:g})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def report(results: dict, steps: int, clips: int, default: float) -> None:
    print(f"{clips} held-out clips, 64x64x17, {steps} steps; PSNR vs uncached (dB)")
    print(f"{'rule':>9} {'threshold':>9} {'calls mean':>10} {'calls max':>9} {'saved min %':>11} "
          f"{'PSNR mean':>9} {'PSNR min':>8}")
    for rule, rows in results.items():
        for r in rows:
            mark = " <- default" if r["threshold"] == default and rule == cache.REUSE else ""
            saved = 100 * (1 - r["max_calls"] / steps)
            print(f"{rule:>9} {r['threshold']:>9g} {r['mean_calls']:>10.1f} {r['max_calls']:>9d} {saved:>11.0f} "
                  f"{r['mean_psnr']:>9.2f} {r['min_psnr']:>8.2f}{mark}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default="tiny")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--replot", help="print and plot the results of an earlier --json (marks today's default)")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        cfg = FLF2VPipeline.from_pretrained(saved["args"]["ckpt_dir"], device="cpu").config
        report(saved["results"], saved["args"]["steps"], saved["args"]["clips"], teacache_config(cfg.dit).threshold)
        if args.plot:
            plot(saved["results"], saved["args"]["steps"], teacache_config(cfg.dit).threshold, Path(args.plot))
        return
    torch.set_num_threads(args.threads)
    pipe = FLF2VPipeline.from_pretrained(args.ckpt_dir, device="cpu")
    default = teacache_config(pipe.config.dit).threshold
    thresholds = sorted(set(args.thresholds) | {default})
    seeds = data.heldout_seeds(args.clips)
    per_clip = {rule: {t: [] for t in thresholds} for rule in ("velocity", "residual")}
    chosen = cache.REUSE
    t0 = time.perf_counter()
    for s in seeds:
        clip = data.make_clip(s)
        ref = run(pipe, clip, args.steps, args.seed)
        assert ref.dit_calls == args.steps
        for rule in per_clip:
            cache.REUSE = rule
            for t in thresholds:
                v = run(pipe, clip, args.steps, args.seed, cache="teacache", cache_threshold=t)
                per_clip[rule][t].append({"seed": s, "dit_calls": v.dit_calls, "psnr": psnr(v.frames, ref.frames)})
        print(f"clip {s} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    cache.REUSE = chosen
    results = {}
    for rule, by_t in per_clip.items():
        results[rule] = []
        for t in thresholds:
            rows = by_t[t]
            calls = [r["dit_calls"] for r in rows]
            ps = [r["psnr"] for r in rows]
            results[rule].append({"threshold": t, "mean_calls": float(np.mean(calls)), "max_calls": max(calls),
                                  "min_calls": min(calls), "mean_psnr": float(np.mean(ps)), "min_psnr": min(ps),
                                  "clips": rows})
    report(results, args.steps, len(seeds), default)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "default": default, "reuse": chosen,
                                               "results": results}, indent=2))
    if args.plot:
        plot(results, args.steps, default, Path(args.plot))


if __name__ == "__main__":
    main()
