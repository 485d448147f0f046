"""Shared fixtures: tiny random checkpoints in both layouts, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's CPU interpreter. It must be set before triton is
# first imported (triton.jit decides at decoration time); setdefault keeps an explicit choice.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never write into the user's cache: the built-in `tiny` checkpoint goes to a session temp dir.
os.environ.setdefault("WANRT_CACHE", os.path.join("/tmp", f"wanrt-test-cache-{os.getuid()}"))


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
def ort_engine(tiny_official, tmp_path_factory):
    """fp32 ONNX graphs of the tiny checkpoint (the onnxruntime backend's engine dir)."""
    from wanrt.engine.exporter import export
    from wanrt.export.specs import Target

    out = tmp_path_factory.mktemp("ort_engine")
    export(tiny_official, out, Target(*TINY_TARGET), precision="fp32", log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def aoti_engine(tiny_official, tmp_path_factory):
    """fp32 AOTInductor packages of the tiny checkpoint for the CPU (~2 minutes on 2 cores)."""
    from wanrt.engine import build
    from wanrt.export.specs import Target

    out = tmp_path_factory.mktemp("aoti_engine")
    build(tiny_official, out, Target(*TINY_TARGET), backend="aoti", precision="fp32", device="cpu",
          log=lambda s: None)
    return out
