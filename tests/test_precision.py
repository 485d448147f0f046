"""precision='fp8': e4m3 DiT block GEMMs (wanrt/kernels/fp8.py), emulated on the CPU with the GPU's math.

Every error bound here is two-sided: an upper bound a few times the measured error, and a lower bound
that an fp8 path which silently stopped quantising (i.e. ran bf16) would fall under.
"""

from __future__ import annotations

import pytest
import torch

from wanrt.kernels import fp8
from wanrt.models.loading import load


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def dits():
    """The trained tiny DiT in fp32 (the reference), bf16 (official map) and fp8."""
    return {"fp32": load("tiny", components=["dit"]).dit,
            "bf16": load("tiny", components=["dit"], dtype=torch.bfloat16).dit,
            "fp8": load("tiny", components=["dit"], precision="fp8").dit}


@pytest.fixture(scope="module")
def step_inputs(dits):
    """A batch-2 (CFG) DiT call at a 3x8x8 latent grid, mid-schedule timestep."""
    cfg = dits["fp32"].cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    y = torch.randn(2, 20, 3, 8, 8, generator=g)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g) * 0.2
    context[:, 24:] = 0
    clip = torch.randn(2, 2 * cfg.clip_tokens, cfg.clip_dim, generator=g)
    return x, torch.tensor([900, 900]), context, clip, y


def _step(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------------------------------------- kernels


def test_quantize_rowwise_roundtrip():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 64)[:, None]
    q, s = fp8.quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), fp8.FP8_MAX))  # each row uses the full range
    err = rel_l2(q.float() * s, x)
    # measured 0.0259 (e4m3: 3 mantissa bits, uniform rounding error ~ 2^-4/sqrt(3) relative); tolerance
    # [0.01, 0.04]: a row-wise scale that became tensor-wise would lose the small rows (rel err ~1).
    assert 0.01 < err < 0.04, err
    zero_q, zero_s = fp8.quantize_rowwise(torch.zeros(2, 32))
    assert torch.equal(zero_q.float(), torch.zeros(2, 32)) and torch.all(zero_s > 0)  # no 0/0


def test_fp8_linear_is_the_scaled_mm_math():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(96, 80).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(80, generator=g))
    q = fp8.FP8Linear.from_linear(lin)
    x = torch.randn(3, 7, 96, generator=g)
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 80)
    xq, sx = fp8.quantize_rowwise(x.reshape(-1, 96))
    ref = (xq.double() * sx.double()) @ q.dequantized_weight().double().t() + lin.bias.double()
    # exact products, fp32 accumulation, one bf16 rounding: measured 1.6e-3 (bf16 rounding); tolerance 4e-3
    assert rel_l2(y.reshape(-1, 80), ref) < 4e-3
    full = x.double() @ lin.weight.double().t() + lin.bias.double()
    err = rel_l2(y, full)
    # vs the unquantised bf16 Linear: measured 0.0252; [0.01, 0.06]; the bf16 Linear itself: 2.0e-3
    assert 0.01 < err < 0.06, err


# ---------------------------------------------------------------------------------------------- the DiT


def test_fp8_dit_step_error_two_sided(dits, step_inputs):
    ref = _step(dits["fp32"], step_inputs)
    err8 = rel_l2(_step(dits["fp8"], step_inputs), ref)
    err16 = rel_l2(_step(dits["bf16"], step_inputs), ref)
    # measured: fp8 0.0431, bf16 0.0059 (trained tiny DiT of the shipped model, all 6 blocks fp8; the models
    # before: 0.0472 / 0.0057, 0.0439 / 0.0057, 0.0432 / 0.0057, 0.0446 / 0.0059, 0.0421 / 0.0058 and 0.0198 /
    # 0.0035). Upper 0.1 (2.3x measured); lower 0.012: a path that stopped quantising is bf16 (0.0059).
    assert 0.012 < err8 < 0.1, (err8, err16)
    assert err8 > 2 * err16


def test_fp8_weights_really_halve(dits):
    def linear_bytes(model, attr):
        return sum(getattr(m, attr).numel() * getattr(m, attr).element_size() for m in model.blocks.modules()
                   if isinstance(m, (torch.nn.Linear, fp8.FP8Linear)))

    b16, b8 = dits["bf16"], dits["fp8"]
    assert all(isinstance(m, fp8.FP8Linear) for n, m in b8.blocks.named_modules()
               if n.endswith((".q", ".k", ".v", ".o", ".k_img", ".v_img", "ffn.0", "ffn.2")))
    assert not any(isinstance(m, torch.nn.Linear) for m in b8.blocks.modules())
    assert linear_bytes(b8, "weight") * 2 == linear_bytes(b16, "weight")  # 1 byte vs 2 per weight

    def param_bytes(model):
        return sum(t.numel() * t.element_size() for t in (*model.blocks.parameters(), *model.blocks.buffers()))

    # every block tensor (biases, norms, modulation, scales included): measured 0.523 at dim 128 (the fp32
    # norm/modulation vectors weigh more at toy width; ~0.50 at 14B); tolerance 0.55.
    ratio = param_bytes(b8) / param_bytes(b16)
    assert ratio < 0.55, ratio
    # outside the blocks nothing changes (embeddings, time projection, head stay as today)
    for name, t in dits["fp8"].named_parameters():
        if not name.startswith("blocks."):
            assert t.dtype == dict(dits["bf16"].named_parameters())[name].dtype, name


def test_fp8_keep_first_and_last_blocks(dits, step_inputs):
    kept = load("tiny", components=["dit"], precision="fp8", fp8_keep=1).dit
    n = len(kept.blocks)
    for i, block in enumerate(kept.blocks):
        assert fp8.is_quantized(block) == (1 <= i < n - 1), i
        if not fp8.is_quantized(block):
            assert block.self_attn.q.weight.dtype == torch.bfloat16
    ref = _step(dits["fp32"], step_inputs)
    err_keep = rel_l2(_step(kept, step_inputs), ref)
    err_all = rel_l2(_step(dits["fp8"], step_inputs), ref)
    # measured: keep=1 0.0403 vs all-fp8 0.0431 (the shipped 6-block DiT; an earlier 4-block model: 0.0143 /
    # 0.0198); keeping blocks in bf16 must change (lower) the error
    assert err_keep < err_all and err_keep > 0.006, (err_keep, err_all)
    too_many = n // 2 + 1  # keeps more than half the blocks at each end: refused before loading
    with pytest.raises(ValueError, match=f"fp8_keep={too_many}"):
        load("tiny", components=["dit"], precision="fp8", fp8_keep=too_many)
    with pytest.raises(ValueError, match="precision must be"):
        load("tiny", components=["dit"], precision="int4")


@pytest.mark.parametrize("fuse", [False, True], ids=["qkv", "qkv_fused"])
def test_norms_hand_fp8_linears_their_quantised_rows(dits, step_inputs, fuse, monkeypatch):
    """The two modulated norms of a block and the FFN's GELU emit e4m3 rows + per-token scales for the FP8
    linears after them (kernels/fused.norm_modulate / gelu_tanh with out_dtype e4m3; one Triton kernel each on
    a GPU, the activation itself never written): the numbers the linears' own quantisation gives, so the step
    is bit-identical; q, k and v share one quantisation where they each did their own."""
    model = load("tiny", components=["dit"], precision="fp8", fuse=True).dit if fuse else dits["fp8"]
    quantised, given = [], []
    real = fp8.quantize_rowwise

    def counting(x):
        quantised.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(fp8, "quantize_rowwise", counting)
    hooks = [m.register_forward_pre_hook(lambda m, args: given.append(isinstance(args[0], fp8.QuantizedRows)))
             for m in model.modules() if isinstance(m, fp8.FP8Linear)]
    try:
        out = _step(model, step_inputs)
        on = (len(quantised), sum(given))
        quantised.clear(), given.clear()
        monkeypatch.setattr(fp8.FP8Linear, "input_dtype", lambda self: None)  # off: the norms emit fp32
        plain = _step(model, step_inputs)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, plain)
    n = len(model.blocks)
    # linears given rows: q, k, v (or q|k|v) after norm1, the FFN's up-projection after norm2 and its
    # down-projection after the GELU; none when off
    assert on[1] == (5 if not fuse else 3) * n and sum(given) == 0
    # quantisations: every linear's own when off (12 a block; 8 with q|k|v, k|v, k_img|v_img fused); on, the
    # two norms and the GELU do 3 and those linears none
    assert len(quantised) == (12 if not fuse else 8) * n
    assert on[0] == len(quantised) - on[1] + 3 * n


@pytest.mark.slow
def test_fp8_tiny_video_psnr():
    """The trained tiny model end to end: fp8 video vs the fp32 video, same seed (~40 s on 2 cores)."""
    from wanrt.metrics import psnr
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.samples import SAMPLE_PROMPT, sample_frames

    first, last = sample_frames()
    kw = dict(max_area=64 * 64, frame_num=9, sample_steps=6, seed=1, progress=False)
    ref = FLF2VPipeline.from_pretrained("tiny", device="cpu")(first, last, SAMPLE_PROMPT, **kw).frames
    pipe = FLF2VPipeline.from_pretrained("tiny", device="cpu", precision="fp8")
    assert fp8.is_quantized(pipe.backends.modules["dit"])
    got = pipe(first, last, SAMPLE_PROMPT, **kw).frames
    value = psnr(got, ref)
    # measured 47.6 dB on a 2-core AMD EPYC, AVX2 (bf16, i.e. fp8 not applied: 56.5 dB) at the model's guide 2.0
    # (run 35's DiT and run 27's decoder); run 32's DiT before: 43.2 / 56.2 dB on that EPYC and on an Intel Xeon
    # with AMX; the 4-block DiT before that: 44.4 / 56.3 dB on the Xeon (run 25's decoder and run 13's alike); at
    # guide 5.0 34.9 / 52.4 dB; the models before (guide 5.0): 38.1 / 53.4, 37.8 / 51.4 and 37.9 / 51.7 dB there,
    # 40.2 / 50.7 dB on an AMD EPYC, 40.8 / 51.0, 39.0 / 52.7 and 43.3 / 54.0 dB. Gate: >= 30 dB (the issue);
    # upper 52 dB, midway between fp8 (47.6 here; other CPUs' bf16 kernels moved it by up to 5 dB at guide 5.0)
    # and bf16 (56.5), so that an fp8 path that quantised nothing fails.
    assert 30.0 <= value <= 52.0, value


def test_fp8_input_errors():
    from wanrt.pipeline import FLF2VPipeline, InputError

    with pytest.raises(InputError, match="precision must be"):
        FLF2VPipeline.from_pretrained("tiny", device="cpu", precision="fp16")
    with pytest.raises(InputError, match="engine's DiT"):
        FLF2VPipeline.from_pretrained("tiny", device="cpu", precision="fp8", backend="aoti", engine_dir="/nonexistent")


def test_cli_generate_precision_errors(tmp_path):
    from typer.testing import CliRunner

    from wanrt.cli import app

    r = CliRunner().invoke(app, ["generate", "--ckpt_dir", "tiny", "--precision", "fp4"])
    assert r.exit_code != 0 and "--precision must be auto or fp8" in r.output
    r = CliRunner().invoke(app, ["generate", "--ckpt_dir", "tiny", "--fp8_keep", "1"])
    assert r.exit_code != 0 and "--fp8_keep needs --precision fp8" in r.output
    r = CliRunner().invoke(app, ["generate", "--backend", "aoti", "--engine_dir", str(tmp_path), "--precision", "fp8"])
    assert r.exit_code != 0 and "engines carry their build precision" in r.output


@pytest.mark.slow
def test_cli_generate_fp8(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "fp8.mp4"
    r = subprocess.run([sys.executable, "-m", "wanrt", "generate", "--ckpt_dir", "tiny", "--precision", "fp8",
                        "--fp8_keep", "1", "--sample_steps", "2", "--frame_num", "5", "--base_seed", "0",
                        "--save_file", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


# ---------------------------------------------------------------------------------------------- AOTInductor


@pytest.mark.slow
def test_aoti_fp8_package_matches_eager_fp8(tmp_path):
    """`wanrt build --backend aoti --precision fp8` of the trained tiny DiT on the CPU (~3-5 min on 2 busy
    cores): the package runs the quantised model, and its step matches the eager fp8 step."""
    from wanrt.bench.runner import _dit_step_case, make_inputs
    from wanrt.engine import build
    from wanrt.export.specs import Target
    from wanrt.models.loading import Checkpoint
    from wanrt.runtime.backends import eager, from_engine_dir

    folder = str(Checkpoint("tiny").folder)
    m = build(folder, tmp_path, Target(64, 48, 9), backend="aoti", precision="fp8", device="cpu", components=["dit"],
              log=lambda s: None)
    assert m.data["precision"] == "fp8"
    got, cfg, _, _ = from_engine_dir(tmp_path, "aoti", torch.device("cpu"), 64, 48, 9, checkpoint=folder,
                                     components=["dit"])
    inputs = make_inputs(cfg, 64, 48, 9, seed=0)
    outs = {}
    for name, dit in (("aoti", got["dit"]), ("fp8", eager(load("tiny", components=["dit"], precision="fp8")).dit),
                      ("bf16", eager(load("tiny", components=["dit"], dtype=torch.bfloat16)).dit),
                      ("fp32", eager(load("tiny", components=["dit"])).dit)):
        case = _dit_step_case(dit, inputs, torch.device("cpu"))
        case.reset()
        with torch.no_grad():
            outs[name] = case.call().clone()
    # The package is as accurate as eager fp8: guided step vs fp32, measured 0.155 (package) and 0.159 (eager
    # fp8) with the shipped model (the models before: 0.160, 0.160, bf16 0.021; 0.152, 0.151, 0.021; 0.145,
    # 0.144, 0.019 and 0.111, 0.107, 0.013); allowed 1.25x eager fp8's. It is not equal to eager fp8 (0.055
    # apart): Inductor's fp32 sums differ in the last bit, which flips e4m3 roundings of activations sitting on
    # a boundary; with the first-run model and other inputs the two agreed to 2.0e-5.
    assert rel_l2(outs["aoti"], outs["fp32"]) <= 1.25 * rel_l2(outs["fp8"], outs["fp32"])
    # the package really quantises: vs eager bf16 it is as far as eager fp8 is (measured 0.156 and 0.160)
    assert rel_l2(outs["aoti"], outs["bf16"]) > 0.02


@pytest.mark.gpu
def test_fp8_linear_native_matches_emulation_on_cuda():
    """torch._scaled_mm (row-wise) vs the CPU emulation of the same math, at a 14B-like width."""
    if not fp8.native_supported("cuda"):
        pytest.skip("needs a CUDA GPU of compute capability >= 8.9")
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(1024, 512, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(512, 1024, device="cuda", generator=g) / 32)
    q = fp8.FP8Linear.from_linear(lin)
    x = torch.randn(2, 300, 1024, device="cuda", generator=g)  # M = 600: not a multiple of 256 (pytorch#133334)
    native = q(x)
    xq, sx = fp8.quantize_rowwise(x.reshape(-1, 1024))
    emulated = fp8.scaled_mm_emulated(xq, sx, q.weight, q.weight_scale, q.bias, torch.bfloat16)
    # same products, different accumulation order, one bf16 rounding each: expected ~1e-3 (bf16 ulp);
    # tolerance 4e-3. vs the bf16 Linear: the fp8 error, two-sided as on the CPU
    assert rel_l2(native.reshape(-1, 512), emulated) < 4e-3
    assert 0.01 < rel_l2(native, lin(x.bfloat16())) < 0.06
