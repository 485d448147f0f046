"""wanrt bench: eager variants (eager+fp8, eager+fused, ...), --precision fp8, rel. L2 vs eager, --profile."""

from __future__ import annotations

import json

import pytest

from wanrt.bench.runner import eager_options, run

W, H, F = 64, 48, 9


def quiet(_):
    return None


def test_eager_variant_names():
    assert eager_options("eager") == ()
    assert eager_options("eager+fp8+sage") == ("fp8", "sage")
    for bad in ("eager+int4", "eager+sage+flash", "eager+fp8+fp8", "aoti+fp8"):
        with pytest.raises(ValueError, match="eager variants"):
            eager_options(bad)
    with pytest.raises(ValueError, match="not understood"):
        run("tiny", backends="eager,eager+int4", log=quiet)


def test_precision_fp8_adds_the_fp8_eager_row_and_its_error(tmp_path):
    """The trained tiny DiT step: eager stays the bf16 reference, eager+fp8 is measured against it."""
    report = run("tiny", size=(W, H), frame_num=F, backends="eager", precision="fp8", repeat=1, warmup=0,
                 log=quiet, json_path=tmp_path / "b.json")
    assert [r.backend for r in report.rows] == ["eager", "eager+fp8"]
    row = report.row("eager+fp8", "dit_step")
    assert row.ok and report.row("eager", "dit_step").rel_l2 is None
    # measured rel. L2 of the guided velocity vs eager bf16: 0.059 (guidance 5 amplifies the cond/uncond
    # difference); bounds [0.01, 0.2]: an fp8 row that ran bf16 would read ~0 (same weights, same math).
    assert 0.01 < row.rel_l2 < 0.2, row.rel_l2
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["settings"]["precision"] == "fp8" and doc["results"][1]["rel_l2"] == pytest.approx(row.rel_l2)


def test_profile_breakdown(tmp_path):
    from wanrt.bench import flops
    from wanrt.bench.profile import CLASSES

    report = run("tiny-random", size=(W, H), frame_num=F, backends="eager", repeat=1, warmup=0, profile=True,
                 log=quiet, json_path=tmp_path / "p.json")
    prof = report.row("eager", "dit_step").profile
    assert set(prof["classes"]) == set(CLASSES)
    c = prof["classes"]
    assert all(c[k]["time_s"] > 0 for k in ("attention", "gemm", "elementwise"))
    assert c["gemm"]["tflops"] and c["attention"]["tflops"] and c["elementwise"]["gbps"]
    # the attention FLOPs the profiler saw: self-attention + the two cross-attentions, batch 2, every
    # block, exactly the analytic count (flops.py), so the class assignment and the shapes are right
    parts = flops.dit_forward_breakdown(report_config(), H, W, F, batch=2)
    assert c["attention"]["flops"] == parts["self_attention"] + parts["cross_attention"]
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["results"][0]["profile"]["classes"]["gemm"]["flops"] == c["gemm"]["flops"]


def report_config():
    from wanrt.models.loading import Checkpoint

    return Checkpoint("tiny-random").config


def test_command_line_records_the_new_options():
    from wanrt.bench.cli import command_line

    cmd = command_line("tiny", (64, 48), 9, "eager,eager+fp8", "dit_step", 1, 0, "fp8", True, 2, fp8_keep=1,
                       profile=True)
    assert "--precision fp8" in cmd and "--fp8_keep 1" in cmd and cmd.endswith("--profile")
    assert "--fp8_keep" not in command_line("tiny", (64, 48), 9, "eager", "dit_step", 1, 0, "auto", True, 2)


def test_profile_breakdown_counts_cuda_kernels_once():
    """On CUDA torch.profiler lists each kernel as an event of its own besides the op that launched it (whose
    self device time already holds the kernel's). The H200 run of 2026-12-04 added them to 'other', which then
    read exactly 50% of a doubled total. Fake events: a GEMM op with its 100 us kernel, an SDPA op with its
    300 us kernel, and a 30 us kernel no op launched."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from wanrt.bench.profile import breakdown

    def ev(name, dev, us, shapes=()):
        return SimpleNamespace(name=name, device_type=dev, self_device_time_total=us, self_cpu_time_total=1,
                               input_shapes=list(shapes), input_dtypes=[], flops=0)

    events = [ev("aten::mm", DeviceType.CPU, 100, [[64, 32], [32, 16]]), ev("sm90_gemm_bf16", DeviceType.CUDA, 100),
              ev("aten::_scaled_dot_product_cudnn_attention", DeviceType.CPU, 300),
              ev("cudnn_generated_fort_native_sdpa", DeviceType.CUDA, 300),
              ev("triton_poi_fused_add", DeviceType.CUDA, 30)]
    b = breakdown(events, "cuda")
    c = b["classes"]
    assert b["total_s"] == pytest.approx(430e-6)  # the device's busy time, not 860
    assert c["gemm"]["time_s"] == pytest.approx(100e-6) and c["attention"]["time_s"] == pytest.approx(300e-6)
    assert c["other"]["time_s"] == pytest.approx(30e-6) and c["other"]["calls"] == 0
