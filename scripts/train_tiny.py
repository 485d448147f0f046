#!/usr/bin/env python3
"""Train the shipped tiny FLF2V model on synthetic clips, on the CPU, and write it in the official layout.

    python scripts/train_tiny.py                       # all stages, into out/tiny_train, then wanrt/assets/tiny
    python scripts/train_tiny.py --stage vae           # one stage (each stage resumes / skips if done)

Stages (each saves its result in --workdir, so an interrupted run continues where it stopped):
  base     random T5 + CLIP (+ tokenizer) of the tiny config, seeded; they stay frozen (see wanrt/tiny/train.py)
  vae      the VAE as an autoencoder through its causal chunked path
  vae_long its decoder fine-tuned on whole 9-21 frame clips, the encoder frozen (--vae_long_steps; 0 skips):
           latents encoded before, and a DiT trained on them, stay valid (-> vae_long.pth, used from then on)
  vae_eval the VAE alone on the held-out target clips (vae_eval.json)
  latents  pre-encode the DiT training clips exactly as the pipeline does (latent, [first, zeros, last]
           latent + mask, CLIP tokens, T5 contexts of all prompts and of the negative prompt)
  dit      flow matching: x_t = (1 - s) x0 + s noise, target noise - x0, timestep int(1000 s), sigmas
           covering the shift-16 inference schedule, prompt dropout to the negative prompt, EMA
  varied_latents, varied  the second run: every trained size and length, varied scenes (-> varied_ema.pt)
  soup     the weighted mean of DiTs fine-tuned from one DiT (--soup FILE, repeated; --soup_weights)
           -> varied_ema.pt: a "model soup", one model with the runs' errors partly averaged out
  export   EMA DiT + VAE + the frozen encoders -> --out (official layout), sha256, loss-curve PNG

Everything is seeded (data by seed and step, noise by a per-step generator); timings go to
<workdir>/timings.json and the loss curves to <workdir>/loss.png. With the defaults the shipped model took
1778 s on a shared 2-core CPU with one torch thread (vae 533 s, latents 161 s, dit 1083 s); the training
stages save resumable state every 100 (VAE) / 250 (DiT) steps, so run it under nohup and rerun to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wanrt.models import loading, tiny  # noqa: E402
from wanrt.models.config import FLF2V_NEG_PROMPT  # noqa: E402
from wanrt.models.dit import WanDiT  # noqa: E402
from wanrt.models.vae import WanVAE  # noqa: E402
from wanrt.tiny import data, train  # noqa: E402

STAGES = ("base", "vae", "vae_long", "vae_eval", "latents", "dit", "varied_latents", "varied", "soup",
          "export")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def record_time(workdir: Path, stage: str, seconds: float) -> None:
    path = workdir / "timings.json"
    t = json.loads(path.read_text()) if path.is_file() else {}
    t[stage] = round(seconds, 1)
    path.write_text(json.dumps(t, indent=2))


def load_models(workdir: Path, vae: bool = True):
    """The frozen encoders (and tokenizer) exactly as the pipeline will load them from the checkpoint
    (T5 round-tripped through its bf16 file), plus the trained VAE when there is one."""
    models = loading.load(workdir / "base")
    path = vae_path(workdir)
    if vae and path.is_file():
        trained = load_vae(models.vae, path).eval()
        models = dataclasses.replace(models, vae=trained, config=models.config.replace(vae=trained.cfg))
    return models


def load_vae(vae: WanVAE, path: Path) -> WanVAE:
    """`vae` with the weights in `path`; widened first when they hold a wider decoder (--vae_long_decoder_dim)."""
    state = torch.load(path, weights_only=True)
    wide = state["decoder.conv1.weight"].shape[0] // vae.cfg.dim_mult[-1]
    if wide != vae.cfg.decoder_base_dim:
        vae = train.widen_decoder(vae, wide)
    vae.load_state_dict(state)
    return vae


def vae_path(workdir: Path) -> Path:
    """The trained VAE: the long-clip fine-tune when stage vae_long has run, else stage vae's."""
    long = workdir / "vae_long.pth"
    return long if long.is_file() else workdir / "vae.pth"


# --------------------------------------------------------------------------------------------- stages


def stage_base(args, workdir: Path) -> None:
    if (workdir / "base" / "config.json").is_file():
        return
    tmp = workdir / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # T5, CLIP and tokenizer exactly as in the shipped model (one seeded generator runs over the models in
    # order, so a VAE of another size would shift them): a DiT can then start from the shipped one
    tiny.write(tmp, layout="official", seed=args.seed, config=train.trained_config())
    if (args.vae_dim, args.vae_res_blocks) != (8, 1):  # a placeholder of the new shape; stage vae trains it
        torch.manual_seed(args.seed)
        vae = WanVAE(train.trained_config(args.vae_dim, args.vae_res_blocks).vae)
        torch.save(vae.state_dict(), tmp / loading.OFFICIAL_VAE)
    tmp.rename(workdir / "base")


def train_vae(workdir: Path, tag: str, vae: WanVAE, params: list, steps: int, lr: float, warmup: int,
              noise_seed: int, batch_of, train_encoder: bool = True, log_every: int = 50, save_every: int = 100,
              latent_noise: float = 0.1, colour_weight: float = 0.0) -> None:
    """AdamW on `params` with a cosine schedule, resumable from <tag>_state.pt; batch_of(step) -> (video,
    weight); the latent noise is seeded by noise_seed + step. -> <tag>.pth, <tag>_history.json."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    state_path, history, start = workdir / f"{tag}_state.pt", [], 0
    if state_path.is_file():  # resume
        st = torch.load(state_path, weights_only=True)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        history, start = st["history"], st["step"]
        log(f"{tag}: resuming at step {start}")
    t0 = time.time()
    with train.fast_vae_norm():
        for step in range(start, steps):
            for g in opt.param_groups:
                g["lr"] = train.cosine_lr(step, steps, lr, warmup=warmup)
            torch.manual_seed(noise_seed + step)  # latent noise, reproducible across resumes
            video, weight = batch_of(step)
            loss = train.vae_loss(vae, video, weight, latent_noise=latent_noise, train_encoder=train_encoder,
                                  colour_weight=colour_weight)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append((step, loss.recon, loss.psnr, loss.moments))
            if step % log_every == 0 or step == steps - 1:
                recent = history[-log_every:]
                log(f"{tag} {step:5d}/{steps}  recon {np.mean([h[1] for h in recent]):.4f}  "
                    f"psnr {np.mean([h[2] for h in recent]):.2f} dB  moments {np.mean([h[3] for h in recent]):.3f}  "
                    f"({time.time() - t0:.0f} s)")
            if (step + 1) % save_every == 0:
                torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "history": history,
                            "step": step + 1}, state_path)
    torch.save(vae.state_dict(), workdir / f"{tag}.pth")
    (workdir / f"{tag}_history.json").write_text(json.dumps(history))


def stage_vae(args, workdir: Path) -> None:
    if (workdir / "vae.pth").is_file():
        return
    torch.manual_seed(args.seed)
    vae = WanVAE(train.trained_config(args.vae_dim, args.vae_res_blocks).vae).train()
    train.init_vae(vae)

    def batch_of(step):  # crops for most steps, whole frames at the end (the middle attention sees the 8x8 grid)
        crop = 32 if step < args.vae_steps - args.vae_full_steps else None
        return train.vae_batch(step, args.vae_batch, args.seed, crop, varied=args.vae_varied)

    train_vae(workdir, "vae", vae, list(vae.parameters()), args.vae_steps, args.vae_lr, 50,
              args.seed * 1_000_003, batch_of)


def stage_vae_long(args, workdir: Path) -> None:
    """Stage vae's VAE, its decoder (conv2 + decoder) trained on whole clips of 9-21 frames
    (train.vae_clip_batch) with the encoder frozen (unless --vae_long_encoder): a 17-frame clip decodes its last
    frame after four cached chunks, which windows of <= 9 frames never train (v3 VAE alone: last frames down to
    21 dB)."""
    if (workdir / "vae_long.pth").is_file() or not args.vae_long_steps:
        return
    vae = load_vae(WanVAE(train.trained_config(args.vae_dim, args.vae_res_blocks).vae), workdir / "vae.pth")
    if args.vae_long_decoder_dim > vae.cfg.decoder_base_dim:  # same output, more channels; same latents
        vae = train.widen_decoder(vae, args.vae_long_decoder_dim, seed=args.seed)
    vae.train()
    if args.vae_long_encoder:  # the whole VAE: its latents change, so run varied_latents and the DiT after
        params = list(vae.parameters())
    else:
        params = [*vae.conv2.parameters(), *vae.decoder.parameters()]  # the encoder runs under no_grad (vae_loss)
    steps = args.vae_long_steps

    def batch_of(step):
        crop = 32 if step < steps - args.vae_long_full_steps else None
        return train.vae_clip_batch(step, args.vae_long_batch, args.seed, crop, halo_weight=args.vae_long_halo_weight,
                                    motion_weight=args.vae_long_motion_weight,
                                    object_weight=args.vae_long_object_weight, hop_fraction=args.vae_long_hops,
                                    crop_on_object=args.vae_long_object_crops)

    train_vae(workdir, "vae_long", vae, params, steps, args.vae_long_lr, 20, args.seed * 1_000_003 + 700_000,
              batch_of, train_encoder=args.vae_long_encoder, log_every=25, save_every=50,
              latent_noise=args.vae_long_latent_noise, colour_weight=args.vae_long_colour_weight)


def stage_vae_eval(args, workdir: Path) -> None:
    """The trained VAE alone on the held-out target clips (scripts/eval_tiny.py --targets, its "vae" rows): the
    bound on what any DiT trained on its latents can reach. -> vae_eval.json, one line per size."""
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.runtime.backends import eager
    from wanrt.tiny import evaluate

    final = workdir / ("vae_long_eval.json" if vae_path(workdir).name == "vae_long.pth" else "vae_eval.json")
    if final.is_file():
        return
    models = load_models(workdir)
    pipe = FLF2VPipeline(eager(models), models.config, models.text_encoder.tokenizer, torch.device("cpu"))
    out = {}
    for w, h in evaluate.TARGET_SIZES:
        summary, scores = evaluate.targets(pipe, data.heldout_seeds(20), w, h, vae_only=True)
        summary["clips_passing"] = sum(evaluate.meets_targets(s) for s in scores)
        out[f"{w}x{h}"] = summary
        log(f"vae_eval {w}x{h}: {summary['clips_passing']}/20 clips meet the targets, crossfaded "
            f"{summary['crossfaded']}, max colour error {summary['max_color_error']:.0f}, min first/last "
            f"{summary['min_psnr_first']:.1f}/{summary['min_psnr_last']:.1f} dB")
    final.write_text(json.dumps(out, indent=1))


def group_seeds(args, groups=train.GROUPS, clips: int | None = None, first: int | None = None
                ) -> dict[tuple[int, int, int], list[int]]:
    """Disjoint training seeds per (frames, width, height) group."""
    out = {}
    next_seed = args.seed * 100_000 if first is None else first
    for frames, w, h, share in groups:
        n = max(1, round((args.clips if clips is None else clips) * share))
        out[(frames, w, h)] = list(range(next_seed, next_seed + n))
        next_seed += n
    assert next_seed < data.HELDOUT_SEED0
    return out


def encode_latents(args, workdir: Path, final: Path, seeds: dict, make) -> None:
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.runtime.backends import eager

    models = load_models(workdir)
    pipe = FLF2VPipeline(eager(models), models.config, models.text_encoder.tokenizer, torch.device("cpu"))
    prompts = sorted({p for (f, w, h), s in seeds.items() for p in train.group_prompts(s, f, w, h, make)})
    prompts.append(FLF2V_NEG_PROMPT)  # last row: the unconditional branch (prompt dropout)
    index = {p: i for i, p in enumerate(prompts)}
    context, bias = train.compact_context(pipe, prompts)
    groups = {}
    t0 = time.time()
    with train.fast_vae_norm():
        for (frames, w, h), s in seeds.items():
            groups[(frames, w, h)] = train.encode_group(pipe, s, frames, w, h, index, make=make).__dict__
            log(f"latents: {len(s)} clips of {frames} frames {w}x{h} ({time.time() - t0:.0f} s)")
    x0 = torch.cat([g["x0"].flatten() for g in groups.values()])
    log(f"latents: per-element mean {x0.mean():.3f} std {x0.std():.3f} (the DiT assumes ~0 / ~1)")
    torch.save({"prompts": prompts, "context": context, "bias": bias, "groups": groups}, final)


def stage_latents(args, workdir: Path) -> None:
    final = workdir / "latents.pt"
    if not final.is_file():
        encode_latents(args, workdir, final, group_seeds(args), data.make_clip)


def varied_seeds(args) -> dict:
    # after every seed of the first run, so the two runs never share a clip
    return group_seeds(args, train.VARIED_GROUPS, args.varied_clips, first=args.seed * 100_000 + 50_000)


def stage_varied_latents(args, workdir: Path) -> None:
    final = workdir / "varied_latents.pt"
    if not final.is_file():
        encode_latents(args, workdir, final, varied_seeds(args), train.varied_clip)


def load_dit_state(path: Path) -> dict[str, torch.Tensor]:
    """A DiT state dict from a .safetensors file (a shipped model) or a torch.save'd one (a run's EMA)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def train_dit(args, workdir: Path, tag: str, latents: str, groups, steps: int, lr: float, init: Path | None,
              given_weight: float) -> None:
    """Flow matching on pre-encoded latents; `tag` names the files (<tag>_state.pt, <tag>_ema.pt, ...)."""
    final = workdir / f"{tag}_ema.pt"
    if final.is_file():
        return
    lat = torch.load(workdir / latents, weights_only=True)
    extra = [Path(x) for x in (args.varied_latents_extra if tag == "varied" else [])]
    if extra:  # more clips at once: other runs' pre-encoded sets (the same VAE and text encoder)
        lat = train.merge_latents([lat] + [torch.load(x, weights_only=True) for x in extra])
        log(f"{tag}: {latents} + {', '.join(map(str, extra))}: "
            f"{sum(len(g['x0']) for g in lat['groups'].values())} clips, {len(lat['prompts'])} prompts")
    sets = {k: train.LatentSet(**v) for k, v in lat["groups"].items()}
    keys = list(sets)
    shares = np.array([g[3] for g in groups])
    context, bias = lat["context"], lat["bias"]
    neg = len(lat["prompts"]) - 1
    torch.manual_seed(args.seed)
    cfg = train.trained_config(dit_layers=args.dit_layers).dit
    dit = WanDiT(cfg).train()
    if init is None:
        train.init_dit(dit)
    else:  # a second run continues from the first run's EMA weights (or another trained DiT, --varied_init)
        state = load_dit_state(init)
        blocks = train.dit_depth(state)
        if blocks != cfg.num_layers:  # a deeper DiT grown from a trained one, the same function at step 0
            try:
                state = train.grow_dit(state, cfg.num_layers)
            except ValueError as e:
                raise SystemExit(f"error: {init}: {e}") from None
            log(f"{tag}: {init} grown from {blocks} to {cfg.num_layers} blocks")
        dit.load_state_dict(state)
    ema = train.EMA(dit, args.ema)
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ropes = {}
    state_path, history, start = workdir / f"{tag}_state.pt", [], 0
    if state_path.is_file():
        st = torch.load(state_path, weights_only=True)
        dit.load_state_dict(st["model"])
        ema.shadow = st["ema"]
        opt.load_state_dict(st["opt"])
        history, start = st["history"], st["step"]
        log(f"{tag}: resuming at step {start}")
    # the first run's data order is unchanged by the second run's existence; a run continuing the second
    # (--varied_init its EMA, another --varied_salt) draws other batches and noise than the one it continues
    salt = 7 if init is None else args.varied_salt
    t0, colours = time.time(), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = train.cosine_lr(step, steps, lr, warmup=100)
        rng = np.random.default_rng([args.seed, salt, step])
        offset = 0 if init is None else 500_000 * (salt - 10)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step + offset)
        key = keys[rng.choice(len(keys), p=shares / shares.sum())]
        g = sets[key]
        idx = torch.from_numpy(rng.integers(0, len(g.x0), args.dit_batch))
        x0, y, clip_fea, pidx = g.x0[idx], g.y[idx], g.clip[idx], g.prompt[idx].clone()
        # object cells weigh more: the static background is copied from the given frames early on, the
        # moving object is what the model has to learn to place
        weight = 1.0 + args.object_weight * g.objects[idx][:, None].float()
        # the latent frames that carry the given first and last frame: users compare those to their inputs
        weight[:, :, [0, -1]] += given_weight
        pidx[torch.from_numpy(rng.random(args.dit_batch) < args.prompt_dropout)] = neg
        sigma = train.sample_sigmas(args.dit_batch, gen)
        # the sampler feeds the DiT int(1000 sigma) (truncated) while mixing with the float sigma; do the same
        t = (sigma * 1000).long().clamp(0, 999)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        grid = dit.grid(x0)
        if grid not in ropes:
            ropes[grid] = dit.rope(*grid)
        pred = train.dit_forward_compact(dit, xt, t, context[pidx], bias[pidx], clip_fea, y, ropes[grid])
        per_sample = (weight * (pred - (noise - x0)).square()).flatten(1).mean(1) / weight.flatten(1).mean(1)
        loss = per_sample.mean()
        if args.colour_weight:  # the object's mean latent per frame, from the x0 this velocity implies
            colour = train.object_mean_loss(xt - s * pred, x0, g.objects[idx]).mean()
            loss = loss + args.colour_weight * colour
            colours.append(colour.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        ema.update(dit, step)
        # x0 error at high noise (sigma > 0.8): what 4-10 step sampling mostly relies on
        hi = sigma > 0.8
        x0_err = ((per_sample[hi] * sigma[hi] ** 2).mean().item() if hi.any() else float("nan"))
        history.append((step, per_sample.mean().item(), x0_err))
        if step % 50 == 0 or step == steps - 1:
            recent = history[-50:]
            log(f"{tag} {step:5d}/{steps}  loss {np.mean([h[1] for h in recent]):.4f}  "
                f"x0 mse (sigma>0.8) {np.nanmean([h[2] for h in recent]):.4f}  "
                + (f"colour {np.mean(colours[-50:]):.4f}  " if colours else "") + f"({time.time() - t0:.0f} s)")
        if (step + 1) % 250 == 0:
            torch.save({"model": dit.state_dict(), "ema": ema.shadow, "opt": opt.state_dict(),
                        "history": history, "step": step + 1}, state_path)
    torch.save(ema.shadow, final)
    (workdir / f"{tag}_history.json").write_text(json.dumps(history))


def stage_dit(args, workdir: Path) -> None:
    train_dit(args, workdir, "dit", "latents.pt", train.GROUPS, args.dit_steps, args.dit_lr, None, args.given_weight)


def stage_varied(args, workdir: Path) -> None:
    """The second run: the first run's DiT on every trained size and length and the varied scenes."""
    if args.varied_steps:
        init = Path(args.varied_init) if args.varied_init else workdir / "dit_ema.pt"
        if not init.is_file():
            raise SystemExit(f"error: the second run starts from {init}, which does not exist: run stage dit first "
                             "(or pass --varied_init with a trained DiT)")
        train_dit(args, workdir, "varied", "varied_latents.pt", train.VARIED_GROUPS, args.varied_steps,
                  args.varied_lr, init, args.varied_given_weight)


def stage_soup(args, workdir: Path) -> None:
    """varied_ema.pt = sum_i w_i DiT_i (fp32), the weights normalised to sum 1 (default: equal)."""
    final = workdir / "varied_ema.pt"
    if not args.soup or final.is_file():
        return
    weights = args.soup_weights or [1.0] * len(args.soup)
    try:
        states = [load_dit_state(Path(f)) for f in args.soup]
        # a DiT shallower than --dit_layers joins grown (the same function), so a grown run soups with its start
        states = [train.grow_dit(st, args.dit_layers) if train.dit_depth(st) < args.dit_layers else st for st in states]
        soup = train.soup(states, weights, names=args.soup)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torch.save(soup, final)
    log(f"soup: {len(args.soup)} DiTs, weights {weights} (normalised to sum 1) -> {final}")


def stage_export(args, workdir: Path) -> None:
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(workdir / "base", tmp)
    models = load_models(workdir)
    final = "varied_ema.pt" if args.varied_steps else "dit_ema.pt"
    state = torch.load(workdir / final, weights_only=True)
    # the base holds a 4-block DiT; a grown one (--dit_layers) sets its own depth, in config.json too
    dit = WanDiT(dataclasses.replace(models.config.dit, num_layers=train.dit_depth(state)))
    dit.load_state_dict(state)
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "num_layers": dit.cfg.num_layers}, indent=2))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(tmp / f"{loading.OFFICIAL_DIT_STEM}.safetensors"))
    torch.save(models.vae.state_dict(), tmp / loading.OFFICIAL_VAE)
    for f in tmp.rglob("*"):  # package data: readable by everyone (safetensors writes 0600)
        f.chmod(0o755 if f.is_dir() else 0o644)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    digest = tiny.tree_sha256(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"export: {out} ({size / 1e6:.1f} MB), sha256 {digest}")
    (workdir / "sha256.txt").write_text(digest + "\n")
    plot(workdir)


def plot(workdir: Path) -> None:
    """loss.png: the curves of the runs whose histories are in the workdir (VAE, first DiT run, second run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(n, json.loads((workdir / f"{n}_history.json").read_text())) for n in ("vae", "vae_long", "dit", "varied")
            if (workdir / f"{n}_history.json").is_file()]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)

    def smooth(v, k=25):
        v = np.asarray(v, dtype=float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v

    for ax, (name, hist) in zip(axes[0], runs):
        if name.startswith("vae"):
            ax.plot(smooth([h[2] for h in hist]), label="reconstruction PSNR (dB)")
            ax.set_xlabel(f"{'VAE' if name == 'vae' else 'decoder'} step (32x32 crops, then whole frames)")
            ax.set_ylabel("training-batch PSNR (dB)")
            ax.set_title("VAE (autoencoder on synthetic clips)" if name == "vae" else
                         "VAE decoder on whole 9-21 frame clips (encoder frozen)")
        else:
            ax.semilogy(smooth([h[1] for h in hist]), label="velocity MSE (weighted)")
            x0 = [h[2] for h in hist]
            ax.semilogy(smooth([v for v in x0 if not math.isnan(v)]), label="x0 MSE at sigma > 0.8")
            ax.set_xlabel("DiT step")
            ax.set_title("DiT, first run (flow matching, FLF2V conditioning)" if name == "dit" else
                         "DiT on every size and length, varied scenes")
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(workdir / "loss.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "out" / "tiny_train"))
    p.add_argument("--out", default=str(ROOT / "wanrt" / "assets" / "tiny"))
    p.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared 2-core box)")
    p.add_argument("--vae_steps", type=int, default=1400)
    p.add_argument("--vae_full_steps", type=int, default=250, help="last VAE steps on whole 64x64 frames")
    p.add_argument("--vae_batch", type=int, default=8)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_dim", type=int, default=8, help="VAE base width (the shipped model: 8)")
    p.add_argument("--vae_res_blocks", type=int, default=1, help="VAE residual blocks per level")
    p.add_argument("--vae_varied", action="store_true",
                   help="train the VAE on the second run's data (every size, varied scenes) too")
    p.add_argument("--vae_long_steps", type=int, default=0,
                   help="stage vae_long: decoder steps on whole 9-21 frame clips, encoder frozen (0: skip)")
    p.add_argument("--vae_long_full_steps", type=int, default=100, help="last vae_long steps on whole frames")
    p.add_argument("--vae_long_batch", type=int, default=4)
    p.add_argument("--vae_long_lr", type=float, default=3e-4)
    p.add_argument("--vae_long_encoder", action="store_true",
                   help="stage vae_long trains the encoder too (its latents change: rerun varied_latents and the DiT)")
    p.add_argument("--vae_long_halo_weight", type=float, default=0.0,
                   help="extra vae_long loss weight of the background within 3 px of the object (0: none)")
    p.add_argument("--vae_long_latent_noise", type=float, default=0.1,
                   help="std of the noise vae_long adds to the latent (train.vae_loss): a DiT's latents are not exact")
    p.add_argument("--vae_long_object_weight", type=float, default=4.0,
                   help="vae_long object pixels weigh 1 + this (train._weighted_batch): their colour is the target")
    p.add_argument("--vae_long_motion_weight", type=float, default=0.0,
                   help="vae_long frames weigh 1 + this x their object motion squared (train.frame_motion)")
    p.add_argument("--vae_long_hops", type=float, default=0.0,
                   help="share of vae_long clips that are one object in a hop (train.vae_clip_batch; 0: as drawn)")
    p.add_argument("--varied_latents_extra", action="append", default=[], metavar="PATH",
                   help="stage varied also trains on this varied_latents.pt of another run (same VAE; repeatable)")
    p.add_argument("--vae_long_colour_weight", type=float, default=0.0,
                   help="vae_long weight of the error's 4x4-cell means (train.vae_loss: the objects' tint; 0: none)")
    p.add_argument("--vae_long_decoder_dim", type=int, default=0,
                   help="stage vae_long first widens the decoder to this base width (train.widen_decoder; 0: as is)")
    p.add_argument("--vae_long_object_crops", action="store_true",
                   help="vae_long crops centred on the object of a frame drawn by its motion, not anywhere")
    p.add_argument("--clips", type=int, default=2400, help="DiT training clips over all groups")
    p.add_argument("--dit_steps", type=int, default=3500)
    p.add_argument("--dit_batch", type=int, default=32)
    p.add_argument("--dit_lr", type=float, default=3e-3)
    p.add_argument("--dit_layers", type=int, default=4,
                   help="DiT blocks; more than --varied_init has grows it (train.grow_dit: new blocks start as "
                        "the identity)")
    p.add_argument("--varied_clips", type=int, default=3200, help="clips of the second run over all its groups")
    p.add_argument("--varied_steps", type=int, default=8000, help="second-run DiT steps (0: ship the first run)")
    p.add_argument("--varied_lr", type=float, default=1e-3)
    p.add_argument("--varied_init", default=None,
                   help="DiT weights the second run starts from (.pt or the official .safetensors; default: the "
                        "first run's EMA in --workdir). With a new VAE, a DiT trained on another VAE's latents "
                        "still carries the conditioning it learned, and stages latents/dit can be skipped")
    p.add_argument("--varied_salt", type=int, default=11,
                   help="data-order salt of the second run (>= 11; another value for a run that continues one)")
    p.add_argument("--varied_given_weight", type=float, default=3.0)
    p.add_argument("--soup", action="append", default=[],
                   help="a DiT file (.safetensors or a run's *_ema.pt) for stage soup; repeat for each")
    p.add_argument("--soup_weights", type=float, nargs="+", default=None,
                   help="one weight per --soup file (normalised; default equal)")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--prompt_dropout", type=float, default=0.1)
    p.add_argument("--object_weight", type=float, default=3.0, help="extra DiT loss weight of object cells")
    p.add_argument("--colour_weight", type=float, default=0.0,
                   help="DiT loss weight of the object's colour term (train.object_mean_loss: the object's mean "
                        "latent per frame, from the predicted x0); 0: off")
    p.add_argument("--given_weight", type=float, default=2.0,
                   help="extra DiT loss weight of the first and last latent frame")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "args.json").write_text(json.dumps(vars(args), indent=2))
    for stage in args.stage or STAGES:
        t0 = time.time()
        log(f"stage {stage}")
        globals()[f"stage_{stage}"](args, workdir)
        record_time(workdir, stage, time.time() - t0)
        log(f"stage {stage} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
