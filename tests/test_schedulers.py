"""wanrt.schedulers against the official Wan2.1 solvers (vendored verbatim in tests/_vendor as the oracle).

Both sides run the same deterministic synthetic "DiT" on the same noise, the way the official FLF2V loop
calls them (unipc: shift=1 ctor + set_timesteps(n, shift=S); dpm++: get_sampling_sigmas + retrieve_timesteps).
Run with ``-s`` to see the measured errors.
"""

import pytest
import torch

from tests._vendor.wan_solvers.fm_solvers import (
    FlowDPMSolverMultistepScheduler,
    get_sampling_sigmas,
    retrieve_timesteps,
)
from tests._vendor.wan_solvers.fm_solvers_unipc import FlowUniPCMultistepScheduler
from wanrt.schedulers import (
    NUM_COLUMNS,
    FlowDPMSolverScheduler,
    FlowUniPCScheduler,
    make_scheduler,
)

SHAPE = (16, 3, 8, 8)
# The official math is float32 end to end (scalar weights, the 2x2 UniC solve, every multiply-add); ours
# derives the weights in float64 and rounds them once. Both therefore carry ~1e-7 relative rounding per
# step that accumulates over the schedule (measured up to ~1e-6 at 50 steps). 1e-5 leaves a 10x margin
# while dropping the whole UniC corrector already moves the result by ~9e-4 at 50 steps (4e-4 at 5-10)
# (see test_tolerance_is_discriminative), so a wrong weight cannot hide under it.
RTOL = 1e-5


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    bias = torch.randn(SHAPE, generator=g)
    return noise, bias


def _model(x: torch.Tensor, t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # Nonlinear in x and dependent on the int timestep, so every history term matters.
    return 0.3 * x + torch.sin(x) * (float(t) / 1000.0) + bias


def _official(solver: str, n: int, shift: float, disable_corrector=()):
    if solver == "unipc":
        s = FlowUniPCMultistepScheduler(
            num_train_timesteps=1000,
            shift=1,
            use_dynamic_shifting=False,
            disable_corrector=list(disable_corrector),
        )
        s.set_timesteps(n, shift=shift)
    else:
        s = FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        retrieve_timesteps(s, sigmas=get_sampling_sigmas(n, shift))
    return s


def _run_official(sched, noise, bias):
    x = noise.clone()
    for t in sched.timesteps:
        v = _model(x, t, bias)
        x = sched.step(v.unsqueeze(0), t, x.unsqueeze(0), return_dict=False)[0].squeeze(0)
    return x


def _run_ours(sched, noise, bias):
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(_model(x, t, bias), t, x)
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = [(s, n, 16.0) for s in ("unipc", "dpm++") for n in (1, 2, 5, 50)] + [
    ("unipc", 10, 5.0),
    ("dpm++", 10, 5.0),
]


@pytest.mark.parametrize("solver,n,shift", CASES)
def test_matches_official(solver, n, shift):
    noise, bias = _inputs()
    ref = _official(solver, n, shift)
    ours = make_scheduler(solver, shift)
    ours.set_timesteps(n)

    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == (n + 1,) and ours.sigmas[-1] == 0
    assert torch.equal(ours.sigmas, ref.sigmas.float())
    assert ours.coefficients.shape == (n, NUM_COLUMNS) and ours.coefficients.dtype == torch.float32

    x_ref = _run_official(ref, noise, bias)
    x_ours = _run_ours(ours, noise, bias)
    assert x_ours.shape == noise.shape and x_ours.dtype == noise.dtype
    err = _rel(x_ours, x_ref)
    print(f"\n{solver:6s} steps={n:3d} shift={shift:4.1f}  max rel err vs official = {err:.2e}")
    assert err < RTOL


def test_official_schedule_values():
    s = FlowUniPCScheduler(shift=16.0)
    s.set_timesteps(50)
    # docs spec section 7 (official values for the FLF2V default).
    assert s.timesteps[:4].tolist() == [999, 998, 997, 995] and s.timesteps[-3:].tolist() == [504, 399, 245]
    d = FlowDPMSolverScheduler(shift=16.0)
    d.set_timesteps(50)
    # dpm++ starts its grid at sigma = 1 exactly, hence t = 1000.
    assert d.timesteps[0].item() == 1000 and d.sigmas[0].item() == 1.0


def test_tolerance_is_discriminative():
    # The same UniPC without its corrector must be well outside RTOL, or the comparison proves nothing.
    noise, bias = _inputs()
    n = 50
    no_corr = _run_official(_official("unipc", n, 16.0, disable_corrector=range(n)), noise, bias)
    ours = FlowUniPCScheduler(shift=16.0)
    ours.set_timesteps(n)
    err = _rel(_run_ours(ours, noise, bias), no_corr)
    print(f"\nunipc vs official-without-corrector: {err:.2e}")
    assert err > 20 * RTOL


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_functional_path_in_place_and_bitwise_equal(solver):
    noise, bias = _inputs(1)
    n = 7
    s = make_scheduler(solver, 16.0)
    s.set_timesteps(n)
    expected = _run_ours(s, noise, bias)

    state = s.init_state(noise)
    x = noise.clone()
    bufs = [state.m, state.m_prev, state.m_prev2, state.x_last, state.row, state.coefficients, x]
    ptrs = [b.data_ptr() for b in bufs]
    k = torch.zeros(1, dtype=torch.int64)  # device-side step index, as a graph replay would use it
    for t in s.timesteps:
        out = s.step_with_state(k, _model(x, t, bias), x, state)
        assert out is x
        assert [b.data_ptr() for b in bufs] == ptrs
        k += 1
    assert torch.equal(x, expected)


def test_step_does_not_modify_input_and_rejects_extra_steps():
    noise, bias = _inputs()
    s = FlowUniPCScheduler()
    s.set_timesteps(2)
    x0 = noise.clone()
    x1 = s.step(_model(x0, s.timesteps[0], bias), s.timesteps[0], x0)
    assert torch.equal(x0, noise) and x1 is not x0
    s.step(_model(x1, s.timesteps[1], bias), s.timesteps[1], x1)
    with pytest.raises(RuntimeError, match=r"all 2 steps already taken; call set_timesteps\(\)"):
        s.step(x1, s.timesteps[1], x1)
    with pytest.raises(RuntimeError, match=r"call set_timesteps\(\) first"):
        FlowDPMSolverScheduler().step(x1, 0, x1)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_set_timesteps_resets_state(solver):
    noise, bias = _inputs(2)
    s = make_scheduler(solver, 16.0)
    s.set_timesteps(6)
    first = _run_ours(s, noise, bias)
    # Abandon a run half way, then restart: nothing from either earlier run may leak in.
    s.set_timesteps(6)
    x = noise.clone()
    for t in s.timesteps[:3]:
        x = s.step(_model(x, t, bias), t, x + 1.0)
    s.set_timesteps(6)
    assert torch.equal(_run_ours(s, noise, bias), first)


def test_make_scheduler():
    assert isinstance(make_scheduler("unipc", 16.0), FlowUniPCScheduler)
    d = make_scheduler("dpm++", 5.0)
    assert isinstance(d, FlowDPMSolverScheduler) and d.shift == 5.0
    for bad in ("UniPC", "dpm", "heun", ""):
        with pytest.raises(ValueError, match="unipc"):
            make_scheduler(bad, 16.0)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        FlowUniPCScheduler().set_timesteps(0)
