#!/usr/bin/env python3
"""Fit TeaCache's rescaling polynomial for a model: indicator change -> DiT output change.

    python scripts/fit_teacache.py                          # the trained tiny model, print the fit
    python scripts/fit_teacache.py --write --threshold 0.3  # and store it in wanrt/models/config.py

TeaCache (wanrt/runtime/cache.py) predicts how much the DiT's output changes between two consecutive
steps from how much its time embedding changed. This script runs uncached sampling on training clips
(seeds from wanrt.tiny.data.TRAIN_SEEDS, never the held-out ones), records for every consecutive pair
of steps x = rel-L1 of the indicator (the time embedding `e`) and y = rel-L1 of the DiT output (per CFG
branch, averaged), and fits y ~ poly(x) of degree 4 (least squares, numpy.polyfit) as the authors do.
With --write the coefficients, the measured default threshold and the fit's provenance replace the
`tiny teacache` block of wanrt/models/config.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wanrt.pipeline import FLF2VPipeline  # noqa: E402
from wanrt.runtime.cache import rel_l1  # noqa: E402
from wanrt.tiny import data, evaluate  # noqa: E402

CONFIG = ROOT / "wanrt" / "models" / "config.py"


class Recorder:
    """Wraps the eager DiT backend: keeps every step's timestep and output (batch 2: cond, uncond)."""

    def __init__(self, dit):
        self.dit = dit
        self.capturable = False
        self.outputs: list[torch.Tensor] = []
        self.t: list[int] = []

    def time_embeddings(self, timesteps):
        return self.dit.time_embeddings(timesteps)

    def bind(self, context, clip_fea, y, timesteps):
        call = self.dit.bind(context, clip_fea, y, timesteps)

        def record(x, t):
            out = call(x, t)
            self.outputs.append(out.detach().clone())
            self.t.append(int(t[0]))
            return out

        return record


def pairs(pipe, recorder, clip, steps: int, seed: int) -> tuple[list[float], list[float]]:
    recorder.outputs.clear()
    recorder.t.clear()
    evaluate.generate(pipe, clip, steps, seed=seed)
    e, _ = recorder.time_embeddings(torch.tensor(recorder.t))
    xs, ys = [], []
    for i in range(1, len(recorder.t)):
        xs.append(rel_l1(e[i], e[i - 1]))
        out, prev = recorder.outputs[i], recorder.outputs[i - 1]
        ys.append(float(np.mean([rel_l1(out[b], prev[b]) for b in range(out.shape[0])])))
    return xs, ys


def write_block(key: tuple[int, int, int], coefficients, threshold: float, source: str) -> None:
    text = CONFIG.read_text()
    coef = ", ".join(f"{c:.8e}" for c in coefficients)
    block = ("    # BEGIN tiny teacache (written by scripts/fit_teacache.py; do not edit by hand)\n"
             f"    # {source}\n"
             f"    {key}: TeaCacheConfig(\n"
             f"        coefficients=({coef}),\n"
             f"        indicator=\"e\", first_steps=1, last_steps=1, threshold={threshold},\n"
             f"        source=\"scripts/fit_teacache.py\"),\n"
             "    # END tiny teacache\n")
    new, n = re.subn(r"    # BEGIN tiny teacache.*?# END tiny teacache\n", block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{CONFIG}: the '# BEGIN tiny teacache' / '# END tiny teacache' block was not found")
    CONFIG.write_text(new)
    print(f"wrote the fit into {CONFIG}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default="tiny")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 30, 50], help="schedules to sample pairs from")
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--threshold", type=float, default=None, help="default threshold to store (with --write)")
    p.add_argument("--write", action="store_true", help="store the fit in wanrt/models/config.py")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FLF2VPipeline.from_pretrained(args.ckpt_dir, device="cpu")
    recorder = Recorder(pipe.backends.dit)
    pipe.backends.dit = recorder
    seeds = list(data.TRAIN_SEEDS[:args.clips])
    xs, ys = [], []
    for steps in args.steps:
        for s in seeds:
            x, y = pairs(pipe, recorder, data.make_clip(s), steps, args.seed)
            xs += x
            ys += y
        print(f"{steps} steps: {len(seeds)} clips, {len(xs)} pairs so far", flush=True)
    xs, ys = np.array(xs), np.array(ys)
    coefficients = np.polyfit(xs, ys, args.degree)
    resid = ys - np.polyval(coefficients, xs)
    print(f"fit over {len(xs)} pairs, x in [{xs.min():.4f}, {xs.max():.4f}], y in [{ys.min():.4f}, {ys.max():.4f}]")
    print(f"rms residual {np.sqrt(np.mean(resid ** 2)):.4f} (y rms {np.sqrt(np.mean(ys ** 2)):.4f})")
    print("coefficients (highest power first):", ", ".join(f"{c:.8e}" for c in coefficients))
    if args.write:
        if args.threshold is None:
            raise SystemExit("--write needs --threshold (the default measured by scripts/cache_tradeoff.py)")
        d = pipe.config.dit
        source = (f"{args.ckpt_dir}: {len(seeds)} training clips x {args.steps} steps, {len(xs)} pairs, degree "
                  f"{args.degree}, rms residual {np.sqrt(np.mean(resid ** 2)):.4f}")
        write_block((d.dim, d.num_layers, d.ffn_dim), coefficients, args.threshold, source)


if __name__ == "__main__":
    main()
