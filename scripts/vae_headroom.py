#!/usr/bin/env python3
"""Where does the tiny VAE lose an object's colour: in its encoder or in its decoder?

For held-out target clips (17 frames, one disk or square) this scores the clip through the VAE (encode,
decode: the `vae` rows of `eval_tiny.py --targets`) and then through the same frozen decoder from a latent
optimised to reproduce the clip (Adam on the latent alone, mean squared error against the true frames). If the
optimised latent passes where the encoder's fails, the decoder can draw the clip and the encoder is what stops
it: a better encoder (and then a DiT retrained on its latents) could pass it.

    python scripts/vae_headroom.py                            # the shipped model's VAE-alone failures
    python scripts/vae_headroom.py --clip 10000017:64x64 --steps 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wanrt.pipeline import FLF2VPipeline  # noqa: E402
from wanrt.tiny import data, evaluate  # noqa: E402

# the clips of docs/tiny_targets.json (reported seeds) that fail colour through the shipped VAE alone
FAILING = ("10000008:64x64", "10000015:64x64", "10000017:64x64", "10000017:64x48", "10000008:48x64",
           "10000012:48x64", "10000016:48x64", "10000008:96x64", "10000017:96x64")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default="tiny")
    ap.add_argument("--clip", action="append", help="SEED:WxH (repeatable; default: the shipped VAE's failures)")
    ap.add_argument("--steps", type=int, default=150, help="Adam steps on the latent")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FLF2VPipeline.from_pretrained(args.ckpt_dir)
    for p in pipe.backends.vae.parameters():  # the eager VAE module: no gradients for the frozen decoder
        p.requires_grad_(False)
    print(f"{'clip':>15} {'colour (VAE)':>12} {'colour (optimised)':>18} {'middle dB':>11} {'dz/z':>5} {'pass':>9}")
    for spec in args.clip or FAILING:
        seed, size = spec.split(":")
        w, h = map(int, size.split("x"))
        t0 = time.time()
        clip = data.make_clip(int(seed), data.FRAMES, w, h, shapes=evaluate.SIMPLE)
        through, optimised, change = evaluate.latent_headroom(pipe, clip.frames, args.steps, args.lr)
        a, b = evaluate.score(through, clip, int(seed)), evaluate.score(optimised, clip, int(seed))
        ok = f"{'yes' if evaluate.meets_targets(a) else 'no'} -> {'yes' if evaluate.meets_targets(b) else 'no'}"
        print(f"{spec:>15} {a.color_error:>12.1f} {b.color_error:>18.1f} {a.psnr_middle:>5.1f}/{b.psnr_middle:<5.1f}"
              f" {change:>5.2f} {ok:>9}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
