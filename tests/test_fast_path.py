"""The few-step, CFG-free path distilled Wan models run: flow-matching Euler, explicit timestep lists, and
guidance 1.0 as one batch-1 DiT call per step (no negative prompt, half the DiT work)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanrt.pipeline import FLF2VPipeline, InputError, validate
from wanrt.schedulers import FlowDPMSolverScheduler, FlowEulerScheduler, check_timesteps, make_scheduler

SHAPE = (16, 3, 8, 8)
DISTILL = [1000, 750, 500, 250]


def _model(x, t, bias):
    return 0.3 * x + torch.sin(x) * (float(t) / 1000.0) + bias


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


# ------------------------------------------------------------------------------------------- sampler


def test_explicit_timesteps_are_shifted_like_the_grid():
    """sigma = shift(t / 1000); LightX2V's 4-step list at shift 5 feeds the DiT 1000, 937, 833, 625."""
    s = make_scheduler("euler", 5.0)
    s.set_timesteps(50, timesteps=DISTILL)  # the list sets the step count
    assert s.timesteps.tolist() == [1000, 937, 833, 625]
    expect = np.array([1.0, 0.9375, 2.5 / 3, 0.625, 0.0], dtype=np.float32)
    assert np.array_equal(s.sigmas.numpy(), expect)
    s.set_timesteps(0, timesteps=DISTILL)  # sample_steps is ignored when a list is given
    assert s.num_inference_steps == 4
    one = make_scheduler("euler", 1.0)
    one.set_timesteps(4, timesteps=DISTILL)
    assert one.timesteps.tolist() == DISTILL  # shift 1: as given


def test_explicit_list_equal_to_the_grid_gives_the_same_tables():
    """dpm++'s own 4-step grid is linspace(1, 0, 5)[:-1] = 1000, 750, 500, 250: the explicit list must
    reproduce its timesteps and coefficient table exactly (the list only replaces the grid)."""
    grid, listed = FlowDPMSolverScheduler(shift=16.0), FlowDPMSolverScheduler(shift=16.0)
    grid.set_timesteps(4)
    listed.set_timesteps(4, timesteps=DISTILL)
    assert torch.equal(grid.timesteps, listed.timesteps) and torch.equal(grid.coefficients, listed.coefficients)


@pytest.mark.parametrize("timesteps", [None, DISTILL, [999, 500, 20]])
def test_euler_matches_diffusers_flow_match_euler(timesteps):
    """Against diffusers' FlowMatchEulerDiscreteScheduler (x' = x + (sigma' - sigma) * v) on the same sigmas.
    Measured max rel err 1.6e-7 to 3.0e-7 (fp32 rounding of our x0-form weights); tolerance 1e-6, while a sampler that
    skips a step or misplaces a sigma is off by > 1e-2."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise, bias = _inputs()
    ours = FlowEulerScheduler(shift=5.0)
    ours.set_timesteps(6, timesteps=timesteps)
    peer = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    unshifted = (np.asarray(timesteps, dtype=np.float64) / 1000.0 if timesteps is not None
                 else np.linspace(1.0, 0.0, 7)[:-1])
    peer.set_timesteps(sigmas=unshifted.tolist())
    assert torch.allclose(peer.sigmas.float(), ours.sigmas, rtol=0, atol=1e-7)
    x_ours, x_peer = noise.clone(), noise.clone()
    for t in ours.timesteps:
        x_ours = ours.step(_model(x_ours, t, bias), t, x_ours)
    for t_ours, t_peer in zip(ours.timesteps, peer.timesteps):
        x_peer = peer.step(_model(x_peer, t_ours, bias), t_peer, x_peer, return_dict=False)[0]
    err = ((x_ours - x_peer).abs().max() / x_peer.abs().max()).item()
    print(f"\neuler vs diffusers ({timesteps}): rel err {err:.1e}")
    assert err < 1e-6


@pytest.mark.parametrize("bad,match", [
    ([], "empty"), ([1000, 1000, 500], "strictly descending"), ([250, 500, 750], "strictly descending"),
    ([1001, 500], r"in \(0, 1000\]"), ([500, 0], r"in \(0, 1000\]"), ([500, -3], r"in \(0, 1000\]"),
    ([float("nan"), 3], "finite"), (["a"], "list of numbers"),
])
def test_bad_timesteps(bad, match):
    with pytest.raises(ValueError, match=match):
        check_timesteps(bad)
    with pytest.raises(InputError, match=match) as e:
        validate(None, 17, 4, 1.0, 64 * 64, "euler", timesteps=bad)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ CFG-free


@pytest.fixture(scope="module")
def pipe(tiny_official):
    return FLF2VPipeline.from_pretrained(tiny_official, device="cpu")


def _request(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = pipe.config.dit
    return (torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(2, 512, d.text_dim, generator=g),
            torch.randn(1, 2 * d.clip_tokens, d.clip_dim, generator=g), torch.randn(1, 20, 2, 4, 6, generator=g))


@torch.no_grad()
@pytest.mark.parametrize("solver,timesteps", [("euler", DISTILL), ("unipc", None)])
def test_guidance_one_batch1_equals_batch2_loop(pipe, solver, timesteps):
    """At guidance 1.0 the batch-2 CFG loop computes uncond + 1 * (cond - uncond) = cond up to rounding;
    the batch-1 loop computes cond directly. Measured max rel err 1.5e-7 (euler) and 2.1e-7 (unipc) (fp32
    rounding of the subtract-add); tolerance 1e-6. Guidance 5.0 on the batch-2 loop moves the result by > 1e-2."""
    latent, context, clip, y = _request(pipe)
    kw = dict(sample_steps=4, sample_shift=5.0, sample_solver=solver, timesteps=timesteps)
    two = pipe.denoise(latent, context, clip, y, guide_scale=1.0, **kw)
    one = pipe.denoise(latent, context[:1], clip, y, guide_scale=1.0, **kw)
    cfg = pipe.denoise(latent, context, clip, y, guide_scale=5.0, **kw)
    err = ((one - two).abs().max() / two.abs().max()).item()
    moved = ((cfg - two).abs().max() / two.abs().max()).item()
    print(f"\nguidance 1.0, {solver}: batch-1 vs batch-2 rel err {err:.1e} (guidance 5.0 moves it {moved:.1e})")
    assert moved > 1e-2
    assert err < 1e-6


def test_guidance_one_runs_one_branch_and_skips_the_negative_prompt(pipe, monkeypatch):
    from tests.test_pipeline import frames

    batches, prompts = [], []
    dit, text = pipe.backends.dit, pipe.backends.text_encoder

    class Spy:
        def __getattr__(self, name):
            return getattr(dit, name)

        def bind(self, context, *rest):
            call = dit.bind(context, *rest)

            def spy(x, t):
                batches.append(x.shape[0])
                return call(x, t)
            return spy

    def counting(ids, mask):
        prompts.append(ids.shape[0])
        return text(ids, mask)

    monkeypatch.setattr(pipe.backends, "dit", Spy())
    monkeypatch.setattr(pipe.backends, "text_encoder", counting)
    pipe._text_cache.clear()
    a, b = frames()
    kw = dict(max_area=64 * 64, frame_num=5, seed=0, progress=False, sample_solver="euler", timesteps=DISTILL)
    pipe(a, b, "a bird", guide_scale=1.0, **kw)
    assert batches == [1] * 4 and prompts == [1]  # one DiT row per step, only the prompt encoded
    batches.clear()
    pipe(a, b, "a bird", guide_scale=5.0, **kw)
    assert batches == [2] * 4 and prompts == [1, 1]  # CFG: now the negative prompt is encoded too


@pytest.fixture(scope="module")
def dit_engines(tiny_official, tmp_path_factory):
    """ONNX DiT graphs of the tiny checkpoint built for batch 1 and for batch 2 (other components stay eager);
    ~3 minutes on 2 busy cores."""
    from wanrt.engine.exporter import export
    from wanrt.export.specs import Target

    out = {}
    for batch in (1, 2):
        out[batch] = tmp_path_factory.mktemp(f"dit_b{batch}")
        export(tiny_official, out[batch], Target(64, 48, 9, batch), precision="fp32", components=["dit"],
               log=lambda s: None)
    return out


@pytest.mark.parametrize("batch,guide,match", [(2, 1.0, "build one with --batch 1"), (1, 5.0, "built with --batch 1")])
def test_engine_batch_must_match_the_guidance(pipe, batch, guide, match):
    """The check runs first (before any encoder): a pipeline fixed to an engine's DiT batch refuses the other mode."""
    import copy

    from tests.test_pipeline import frames
    from wanrt.export.specs import Target

    fixed = copy.copy(pipe)
    fixed.target = Target(64, 48, 9, batch)
    a, b = frames(48, 64)
    with pytest.raises(InputError, match=match) as e:
        fixed(a, b, "x", guide_scale=guide, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@torch.no_grad()
def test_batch1_engine_serves_guidance_one_and_refuses_cfg(tiny_official, dit_engines, pipe):
    from tests.test_pipeline import frames

    a, b = frames(48, 64)
    kw = dict(seed=0, progress=False, sample_solver="euler", timesteps=DISTILL)
    engines = {n: FLF2VPipeline.from_pretrained(tiny_official, device="cpu", backend="onnxruntime",
                                                engine_dir=d, overrides={c: "eager" for c in
                                                                         ("text_encoder", "image_encoder", "vae")})
               for n, d in dit_engines.items()}
    got = engines[1](a, b, "a bird", guide_scale=1.0, **kw).frames.astype(np.float64)
    ref = pipe(a, b, "a bird", guide_scale=1.0, max_area=64 * 48, frame_num=9, **kw).frames.astype(np.float64)
    assert np.abs(got - ref).max() <= 1  # ORT fp32 vs eager: at most one uint8 level
    with pytest.raises(InputError, match="built with --batch 1"):
        engines[1](a, b, "a bird", guide_scale=5.0, **kw)
    with pytest.raises(InputError, match="build one with --batch 1"):
        engines[2](a, b, "a bird", guide_scale=1.0, **kw)
    assert engines[2](a, b, "a bird", guide_scale=5.0, **kw).frames.shape == (9, 48, 64, 3)


def test_cli_cfg_parallel_needs_cfg():
    from typer.testing import CliRunner

    from wanrt.cli import app

    r = CliRunner().invoke(app, ["generate", "--ckpt_dir", "tiny", "--nproc", "2", "--cfg_parallel",
                                 "--sample_guide_scale", "1.0"])
    assert r.exit_code == 1 and "guidance 1.0 runs only the cond branch" in r.output
