"""Shared fixtures: tiny random checkpoints in both layouts, written once per test session, and a per-run
wanrt cache (WANRT_CACHE)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's CPU interpreter. It must be set before triton is
# first imported (triton.jit decides at decoration time); setdefault keeps an explicit choice.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture(scope="session", autouse=True)
def wanrt_cache(tmp_path_factory):
    """Tests never write into the user's cache, and never read a previous run's: the cache (where
    `tiny-random` is written on first use) is a fresh folder under this session's temp dir, for this
    process and every subprocess a test starts. A fixed folder kept between runs could hide a change to
    the tiny checkpoint behind a stale copy."""
    old = os.environ.get("WANRT_CACHE")
    os.environ["WANRT_CACHE"] = str(tmp_path_factory.mktemp("wanrt_cache"))
    yield os.environ["WANRT_CACHE"]
    if old is None:
        os.environ.pop("WANRT_CACHE", None)
    else:
        os.environ["WANRT_CACHE"] = old


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so inputs drawn without an explicit generator are
    the same on every run (and in every order the tests run in)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    from wanrt.models import tiny

    return tiny.write(tmp_path_factory.mktemp("tiny_official"), layout="official", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    from wanrt.models import tiny

    return tiny.write(tmp_path_factory.mktemp("tiny_diffusers"), layout="diffusers", seed=0, dit_shards=2)


TINY_TARGET = (64, 48, 9)  # the engine target of the shared engine fixtures (4:3 like the sample frames)


@pytest.fixture(scope="session")
def calibration(tiny_official):
    """FP8 scales of the tiny checkpoint at TINY_TARGET: block linears and every attention's q/k/v (one
    calibration run shared by tests/test_fp8.py and tests/test_fp8_attention.py)."""
    from wanrt.calibration import calibrate
    from wanrt.export.specs import Target
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.samples import SAMPLE_PROMPT

    pipe = FLF2VPipeline.from_pretrained(tiny_official, fuse=False)  # calibration names the official linears
    return calibrate(pipe, Target(*TINY_TARGET), steps=2, prompts=(SAMPLE_PROMPT,), attention=True)


@pytest.fixture(scope="session")
def ort_engine(tiny_official, tmp_path_factory):
    """fp32 ONNX graphs of the tiny checkpoint (the onnxruntime backend's engine dir)."""
    from wanrt.engine.exporter import export
    from wanrt.export.specs import Target

    out = tmp_path_factory.mktemp("ort_engine")
    export(tiny_official, out, Target(*TINY_TARGET), precision="fp32", log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def aoti_engine(tiny_official, tmp_path_factory):
    """fp32 AOTInductor packages of the tiny checkpoint for the CPU, built as a user with two cores would: the
    VAE by `wanrt build` in a second process while this one builds the rest into the same engine dir (measured
    on 2 cores: 105 s one after the other, of which the VAE's four graphs 57 s). The tests that use it also
    prove the two builds' manifest entries merged: they load every component from it."""
    import subprocess
    import sys

    from wanrt.engine import build
    from wanrt.export.specs import Target

    out = tmp_path_factory.mktemp("aoti_engine")
    w, h, f = TINY_TARGET
    vae = subprocess.Popen([sys.executable, "-m", "wanrt", "build", "--ckpt_dir", str(tiny_official), "--out", str(out),
                            "--backend", "aoti", "--precision", "fp32", "--device", "cpu", "--size", f"{w}*{h}",
                            "--frame_num", str(f), "--components", "vae"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        build(tiny_official, out, Target(*TINY_TARGET), backend="aoti", precision="fp32", device="cpu",
              components=("text_encoder", "image_encoder", "dit"), log=lambda s: None)
        log, _ = vae.communicate(timeout=600)
    finally:
        vae.kill()
    assert vae.returncode == 0, log
    return out
