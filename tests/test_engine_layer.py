"""The engine layer's graph contract on the CPU: stub graphs that reuse their output buffers (as TensorRT
does) behind the callers that keep outputs (text encoder rows, VAE chunks and caches, the denoising
step), the contract's input checks, and the TensorRT graph class driven by a fake `tensorrt` module
whose execution context reads and writes the bound host addresses."""

from __future__ import annotations

import ctypes
import types

import pytest
import torch

from wanrt.engine.graph import ContractGraph, FunctionGraph, GraphInputError, GraphOutputError
from wanrt.export.specs import GraphSpec, Target, TensorSpec
from wanrt.runtime.backends import GraphSingle, GraphTextEncoder, GraphVAE, graph_backends

F32, I64 = "float32", "int64"


class Reusing:
    """A stub engine: `fn(*inputs)` computed into the SAME output buffers on every call; it refuses an input
    that aliases one of its outputs (reading and writing one buffer in one launch is undefined in TensorRT)."""

    def __init__(self, fn, shapes):
        self.fn = fn
        self.bufs = [torch.empty(s) for s in shapes]

    def __call__(self, *args):
        for a in args:
            for b in self.bufs:
                if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                    raise AssertionError("an input aliases an output buffer")
        for b, v in zip(self.bufs, self.fn(*args)):
            b.copy_(v)
        return list(self.bufs)


class Lying(FunctionGraph):
    """The bug the contract exists for: an engine that reuses its buffers but does not say so
    (what wanrt's TensorRT graph did before the contract)."""

    reuses_outputs = False


def text_spec(n=4, d=3):
    return GraphSpec("t5", (TensorSpec("ids", I64, (1, n)), TensorSpec("mask", I64, (1, n))),
                     (TensorSpec("context", F32, (1, n, d)),))


def text_fn(ids, mask):
    return [(ids * mask).float()[..., None].expand(1, ids.shape[1], 3) + 1]


def test_text_encoder_rows_stay_distinct_under_buffer_reuse():
    """CFG needs two different embeddings (prompt, negative prompt). With an engine that reuses its
    output and a contract that does not copy, both rows become the last prompt's (guidance silently off)."""
    ids = torch.tensor([[5, 6, 7, 0], [9, 9, 0, 0]])
    mask = (ids != 0).long()
    want = torch.cat([text_fn(ids[i:i + 1], mask[i:i + 1])[0] for i in range(2)])
    safe = GraphTextEncoder(FunctionGraph(Reusing(text_fn, [(1, 4, 3)]), text_spec(), reuses_outputs=True))
    assert torch.equal(safe(ids, mask), want)
    broken = GraphTextEncoder(Lying(Reusing(text_fn, [(1, 4, 3)]), text_spec()))
    got = broken(ids, mask)
    assert torch.equal(got[0], got[1]) and not torch.equal(got, want)  # the failure the contract prevents


def vae_specs():
    lat, cache = (1, 2, 1, 2, 2), (1, 2, 2, 2, 2)
    frames = (1, 3, 1, 2, 2)
    first = GraphSpec("vae_decoder_first", (TensorSpec("latent", F32, lat),),
                      (TensorSpec("frames", F32, frames), TensorSpec("cache_out_0", F32, cache)))
    steady = GraphSpec("vae_decoder", (TensorSpec("latent", F32, lat), TensorSpec("cache_in_0", F32, cache)),
                       (TensorSpec("frames", F32, frames), TensorSpec("cache_out_0", F32, cache)))
    return first, steady


def dec_first(z):
    return [z.sum(1, keepdim=True).expand(1, 3, 1, 2, 2) * 1.5, torch.cat([z, z], 2)]


def dec(z, c):
    frames = (z.sum(1, keepdim=True) + c.mean()).expand(1, 3, 1, 2, 2)
    return [frames, torch.cat([c[:, :, 1:], z], 2) * 0.5 + 1]


def test_vae_chunks_and_caches_under_buffer_reuse():
    """decode_chunks keeps every chunk and feeds the caches back: with reused buffers and no copy, every
    chunk would be the last one and the cache input would alias the cache output."""
    from wanrt.models.vae import decode_chunks

    first, steady = vae_specs()
    z = torch.randn(1, 2, 5, 2, 2, generator=torch.Generator().manual_seed(0))

    def backend(cls, reuses):
        shapes = [(1, 3, 1, 2, 2), (1, 2, 2, 2, 2)]
        g1 = cls(Reusing(dec_first, shapes), first, reuses_outputs=reuses) if cls is FunctionGraph else \
            cls(Reusing(dec_first, shapes), first)
        g2 = cls(Reusing(dec, shapes), steady, reuses_outputs=reuses) if cls is FunctionGraph else \
            cls(Reusing(dec, shapes), steady)
        return GraphVAE(None, None, g1, g2)

    fresh = GraphVAE(None, None, FunctionGraph(dec_first, first), FunctionGraph(dec, steady))
    want = decode_chunks(fresh.decode_chunk, z)
    got = decode_chunks(backend(FunctionGraph, True).decode_chunk, z)
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="aliases"):  # without the copy: cache in == cache out
        decode_chunks(backend(Lying, False).decode_chunk, z)


def test_dit_step_is_safe_with_borrowed_outputs():
    """The step borrows the DiT's output buffer (zero copy) and consumes it before the next call: the
    latent after all steps equals the one from a DiT that returns fresh tensors, bit for bit."""
    from wanrt.runtime.step import CFGStep
    from wanrt.schedulers import make_scheduler

    shape = (2, 4, 2, 2, 2)
    spec = GraphSpec("dit", (TensorSpec("x", F32, shape), TensorSpec("t", I64, (2,)),
                             TensorSpec("context", F32, (2, 3, 5)), TensorSpec("clip_fea", F32, (2, 2, 5)),
                             TensorSpec("y", F32, shape)), (TensorSpec("velocity", F32, shape),))

    def velocity(x, t, context, clip_fea, y):
        return [x * 0.3 - y * 0.1 + t.view(2, 1, 1, 1, 1) / 1000 + context.mean((1, 2)).view(2, 1, 1, 1, 1)]

    g = torch.Generator().manual_seed(1)
    latent, y1 = torch.randn(1, *shape[1:], generator=g), torch.randn(1, *shape[1:], generator=g)
    context, clip = torch.randn(2, 3, 5, generator=g), torch.randn(1, 2, 5, generator=g)

    def run(dit):
        sched = make_scheduler("unipc", 3.0)
        sched.set_timesteps(6, device=torch.device("cpu"))
        return CFGStep(dit, context, clip, y1, 5.0, sched, latent).run(cuda_graph=False).clone()

    want = run(GraphSingle(FunctionGraph(velocity, spec)))
    got = run(GraphSingle(FunctionGraph(Reusing(velocity, [shape]), spec, reuses_outputs=True), borrow=True))
    assert torch.equal(got, want)
    assert graph_backends({"dit": FunctionGraph(velocity, spec)})["dit"].call.__name__ == "borrow"


def test_inputs_are_checked_and_cast():
    seen = []
    graph = FunctionGraph(lambda ids, mask: (seen.append((ids.dtype, mask.dtype)), text_fn(ids, mask))[1],
                          text_spec())
    ids = torch.ones(1, 4, dtype=torch.int32)
    graph(ids, torch.ones(1, 4, dtype=torch.bool))
    assert seen == [(torch.int64, torch.int64)]  # cast to the spec
    with pytest.raises(GraphInputError, match="got 1 inputs, the graph takes 2"):
        graph(ids)
    with pytest.raises(GraphInputError, match=r"input mask has shape \(1, 5\)"):
        graph(ids, torch.ones(1, 5, dtype=torch.int64))
    with pytest.raises(GraphInputError, match="input ids is torch.float32, the graph takes int64"):
        graph(ids.float(), ids)
    wrong = FunctionGraph(lambda ids, mask: [torch.zeros(1, 4, 2)], text_spec())
    with pytest.raises(GraphOutputError, match="its I/O spec says"):
        wrong(ids, ids)
    with pytest.raises(TypeError, match="not ContractGraphs"):
        graph_backends({"t5": text_fn})
    assert issubclass(FunctionGraph, ContractGraph)


# -- TensorRT, driven by a fake module ----------------------------------------------------------------


def _at(ptr: int, shape, dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    size = n * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * size).from_address(ptr), dtype=dtype).view(shape)


def fake_trt(io, fn, refuse=()):
    """A `tensorrt` stand-in: an engine with tensors `io` = [(name, mode, shape, dtype name)] whose
    execution reads the inputs at their bound (host) addresses and writes fn(inputs) to the outputs'."""
    DataType = types.SimpleNamespace(**{k: k for k in ("FLOAT", "HALF", "BF16", "FP8", "INT64", "INT32", "INT8",
                                                        "UINT8", "BOOL")})
    Mode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    torch_of = {"FLOAT": torch.float32, "INT64": torch.int64, "HALF": torch.float16, "BF16": torch.bfloat16}

    class Context:
        def __init__(self):
            self.addr = {}

        def set_tensor_address(self, name, ptr):
            if name in refuse:
                return False
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            ins = [_at(self.addr[n], s, torch_of[d]) for n, m, s, d in io if m == "in"]
            outs = [_at(self.addr[n], s, torch_of[d]) for n, m, s, d in io if m == "out"]
            for o, v in zip(outs, fn(*ins)):
                o.copy_(v)
            return True

    class Engine:
        num_io_tensors = len(io)

        def get_tensor_name(self, i):
            return io[i][0]

        def get_tensor_mode(self, name):
            return next(m for n, m, _, _ in io if n == name)

        def get_tensor_shape(self, name):
            return next(s for n, _, s, _ in io if n == name)

        def get_tensor_dtype(self, name):
            return next(d for n, _, _, d in io if n == name)

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            assert bytes(plan[:4]) == b"plan"  # read through the memory map
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(DataType=DataType, TensorIOMode=Mode, Runtime=Runtime, Logger=Logger)


CACHE_SPEC = GraphSpec("vae_decoder", (TensorSpec("latent", F32, (1, 2)), TensorSpec("cache_in_0", F32, (1, 3))),
                       (TensorSpec("frames", F32, (1, 2)), TensorSpec("cache_out_0", F32, (1, 3))))
CACHE_IO = [("latent", "in", (1, 2), "FLOAT"), ("cache_in_0", "in", (1, 3), "FLOAT"),
            ("frames", "out", (1, 2), "FLOAT"), ("cache_out_0", "out", (1, 3), "FLOAT")]


def cache_fn(z, c):
    return [z * 2 + c.sum(), c + 1]


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "g.plan"
    path.write_bytes(b"plan" + bytes(60))
    return path


def test_trt_graph_owns_inputs_and_hands_out_copies(plan):
    from wanrt.engine.tensorrt import TRTGraph

    g = TRTGraph(plan, CACHE_SPEC, torch.device("cpu"), trt=fake_trt(CACHE_IO, cache_fn))
    assert all(b.data_ptr() % 256 == 0 for b in (*g.inputs, *g.outputs))  # owned, aligned, bound once
    z, c = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, 3)  # fp64: cast by the contract
    outs = []
    for _ in range(3):  # the VAE cache loop: outputs fed back as inputs, every chunk kept
        frames, c = g(z, c)
        outs.append(frames)
    ref_c, ref = torch.zeros(1, 3), []
    for _ in range(3):
        f, ref_c = cache_fn(z.float(), ref_c)
        ref.append(f)
    assert torch.equal(torch.cat(outs), torch.cat(ref)) and torch.equal(c, ref_c)
    borrowed = g.borrow(z, c)
    assert borrowed[0].data_ptr() == g.outputs[0].data_ptr()  # the explicit zero-copy form
    with pytest.raises(GraphInputError, match="cache_in_0 has shape"):
        g(z, torch.zeros(1, 4))


@pytest.mark.parametrize("io, match", [
    ([*CACHE_IO[:3], ("cache_out_0", "out", (1, 3), "BF16")], "cache_out_0: engine"),
    (CACHE_IO[:3], "cache_out_0: engine None"),
    ([*CACHE_IO[:1], ("cache_in_0", "in", (1, 4), "FLOAT"), *CACHE_IO[2:]], r"cache_in_0: engine \('input', \(1, 4\)"),
])
def test_trt_graph_checks_the_engine_io_at_load(plan, io, match):
    from wanrt.engine.tensorrt import TRTGraph

    with pytest.raises(ValueError, match=match):
        TRTGraph(plan, CACHE_SPEC, torch.device("cpu"), trt=fake_trt(io, cache_fn))


def test_trt_graph_checks_set_tensor_address(plan):
    from wanrt.engine.tensorrt import TRTGraph

    with pytest.raises(RuntimeError, match="refused the address of frames"):
        TRTGraph(plan, CACHE_SPEC, torch.device("cpu"), trt=fake_trt(CACHE_IO, cache_fn, refuse=("frames",)))


def test_trt_dtype_map_is_complete():
    from wanrt.engine.graph import DTYPES
    from wanrt.engine.tensorrt import TRT_DTYPES

    assert set(TRT_DTYPES) == set(DTYPES)
    assert {"BF16", "HALF", "FP8", "INT32", "BOOL", "FLOAT", "INT64"} <= set(TRT_DTYPES.values())


# -- the engine dir: layout, typed manifest, integrity ---------------------------------------------------


ENGINE_TARGET = Target(64, 48, 9)


def _open_engine_dir(root):
    """An EngineDir opened for a build of the tiny config at 64x48x9 (as each export/build process does)."""
    import dataclasses

    from wanrt.engine.dir import EngineDir
    from wanrt.models.config import WanConfig

    d = EngineDir(root)
    d.open(source={"path": "x", "layout": "official", "fingerprint": "f"},
           config=dataclasses.asdict(WanConfig.tiny()), precision="fp32", target=ENGINE_TARGET)
    (root / "engines").mkdir(exist_ok=True)
    return d


def _engine_dir(root):
    target = ENGINE_TARGET
    d = _open_engine_dir(root)
    m = d.manifest
    f = d.onnx_path("dit", target)
    f.parent.mkdir(parents=True)
    f.write_bytes(b"graph bytes")
    m.record("graphs", "dit@64x48x9", [str(f.relative_to(root))], component="dit", graph="dit")
    return d, target, f


@pytest.mark.parametrize("edit", ["batch", "config", "versions", "spec"])
def test_an_edited_manifest_is_refused(tmp_path, edit):
    """Before: an edited batch or config changed the shapes a loader used without notice."""
    import json

    from wanrt.engine.manifest import EngineError, Manifest
    from wanrt.runtime.backends import from_engine_dir

    d, target, _ = _engine_dir(tmp_path)
    assert d.verify() == [] and Manifest.load(tmp_path).batch == 2
    data = json.loads((tmp_path / "manifest.json").read_text())
    if edit == "batch":
        data["batch"] = 1
    elif edit == "config":
        data["config"]["dit"]["num_layers"] += 1
    elif edit == "versions":
        data["versions"]["torch"] = "0.0"
    else:
        data["graphs"]["dit@64x48x9"]["graph"] = "vae"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="changed after wanrt wrote it"):
        from_engine_dir(tmp_path, "onnxruntime", torch.device("cpu"))
    assert len(d.__class__.load(tmp_path).verify()) == 1


def test_load_checks_size_and_mtime_then_the_hash(tmp_path, monkeypatch):
    import os

    from wanrt.engine import manifest as manifest_mod
    from wanrt.engine.manifest import EngineError, Manifest

    d, target, f = _engine_dir(tmp_path)
    m = Manifest.load(tmp_path)
    hashed = []
    real = manifest_mod.sha256
    monkeypatch.setattr(manifest_mod, "sha256", lambda p: hashed.append(p) or real(p))
    m.verify_files("graphs", "dit@64x48x9")
    assert hashed == []  # size and mtime as recorded: no re-hash at load
    m.verify_files("graphs", "dit@64x48x9", full=True)
    assert hashed == [f]  # on demand: the full hash
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched (e.g. copied), same bytes: passes
    m.verify_files("graphs", "dit@64x48x9")
    assert len(hashed) == 2
    f.write_bytes(b"graph bytez")  # same size, new bytes and mtime: re-hashed, refused
    with pytest.raises(EngineError, match="does not match its sha256"):
        m.verify_files("graphs", "dit@64x48x9")


def _writer(root, name, n):
    """One process's share of test_writers_in_parallel_keep_every_entry: n files, each recorded as it is made."""
    d = _open_engine_dir(root)
    for i in range(n):
        f = root / "engines" / f"{name}{i}.bin"
        f.write_bytes(f"{name} {i}".encode())
        d.manifest.record("engines", f"{name}{i}", [str(f.relative_to(root))], component="vae", graph=name)


def test_a_second_writer_keeps_the_first_ones_entries(tmp_path):
    """Two builds into one engine dir (e.g. `wanrt build --components vae` beside one of the DiT): each opened
    the manifest before the other recorded anything. Before, the last save dropped the other's entries."""
    import json

    from wanrt.engine.manifest import Manifest

    a = _open_engine_dir(tmp_path)
    b = _open_engine_dir(tmp_path)
    for d, name in ((a, "dit"), (b, "vae"), (a, "t5")):
        f = tmp_path / "engines" / f"{name}.bin"
        f.write_bytes(name.encode())
        d.manifest.record("engines", name, [f"engines/{name}.bin"], component=name, graph=name)
    m = Manifest.load(tmp_path)
    assert sorted(m.section("engines")) == ["dit", "t5", "vae"]
    assert m.verify() == []  # merged and re-signed: intact
    # an entry this process did not write is the disk's, even when it holds an older copy
    json_entry = m.entry("engines", "vae")
    assert a.manifest.entry("engines", "vae") == json_entry
    # a manifest edited by hand is not merged into the next save (that would re-sign the edit)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["engines"]["forged"] = dict(json_entry)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    f = tmp_path / "engines" / "clip.bin"
    f.write_bytes(b"clip")
    b.manifest.record("engines", "clip", ["engines/clip.bin"], component="clip", graph="clip")
    m = Manifest.load(tmp_path)
    assert "forged" not in m.section("engines") and m.verify() == []


def test_writers_in_parallel_keep_every_entry(tmp_path):
    """Three processes record 12 entries each into one engine dir at once; the dir lock serialises each
    read-merge-write, so all 36 end up in the manifest (without the lock, entries are lost between one
    writer's read and another's write)."""
    import multiprocessing

    from wanrt.engine.manifest import Manifest

    _open_engine_dir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, name, 12)) for name in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    m = Manifest.load(tmp_path)
    assert len(m.section("engines")) == 36 and m.verify() == []


def test_doctor_verify(tmp_path):
    from typer.testing import CliRunner

    from wanrt.cli import app

    d, target, f = _engine_dir(tmp_path)
    ok = CliRunner().invoke(app, ["doctor", "--verify", str(tmp_path)])
    assert ok.exit_code == 0 and "intact" in ok.output, ok.output
    st = f.stat()
    f.write_bytes(b"graph bytez")
    os_utime = __import__("os").utime
    os_utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime kept: only the full hash sees it
    bad = CliRunner().invoke(app, ["doctor", "--verify", str(tmp_path)])
    assert bad.exit_code == 1 and "does not match its sha256" in bad.output, bad.output


def test_component_table_and_old_spellings():
    from wanrt.export.specs import COMPONENTS, GRAPH_NAMES, TABLE, check_components, component_of

    assert COMPONENTS == ("text_encoder", "image_encoder", "dit", "vae")
    assert [component_of(g) for g in GRAPH_NAMES] == ["text_encoder", "image_encoder", "dit"] + ["vae"] * 4
    assert TABLE["text_encoder"].weights == "text_encoder"
    assert check_components("dit, vae,dit") == ["dit", "vae"]
    with pytest.raises(ValueError, match="'t5' is now called 'text_encoder'"):
        check_components("t5,dit")
    with pytest.raises(ValueError, match="'vae_decoder' is now called 'vae'"):
        check_components(["vae_decoder"])
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        check_components(["unet"])


def test_cli_refuses_old_component_names(tmp_path):
    from typer.testing import CliRunner

    from wanrt.cli import app

    r = CliRunner().invoke(app, ["export", "--ckpt_dir", "tiny", "--out", str(tmp_path), "--components", "t5"])
    assert r.exit_code != 0 and "'t5' is now called 'text_encoder'" in r.output
    assert not (tmp_path / "manifest.json").exists()  # refused before any work


def test_fp8_recipe_keeps_nvidias_edge_blocks_bf16():
    from wanrt.export.fp8 import excluded_blocks, quantized_linears, recipe_linears
    from wanrt.models.config import WanConfig
    from wanrt.models.dit import WanDiT

    assert excluded_blocks(40) == [0, 1, 2, 37, 38, 39]
    assert excluded_blocks(2) == []  # too few blocks to spare: the tiny model is quantised whole
    cfg = WanConfig.tiny().dit
    cfg = type(cfg)(**{**cfg.__dict__, "num_layers": 8})
    with torch.device("meta"):
        dit = WanDiT(cfg)
    every = quantized_linears(dit)
    kept = recipe_linears(dit)
    assert {int(n.split(".")[1]) for n in kept} == {3, 4}
    assert len(kept) == len(every) * 2 // 8 and recipe_linears(dit, "all") == every


# -- polygraphy / engine inspection --------------------------------------------------------------------


def test_layer_summary_counts_fused_attention_and_fp8():
    import json

    from wanrt.engine.compare import summarize_layers

    detailed = {"Layers": [
        {"Name": "patch_embedding", "LayerType": "CaskConvolution", "TacticName": "sm90_xmma_conv_bf16"},
        {"Name": "blocks.0.self_attn/MatMul+Softmax+MatMul", "LayerType": "kgen",
         "TacticName": "_gemm_mha_v2_bf16_128_128_sm90"},
        {"Name": "blocks.3.ffn.0/MatMul", "LayerType": "gemm", "Inputs": [{"Format/Datatype": "FP8"}],
         "TacticName": "sm90_xmma_gemm_e4m3f32_e4m3"},
    ]}
    got = summarize_layers(json.dumps(detailed))
    assert got["layers"] == 3 and got["fused_attention"] == 1 and got["fp8"] == 1
    assert got["fused_attention_layers"] == ["blocks.0.self_attn/MatMul+Softmax+MatMul"]
    unfused = {"Layers": ["blocks.0.self_attn/MatMul", "blocks.0.self_attn/Softmax", "blocks.0.self_attn/MatMul_1"]}
    assert summarize_layers(json.dumps(unfused))["fused_attention"] == 0  # names only: nothing fused


def _has_tensorrt() -> bool:
    try:
        from wanrt.engine.tensorrt import require

        require()
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message where TensorRT is absent")
def test_compare_without_tensorrt_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from wanrt.cli import app
    from wanrt.engine.compare import compare_with_onnxruntime
    from wanrt.engine.tensorrt import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="TensorRT is not usable here"):
        compare_with_onnxruntime(tmp_path, "dit", Target(64, 48, 9))
    _engine_dir(tmp_path)
    r = CliRunner().invoke(app, ["doctor", "--compare", str(tmp_path)])
    assert r.exit_code == 1 and "no TensorRT engines to compare" in r.output


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message where TensorRT is absent")
def test_plugin_graph_without_tensorrt_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from wanrt.engine.tensorrt import TensorRTUnavailable, register_our_plugins

    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 1, 4]) for n in "qkv"]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 1, 4])
    node = helper.make_node("FlashAttention", ["q", "k", "v"], ["out"], domain="wanrt")
    model = helper.make_model(helper.make_graph([node], "g", x, [out]),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("wanrt", 1)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    with pytest.raises(TensorRTUnavailable, match="uses our attention plugins, which cannot be registered"):
        register_our_plugins(path)


def test_trt_network_dtypes_checked_at_build():
    from wanrt.engine.tensorrt import check_network

    trt = fake_trt(CACHE_IO, cache_fn)

    class Net:
        def __init__(self, dtype):
            self.io = [types.SimpleNamespace(name=n, shape=s, dtype=dtype if n == "frames" else d)
                       for n, _, s, d in CACHE_IO]
            self.num_inputs, self.num_outputs = 2, 2

        def get_input(self, i):
            return self.io[i]

        def get_output(self, i):
            return self.io[2 + i]

    check_network(Net("FLOAT"), CACHE_SPEC, trt)
    with pytest.raises(ValueError, match="frames: BF16 \\(spec FLOAT\\)"):
        check_network(Net("BF16"), CACHE_SPEC, trt)
