"""`wanrt generate` and `wanrt doctor` through typer's CliRunner, plus one real subprocess run."""

from __future__ import annotations

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


def test_doctor_lists_backends():
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0
    for name in ("eager", "onnxruntime", "aoti", "tensorrt", "triton"):
        assert name in r.stdout


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
