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


class TensorRTUnavailable(ImportError):
    pass


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


def check_network(network, spec: GraphSpec) -> None:
    """The parsed network must have exactly the spec's static inputs and outputs."""
    got_in = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    got_out = {network.get_output(i).name: tuple(network.get_output(i).shape) for i in range(network.num_outputs)}
    want_in = {t.name: t.shape for t in spec.inputs}
    want_out = {t.name: t.shape for t in spec.outputs}
    if got_in != want_in or got_out != want_out:
        raise ValueError(f"{spec.name}: the ONNX network's I/O {got_in} -> {got_out} does not match the spec "
                         f"{want_in} -> {want_out}; re-export it")


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

    if uses_plugins(onnx_path):
        from wanrt.kernels.trt_plugins import register_plugins

        register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads <file>.data external weights itself
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    check_network(network, spec)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else None
    config, cache = configure(trt, builder, network, settings, cache_bytes)
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
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "build_seconds": round(seconds, 1), "plan_bytes": plan_path.stat().st_size}


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TRTGraph:
    """A deserialized plan with preallocated outputs: `graph(*tensors) -> list[torch.Tensor]`.

    Tensor addresses are bound once per input buffer identity; execute_async_v3 runs on the current
    torch stream, so the whole call can be captured in a CUDA graph (no host sync inside).
    """

    capturable = True

    def __init__(self, plan_path: Path, spec: GraphSpec, device, onnx_path: Path | None = None,
                 stripped: bool = False):
        trt = require()
        import torch

        self.spec, self.device = spec, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        if onnx_path is not None and uses_plugins(onnx_path):
            from wanrt.kernels.trt_plugins import register_plugins

            register_plugins()
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan_path} (built by another TensorRT version or GPU?)")
        if stripped:
            refitter = trt.Refitter(self.engine, self.logger)
            if not trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(onnx_path)) \
                    or not refitter.refit_cuda_engine():
                raise RuntimeError(f"refitting the weight-stripped plan {plan_path} from {onnx_path} failed")
        self.context = self.engine.create_execution_context()
        dt = {"float32": torch.float32, "int64": torch.int64}
        self.outputs = [torch.empty(t.shape, dtype=dt[t.dtype], device=device) for t in spec.outputs]
        for t, buf in zip(spec.outputs, self.outputs):
            self.context.set_tensor_address(t.name, buf.data_ptr())
        self._bound: dict[str, int] = {}

    def __call__(self, *tensors):
        import torch

        for s, t in zip(self.spec.inputs, tensors):
            if tuple(t.shape) != s.shape:
                raise ValueError(f"{self.spec.name}: input {s.name} has shape {tuple(t.shape)}, "
                                 f"the engine was built for {s.shape}")
            t = t.contiguous()
            if self._bound.get(s.name) != t.data_ptr():
                self.context.set_tensor_address(s.name, t.data_ptr())
                self._bound[s.name] = t.data_ptr()
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")
        return list(self.outputs)
