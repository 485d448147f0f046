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
