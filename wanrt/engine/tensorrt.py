"""TensorRT: build strongly typed plans from the exported ONNX, and run them. Isolated on purpose.

Written against the TensorRT 10.12+/11 Python API (../shared/spec/tensorrt.md): a STRONGLY_TYPED
network from the ONNX parser (`parse_from_file`, which reads external data), no precision builder
flags (precision lives in the graph: bf16 tensors, explicit Casts, FP8 Q/DQ), builder optimisation
level and workspace limit, a timing cache file, static shapes checked against the I/O spec, our
Triton plugins registered when the graph uses them, and optional weight-stripped plans refitted from
the ONNX at load. Nothing here is imported by `import wanrt`; `tensorrt` itself is imported only
inside the functions that need it. The pure-Python parts (settings, profiles, checks) are tested
without TensorRT.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wanrt.export.specs import GraphSpec

from .graph import ContractGraph, torch_dtype


class TensorRTUnavailable(ImportError):
    pass


def register_our_plugins(onnx_path: Path) -> None:
    """Register our Triton plugins when the graph has wanrt custom nodes (--graph_attention flash|sage);
    one line when they cannot be (no tensorrt.plugin, no triton, an old TensorRT)."""
    if not uses_plugins(onnx_path):
        return
    try:
        from wanrt.kernels.trt_plugins import register_plugins

        register_plugins()
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError of an old tensorrt.plugin, ...
        raise TensorRTUnavailable(f"{onnx_path.name} uses our attention plugins, which cannot be registered here "
                                  f"({type(e).__name__}: {e}); re-export with --graph_attention matmul") from None


def require():
    """Import tensorrt or fail with one line that says what to do."""
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        raise TensorRTUnavailable(f"TensorRT is not usable here ({type(e).__name__}: {e}); install TensorRT "
                                  ">= 10.12 on a CUDA machine (pip install 'wanrt[tensorrt]') or use --backend aoti"
                                  ) from None
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    if (major, minor) < (10, 12):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: wanrt builds strongly typed networks, "
                                  "which need TensorRT >= 10.12")
    return trt


_LOGGER = None


def logger(trt):
    """The one TensorRT logger of this process (TensorRT keeps a reference to it; one is enough)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


@dataclass(frozen=True)
class BuildSettings:
    """Everything the builder is told, derived from the I/O spec and the options; stored in the manifest."""

    graph: str
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3
    strip_weights: bool = False  # weight-stripped plan (STRIP_PLAN + REFIT_IDENTICAL), refitted from the ONNX
    tf32: bool = False  # fp32 graphs stay fp32 unless asked
    # one optimisation profile with min = opt = max = the spec's static shape, per input
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def settings_for(spec: GraphSpec, *, workspace_gb: float = 8.0, optimization_level: int = 3,
                 strip_weights: bool = False, tf32: bool = False) -> BuildSettings:
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"builder optimization level must be 0..5, got {optimization_level}")
    if workspace_gb <= 0:
        raise ValueError(f"workspace must be positive, got {workspace_gb} GB")
    profile = {t.name: (t.shape, t.shape, t.shape) for t in spec.inputs}
    return BuildSettings(graph=spec.name, workspace_bytes=int(workspace_gb * (1 << 30)),
                         optimization_level=optimization_level, strip_weights=strip_weights, tf32=tf32,
                         profile=profile, outputs={t.name: t.shape for t in spec.outputs})


def builder_flags(trt, settings: BuildSettings) -> list:
    """The BuilderFlags to set. Never FP16/BF16/FP8/INT8: strongly typed networks take precision from
    the graph (and TensorRT 11 removed those flags)."""
    flags = []
    if settings.strip_weights:
        flags += [trt.BuilderFlag.STRIP_PLAN, trt.BuilderFlag.REFIT_IDENTICAL]
    return flags


def check_network(network, spec: GraphSpec, trt=None) -> None:
    """The parsed network must have exactly the spec's static inputs and outputs (and, given the tensorrt
    module, the spec's dtypes)."""
    got_in = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    got_out = {network.get_output(i).name: tuple(network.get_output(i).shape) for i in range(network.num_outputs)}
    want_in = {t.name: t.shape for t in spec.inputs}
    want_out = {t.name: t.shape for t in spec.outputs}
    if got_in != want_in or got_out != want_out:
        raise ValueError(f"{spec.name}: the ONNX network's I/O {got_in} -> {got_out} does not match the spec "
                         f"{want_in} -> {want_out}; re-export it")
    if trt is not None:
        tensors = [network.get_input(i) for i in range(network.num_inputs)]
        tensors += [network.get_output(i) for i in range(network.num_outputs)]
        want = {t.name: getattr(trt.DataType, TRT_DTYPES[t.dtype]) for t in (*spec.inputs, *spec.outputs)}
        bad = [f"{t.name}: {t.dtype} (spec {want[t.name]})" for t in tensors if t.dtype != want[t.name]]
        if bad:
            raise ValueError(f"{spec.name}: the ONNX network's I/O dtypes differ from the spec ({'; '.join(bad)}); "
                             "re-export it")


def configure(trt, builder, network, settings: BuildSettings, timing_cache: bytes | None):
    """A builder config for `settings` (and the timing cache to update)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if not settings.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in builder_flags(trt, settings):
        config.set_flag(flag)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in settings.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    return config, cache


def uses_plugins(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.domain == "wanrt" for n in model.graph.node)


def build_plan(onnx_path: Path, plan_path: Path, spec: GraphSpec, settings: BuildSettings,
               timing_cache_path: Path | None = None, log=print) -> dict:
    """Parse, build and write a serialized plan (temporary name, then rename). Returns build facts."""
    trt = require()
    import torch

    register_our_plugins(onnx_path)
    builder = trt.Builder(logger(trt))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger(trt))
    if not parser.parse_from_file(str(onnx_path)):  # reads <file>.data external weights itself
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    check_network(network, spec, trt)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else None
    config, cache = configure(trt, builder, network, settings, cache_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer inspection below names tactics
    t0 = time.perf_counter()
    log(f"{spec.name}: building the TensorRT plan (optimisation level {settings.optimization_level})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see its log above)")
    seconds = time.perf_counter() - t0
    _write_atomic(plan_path, memoryview(plan))
    if timing_cache_path is not None:
        _write_atomic(timing_cache_path, memoryview(cache.serialize()))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    from .compare import inspect_plan

    layers = inspect_plan(trt, plan)  # fused attention and FP8 kernels present? recorded in the manifest
    log(f"{spec.name}: {layers['layers']} layers, {layers['fused_attention']} fused attention, "
        f"{layers['fp8']} FP8")
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "build_seconds": round(seconds, 1), "plan_bytes": plan_path.stat().st_size, "layers": layers}


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# I/O spec dtype -> the TensorRT DataType member name (looked up on the imported module)
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "float8_e4m3fn": "FP8", "int64": "INT64",
              "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
ALIGNMENT = 256  # bytes: TensorRT's I/O address alignment


def aligned_empty(shape, dtype, device, alignment: int = ALIGNMENT):
    """An uninitialised tensor whose data pointer is a multiple of `alignment` bytes (owned, never freed early)."""
    import torch

    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % alignment
    out = raw[offset:offset + nbytes].view(dtype).view(tuple(shape))
    assert out.data_ptr() % alignment == 0
    return out


def check_engine_io(trt, engine, spec: GraphSpec) -> None:
    """The deserialized engine must have exactly the spec's inputs and outputs: names, order of kind,
    static shapes and dtypes. Anything else is one line that says to rebuild."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        io[name] = (mode, tuple(engine.get_tensor_shape(name)), engine.get_tensor_dtype(name))
    want = {t.name: ("input", tuple(t.shape), getattr(trt.DataType, TRT_DTYPES[t.dtype])) for t in spec.inputs}
    want |= {t.name: ("output", tuple(t.shape), getattr(trt.DataType, TRT_DTYPES[t.dtype])) for t in spec.outputs}
    if io != want:
        diff = sorted(n for n in set(io) | set(want) if io.get(n) != want.get(n))
        detail = "; ".join(f"{n}: engine {io.get(n)}, spec {want.get(n)}" for n in diff)
        raise ValueError(f"{spec.name}: the TensorRT engine's I/O does not match its spec ({detail}); rebuild it")


def read_plan(path: Path):
    """The plan as a read-only memory map: TensorRT deserializes from it without a second host copy."""
    import mmap

    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class TRTGraph(ContractGraph):
    """A deserialized plan under the graph contract.

    Checked at load: the engine's I/O tensors (count, names, static shapes, dtypes) against the spec.
    Inputs are copied (cast by the contract) into owned, 256-byte-aligned buffers and outputs written to
    preallocated buffers; every address is bound once, at load, and each `set_tensor_address` result is
    checked. So no caller tensor is ever bound (an input can never alias an output, e.g. a VAE cache fed
    back), and `graph(...)` hands out copies of the outputs (`reuses_outputs`); `graph.borrow(...)` gives
    the buffers themselves, valid until the next call. execute_async_v3 runs on the current torch stream,
    with no host sync, so a call can be captured in a CUDA graph.
    """

    capturable = True
    reuses_outputs = True

    def __init__(self, plan_path: Path, spec: GraphSpec, device, onnx_path: Path | None = None,
                 stripped: bool = False, trt=None):
        super().__init__(spec, device)
        trt = trt or require()
        if onnx_path is not None:
            register_our_plugins(Path(onnx_path))
        runtime = trt.Runtime(logger(trt))
        plan = read_plan(plan_path)
        try:
            self.engine = runtime.deserialize_cuda_engine(plan)
        finally:
            plan.close()
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan_path} (built by another TensorRT version or GPU?)")
        if stripped:
            refitter = trt.Refitter(self.engine, logger(trt))
            if not trt.OnnxParserRefitter(refitter, logger(trt)).refit_from_file(str(onnx_path)) \
                    or not refitter.refit_cuda_engine():
                raise RuntimeError(f"refitting the weight-stripped plan {plan_path} from {onnx_path} failed")
        check_engine_io(trt, self.engine, spec)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {plan_path} (out of memory?)")
        self.inputs = [aligned_empty(t.shape, torch_dtype(t.dtype), self.device) for t in spec.inputs]
        self.outputs = [aligned_empty(t.shape, torch_dtype(t.dtype), self.device) for t in spec.outputs]
        for t, buf in zip((*spec.inputs, *spec.outputs), (*self.inputs, *self.outputs)):
            if not self.context.set_tensor_address(t.name, buf.data_ptr()):
                raise RuntimeError(f"{spec.name}: TensorRT refused the address of {t.name}")

    def _stream(self) -> int:
        import torch

        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _run(self, args):
        for buf, t in zip(self.inputs, args):
            buf.copy_(t, non_blocking=True)
        if not self.context.execute_async_v3(self._stream()):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")
        return list(self.outputs)
