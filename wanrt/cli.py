"""`wanrt` command line: parse, call the Python API, print. No model work happens here.

Errors are one line on stderr (`error: ...`) with a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="wanrt: ahead-of-time compiled inference for Wan2.1 FLF2V-14B.")

OFFICIAL_SIZES = ("1280*720", "720*1280", "832*480", "480*832")
TASKS = ("flf2v-14B",)


class CLIError(Exception):
    """A usage problem found by the CLI itself."""


def _fail(e: BaseException, debug: bool) -> None:
    from wanrt.parallel.launch import env_rank

    if debug:
        raise e
    rank = env_rank().rank  # in a multi-process run rank 0 reports; the others name themselves
    typer.echo(f"error: {e}" if rank == 0 else f"error: rank {rank}: {e}", err=True)
    raise typer.Exit(code=1)


def _known_errors() -> tuple[type[BaseException], ...]:
    from wanrt.engine.manifest import EngineError
    from wanrt.models.checkpoint import CheckpointError
    from wanrt.video import MediaError

    return (CLIError, CheckpointError, EngineError, MediaError, ValueError, FileNotFoundError, PermissionError,
            RuntimeError, ImportError)


def _given(ctx: typer.Context, param: str) -> bool:
    """Whether an option was given (not defaulted): engine dirs fix size and frames otherwise."""
    source = ctx.get_parameter_source(param)
    return getattr(source, "name", None) not in (None, "DEFAULT", "DEFAULT_MAP")  # typer may vendor click


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' -> (W, H); both positive multiples of 16."""
    from wanrt.export.specs import parse_size as parse

    return parse(size)


def parse_overrides(text: str) -> dict[str, str]:
    """'vae=eager,dit=onnxruntime' -> {'vae': 'eager', 'dit': 'onnxruntime'}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise CLIError(f"--override takes component=backend pairs (e.g. vae=eager), got {part!r}")
        out[name.strip()] = value.strip()
    return out


def parse_timesteps(text: str | None) -> list[float] | None:
    """'1000,750,500,250' -> [1000.0, 750.0, 500.0, 250.0] (range and order are checked by the pipeline)."""
    if text is None:
        return None
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CLIError(f"--timesteps takes comma-separated numbers such as 1000,750,500,250, got {text!r}") from None


def parse_loras(items: list[str] | None):
    """['a.safetensors', 'b.safetensors:0.8'] -> [LoRASpec, ...]; None when no --lora was given."""
    if not items:
        return None
    from wanrt.models.lora import parse

    return [parse(item) for item in items]


LoraOpt = Annotated[list[str] | None, typer.Option("--lora", help="LoRA file for the DiT, FILE or FILE:SCALE "
                                                   "(repeatable; official/ComfyUI or diffusers keys).")]


def parse_dtype(name: str):
    import torch

    table = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise CLIError(f"--dtype must be one of auto, fp32, bf16, fp16; got {name!r}")
    return table[name]


def _check_fits_rope(first, area: int) -> None:
    """The output size follows the first frame's aspect ratio; refuse one the RoPE table cannot cover."""
    from wanrt.models.config import DiTConfig
    from wanrt.pipeline import target_size
    from wanrt.video import load_image

    img = load_image(first)
    lat_h, lat_w = target_size(img.shape[1], img.shape[2], area)
    limit = DiTConfig().rope_max_len
    if max(lat_h, lat_w) // 2 > limit:
        raise CLIError(f"--size area {area} gives a {lat_w * 8}x{lat_h * 8} video for this first frame, larger than "
                       f"the model's RoPE table allows ({limit * 16} px per side)")


_UNUSED_OFFICIAL_FLAGS = {
    "offload_model": "wanrt keeps models resident; see the runtime's memory policy",
    "t5_cpu": "use the runtime's memory policy instead",
    "t5_fsdp": "use torchrun with --tp_size",
    "dit_fsdp": "use torchrun with --ulysses_size/--tp_size",
    "use_prompt_extend": "prompt extension is not part of wanrt",
    "image": "the official I2V input; FLF2V takes --first_frame and --last_frame",
    "src_video": "a VACE input; FLF2V does not use it",
    "src_mask": "a VACE input; FLF2V does not use it",
    "src_ref_images": "a VACE input; FLF2V does not use it",
}


def _check_device(device: str | None) -> None:
    """--device cuda on a torch without CUDA (or without that GPU): one line, before any work."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}, but no GPU is visible")
        raise CLIError(f"--device {device}: this torch {torch.__version__} is {build}; use --device cpu, or install "
                       "a CUDA build of torch on a GPU machine")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 .. "
                       f"cuda:{torch.cuda.device_count() - 1})")


class GroupedCommand(TyperCommand):
    """A command whose --help lists its options in titled groups (`GROUPS`: title -> parameter names);
    parameters in no group come last under 'Other options'."""

    GROUPS: dict[str, tuple[str, ...]] = {}

    def format_options(self, ctx, formatter) -> None:
        rows = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx)}
        rows = {name: rec for name, rec in rows.items() if rec}
        placed: set[str] = set()
        for title, names in (*self.GROUPS.items(), ("Other options", tuple(n for n in rows if n not in placed))):
            recs = [rows[n] for n in names if n in rows and n not in placed]
            placed.update(names)
            if recs:
                with formatter.section(title):
                    formatter.write_dl(recs)


class GenerateCommand(GroupedCommand):
    GROUPS = {
        "Input": ("task", "ckpt_dir", "first_frame", "last_frame", "prompt", "negative_prompt", "last_frame_fit"),
        "Video and sampling": ("size", "frame_num", "sample_steps", "sample_shift", "sample_guide_scale",
                               "sample_solver", "timesteps", "base_seed"),
        "Output": ("save_file", "save_frames"),
        "Model, precision and LoRA": ("device", "dtype", "precision", "fp8_keep", "lora"),
        "Speed: engines, kernels, caching": ("backend", "engine_dir", "override", "attention", "kernels", "cache",
                                             "cache_threshold", "cuda_graphs", "memory"),
        "Multi-GPU": ("nproc", "ulysses_size", "cfg_parallel", "tp_size"),
    }


@app.command(cls=GenerateCommand,
             help="Generate a video from a first frame, a last frame and a prompt (official generate.py flags). "
                  f"Official sizes: {', '.join(OFFICIAL_SIZES)}; any W*H with both sides multiples of 16 works "
                  "(it sets the pixel area; the aspect ratio follows the first frame).")
def generate(
    ctx: typer.Context,
    task: Annotated[str, typer.Option("--task", help="Only flf2v-14B.")] = "flf2v-14B",
    size: Annotated[str, typer.Option("--size", help="Output area as W*H, e.g. 1280*720 (the built-in "
                                                           "tiny models: 64*64).")] = "1280*720",
    ckpt_dir: Annotated[str | None, typer.Option("--ckpt_dir", "--ckpt-dir",
                                                 help="Checkpoint folder (official or diffusers) or 'tiny'.")] = None,
    first_frame: Annotated[str | None, typer.Option("--first_frame", "--first-frame", help="First frame image (PNG/"
                                                    "JPEG); its aspect ratio sets the video's.")] = None,
    last_frame: Annotated[str | None, typer.Option("--last_frame", "--last-frame", help="Last frame image.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="What happens between the two frames.")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative_prompt", "--negative-prompt",
                                                        help="Default: the official FLF2V negative prompt.")] = None,
    frame_num: Annotated[int, typer.Option("--frame_num", "--frame-num", help="4n+1 frames (the built-in "
                                                           "tiny models: 17).")] = 81,
    sample_steps: Annotated[int, typer.Option("--sample_steps", "--sample-steps", help="Denoising steps.")] = 50,
    sample_shift: Annotated[float | None, typer.Option("--sample_shift", "--sample-shift", help="Flow-matching "
                                                       "sigma shift (> 0). Default: the checkpoint's (official "
                                                       "16, for 720p).", show_default=False)] = None,
    sample_guide_scale: Annotated[float | None, typer.Option("--sample_guide_scale", "--sample-guide-scale",
                                                             help="CFG scale; 1.0 runs the conditional branch only. "
                                                             "Default: the checkpoint's (official 5.0; the "
                                                             "trained tiny model 2.0).", show_default=False)] = None,
    sample_solver: Annotated[str, typer.Option("--sample_solver", "--sample-solver",
                                               help="unipc, dpm++ or euler.")] = "unipc",
    timesteps: Annotated[str | None, typer.Option("--timesteps", help="Explicit descending timesteps in (0, 1000], "
                                                  "e.g. 1000,750,500,250 (distilled models); replaces "
                                                  "--sample_steps, shifted by --sample_shift.")] = None,
    lora: LoraOpt = None,
    base_seed: Annotated[int, typer.Option("--base_seed", "--base-seed", help="-1: random.")] = -1,
    save_file: Annotated[str | None, typer.Option("--save_file", "--save-file", help="Video file (.mp4, .mov or "
                                                 ".mkv). Default: a new file named for the task, the real size, the "
                                                 "frame count, the seed and the time; never replaces another.")] = None,
    save_frames: Annotated[str | None, typer.Option("--save_frames", "--save-frames", help="Also write every frame "
                                                    "as a lossless PNG into this new folder.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if any).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 map on CUDA, fp32 on CPU), fp32, bf16.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (what --dtype says) or fp8: the eager DiT's "
                                           "block GEMMs in FP8 (CUDA sm89+; emulated on the CPU), the rest "
                                           "bf16.")] = "auto",
    fp8_keep: Annotated[int, typer.Option("--fp8_keep", "--fp8-keep", help="With --precision fp8: keep the first "
                                          "and last N DiT blocks in bf16.")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="eager, onnxruntime, aoti or tensorrt.")] = "eager",
    engine_dir: Annotated[str | None, typer.Option("--engine_dir", "--engine-dir",
                                                   help="Engine dir for a compiled backend.")] = None,
    override: Annotated[str | None, typer.Option("--override", help="Per-component backends, e.g. "
                                                 "'vae=eager,text_encoder=eager' (components: text_encoder, "
                                                 "image_encoder, dit, vae).")] = None,
    memory: Annotated[str, typer.Option("--memory", help="resident, sequential (T5/CLIP/VAE off the GPU while "
                                        "the DiT runs) or t5_cpu.")] = "resident",
    cuda_graphs: Annotated[bool, typer.Option("--cuda_graphs/--no_cuda_graphs", "--cuda-graphs/--no-cuda-graphs",
                                              help="Capture the denoising step as a CUDA graph.")] = True,
    attention: Annotated[str, typer.Option("--attention", help="sdpa, flash or sage (Triton kernels).")] = "sdpa",
    kernels: Annotated[str, typer.Option("--kernels", help="torch or triton (fused norm/RoPE kernels).")] = "torch",
    last_frame_fit: Annotated[str, typer.Option("--last_frame_fit", help="A last frame of another size than the "
                                                "first: 'resize' it (center crop to the aspect ratio, bicubic; "
                                                "default) or 'official' (the official code's cropping, for "
                                                "parity).")] = "resize",
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    cache: Annotated[str, typer.Option("--cache", help="Step caching: none, or teacache (skip DiT calls whose "
                                       "output is predictable).")] = "none",
    cache_threshold: Annotated[float | None, typer.Option("--cache_threshold", "--cache-threshold",
                                                          help="TeaCache threshold (default: the model's; "
                                                          "higher skips more).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Run as N local processes (what torchrun "
                                       "--nproc_per_node=N -m wanrt generate does).")] = 1,
    ulysses_size: Annotated[int, typer.Option("--ulysses_size", "--ulysses-size", help="Sequence-parallel degree "
                                              "of the DiT (divides its heads).")] = 1,
    cfg_parallel: Annotated[bool, typer.Option("--cfg_parallel", "--cfg-parallel", help="Cond and uncond on "
                                               "different ranks: 2 x ulysses_size processes.")] = False,
    tp_size: Annotated[int, typer.Option("--tp_size", "--tp-size", help="Tensor-parallel degree of the DiT and "
                                         "T5 (not combined with the others).")] = 1,
    # official flags that wanrt accepts and ignores (with a note)
    offload_model: Annotated[str | None, typer.Option("--offload_model", "--offload-model", hidden=True)] = None,
    t5_cpu: Annotated[bool, typer.Option("--t5_cpu", "--t5-cpu", hidden=True)] = False,
    t5_fsdp: Annotated[bool, typer.Option("--t5_fsdp", "--t5-fsdp", hidden=True)] = False,
    dit_fsdp: Annotated[bool, typer.Option("--dit_fsdp", "--dit-fsdp", hidden=True)] = False,
    ring_size: Annotated[int, typer.Option("--ring_size", "--ring-size", hidden=True)] = 1,
    use_prompt_extend: Annotated[bool, typer.Option("--use_prompt_extend", "--use-prompt-extend", hidden=True)] = False,
    prompt_extend_method: Annotated[str | None, typer.Option("--prompt_extend_method", hidden=True)] = None,
    prompt_extend_model: Annotated[str | None, typer.Option("--prompt_extend_model", hidden=True)] = None,
    prompt_extend_target_lang: Annotated[str | None, typer.Option("--prompt_extend_target_lang", hidden=True)] = None,
    image: Annotated[str | None, typer.Option("--image", hidden=True)] = None,
    src_video: Annotated[str | None, typer.Option("--src_video", hidden=True)] = None,
    src_mask: Annotated[str | None, typer.Option("--src_mask", hidden=True)] = None,
    src_ref_images: Annotated[str | None, typer.Option("--src_ref_images", hidden=True)] = None,
) -> None:
    try:
        import random

        from wanrt.models import tiny as tiny_models
        from wanrt.parallel import ParallelPlan, load_pipeline, model_config, session, spawn
        from wanrt.parallel.launch import command_argv, env_rank
        from wanrt.pipeline import validate
        from wanrt.video import check_frames_folder, check_writable, load_image

        if task not in TASKS:
            raise CLIError(f"unknown task {task!r}: wanrt runs {', '.join(TASKS)}")
        given = {"offload_model": offload_model is not None, "t5_cpu": t5_cpu, "t5_fsdp": t5_fsdp,
                 "dit_fsdp": dit_fsdp, "use_prompt_extend": use_prompt_extend, "image": image is not None,
                 "src_video": src_video is not None, "src_mask": src_mask is not None,
                 "src_ref_images": src_ref_images is not None}
        for flag, why in _UNUSED_OFFICIAL_FLAGS.items():
            if given[flag]:
                typer.echo(f"note: --{flag} is accepted for compatibility and ignored ({why})", err=True)
        if ring_size != 1:
            raise CLIError(f"--ring_size {ring_size}: ring attention is not implemented in wanrt; use --ulysses_size "
                           "(with --cfg_parallel: ulysses_size x 2 = processes), see docs/parallel.md")
        engine = backend != "eager"
        if precision not in ("auto", "fp8"):
            raise CLIError(f"--precision must be auto or fp8, got {precision!r}")
        if precision != "fp8" and fp8_keep:
            raise CLIError("--fp8_keep needs --precision fp8")
        if precision == "fp8" and (engine or ulysses_size > 1 or cfg_parallel or tp_size > 1 or nproc > 1):
            raise CLIError("--precision fp8 runs the eager DiT in one process; engines carry their build precision "
                           "(wanrt build --precision fp8) and the multi-GPU splits run bf16")
        if engine and engine_dir is None:
            raise CLIError(f"--backend {backend} needs --engine_dir (make one with `wanrt export` or `wanrt build`)")
        if not engine and ckpt_dir is not None and tiny_models.is_builtin(ckpt_dir):  # the tiny model's own target
            size = size if _given(ctx, "size") else "{}*{}".format(*tiny_models.BUILTIN_SIZE)
            frame_num = frame_num if _given(ctx, "frame_num") else tiny_models.BUILTIN_FRAMES
        size_given = _given(ctx, "size") and engine
        w, h = parse_size(size)
        frames_given = frame_num if (not engine or _given(ctx, "frame_num")) else None
        if base_seed < -1 or base_seed >= 2**63:
            raise CLIError(f"--base_seed must be -1 (random) or 0 .. 2**63-1, got {base_seed}")
        steps = parse_timesteps(timesteps)
        if steps is not None and _given(ctx, "sample_steps") and sample_steps != len(steps):
            raise CLIError(f"--sample_steps {sample_steps} contradicts the {len(steps)} --timesteps; give one of them")
        validate(None, 81 if frames_given is None else frames_given, sample_steps, sample_guide_scale, w * h,
                 sample_solver, sample_shift, timesteps=steps)
        _check_device(device)
        from wanrt.runtime.cache import check as check_cache

        check_cache(cache, cache_threshold)
        if cfg_parallel and sample_guide_scale == 1.0:
            raise CLIError("--cfg_parallel splits the cond and uncond branches, but guidance 1.0 runs only the cond "
                           "branch; drop --cfg_parallel (or use --ulysses_size)")
        loras = parse_loras(lora)
        if ckpt_dir is None and not engine:
            raise CLIError("--ckpt_dir is required (a checkpoint folder, or 'tiny' for the built-in model)")
        if (first_frame is None) != (last_frame is None):
            raise CLIError("give both --first_frame and --last_frame (or neither, with --ckpt_dir tiny)")
        if first_frame is None:
            if not (ckpt_dir or "").startswith("tiny") and not engine:
                raise CLIError("--first_frame and --last_frame are required")
            from wanrt.samples import SAMPLE_PROMPT, sample_frames

            first, last = sample_frames()
            prompt = prompt or SAMPLE_PROMPT
        else:
            first, last = load_image(first_frame), load_image(last_frame)  # fail before loading models
        if prompt is None:
            raise CLIError("--prompt is required")
        if not engine:
            _check_fits_rope(first, w * h)
        plan = ParallelPlan(ulysses=ulysses_size, cfg=cfg_parallel, tp=tp_size)
        world = env_rank().world_size
        if engine and (plan.size > 1 or nproc > 1 or world > 1):
            raise CLIError(f"--backend {backend} runs in one process; multi-GPU splits use the eager backend")
        if nproc > 1 and world == 1:  # re-run this command as nproc local ranks (what torchrun does)
            plan.check(nproc, model_config(ckpt_dir))
            raise typer.Exit(spawn(nproc, [sys.executable, "-m", "wanrt", *command_argv(ctx)]))
        if nproc not in (1, world):
            raise CLIError(f"--nproc {nproc}, but this process was launched as one of {world}")
        plan.check(world, model_config(ckpt_dir) if plan.size > 1 or world > 1 else None)

        def decide():  # rank 0 picks the seed and checks the output path; the others receive them
            seed = base_seed if base_seed >= 0 else random.randint(0, 2**63 - 1)
            # no --save_file: the name (real size, seed, time) is made after the run, in the current folder
            if save_frames:
                check_frames_folder(save_frames)
            return seed, check_writable(save_file if save_file else "default.mp4")

        with session(device) as run:
            seed, out = run.on_main(decide)
            engine_options = dict(backend=backend, engine_dir=engine_dir, size=(w, h) if size_given else None,
                                  frame_num=frames_given) if engine else {}
            if override:
                engine_options["overrides"] = parse_overrides(override)
            if precision == "fp8":
                engine_options.update(precision="fp8", fp8_keep=fp8_keep)
            pipe = load_pipeline(ckpt_dir, plan, run, device=device, dtype=parse_dtype(dtype), attention=attention,
                                 kernels=kernels, memory=memory, cuda_graphs=cuda_graphs, lora=loras,
                                 **engine_options)
            video = pipe(first, last, prompt, negative_prompt=negative_prompt,
                         max_area=w * h if (size_given or not engine) else None, frame_num=frames_given,
                         sample_steps=sample_steps, sample_shift=sample_shift, guide_scale=sample_guide_scale,
                         sample_solver=sample_solver, seed=seed, progress=sys.stderr.isatty() and run.is_main,
                         decode=run.is_main, last_frame_fit=last_frame_fit, cache=cache,
                         cache_threshold=cache_threshold, timesteps=steps)  # only rank 0 decodes and writes
            if run.is_main:
                for note in video.notes:
                    typer.echo(f"note: {note}", err=True)
                out = video.save(out, exclusive=False) if save_file else video.save(video.default_name(task),
                                                                                    exclusive=True)
                if save_frames:
                    typer.echo(f"frames: {video.save_frames(save_frames)}", err=True)
                t = video.timings
                mixed = ", ".join(f"{c}={b}" for c, b in video.backends.items())
                typer.echo(f"backends: {mixed}", err=True)
                typer.echo(f"saved {out} ({video.frames.shape[0]} frames {video.frames.shape[2]}x"
                           f"{video.frames.shape[1]}, seed {seed}) in {t['total']:.2f} s: text "
                           f"{t['text_encoder']:.2f} s, image {t['image_encoder']:.2f} s, vae encode "
                           f"{t['vae_encode']:.2f} s, denoise {t['denoise']:.2f} s "
                           f"({t['denoise'] / (len(steps) if steps else sample_steps):.3f} s/step), vae decode "
                           f"{t['vae_decode']:.2f} s; {video.dit_calls} DiT calls for "
                           f"{len(steps) if steps else sample_steps} steps")
    except (typer.Exit, KeyboardInterrupt):  # click's Exit is a RuntimeError: not an error here; Ctrl-C
        raise  # must not reach _known_errors(), whose imports fail inside a half-imported torch
    except _known_errors() as e:
        _fail(e, debug)


def _target(ckpt_dir: str, out: str, size: str | None, frame_num: int | None, batch: int, components: str):
    """The engine target and the component list of `export` / `build`. Size and frame count default to
    the official 1280*720 x 81, or to the built-in tiny models' own 64*64 x 17 (as `generate` does)."""
    from wanrt.export.specs import Target, check_components
    from wanrt.models import tiny as tiny_models

    if Path(out).exists() and not Path(out).is_dir():
        raise CLIError(f"--out {out} is a file; give a folder for the engine dir (new, or one made by wanrt)")
    builtin = tiny_models.is_builtin(ckpt_dir)
    if size is None:
        size = "{}*{}".format(*tiny_models.BUILTIN_SIZE) if builtin else "1280*720"
    if frame_num is None:
        frame_num = tiny_models.BUILTIN_FRAMES if builtin else 81
    w, h = parse_size(size)
    return Target(w, h, frame_num, batch), check_components(components)


def _fp8_calibration(ckpt_dir, out, target, precision: str, parts: list[str], steps: int,
                     attention: bool = False, lora=None) -> dict | None:
    """fp8 DiT exports need activation scales from a few real denoising steps (stored in the engine dir)."""
    if precision != "fp8" or "dit" not in parts:
        return None
    from wanrt.calibration import calibrate_to

    return calibrate_to(ckpt_dir, out, target, steps=steps, log=typer.echo, attention=attention, lora=lora)


# Options that `export` and `build` share (one target: exact size, frame count, components, DiT batch).
CkptDirOpt = Annotated[str, typer.Option("--ckpt_dir", "--ckpt-dir", help="Checkpoint folder or 'tiny'.")]
ExactSizeOpt = Annotated[str | None, typer.Option("--size", help="Video size W*H (exact; multiples of 16). "
                                                  "Default 1280*720; the built-in tiny models: 64*64.")]
FrameNumOpt = Annotated[int | None, typer.Option("--frame_num", "--frame-num", help="4n+1 frames. Default 81; "
                                                 "the built-in tiny models: 17.")]
ComponentsOpt = Annotated[str, typer.Option("--components", help="Comma-separated subset of the default.")]
BatchOpt = Annotated[int, typer.Option("--batch", help="DiT batch: 2 (CFG in one call) or 1 (guidance 1.0: CFG-free).")]
CalibStepsOpt = Annotated[int, typer.Option("--calib_steps", help="fp8: denoising steps to calibrate.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
_GRAPH_ATTENTION_HELP = ("How the DiT's attention is exported: matmul (Cast-free MatMul-Softmax-MatMul, opset 20, "
                         "TensorRT >= 10.12), onnx (the opset-23 Attention op, TensorRT >= 10.14), or flash|sage "
                         "(our Triton kernels as custom nodes, run as TensorRT plugins).")
Fp8AttentionOpt = Annotated[bool, typer.Option("--fp8_attention", "--fp8-attention",
                                               help="fp8: also FP8 Q/DQ around the DiT's attention (ModelOpt style).")]
GraphAttentionOpt = Annotated[str, typer.Option("--graph_attention", "--graph-attention", help=_GRAPH_ATTENTION_HELP)]
ExportAttentionOpt = Annotated[str, typer.Option("--graph_attention", "--graph-attention", "--attention",
                                                 help=_GRAPH_ATTENTION_HELP)]
DEFAULT_COMPONENTS = "text_encoder,image_encoder,dit,vae"  # export.specs.COMPONENTS (not imported: torch)


@app.command(help="Export the models to static ONNX for one size and frame count (ENGINE_DIR/onnx/...).")
def export(
    ckpt_dir: CkptDirOpt,
    out: Annotated[str, typer.Option("--out", help="Engine dir to write (manifest.json, onnx/).")],
    size: ExactSizeOpt = None,
    frame_num: FrameNumOpt = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp8.")] = "bf16",
    components: ComponentsOpt = DEFAULT_COMPONENTS,
    batch: BatchOpt = 2,
    calib_steps: CalibStepsOpt = 4,
    graph_attention: ExportAttentionOpt = "matmul",
    fp8_attention: Fp8AttentionOpt = False,
    lora: LoraOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Re-export even if files are up to date.")] = False,
    debug: DebugOpt = False,
) -> None:
    try:
        from wanrt.engine.exporter import export as run_export

        target, parts = _target(ckpt_dir, out, size, frame_num, batch, components)
        t0 = time.perf_counter()
        loras = parse_loras(lora)
        calibration = _fp8_calibration(ckpt_dir, out, target, precision, parts, calib_steps, fp8_attention, loras)
        run_export(ckpt_dir, out, target, precision=precision, components=parts, force=force, log=typer.echo,
                   calibration=calibration, graph_attention=graph_attention, fp8_attention=fp8_attention,
                   lora=loras)
        typer.echo(f"exported to {out} in {time.perf_counter() - t0:.1f} s")
    except KeyboardInterrupt:
        raise
    except _known_errors() as e:
        _fail(e, debug)


@app.command(help="Build engines once: TensorRT plans (from the exported ONNX) or AOTInductor packages, for one "
                  "size and frame count; run again with another --size to add a profile to the same engine dir.")
def build(
    ckpt_dir: CkptDirOpt,
    out: Annotated[str, typer.Option("--out", help="Engine dir (manifest.json, onnx/, engines/).")],
    backend: Annotated[str, typer.Option("--backend", help="tensorrt or aoti.")] = "tensorrt",
    size: ExactSizeOpt = None,
    frame_num: FrameNumOpt = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp8 (tensorrt: calibrated Q/DQ; "
                                           "aoti: the eager FP8 DiT, dynamic per-token scales).")] = "bf16",
    components: ComponentsOpt = DEFAULT_COMPONENTS,
    batch: BatchOpt = 2,
    device: Annotated[str | None, typer.Option("--device", help="aoti: cpu or cuda (default: cuda if any).")] = None,
    attention: Annotated[str, typer.Option("--attention", help="aoti: sdpa or flash (Triton); tensorrt: flash "
                                           "or sage export our kernels as plugins.")] = "sdpa",
    workspace_gb: Annotated[float, typer.Option("--workspace_gb", help="tensorrt builder workspace.")] = 8.0,
    opt_level: Annotated[int, typer.Option("--opt_level", help="tensorrt builder optimisation level 0-5.")] = 3,
    strip_weights: Annotated[bool, typer.Option("--strip_weights", help="tensorrt: weight-stripped plans, "
                                                "refitted from the ONNX at load.")] = False,
    tf32: Annotated[bool, typer.Option("--tf32", help="tensorrt: allow TF32 in the fp32 graphs (VAE).")] = False,
    calib_steps: CalibStepsOpt = 4,
    graph_attention: GraphAttentionOpt = "matmul",
    fp8_attention: Fp8AttentionOpt = False,
    lora: LoraOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
    debug: DebugOpt = False,
) -> None:
    try:
        from wanrt.engine import build as run_build

        target, parts = _target(ckpt_dir, out, size, frame_num, batch, components)
        t0 = time.perf_counter()
        options = {}
        if backend == "tensorrt":
            from wanrt.engine.tensorrt import require

            require()  # one clear line before any export work when TensorRT is absent
            options = dict(workspace_gb=workspace_gb, optimization_level=opt_level, strip_weights=strip_weights,
                           tf32=tf32, graph_attention=graph_attention, fp8_attention=fp8_attention)
            if attention in ("flash", "sage") and graph_attention == "matmul":  # our kernels, as plugins
                options["graph_attention"] = attention
            _fp8_calibration(ckpt_dir, out, target, precision, parts, calib_steps,  # stored in the engine dir
                             fp8_attention, parse_loras(lora))
        run_build(ckpt_dir, out, target, backend=backend, precision=precision, components=parts, device=device,
                  force=force, log=typer.echo, attention=attention, lora=parse_loras(lora), **options)
        typer.echo(f"built {backend} engines in {out} in {time.perf_counter() - t0:.1f} s")
    except KeyboardInterrupt:
        raise
    except _known_errors() as e:
        _fail(e, debug)


def _register_bench() -> None:
    from wanrt.bench.cli import HELP as BENCH_HELP
    from wanrt.bench.cli import bench

    app.command("bench", help=BENCH_HELP)(bench)


_register_bench()


@app.command(help="Serve one loaded pipeline over HTTP: GET /health, POST /generate (JSON in, video/mp4 out). "
                  "Needs the `serve` extra (pip install 'wanrt[serve]').")
def serve(
    ckpt_dir: Annotated[str | None, typer.Option("--ckpt_dir", "--ckpt-dir", help="Checkpoint folder or 'tiny'.")]
    = None,
    backend: Annotated[str, typer.Option("--backend", help="eager, onnxruntime, aoti or tensorrt.")] = "eager",
    engine_dir: Annotated[str | None, typer.Option("--engine_dir", "--engine-dir",
                                                   help="Engine dir for a compiled backend.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if any).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    max_body_mb: Annotated[float, typer.Option("--max_body_mb", help="Larger request bodies get 413 unread.")] = 64.0,
    max_queue: Annotated[int, typer.Option("--max_queue", help="Requests queued or running at once; more get "
                                           "503.")] = 4,
    debug: DebugOpt = False,
) -> None:
    try:
        try:
            from wanrt.serve import serve as run_server
        except ImportError as e:
            raise CLIError(f"wanrt serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install 'wanrt[serve]'") from None
        from wanrt.pipeline import FLF2VPipeline

        _check_device(device)
        if backend == "eager" and ckpt_dir is None:
            raise CLIError("--ckpt_dir is required (a checkpoint folder, or 'tiny' for the built-in model)")
        pipe = FLF2VPipeline.from_pretrained(ckpt_dir, device=device, backend=backend, engine_dir=engine_dir)
        typer.echo(f"serving on http://{host}:{port} (Ctrl-C to stop)", err=True)
        run_server(pipe, host, port, max_body_mb=max_body_mb, max_queue=max_queue)
    except KeyboardInterrupt:
        raise
    except _known_errors() as e:
        _fail(e, debug)


@app.command(help="Show which backends are usable on this machine, and why the others are not; "
                  "--verify ENGINE_DIR re-hashes an engine dir's files and checks its manifest; --ckpt_dir DIR "
                  "reads every weight of a checkpoint and names any that holds NaN or inf.")
def doctor(
    verify: Annotated[str | None, typer.Option("--verify", help="Engine dir to check in full.")] = None,
    ckpt_dir: Annotated[str | None, typer.Option("--ckpt_dir", "--ckpt-dir", help="Checkpoint to scan for "
                                                 "non-finite weights.")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="Engine dir whose TensorRT engines to "
                                                "compare with ONNX Runtime (polygraphy).")] = None,
) -> None:
    from wanrt.doctor import report

    if ckpt_dir is not None:
        from wanrt.models.loading import nonfinite_weights

        checked, bad = nonfinite_weights(ckpt_dir)
        for key in bad:
            typer.echo(f"non-finite: {key}")
        typer.echo(f"{'FAIL' if bad else 'ok'}: {len(bad)} of {checked} tensors of {ckpt_dir} hold NaN or inf")
        raise typer.Exit(1 if bad else 0)

    if compare is not None:
        from wanrt.doctor import compare as compare_dir

        try:
            lines = compare_dir(compare)
        except _known_errors() as e:
            _fail(e, False)
        for line in lines:
            typer.echo(line)
        raise typer.Exit(0 if lines[0].startswith("ok") else 1)
    if verify is not None:
        from wanrt.doctor import verify as verify_dir

        lines = verify_dir(verify)
        for line in lines:
            typer.echo(line)
        raise typer.Exit(0 if lines[0].startswith("ok") else 1)
    for line in report():
        typer.echo(line)


def _version(value: bool) -> None:
    if value:
        import wanrt

        typer.echo(f"wanrt {wanrt.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """wanrt: ahead-of-time compiled inference for Wan2.1 FLF2V-14B."""


def main() -> None:
    """The `wanrt` entry point. Ctrl-C at any moment exits 130 with one line and no traceback (typer turns
    an interrupt inside a command into exit 130; this catches the rest, e.g. during start-up). Files are
    written atomically, so nothing half-written stays behind."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
