"""`wanrt build`: AOTInductor packages built and run on the CPU, manifest checks, and the TensorRT
builder's pure-Python parts (TensorRT itself cannot be installed here; tests that need it skip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from wanrt.engine import build, engine_file, engine_key
from wanrt.engine.manifest import EngineError, Manifest
from wanrt.export.specs import Target, graph_specs
from wanrt.models.config import WanConfig
from wanrt.pipeline import FLF2VPipeline

TARGET = Target(64, 48, 9)


@pytest.fixture(scope="module")
def aoti_dir(aoti_engine):
    return aoti_engine


def test_aoti_video_matches_eager(aoti_dir, tiny_official):
    from wanrt.metrics import psnr
    from wanrt.samples import sample_frames

    a, b = sample_frames()
    kw = dict(sample_steps=4, seed=5, progress=False)
    eager = FLF2VPipeline.from_pretrained(tiny_official)(a, b, "a bird", max_area=64 * 48, frame_num=9, **kw)
    pipe = FLF2VPipeline.from_pretrained(tiny_official, backend="aoti", engine_dir=aoti_dir, device="cpu")
    video = pipe(a, b, "a bird", **kw)
    value = psnr(video.frames, eager.frames)
    print(f"\nAOTInductor (cpu) vs eager video: PSNR {value:.1f} dB")
    # the same package and request size as test_runtime's aoti row (measured 87.8 dB there, seed 0, 3 steps);
    # tolerance 75 dB (about 4x the RMS error); finite: bit-identical frames would mean eager ran
    assert 75.0 <= value < float("inf"), value
    assert pipe.backends.names["dit"] == "aoti"


def test_manifest_records_the_builds(aoti_dir, tmp_path):
    aoti_dir = shutil.copytree(aoti_dir, tmp_path / "eng")  # the rebuild check must not touch the shared dir
    m = Manifest.load(aoti_dir)
    e = m.entry("engines", engine_key("aoti", "dit", TARGET))
    assert e["device"] == "cpu" and e["torch"] == torch.__version__ and e["build_seconds"] > 0
    rel = engine_file("aoti", "dit", TARGET, "cpu")
    assert list(e["files"]) == [rel] and (aoti_dir / rel).is_file()
    lines = []
    build(m.data["checkpoint"]["path"], aoti_dir, TARGET, backend="aoti", precision="fp32", device="cpu",
          log=lines.append)
    from wanrt.export import GRAPHS

    n_graphs = sum(len(graphs) for graphs in GRAPHS.values())  # every graph of every component
    assert len(lines) == n_graphs + 1 and all(line.endswith("up to date") for line in lines)  # + the dit_time table


def _package_bytes(path) -> int:
    import zipfile

    return sum(i.file_size for i in zipfile.ZipFile(path).infolist())


# slow: 25 s of its own builds; the shared engine dir's packages are checked the same way by
# test_engine_dir_packages_take_their_weights_and_loras_at_load
@pytest.mark.slow
def test_packages_hold_code_and_read_weights_at_load(tmp_path):
    """A package built from a checkpoint holds no constants (Inductor's package_constants_in_so off): it is
    smaller than the embedded build by about the weights' bytes, runs only with the weights handed to it at load
    (by name, read in place: a changed weight changes the output), and refuses weights that lack a constant."""
    from wanrt.engine.aoti import AOTIGraph, compile_package
    from wanrt.export.specs import GraphSpec, TensorSpec

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).eval()
    spec = GraphSpec("toy", (TensorSpec("x", "float32", (4, 256)),), (TensorSpec("y", "float32", (4, 64)),))
    compile_package(net, spec, tmp_path / "embedded.pt2", torch.device("cpu"))
    compile_package(net, spec, tmp_path / "code.pt2", torch.device("cpu"), embed_weights=False)
    weight_bytes = sum(p.numel() * 4 for p in net.parameters())  # 656 KB
    saved = _package_bytes(tmp_path / "embedded.pt2") - _package_bytes(tmp_path / "code.pt2")
    assert saved >= 0.9 * weight_bytes, (saved, weight_bytes)  # switch embed_weights off here: saved = 0
    x = torch.randn(4, 256)
    graph = AOTIGraph(tmp_path / "code.pt2", spec, torch.device("cpu"), weights=net)
    torch.testing.assert_close(graph(x)[0], net(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        net[2].bias.add_(1.0)  # the runner reads the module's tensors in place: no copy of 33 GB at load
    torch.testing.assert_close(graph(x)[0], net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(EngineError, match="lack 2 of the package's constants"):
        AOTIGraph(tmp_path / "code.pt2", spec, torch.device("cpu"), weights=net[:2])


def test_engine_dir_packages_take_their_weights_and_loras_at_load(aoti_dir, tiny_official, tmp_path):
    """The engine dir's packages are code only (manifest: weights "checkpoint"); a LoRA given at load is merged
    as the checkpoint is read (the video follows the eager DiT with that LoRA, not the plain one); the build
    refuses --lora, and a checkpoint that changed since the build is refused at load."""
    from safetensors.torch import save_file

    from tests.test_lora import _lora
    from wanrt.metrics import psnr
    from wanrt.samples import sample_frames

    m = Manifest.load(aoti_dir)
    assert {e["weights"] for e in m.data["engines"].values()} == {"checkpoint"}
    lora = tmp_path / "style.safetensors"
    save_file(_lora("official"), str(lora))
    a, b = sample_frames()
    kw = dict(sample_steps=3, seed=2, progress=False)
    eager = FLF2VPipeline.from_pretrained(tiny_official, lora=[(lora, 1.0)])(a, b, "a bird", max_area=64 * 48,
                                                                             frame_num=9, **kw)
    plain = FLF2VPipeline.from_pretrained(tiny_official)(a, b, "a bird", max_area=64 * 48, frame_num=9, **kw)
    pipe = FLF2VPipeline.from_pretrained(tiny_official, backend="aoti", engine_dir=aoti_dir, device="cpu",
                                         lora=[(lora, 1.0)])
    video = pipe(a, b, "a bird", **kw)
    # as test_aoti_video_matches_eager: >= 75 dB against the eager run with the same LoRA (measured 90.3 dB);
    # the LoRA's own effect is far larger (measured 19.5 dB between the plain and the LoRA video)
    assert psnr(video.frames, eager.frames) >= 75.0
    assert psnr(plain.frames, eager.frames) < 50.0
    with pytest.raises(ValueError, match="pass the LoRAs when loading them"):
        build(tiny_official, tmp_path / "x", TARGET, backend="aoti", precision="fp32", device="cpu",
              lora=[(lora, 1.0)], log=lambda s: None)
    copy = shutil.copytree(aoti_dir, tmp_path / "eng")
    moved = Manifest.load(copy)
    moved.data["checkpoint"]["fingerprint"] = "0" * 16  # what a re-downloaded or edited checkpoint looks like
    moved.save()
    with pytest.raises(EngineError, match="changed since the aoti packages were built") as err:
        FLF2VPipeline.from_pretrained(backend="aoti", engine_dir=copy, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value,match", [
    ("wanrt", "0.0.1", "built by wanrt 0.0.1"),
    ("torch", "1.0", "compiled by torch 1.0"),
    ("device", "cuda", "compiled for cuda, not cpu"),
])
def test_manifest_mismatch_is_refused(aoti_dir, tmp_path, field, value, match):
    copy = shutil.copytree(aoti_dir, tmp_path / "eng")
    data = json.loads((copy / "manifest.json").read_text())
    if field == "wanrt":
        data["versions"]["wanrt"] = value
    else:
        for e in data["engines"].values():
            e[field] = value
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match=match) as err:
        FLF2VPipeline.from_pretrained(backend="aoti", engine_dir=copy, device="cpu")
    assert "wanrt build --backend aoti --force" in str(err.value)


def test_corrupted_package_is_never_loaded(aoti_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(aoti_dir, tmp_path / "eng")
    f = copy / engine_file("aoti", "vae_decoder", TARGET, "cpu")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda p: loaded.append(p))
    with pytest.raises(EngineError, match="vae_decoder.pt2 does not match its sha256"):
        FLF2VPipeline.from_pretrained(backend="aoti", engine_dir=copy, device="cpu")
    assert all("vae_decoder.pt2" not in str(p) for p in loaded)


def test_interrupted_build_leaves_no_half_written_engine(tiny_official, tmp_path, monkeypatch):
    """Ctrl-C while AOTInductor writes the DiT package: the manifest lists the CLIP package finished before,
    the DiT package does not exist, no temporary file is left, and a rerun builds only the DiT."""
    from wanrt.export import GRAPHS

    parts = tuple(next(c for c, graphs in GRAPHS.items() if g in graphs) for g in ("clip", "dit"))
    written = []

    # the real one takes ~1 minute per graph; it writes like this
    def fake_compile(program, package_path, inductor_configs=None):
        written.append(package_path)
        with open(package_path, "wb") as f:
            f.write(b"a whole package")
            if len(written) == 2:
                raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C while the DiT package was written

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_official, tmp_path, TARGET, backend="aoti", precision="fp32", device="cpu",
              components=parts, log=lambda s: None)
    assert [p.endswith(".tmp.pt2") for p in written] == [True, True]  # packages are written under temp names
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert list(data["engines"]) == [engine_key("aoti", "clip", TARGET)]
    assert (tmp_path / engine_file("aoti", "clip", TARGET, "cpu")).is_file()
    assert not (tmp_path / engine_file("aoti", "dit", TARGET, "cpu")).exists()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left
    lines = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, inductor_configs=None: Path(package_path).write_bytes(b"dit"))
    build(tiny_official, tmp_path, TARGET, backend="aoti", precision="fp32", device="cpu",
          components=parts, log=lines.append)
    assert lines[0] == f"{engine_key('aoti', 'clip', TARGET)}: up to date"
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["engines"]) == sorted(
        engine_key("aoti", g, TARGET) for g in ("clip", "dit"))


def test_aoti_rejects_an_unknown_precision(tiny_official, tmp_path):
    # fp8 is an aoti precision since the eager FP8 DiT (tests/test_precision.py builds and checks one)
    with pytest.raises(ValueError, match=r"aoti builds fp32, bf16 or fp8 \(got 'int4'\)"):
        build(tiny_official, tmp_path, TARGET, backend="aoti", precision="int4")
    assert not (tmp_path / "engines").exists()


# ------------------------------------------------------------------------------ TensorRT, pure Python


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def test_import_wanrt_does_not_import_tensorrt():
    import subprocess
    import sys

    code = "import sys, wanrt, wanrt.engine, wanrt.engine.tensorrt, wanrt.cli; print('tensorrt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_build_tensorrt_fails_at_once_without_tensorrt(tiny_official, tmp_path):
    if _has_tensorrt():
        pytest.skip("tensorrt is installed here")
    from wanrt.cli import app

    r = CliRunner().invoke(app, ["build", "--backend", "tensorrt", "--ckpt_dir", str(tiny_official), "--out",
                                 str(tmp_path / "eng"), "--size", "64*48", "--frame_num", "9"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not usable here")
    assert not (tmp_path / "eng").exists()  # no export work was done


def test_trt_settings_from_the_spec():
    from wanrt.engine.tensorrt import settings_for

    spec = graph_specs(WanConfig.flf2v_14b(), Target(1280, 720, 81))["dit"]
    s = settings_for(spec, workspace_gb=16, optimization_level=4)
    assert s.profile["x"] == ((2, 16, 21, 90, 160),) * 3  # static: min = opt = max
    assert s.profile["context"] == ((2, 512, 4096),) * 3 and s.outputs == {"velocity": (2, 16, 21, 90, 160)}
    assert s.workspace_bytes == 16 << 30 and s.optimization_level == 4 and not s.strip_weights
    with pytest.raises(ValueError, match="optimization level"):
        settings_for(spec, optimization_level=7)
    assert json.loads(json.dumps(s.to_dict()))["profile"]["t"] == [[2], [2], [2]]


class _Recorder:
    """A recording stand-in for the TensorRT builder objects (no TensorRT behaviour is simulated: it only
    records which API calls our configuration code makes)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kw):
            self.calls.append((name, args))
            return self

        return record


def test_trt_config_sets_no_precision_flags():
    from wanrt.engine.tensorrt import configure, settings_for

    spec = graph_specs(WanConfig.tiny(), TARGET)["dit"]
    flags = SimpleNamespace(TF32="TF32", STRIP_PLAN="STRIP_PLAN", REFIT_IDENTICAL="REFIT_IDENTICAL",
                            FP16="FP16", BF16="BF16", FP8="FP8", INT8="INT8")
    trt = SimpleNamespace(BuilderFlag=flags, MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"))
    builder = _Recorder()
    configure(trt, builder, None, settings_for(spec, strip_weights=True), None)
    names = [c for c in builder.calls]
    set_flags = [a[0] for n, a in names if n == "set_flag"]
    assert set_flags == ["STRIP_PLAN", "REFIT_IDENTICAL"]  # never FP16/BF16/FP8/INT8: precision is in the graph
    assert ("clear_flag", ("TF32",)) in names
    shapes = {a[0]: a[1:] for n, a in names if n == "set_shape"}
    assert shapes["y"] == ((2, 20, 3, 6, 8),) * 3 and set(shapes) == {t.name for t in spec.inputs}
    assert ("set_memory_pool_limit", ("WORKSPACE", 8 << 30)) in names


def test_trt_network_io_check():
    from wanrt.engine.tensorrt import check_network

    spec = graph_specs(WanConfig.tiny(), TARGET)["clip"]

    class Net:
        def __init__(self, shape):
            self.num_inputs, self.num_outputs = 1, 1
            self.shape = shape

        def get_input(self, i):
            return SimpleNamespace(name="pixels", shape=self.shape)

        def get_output(self, i):
            return SimpleNamespace(name="clip_tokens", shape=(2, 17, 160))

    check_network(Net((2, 3, 32, 32)), spec)
    with pytest.raises(ValueError, match="does not match the spec"):
        check_network(Net((1, 3, 32, 32)), spec)


@pytest.mark.skipif(not _has_tensorrt(), reason="TensorRT is not installed (its wheels cannot be downloaded here)")
@pytest.mark.gpu
def test_tensorrt_build_and_run(tiny_official, tmp_path):
    from wanrt.metrics import psnr
    from wanrt.samples import sample_frames

    build(tiny_official, tmp_path, TARGET, backend="tensorrt", precision="fp32", log=lambda s: None)
    a, b = sample_frames()
    kw = dict(sample_steps=4, seed=5, progress=False)
    ref = FLF2VPipeline.from_pretrained(tiny_official, dtype=torch.float32)(a, b, "x", max_area=64 * 48,
                                                                           frame_num=9, **kw)
    out = FLF2VPipeline.from_pretrained(backend="tensorrt", engine_dir=tmp_path)(a, b, "x", **kw)
    assert psnr(out.frames, ref.frames) >= 40
