"""The runtime: every backend behind one seam, static step buffers, the service behaviour (threads,
cancellation, failure isolation) and memory policies. CPU, tiny. (The HTTP service: test_serve.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from wanrt.metrics import psnr
from wanrt.pipeline import FLF2VPipeline, InputError
from wanrt.runtime.step import Cancelled, CFGStep
from wanrt.samples import sample_frames

KW = dict(sample_steps=3, progress=False)


@pytest.fixture(scope="module")
def eager(tiny_official):
    return FLF2VPipeline.from_pretrained(tiny_official)


def _frames():
    return sample_frames()


def _eager_video(pipe, seed=0, prompt="a bird"):
    a, b = _frames()
    return pipe(a, b, prompt, max_area=64 * 48, frame_num=9, seed=seed, **KW).frames


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_every_backend_makes_the_eager_video(eager, tiny_official, ort_engine, aoti_engine, backend):
    engine = {"onnxruntime": ort_engine, "aoti": aoti_engine}[backend]
    pipe = FLF2VPipeline.from_pretrained(backend=backend, engine_dir=engine, device="cpu")
    a, b = _frames()
    video = pipe(a, b, "a bird", seed=0, **KW)
    value = psnr(video.frames, _eager_video(eager))
    print(f"\n{backend} vs eager: PSNR {value:.1f} dB")
    assert value >= 40 and set(video.backends.values()) == {backend}


def test_components_can_mix(eager, tiny_official, ort_engine):
    """An ONNX Runtime DiT with the eager VAE and encoders, recorded in the result."""
    pipe = FLF2VPipeline.from_pretrained(tiny_official, backend="onnxruntime", engine_dir=ort_engine,
                                         overrides={"vae": "eager", "text_encoder": "eager"})
    a, b = _frames()
    video = pipe(a, b, "a bird", seed=0, **KW)
    assert video.backends == {"text_encoder": "eager", "image_encoder": "onnxruntime", "dit": "onnxruntime",
                              "vae": "eager"}
    assert psnr(video.frames, _eager_video(eager)) >= 40
    with pytest.raises(InputError, match="unknown component"):
        FLF2VPipeline.from_pretrained(tiny_official, overrides={"unet": "eager"})


def test_threads_equal_serial(eager):
    """4 threads x 2 requests on one pipeline give exactly the serial results (requests serialize)."""
    jobs = [(seed, f"prompt {seed % 3}") for seed in range(8)]
    serial = {job: _eager_video(eager, *job) for job in jobs}
    results, errors = {}, []

    def worker(mine):
        try:
            for job in mine:
                results[job] = _eager_video(eager, *job)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 8
    assert all(np.array_equal(results[j], serial[j]) for j in jobs)


def test_cancel_between_steps_and_pipeline_stays_usable(eager):
    a, b = _frames()
    cancel = threading.Event()
    calls = []
    dit = eager.backends.dit

    class CancelAfterOne:  # cancels from "another thread" after the first DiT call
        def __getattr__(self, name):
            return getattr(dit, name)

        def bind(self, *args):
            call = dit.bind(*args)

            def wrapped(x, t):
                calls.append(1)
                cancel.set()
                return call(x, t)

            return wrapped

    eager.backends.dit = CancelAfterOne()
    try:
        with pytest.raises(Cancelled, match="after 1 of 20 steps"):
            eager(a, b, "x", max_area=64 * 48, frame_num=9, sample_steps=20, progress=False, cancel=cancel)
    finally:
        eager.backends.dit = dit
    assert len(calls) == 1
    assert _eager_video(eager).shape == (9, 48, 64, 3)  # the next request is unaffected


def test_bad_request_does_not_poison_the_next(eager):
    a, b = _frames()
    before = _eager_video(eager, seed=2)
    with pytest.raises(InputError):
        eager(a, b, "x", frame_num=10, **KW)
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the request
        eager(np.zeros((5, 5), np.uint8), b, "x", **KW)
    assert np.array_equal(_eager_video(eager, seed=2), before)


class _StaticDiT:
    """A DiT backend that allocates nothing: isolates the allocations of our own step code."""

    def __init__(self, shape):
        self.out = torch.randn(shape)

    def __call__(self, x, t, context, clip_fea, y):
        return self.out


def test_step_loop_allocates_nothing_after_the_first_step():
    """Measured with the profiler's memory events: after step 0, the guidance and scheduler update on
    the static buffers allocate no tensor at all (the DiT's own intermediates are the DiT's: on CUDA the
    graph's private pool holds them)."""
    from torch.profiler import ProfilerActivity, profile

    from wanrt.schedulers import make_scheduler

    latent = torch.randn(1, 16, 3, 6, 8)
    sched = make_scheduler("unipc", 16.0)
    sched.set_timesteps(6)
    step = CFGStep(_StaticDiT((2, 16, 3, 6, 8)), torch.randn(2, 512, 32), torch.randn(1, 34, 160),
                   torch.randn(1, 20, 3, 6, 8), 5.0, sched, latent)
    step.step()
    ptrs = [t.data_ptr() for t in (step.latent, step.x, step.t, step.guided, step.state.m, step.state.x_last)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(4):
            step.step()
    allocs = [e for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocs == [], [(e.name, e.cpu_memory_usage) for e in allocs][:5]
    assert ptrs == [t.data_ptr() for t in (step.latent, step.x, step.t, step.guided, step.state.m, step.state.x_last)]
    assert int(step.k) == 5


@pytest.mark.parametrize("mode", ["sequential", "t5_cpu"])
def test_memory_policies_same_video_and_peaks(eager, tiny_official, mode):
    pipe = FLF2VPipeline.from_pretrained(tiny_official, memory=mode)
    a, b = _frames()
    video = pipe(a, b, "a bird", max_area=64 * 48, frame_num=9, seed=0, **KW)
    assert np.array_equal(video.frames, _eager_video(eager))
    assert set(video.memory) == {"text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode"}
    assert all(v > 0 for v in video.memory.values())
    plan = pipe.memory.placement("denoise")
    if mode == "sequential":
        assert plan["dit"] == pipe.device and plan["text_encoder"] == plan["vae"] == torch.device("cpu")
    else:
        assert pipe.memory.input_device("text_encoder") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_steps(tiny_official):
    a, b = _frames()
    kw = dict(max_area=64 * 48, frame_num=9, sample_steps=6, seed=0, progress=False)
    graph = FLF2VPipeline.from_pretrained(tiny_official, device="cuda", dtype=torch.float32)(a, b, "x", **kw)
    plain = FLF2VPipeline.from_pretrained(tiny_official, device="cuda", dtype=torch.float32,
                                          cuda_graphs=False)(a, b, "x", **kw)
    assert psnr(graph.frames, plain.frames) >= 60
