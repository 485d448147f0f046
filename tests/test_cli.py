"""`wanrt generate` and `wanrt doctor` through typer's CliRunner, plus one real subprocess run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wanrt.cli import app
from wanrt.video import read_mp4

runner = CliRunner()
TINY = ["--ckpt_dir", "tiny", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("first.png", "last.png"):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def run(args):
    return runner.invoke(app, ["generate", *args])


def test_generate_builtin_frames(tmp_path):
    out = tmp_path / "v.mp4"
    r = run([*TINY, "--save_file", str(out), "--base_seed", "0"])
    assert r.exit_code == 0, r.output
    assert "saved" in r.stdout and "s/step" in r.stdout
    assert read_mp4(out).shape == (5, 48, 64, 3)  # 4:3 sample frames at area 64*64


def test_generate_dashed_flags_and_official_extras(tmp_path, images):
    out = tmp_path / "v.mp4"
    r = run(["--ckpt-dir", "tiny", "--size", "64*64", "--frame-num", "5", "--sample-steps", "2",
             "--first-frame", images[0], "--last-frame", images[1], "--prompt", "a bird", "--save-file", str(out),
             "--offload_model", "True", "--t5_cpu", "--sample_solver", "dpm++"])
    assert r.exit_code == 0, r.output
    assert "note: --offload_model is accepted" in r.stderr and "note: --t5_cpu" in r.stderr
    assert out.is_file()


@pytest.mark.parametrize("args,match", [
    (["--frame_num", "8"], "frame_num must be 4n+1"),
    (["--size", "64*60"], "multiples of 16"),
    (["--size", "big"], "W*H"),
    (["--sample_steps", "0"], "sample_steps must be >= 1"),
    (["--sample_guide_scale", "-1"], "guide scale must be >= 0"),
    (["--task", "t2v-14B"], "unknown task 't2v-14B'"),
    (["--first_frame", "/no/such.png", "--last_frame", "/no/such.png", "--prompt", "x"], "image file not found"),
    (["--save_file", "/no/such/dir/v.mp4"], "output folder /no/such/dir does not exist"),
])
def test_errors_are_one_line(tmp_path, args, match):
    r = run([*TINY, "--save_file", str(tmp_path / "v.mp4"), *args])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_unreadable_image(tmp_path, images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = run([*TINY, "--first_frame", str(bad), "--last_frame", images[1], "--prompt", "x",
             "--save_file", str(tmp_path / "v.mp4")])
    assert r.exit_code != 0 and r.stderr.startswith("error: cannot read image") and "bad.png" in r.stderr
    assert not (tmp_path / "v.mp4").exists()


def test_checkpoint_missing_files(tmp_path, tiny_official, images):
    ckpt = shutil.copytree(tiny_official, tmp_path / "ckpt")
    (ckpt / "Wan2.1_VAE.pth").unlink()
    r = run(["--ckpt_dir", str(ckpt), "--size", "64*64", "--frame_num", "5", "--first_frame", images[0],
             "--last_frame", images[1], "--prompt", "x", "--save_file", str(tmp_path / "v.mp4")])
    assert r.exit_code != 0 and "is missing Wan2.1_VAE.pth" in r.stderr
    assert not (tmp_path / "v.mp4").exists()


def test_debug_shows_traceback(tmp_path):
    r = run([*TINY, "--frame_num", "8", "--debug"])
    assert r.exit_code != 0 and r.exception is not None  # raised, not swallowed


def test_size_too_large_for_rope(tmp_path):
    # a 4:3 first frame at this area is ~18900 px wide: 1182 patches per row > the 1024-entry RoPE table
    r = run([*TINY, "--size", "16384*16384", "--save_file", str(tmp_path / "v.mp4")])
    assert r.exit_code != 0 and "RoPE table" in r.stderr


def test_real_subprocess_makes_decodable_mp4(tmp_path):
    """The issue's own check: `wanrt generate --ckpt_dir tiny` with nothing else (the built-in model's
    64*64 x 17 target, the official 50 steps) writes an mp4 in which the bird flies from its place in the
    first frame to its place in the last."""
    from wanrt.samples import sample_background, sample_frames
    from wanrt.tiny.data import centroids

    out = tmp_path / "demo.mp4"
    exe = shutil.which("wanrt") or f"{sys.executable} -m wanrt.cli"
    cmd = exe.split() + ["generate", "--ckpt_dir", "tiny", "--base_seed", "0", "--save_file", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert res.returncode == 0, res.stderr
    frames = read_mp4(out)
    assert frames.shape == (17, 48, 64, 3)
    c = centroids(frames, sample_background())
    given = centroids(np.stack([np.asarray(f) for f in sample_frames()]), sample_background())
    assert not np.isnan(c).any()
    assert np.abs(c[0] - given[0]).max() < 3 and np.abs(c[-1] - given[1]).max() < 3  # starts and ends in place
    assert given[0, 0] + 5 < c[8, 0] < given[1, 0] - 5  # and is in between halfway


def test_export_and_build_default_to_every_component():
    from wanrt import cli
    from wanrt.export.specs import COMPONENTS

    assert ",".join(COMPONENTS) == cli.DEFAULT_COMPONENTS


# ------------------------------------------------------------------------ official defaults, options

# The official FLF2V negative prompt, transcribed from wan/configs (../shared/spec/wan21-flf2v.md section 1):
# "镜头切换，" + i2v's "镜头晃动，" + the shared negative prompt.
OFFICIAL_NEG = ("镜头切换，镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
                "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，"
                "畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class _Stop(Exception):
    """Raised by the recording pipeline once the CLI has called it (not one of the CLI's known errors)."""


def test_official_defaults(tiny_official, images, monkeypatch):
    """`wanrt generate` with only the official required flags asks for 81 frames at 1280*720, 50 UniPC steps,
    and the checkpoint's shift and guide scale (an official checkpoint's: 16 and 5.0), and the pipeline fills in
    the official negative prompt."""
    import wanrt.parallel
    from wanrt.pipeline import FLF2VPipeline

    seen = {}

    class Recording:
        def __call__(self, first, last, prompt, **kw):
            seen.update(kw, prompt=prompt)
            raise _Stop

    def load_pipeline(path, plan, run, **options):
        seen["options"] = options
        return Recording()

    monkeypatch.setattr(wanrt.parallel, "load_pipeline", load_pipeline)
    r = run(["--ckpt_dir", str(tiny_official), "--first_frame", images[0], "--last_frame", images[1],
             "--prompt", "a bird", "--base_seed", "1"])
    assert isinstance(r.exception, _Stop), r.output
    assert seen["frame_num"] == 81 and seen["max_area"] == 1280 * 720
    assert seen["sample_steps"] == 50 and seen["sample_shift"] is None and seen["guide_scale"] is None
    assert seen["sample_solver"] == "unipc" and seen["negative_prompt"] is None
    assert seen["cache"] == "none" and seen["timesteps"] is None and seen["last_frame_fit"] == "resize"
    assert seen["options"] == dict(device=None, dtype=None, attention="sdpa", kernels="torch", memory="resident",
                                   cuda_graphs=True, lora=None)  # no LoRA
    # None means the official negative prompt: the text encoder gets exactly it next to the prompt
    pipe = FLF2VPipeline.from_pretrained(tiny_official)
    encoded, used = [], {}
    real, real_denoise = pipe.encode_text, pipe.denoise
    monkeypatch.setattr(pipe, "encode_text", lambda prompts: encoded.append(prompts) or real(prompts))
    monkeypatch.setattr(pipe, "denoise", lambda *a, **kw: used.update(kw) or real_denoise(*a, **kw))
    a, b = (np.asarray(Image.open(p)) for p in images)
    pipe(a, b, "a bird", max_area=64 * 64, frame_num=5, sample_steps=1, seed=0, progress=False)
    assert encoded == [["a bird", OFFICIAL_NEG]]
    assert (used["guide_scale"], used["sample_shift"]) == (5.0, 16.0)  # None: the official checkpoint's


def test_generate_kernel_memory_and_dtype_options(tmp_path, monkeypatch):
    """--attention/--kernels/--memory/--no_cuda_graphs/--dtype reach the pipeline that runs, and it runs."""
    import wanrt.parallel

    built = []
    real = wanrt.parallel.load_pipeline

    def recording(*args, **options):
        built.append(real(*args, **options))
        return built[-1]

    monkeypatch.setattr(wanrt.parallel, "load_pipeline", recording)
    out = tmp_path / "v.mp4"
    r = run([*TINY, "--sample_steps", "1", "--attention", "flash", "--kernels", "triton", "--memory", "sequential",
             "--no_cuda_graphs", "--dtype", "fp32", "--base_seed", "0", "--save_file", str(out)])
    assert r.exit_code == 0, r.output
    pipe = built[0]
    assert (pipe.attention, pipe.kernels, pipe.memory.mode, pipe.cuda_graphs) == ("flash", "triton", "sequential",
                                                                                 False)
    import torch

    assert next(pipe.backends.dit.model.parameters()).dtype == torch.float32
    assert read_mp4(out).shape == (5, 48, 64, 3)


def _clip_component() -> str:
    """The export/build --components name of the CLIP graph (the cheapest one to export or compile)."""
    from wanrt.export import GRAPHS

    return next(c for c, graphs in GRAPHS.items() if "clip" in graphs)


def test_export_then_generate_with_engine_options(tiny_official, tmp_path):
    """`wanrt export` (CLIP only: the cheapest graph) then `wanrt generate --backend onnxruntime --engine_dir
    --override` running that graph with the other components eager."""
    eng = tmp_path / "eng"
    r = runner.invoke(app, ["export", "--ckpt_dir", str(tiny_official), "--size", "64*48", "--frame_num", "5",
                            "--precision", "fp32", "--components", _clip_component(), "--out", str(eng)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((eng / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["clip"] and (eng / "onnx" / "clip.onnx").is_file()
    out = tmp_path / "v.mp4"
    r = run(["--ckpt_dir", str(tiny_official), "--backend", "onnxruntime", "--engine_dir", str(eng),
             "--override", "text_encoder=eager,dit=eager,vae=eager", "--sample_steps", "1", "--base_seed", "0",
             "--save_file", str(out)])
    assert r.exit_code == 0, r.output
    assert "backends: text_encoder=eager, image_encoder=onnxruntime, dit=eager, vae=eager" in r.stderr
    assert read_mp4(out).shape == (5, 48, 64, 3)  # the engine's profile fixes size and frames


@pytest.mark.slow
def test_build_aoti_through_the_cli(tiny_official, tmp_path):
    """`wanrt build --backend aoti` (CLIP only), then generate with that package (~1 minute on 2 cores)."""
    eng = tmp_path / "eng"
    r = runner.invoke(app, ["build", "--backend", "aoti", "--device", "cpu", "--ckpt_dir", str(tiny_official),
                            "--size", "64*48", "--frame_num", "5", "--precision", "fp32",
                            "--components", _clip_component(), "--out", str(eng)])
    assert r.exit_code == 0, r.output
    engines = json.loads((eng / "manifest.json").read_text())["engines"]
    assert [e["graph"] for e in engines.values()] == ["clip"] and all(e["device"] == "cpu" for e in engines.values())
    out = tmp_path / "v.mp4"
    r = run(["--ckpt_dir", str(tiny_official), "--backend", "aoti", "--engine_dir", str(eng),
             "--override", "text_encoder=eager,dit=eager,vae=eager", "--sample_steps", "1", "--base_seed", "0",
             "--save_file", str(out)])
    assert r.exit_code == 0, r.output
    assert "image_encoder=aoti" in r.stderr and read_mp4(out).shape == (5, 48, 64, 3)


# ------------------------------------------------------------------------------------------- doctor


def test_doctor_gives_the_reasons(monkeypatch):
    """Each backend that cannot run says why, with the fix."""
    import wanrt.doctor as doctor

    real = doctor._version

    def missing(module):
        if module in ("onnxruntime", "tensorrt", "triton"):
            return None, f"ModuleNotFoundError: No module named '{module}'"
        return real(module)

    monkeypatch.setattr(doctor, "_version", missing)
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)  # no C++ compiler
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith(("ok", "no"))}
    assert lines["eager"].startswith("ok")
    assert lines["onnxruntime"].startswith("no") and "No module named 'onnxruntime'" in lines["onnxruntime"]
    assert "pip install 'wanrt[export]'" in lines["onnxruntime"]
    assert lines["aoti"].startswith("no") and "needs a C++ compiler" in lines["aoti"]
    assert lines["tensorrt"].startswith("no") and "install TensorRT >= 10.12" in lines["tensorrt"]
    assert lines["triton"].startswith("no") and "pip install triton" in lines["triton"]


def test_doctor_on_this_machine():
    import torch

    r = runner.invoke(app, ["doctor"])
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith(("ok", "no"))}
    assert set(lines) >= {"eager", "onnxruntime", "onnx", "aoti", "tensorrt", "triton"}
    if not torch.cuda.is_available():
        assert "CPU only (no CUDA device)" in lines["eager"]
        assert lines["triton"].startswith("no") and "kernels need a GPU" in lines["triton"]
        assert lines["tensorrt"].startswith("no")  # either not importable or no CUDA device
        assert "not importable" in lines["tensorrt"] or "no CUDA device" in lines["tensorrt"]
