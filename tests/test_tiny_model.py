"""The shipped trained tiny model: integrity, the random twin, and that it really does FLF2V.

The quality test runs the public pipeline on held-out synthetic clips (seeds never used in training)
with few steps: the given frames must come back (PSNR >= 25 dB) and the object must travel along its
path, far closer than a static video (the first frame repeated) would be.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from wanrt.models import loading, tiny
from wanrt.models.checkpoint import CheckpointError
from wanrt.tiny import data, evaluate, train

pytestmark = pytest.mark.skipif(not (tiny.TRAINED_DIR / "config.json").is_file(),
                                reason="the trained tiny checkpoint is not in this checkout")


@pytest.fixture(scope="module")
def pipe():
    from wanrt.pipeline import FLF2VPipeline

    return FLF2VPipeline.from_pretrained("tiny", device="cpu")


def test_tiny_is_the_shipped_trained_checkpoint():
    folder, layout = loading.resolve("tiny")
    assert layout == "official" and folder == tiny.TRAINED_DIR
    assert tiny.tree_sha256(folder) == tiny.TRAINED_SHA256
    cfg = loading.Checkpoint("tiny").config
    assert cfg.dit.num_heads == 4  # the 2- and 4-way head splits of the parallel tests still apply
    assert cfg.t5 == train.trained_config().t5
    assert cfg.dit == train.trained_config(dit_layers=train.SHIPPED_DIT_LAYERS).dit


def test_trained_model_samples_at_its_own_guide_scale(pipe, monkeypatch):
    """The trained checkpoint carries guide scale 2.0 (models/tiny.py TRAINED_SAMPLE: it passes more held-out
    clips there than at the official 5.0); a request without one gets it, an engine manifest's config keeps it,
    a given value wins, and tiny-random (like any other checkpoint) keeps the official 5.0 and 16. Switched off
    (SampleConfig() for the trained folder) the first assertion fails and test_readme_target_rows_at_64x64 with
    it (with run 13's decoder: 11 clips at guide 5.0 against 14 at 2.0)."""
    from wanrt.models.config import SampleConfig, WanConfig
    from wanrt.samples import SAMPLE_PROMPT, sample_frames

    assert pipe.config.sample == SampleConfig(guide_scale=2.0, shift=16.0) == tiny.TRAINED_SAMPLE
    used = []
    real = pipe.denoise
    monkeypatch.setattr(pipe, "denoise", lambda *a, **kw: used.append((kw["guide_scale"], kw["sample_shift"]))
                        or real(*a, **kw))
    first, last = sample_frames()
    kw = dict(max_area=32 * 32, frame_num=5, sample_steps=1, seed=0, progress=False)
    pipe(first, last, SAMPLE_PROMPT, **kw)
    pipe(first, last, SAMPLE_PROMPT, guide_scale=5.0, sample_shift=8.0, **kw)
    assert used == [(2.0, 16.0), (5.0, 8.0)]
    stored = pipe.config.to_dict()  # what an engine dir's manifest records
    assert WanConfig.from_dict(stored).sample == tiny.TRAINED_SAMPLE
    del stored["sample"]  # a manifest written before the field: the official values
    assert WanConfig.from_dict(stored).sample == SampleConfig(5.0, 16.0)
    assert loading.load("tiny-random", components=()).config.sample == SampleConfig(5.0, 16.0)


def test_altered_checkpoint_is_refused(tmp_path):
    copy = shutil.copytree(tiny.TRAINED_DIR, tmp_path / "tiny")
    assert tiny.trained(copy) == copy
    vae = copy / loading.OFFICIAL_VAE
    raw = bytearray(vae.read_bytes())
    raw[-100] ^= 1
    vae.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        tiny.trained(copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        tiny.trained(copy)


def test_tiny_random_still_resolves_to_random_weights():
    folder, layout = loading.resolve("tiny-random")
    assert layout == "official" and folder != tiny.TRAINED_DIR
    models = loading.load("tiny-random", components=("dit",))
    _, dit, *_ = tiny.random_models(seed=0)
    ref = dit.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in models.dit.state_dict().items())


def test_clips_are_deterministic_and_prompts_use_the_tokenizer_words():
    a, b = data.make_clip(123), data.make_clip(123)
    assert np.array_equal(a.frames, b.frames) and a.prompt == b.prompt
    assert a.frames.shape == (17, 64, 64, 3) and a.frames.dtype == np.uint8
    words = set(tiny._WORDS)
    for s in range(50):
        assert set(data.make_clip(s).prompt.split()) <= words
    assert set(data.heldout_seeds(20)).isdisjoint(range(data.HELDOUT_SEED0))
    # the selection set (eval_tiny.py --first_clip 20) is 20 other held-out clips, none of the reported 20
    reported, selection = data.heldout_seeds(20), data.heldout_seeds(20, first=20)
    assert len(set(selection)) == 20 and set(selection).isdisjoint(reported) and min(selection) > data.HELDOUT_SEED0


@pytest.mark.parametrize("frames,width,height", [(9, 64, 64), (13, 48, 64), (21, 96, 64), (17, 64, 48)])
def test_varied_scenes_are_deterministic_and_use_the_tokenizer_words(frames, width, height):
    words = set(tiny._WORDS)
    counts = set()
    for s in range(30):
        a, b = data.make_scene(s, frames, width, height), data.make_scene(s, frames, width, height)
        assert np.array_equal(a.frames, b.frames) and a.prompt == b.prompt
        assert a.frames.shape == (frames, height, width, 3) and set(a.prompt.split()) <= words
        assert a.prompt.count(" a ") == a.objects - 1  # one clause per object
        counts.add(a.objects)
        # the first object moves at least MIN_TRAVEL (in units of the 64-px design)
        assert np.hypot(*(a.centers[-1] - a.centers[0])) >= data.MIN_TRAVEL * max(width, height) / 64 - 1e-9
    assert counts == {1, 2, 3}


def test_object_checks_catch_a_cross_fade_a_smear_and_a_colour_change():
    """The held-out checks must fail on what the issue saw: a cross-fade (first and last frame blended),
    an object smeared over its path, and an object whose colour changes; the truth passes them all."""
    clip = data.make_clip(data.heldout_seeds(1)[0], shapes=evaluate.SIMPLE)
    truth = evaluate.score(clip.frames, clip)
    assert truth.crossfaded == 0 and truth.color_error < 1 and truth.relative_centroid_error == 0
    f = clip.frames.astype(np.float64)
    w = np.linspace(0, 1, len(f))[:, None, None, None]
    fade = np.rint((1 - w) * f[:1] + w * f[-1:]).astype(np.uint8)
    fade[0], fade[-1] = clip.frames[0], clip.frames[-1]
    assert evaluate.score(fade, clip).crossfaded >= 5
    smear = clip.frames.copy()
    for i in range(1, len(f) - 1):  # every middle frame shows the object at all its positions at once
        smear[i] = clip.frames.min(0) if clip.color.sum() < clip.background.sum(-1).mean() else clip.frames.max(0)
    assert evaluate.score(smear, clip).crossfaded == len(f) - 2
    recolour = clip.frames.copy()
    m = data.object_mask(clip.frames, clip.background)
    recolour[8][m[8]] = 255 - recolour[8][m[8]]
    assert evaluate.score(recolour, clip).color_error > 40


def test_compact_training_forward_equals_the_model_forward(pipe):
    from wanrt.models.config import FLF2V_NEG_PROMPT
    from wanrt.models.dit import WanDiT

    prompts = ["a small red disk jumps up and to the left", FLF2V_NEG_PROMPT]
    context, bias = train.compact_context(pipe, prompts)
    full = pipe.encode_text(prompts)
    torch.manual_seed(0)
    dit = WanDiT(train.trained_config().dit).eval()
    x, y = torch.randn(2, 16, 3, 6, 8), torch.randn(2, 20, 3, 6, 8)
    clip, t = torch.randn(2, 34, 160), torch.tensor([999, 250])
    with torch.no_grad():
        ref = dit(x, t, full, clip, y)
        out = train.dit_forward_compact(dit, x, t, context, bias, clip, y, dit.rope(3, 3, 4))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_latent_headroom_fits_the_latent_through_the_frozen_decoder():
    """scripts/vae_headroom.py: a latent optimised through the shipped decoder reproduces a held-out hop clip
    better than the encoder's latent does (the evidence that the encoder bounds small objects' colour), and the
    decoder itself is left as it was."""
    from wanrt.metrics import psnr
    from wanrt.pipeline import FLF2VPipeline

    pipe = FLF2VPipeline.from_pretrained("tiny")
    decoder = {k: v.clone() for k, v in pipe.backends.vae.state_dict().items()}
    for p in pipe.backends.vae.parameters():
        p.requires_grad_(False)
    clip = data.make_clip(10000017, 5, 64, 48, shapes=evaluate.SIMPLE)  # a small red disk in a hop
    through, optimised, change = evaluate.latent_headroom(pipe, clip.frames, steps=6)
    np.testing.assert_array_equal(through, evaluate.vae_round_trip(pipe, clip.frames))
    gain = psnr(optimised, clip.frames) - psnr(through, clip.frames)
    # measured +0.96 dB after 6 Adam steps (25.9 -> 26.9 dB; +4.5 dB on the middle frames after 150 steps at 17
    # frames); 0.3 dB is a third of it, and 0 steps (no optimisation) gives exactly 0
    assert gain >= 0.3 and 0 < change < 0.5, (gain, change)
    assert all(torch.equal(v, decoder[k]) for k, v in pipe.backends.vae.state_dict().items())


def test_decoder_fine_tune_trains_the_decoder_on_whole_clips_and_leaves_the_encoder_alone():
    """Stage vae_long (scripts/train_tiny.py): whole clips from their first frame, the given last frame weighed
    up, and no gradient into the encoder, so latents a DiT was trained on stay valid."""
    from wanrt.models.vae import WanVAE

    video, weight = train.vae_clip_batch(0, 2, 0, crop=16)
    t = video.shape[2]
    assert video.shape == (2, 3, t, 16, 16) and t in (9, 13, 17, 21)
    assert torch.equal(video, train.vae_clip_batch(0, 2, 0, crop=16)[0])  # seeded by (seed, step)
    # key frames x2 (1 + key_weight), the last frame x3 more; a plain middle frame keeps weight 1 off the object
    assert weight[:, :, -1].min() == 6.0 and weight[:, :, 1].min() == 1.0
    torch.manual_seed(0)
    vae = WanVAE(train.trained_config().vae)
    for train_encoder in (False, True):
        vae.zero_grad(set_to_none=True)
        train.vae_loss(vae, video, weight, train_encoder=train_encoder).total.backward()
        encoder = [p.grad for p in [*vae.encoder.parameters(), *vae.conv1.parameters()]]
        assert all(g is None for g in encoder) != train_encoder
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.conv2.parameters())
    # --vae_long_latent_noise: the decoder sees the latent plus that much noise (none: the same loss every call)
    losses = {}
    for noise in (0.0, 0.1):
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                losses[noise, seed] = train.vae_loss(vae, video, weight, latent_noise=noise, train_encoder=False).recon
    assert losses[0.0, 1] == losses[0.0, 2] and losses[0.1, 1] != losses[0.1, 2]


def test_colour_term_charges_a_uniform_tint_more_than_pixel_noise_of_the_same_size(monkeypatch):
    """--vae_long_colour_weight (train.vae_loss): the error's 4x4-cell means, so a tint (what the held-out colour
    check reads) costs more than zero-mean pixel noise of the same pixel MSE; with weight 0 both cost the same."""
    from wanrt.models.vae import WanVAE

    video, weight = train.vae_clip_batch(0, 2, 0, crop=16)
    torch.manual_seed(0)
    vae = WanVAE(train.trained_config().vae)
    with torch.no_grad():
        decoded = train.vae_decode_train(vae, train.vae_encode_train(vae, video))
    tint = torch.full_like(video, 0.2)
    noise = 0.2 * torch.sign(torch.randn_like(video))  # same per-pixel size, mean ~0 over a 4x4 cell
    costs = {}
    for name, delta in (("tint", tint), ("noise", noise)):
        for cw in (0.0, 4.0):
            # the loss of an output that differs from the target (the decoder's own output) by exactly delta
            monkeypatch.setattr(train, "vae_decode_train", lambda _vae, z, delta=delta: decoded + delta)
            costs[name, cw] = train.vae_loss(vae, decoded, weight, latent_noise=0.0, train_encoder=False,
                                             colour_weight=cw).recon
    assert abs(costs["tint", 0.0] - costs["noise", 0.0]) < 1e-6  # the pixel loss cannot tell them apart
    assert costs["tint", 4.0] - costs["tint", 0.0] > 5 * (costs["noise", 4.0] - costs["noise", 0.0])


def test_halo_weight_covers_the_background_around_the_object_and_nothing_else():
    """--vae_long_halo_weight: the background within 3 px of the object weighs more (a blurry decoder paints
    object-background blends there, which the colour check reads as object pixels of a wrong colour); object
    pixels and far background keep their weights, and the video is the same batch."""
    video0, plain = train.vae_clip_batch(0, 2, 0)
    video, halo = train.vae_clip_batch(0, 2, 0, halo_weight=4.0)
    assert torch.equal(video, video0)
    ring = (halo - plain)[:, 0] > 0
    obj = (plain[:, 0] > plain[:, 0].amin(dim=(-1, -2), keepdim=True)).numpy()  # object pixels weigh more
    assert ring.any() and not (ring.numpy() & obj).any()  # the ring is background only ...
    assert np.array_equal(train.dilate(obj, 3) & ~obj, ring.numpy())  # ... exactly what lies within 3 px


def test_motion_weight_favours_the_frames_where_a_small_object_moves_fast():
    """--vae_long_motion_weight: a frame weighs 1 + w * motion^2 (train.frame_motion), so the decoder spends
    its capacity where one 4-frame latent chunk holds four distant positions (the smears of the held-out clips'
    fast hops); the video is the same batch and w = 0 gives the old weights."""
    still = np.zeros((3, 16, 16), bool)
    still[:, 4:8, 4:8] = True
    assert np.array_equal(train.frame_motion(still), np.zeros(3))
    jump = still.copy()
    jump[2] = False
    jump[2, 10:14, 10:14] = True  # frame 2 jumps clear of itself: frames 1 and 2 changed 2x their area
    assert np.array_equal(train.frame_motion(jump), np.array([0.0, 2.0, 2.0]))
    step = still.copy()
    step[2] = False
    step[2, 4:8, 5:9] = True  # a 1-px move of a 4x4 square: 8 pixels changed of 16
    assert np.array_equal(train.frame_motion(step), np.array([0.0, 0.5, 0.5]))

    video0, plain = train.vae_clip_batch(0, 2, 0, halo_weight=4.0)
    video, weighted = train.vae_clip_batch(0, 2, 0, halo_weight=4.0, motion_weight=4.0)
    assert torch.equal(video, video0)
    factor = (weighted / plain)[:, 0, :, 0, 0]  # (clips, frames): one factor per frame
    assert torch.equal(weighted, plain * factor[:, None, :, None, None])
    assert factor.amin() >= 1.0 and factor.amax() <= 17.0  # 1 + 4 * motion^2, motion in [0, 2]
    assert factor.amax() > 1.5 * factor.amin()  # fast frames weigh clearly more (measured: 2.34 vs 1.25)


def test_hop_clips_and_object_crops_put_the_fast_hops_in_the_batch():
    """--vae_long_hops / --vae_long_object_crops (train.vae_clip_batch): the decoder's worst held-out clips are
    small objects in fast hops, ~1 clip in 5 of the plain draw, and a random quarter-frame crop often holds no
    object at all. With hops 1.0 every clip is one object whose middle frame lies above its chord (measured
    lift >= 8.2 px over 10 clips; the plain draw has straight moves and two-object scenes); object crops hold
    the object in every clip (measured: object pixels 28% of the crop vs 10% for random crops, 8 of 20 random
    crops with none). Off, the batch is the old one, so earlier runs reproduce."""
    from wanrt.tiny.evaluate import components

    def object_masks(weight):  # object pixels weigh more than the rest of their frame
        return (weight > weight.amin((3, 4), keepdim=True))[:, 0].numpy()

    def hop_like(mask):  # one object, its middle frame >= 4 px above the mean height of its ends
        y = [np.nonzero(f)[0].mean() for f in mask]
        return len(components(mask[0])) == 1 and (y[0] + y[-1]) / 2 - y[len(y) // 2] >= 4.0

    for hops, expect in ((1.0, True), (0.0, False)):
        clips = [m for step in range(5) for m in object_masks(train.vae_clip_batch(step, 2, 0, hop_fraction=hops)[1])]
        assert all(map(hop_like, clips)) == expect
    assert torch.equal(train.vae_clip_batch(3, 2, 0, crop=16, hop_fraction=0.0)[0],
                       train.vae_clip_batch(3, 2, 0, crop=16)[0])
    empty = {False: 0, True: 0}
    for step in range(10):
        for on in (False, True):
            masks = object_masks(train.vae_clip_batch(step, 2, 0, crop=16, crop_on_object=on)[1])
            empty[on] += sum(not m.any() for m in masks)
    assert empty[True] == 0 and empty[False] >= 3


def test_object_weight_scales_only_the_object_pixels():
    """--vae_long_object_weight: object pixels weigh 1 + w (times the frame factors), the rest as before."""
    video0, plain = train.vae_clip_batch(0, 2, 0, halo_weight=4.0, motion_weight=4.0)
    video, heavy = train.vae_clip_batch(0, 2, 0, halo_weight=4.0, motion_weight=4.0, object_weight=12.0)
    assert torch.equal(video, video0)
    changed = heavy != plain
    assert changed.any() and bool((heavy[changed] > plain[changed]).all())  # only heavier, somewhere
    assert changed.float().mean() < 0.2  # object pixels only: a few percent of the frames (measured 0.04)
    assert torch.allclose(heavy[changed] / plain[changed], torch.tensor(13.0 / 5.0))  # (1 + 12) / (1 + 4)


def test_trained_model_fills_in_the_motion(pipe):
    summary, scores = evaluate.evaluate(pipe, data.heldout_seeds(4), steps=6)
    for s in scores:
        print(f"\nseed {s.seed} '{s.prompt}': first {s.psnr_first:.1f} dB, last {s.psnr_last:.1f} dB, "
              f"middle {s.psnr_middle:.1f} dB, centroid error {s.centroid_error:.1f} px "
              f"(static {s.static_centroid_error:.1f})")
    # The given frames come back: every first frame (a 1-frame latent), and the last frames on average (the
    # last frame shares its latent with three generated frames, so it is the harder one; see the report of
    # scripts/eval_tiny.py for the spread over 20 clips).
    assert min(s.psnr_first for s in scores) >= 25.0
    assert summary["psnr_last"] >= 25.0 and min(s.psnr_last for s in scores) >= 22.0
    # ...and the object travels its path: far closer than a static video, and never lost
    assert summary["centroid_error"] < 0.5 * summary["static_centroid_error"]
    assert summary["missing"] == 0


def test_demo_bird_flies_from_the_first_to_the_last_position(pipe):
    from wanrt.samples import SAMPLE_PROMPT, sample_background, sample_frames

    first, last = sample_frames()
    video = pipe(first, last, SAMPLE_PROMPT, max_area=64 * 64, frame_num=9, sample_steps=6, seed=1, progress=False)
    assert video.frames.shape == (9, 48, 64, 3)
    c = data.centroids(video.frames, sample_background())
    assert not np.isnan(c).any()
    # up and to the right, a step at a time: x grows, y shrinks (image y points down)
    assert (np.diff(c[:, 0]) > -1.0).all() and (np.diff(c[:, 1]) < 1.0).all()
    assert c[-1, 0] - c[0, 0] > 20 and c[0, 1] - c[-1, 1] > 12


# The README's held-out table (20 clips, `python scripts/eval_tiny.py --threads 2`): steps -> first frame PSNR,
# mean last frame PSNR, min last frame PSNR, middle frames PSNR, centroid error (px).
README_TABLE = {4: (35.1, 33.7, 29.9, 28.1, 1.9), 10: (35.1, 34.2, 30.0, 29.4, 1.8), 50: (35.0, 34.3, 29.9, 29.5, 1.8)}
README_STATIC = (22.9, 15.6)  # the static video (first frame repeated): middle frames PSNR, centroid error


# every row with -m slow (10 steps: 46 s on 2 Intel Xeon cores); the default suite pins the trained model through
# test_readme_target_rows_at_64x64[model], which moves with any change of the DiT or the decoder
@pytest.mark.parametrize("steps", [pytest.param(4, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow),
                                   pytest.param(50, marks=pytest.mark.slow)])
def test_readme_metric_table(pipe, steps):
    """Every cell of the README's table, not a 4-clip mean: the evaluation is seeded end to end, so the
    numbers reproduce up to thread-count summation order. Tolerance 0.3 dB / 0.3 px (the table rounds to
    0.1; a retrained DiT moves them by whole dB, run 12's decoder alone moved the first and middle frames by 0.31 and
    0.34 dB, just outside; guide 5.0 instead of the model's 2.0 moves the last and middle frames by 3 and 1.6 dB).
    Measured at 10 steps: 35.08, 34.16 (min 30.01), 29.43 dB, 1.81 px; static 22.88 dB, 15.56 px."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the README's command
    try:
        summary, _ = evaluate.evaluate(pipe, data.heldout_seeds(20), steps=steps)
    finally:
        torch.set_num_threads(threads)
    got = (summary["psnr_first"], summary["psnr_last"], summary["min_psnr_last"], summary["psnr_middle"],
           summary["centroid_error"])
    print(f"\n{steps} steps: " + ", ".join(f"{v:.2f}" for v in got)
          + f"; static {summary['static_psnr_middle']:.2f} dB, {summary['static_centroid_error']:.2f} px")
    assert np.allclose(got, README_TABLE[steps], atol=0.3), (got, README_TABLE[steps])
    assert np.allclose((summary["static_psnr_middle"], summary["static_centroid_error"]), README_STATIC, atol=0.3)


# The README's "stricter checks" table, its 64x64 rows (`python scripts/eval_tiny.py --targets --clips 20 --threads
# 2`): min first / min last PSNR, middle frames failing the object check (of 300), max colour error, max centroid
# error / travel, clips meeting every target.
README_TARGETS_64 = {"model": (32.0, 31.4, 0, 63.7, 0.12, 16), "vae": (32.0, 32.9, 0, 57.3, 0.02, 17)}


# 52-65 s and 36 s on 2 Intel Xeon cores, both with -m slow: the default suite reached 896-916 s of its 15 minutes
# on a fresh clone (2026-12-04), and the shipped model's identity is checked in the default suite by its SHA-256
@pytest.mark.parametrize("kind", [pytest.param("model", marks=pytest.mark.slow),
                                  pytest.param("vae", marks=pytest.mark.slow)])
def test_readme_target_rows_at_64x64(pipe, kind):
    """Seeded end to end like the table above. Tolerances: 0.3 dB, 0.6 colour levels and 0.006 of the travel
    (the table rounds to 0.1 / 1 / 0.01), 6 of the 300 frames and one clip (another CPU's float summation can
    move a frame's uint8 values across the check's thresholds; measured: identical on rerun). A changed model
    or VAE moves these by whole dB and dozens of frames (run 12's decoder alone: the worst colour by 7 and 14
    levels, the passing clips by 2 and 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary, scores = evaluate.targets(pipe, data.heldout_seeds(20), 64, 64, 20, vae_only=kind == "vae")
    finally:
        torch.set_num_threads(threads)
    got = (summary["min_psnr_first"], summary["min_psnr_last"], summary["crossfaded"], summary["max_color_error"],
           summary["max_relative_centroid_error"], sum(evaluate.meets_targets(s) for s in scores))
    print(f"\n{kind}: {got}")
    want = README_TARGETS_64[kind]
    assert np.allclose(got[:2], want[:2], atol=0.3) and abs(got[2] - want[2]) <= 6, (got, want)
    assert abs(got[3] - want[3]) <= 0.6 and abs(got[4] - want[4]) <= 0.006 and abs(got[5] - want[5]) <= 1, (got, want)


def test_grow_dit_adds_blocks_that_start_as_the_identity_and_can_learn():
    """--dit_layers N with a smaller --varied_init: train.grow_dit inserts blocks whose residual writes
    (self_attn.o, cross_attn.o, ffn.2) are zero, so the grown DiT is the same function (measured max
    difference 0.0 on outputs of size ~1; tolerance 1e-6), and those projections get gradients. Without the
    zeroing the copied blocks add their output a second time and the outputs differ by O(1)."""
    from wanrt.models.dit import WanDiT

    torch.manual_seed(0)
    small = WanDiT(train.trained_config().dit).eval()
    grown_state = train.grow_dit(small.state_dict(), 6)
    big = WanDiT(train.trained_config(dit_layers=6).dit).eval()
    big.load_state_dict(grown_state)
    c = small.cfg
    x, y = torch.randn(1, c.out_dim, 3, 4, 4), torch.randn(1, c.in_dim - c.out_dim, 3, 4, 4)
    context, clip = torch.randn(1, c.text_len, c.text_dim), torch.randn(1, 2 * c.clip_tokens, c.clip_dim)
    args = (torch.tensor([700]), context, clip, y)
    with torch.no_grad():
        ref = small(x, *args)
    out = big(x, *args)
    assert ref.abs().max() > 0.1  # a real signal, not a zero head
    assert torch.allclose(out, ref, atol=1e-6)
    # old blocks 0-3 sit at 0, 1, 3, 4; the new ones (2, 5) copy the block before them, writes zeroed
    assert torch.equal(grown_state["blocks.3.self_attn.q.weight"], small.state_dict()["blocks.2.self_attn.q.weight"])
    assert torch.equal(grown_state["blocks.2.self_attn.q.weight"], small.state_dict()["blocks.1.self_attn.q.weight"])
    out.square().mean().backward()
    for name in ("self_attn.o", "cross_attn.o", "ffn.2"):
        layer = big.get_submodule(f"blocks.5.{name}")
        assert not layer.weight.any() and layer.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="--dit_layers >= 4"):
        train.grow_dit(small.state_dict(), 3)


def test_soup_is_the_normalised_weighted_mean_of_one_models_runs():
    """Stage soup (scripts/train_tiny.py --soup A --soup B): the shipped DiT may be the mean of runs fine-tuned
    from one DiT. Exact up to fp32 rounding (measured max error 0 on these values; tolerance 1e-6)."""
    a = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([4.0])}
    b = {"w": torch.tensor([2.0, 6.0]), "b": torch.tensor([0.0])}
    even = train.soup([a, b], [1, 1])
    assert torch.allclose(even["w"], torch.tensor([1.0, 4.0]), atol=1e-6)
    assert torch.allclose(even["b"], torch.tensor([2.0]), atol=1e-6)
    weighted = train.soup([a, b], [3, 1])  # normalised: 0.75 a + 0.25 b
    assert torch.allclose(weighted["w"], torch.tensor([0.5, 3.0]), atol=1e-6)
    with pytest.raises(ValueError, match="same config"):
        train.soup([a, {"w": torch.zeros(3), "b": torch.zeros(1)}], [1, 1], names=["a.pt", "wide.pt"])
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        train.soup([a, b], [1])


def test_merge_latents_unites_prompt_tables_and_concatenates_groups():
    """--varied_latents_extra (train.merge_latents): clips of several pre-encoded sets in one training run, each
    clip still pointing at its own prompt's text rows, the negative prompt (prompt dropout's) last."""
    def latents(prompts, n, start):
        ctx = torch.stack([torch.full((2, 3), float(sum(map(ord, p)))) for p in prompts])  # rows tell prompts apart
        group = {"x0": torch.arange(start, start + n).float().view(n, 1), "prompt": torch.arange(n) % len(prompts)}
        return {"prompts": prompts, "context": ctx, "bias": ctx[:, :, 0], "groups": {(9, 64, 64): group}}

    a, b = latents(["red disk", "blue square", "NEG"], 4, 0), latents(["green disk", "red disk", "NEG"], 3, 100)
    m = train.merge_latents([a, b])
    assert m["prompts"] == ["red disk", "blue square", "green disk", "NEG"]
    g = m["groups"][(9, 64, 64)]
    assert g["x0"].view(-1).tolist() == [0, 1, 2, 3, 100, 101, 102]
    for f, offset, n in ((a, 0, 4), (b, 4, 3)):  # every clip keeps its prompt's context row
        for i in range(n):
            want = f["context"][f["groups"][(9, 64, 64)]["prompt"][i]]
            assert torch.equal(m["context"][g["prompt"][offset + i]], want)
    assert torch.equal(m["context"][-1], a["context"][-1]) and m["bias"].shape == (4, 2)
    with pytest.raises(ValueError, match="negative prompts"):
        train.merge_latents([a, latents(["x", "OTHER NEG"], 1, 0)])


def test_object_mean_loss_charges_a_colour_shift_and_not_a_change_inside_the_object():
    """The DiT's colour term (--colour_weight): shifting the object's cells by a constant (a new colour) is
    charged; moving the same values around inside the object (zero mean change) is not; background errors and
    frames without the object are not charged."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 6, 6, generator=gen)
    objects = torch.zeros(2, 3, 6, 6, dtype=torch.bool)
    objects[:, :2, 1:3, 1:3] = True  # 4 cells in frames 0 and 1; frame 2 has no object
    tint = x0.clone()
    tint[:, :, :2, 1:3, 1:3] += 0.5
    # mean error 0.5 on every channel of the frames that show the object
    assert torch.allclose(train.object_mean_loss(tint, x0, objects), torch.full((2,), 0.25))
    shuffled = x0.clone()
    shuffled[:, :, :2, 1:3, 1:3] += torch.tensor([[0.5, -0.5], [-0.5, 0.5]])  # the same size, zero mean
    assert train.object_mean_loss(shuffled, x0, objects).abs().max() < 1e-6
    elsewhere = x0.clone()
    elsewhere[:, :, :, 4:, 4:] += 1.0
    elsewhere[:, :, 2] += 1.0
    assert train.object_mean_loss(elsewhere, x0, objects).abs().max() < 1e-6
