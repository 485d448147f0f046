"""Shared fixtures: tiny random checkpoints in both layouts, written once per test session."""

from __future__ import annotations

import os

import pytest

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
