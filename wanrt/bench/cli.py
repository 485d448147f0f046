"""The `wanrt bench` command: parse, call wanrt.bench.run, print. Registered by wanrt/cli.py as
`app.command("bench", help=HELP)(bench)`; this module never imports wanrt.cli (that imports us)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

HELP = ("Time every backend against eager PyTorch on the same inputs (interleaved, device-synchronised): "
        "min/median/max, speed-up vs eager, analytic FLOPs, TFLOP/s and % of the GPU's peak, peak memory, "
        "PSNR and max error vs eager. --ckpt_dir takes a checkpoint folder, 'tiny' or random:<config> "
        "(tiny, small, flf2v-14b).")


class BenchUsageError(ValueError):
    """A bench option that cannot be parsed."""


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' -> (W, H), both positive multiples of 16 (what an engine target needs)."""
    from wanrt.export.specs import parse_size as parse

    try:
        return parse(size)
    except ValueError as e:
        raise BenchUsageError(str(e)) from None


def command_line(ckpt_dir, size, frame_num, backends, what, repeat, warmup, precision, interleave,
                 sample_steps, cache: str = "none", cache_threshold: float | None = None, fp8_keep: int = 0,
                 profile: bool = False) -> str:
    """The canonical command that reproduces a run (recorded in the JSON and printed)."""
    args = ["wanrt", "bench", "--ckpt_dir", ckpt_dir, "--size", f"{size[0]}*{size[1]}", "--frame_num",
            str(frame_num), "--backends", backends, "--what", what, "--repeat", str(repeat), "--warmup",
            str(warmup), "--precision", precision]
    if "e2e" in what:
        args += ["--sample_steps", str(sample_steps)]
    if fp8_keep:
        args += ["--fp8_keep", str(fp8_keep)]
    if profile:
        args.append("--profile")
    if not interleave:
        args.append("--no-interleave")
    if cache != "none":
        args += ["--cache", cache] + ([] if cache_threshold is None else ["--cache_threshold", str(cache_threshold)])
    return shlex.join(args)


def bench(
    ckpt_dir: Annotated[str, typer.Option("--ckpt_dir", "--ckpt-dir", help="Checkpoint folder (official or "
                                          "diffusers), 'tiny', or random:tiny|small|flf2v-14b.")] = "tiny",
    size: Annotated[str | None, typer.Option("--size", help="W*H (default: 64*48 for tiny, 256*256 for small, "
                                             "1280*720 otherwise).")] = None,
    frame_num: Annotated[int | None, typer.Option("--frame_num", "--frame-num", help="4n+1 frames (default: 9 "
                                                  "for tiny/small, 81 otherwise).")] = None,
    backends: Annotated[str, typer.Option("--backends", help="Comma list of eager, onnxruntime, aoti, tensorrt, and "
                                                     "eager variants eager+<option>[+...] with options fp8, fused, "
                                                     "sage, flash, triton (e.g. eager+fp8+sage).")
                        ] = "eager,onnxruntime,aoti,tensorrt",
    what: Annotated[str, typer.Option("--what", help="Comma list of dit_step, vae, vae_encode, vae_decode, t5, "
                                      "clip, e2e.")] = "dit_step",
    repeat: Annotated[int, typer.Option("--repeat", help="Timed calls per backend.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls per backend first.")] = 1,
    precision: Annotated[str, typer.Option("--precision", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, "
                                           "fp8 (engines fp8; eager stays the bf16 reference and "
                                           "eager+fp8 is added).")] = "auto",
    fp8_keep: Annotated[int, typer.Option("--fp8_keep", "--fp8-keep", help="FP8 eager variants keep the first and "
                                          "last N DiT blocks in bf16.")] = 0,
    profile: Annotated[bool, typer.Option("--profile", help="Add a per-op-class breakdown (attention, GEMM, "
                                          "elementwise, other: time, TFLOP/s or GB/s) of one call per row "
                                          "(torch.profiler).")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if any).")
                      ] = None,
    engine_dir: Annotated[str | None, typer.Option("--engine_dir", "--engine-dir", help="Build/reuse engines "
                                                   "here (default: a temp dir, deleted afterwards).")] = None,
    sample_steps: Annotated[int, typer.Option("--sample_steps", "--sample-steps", help="Denoising steps of an "
                                              "e2e run.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the inputs and of random weights.")] = 0,
    interleave: Annotated[bool, typer.Option("--interleave/--no-interleave", help="All backends resident and "
                                             "called in rotating order (default), or one backend at a time "
                                             "(models too large to hold twice).")] = True,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    plot_out: Annotated[str | None, typer.Option("--plot", help="Write a PNG bar chart here (matplotlib).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    cache: Annotated[str, typer.Option("--cache", help="Step caching of the e2e runs: none or teacache.")] = "none",
    cache_threshold: Annotated[float | None, typer.Option("--cache_threshold", "--cache-threshold",
                                                          help="TeaCache threshold (default: the model's).")] = None,
) -> None:
    from wanrt.engine.manifest import EngineError
    from wanrt.models.checkpoint import CheckpointError

    try:
        from wanrt.bench.runner import default_target, run

        w0, h0, f0 = default_target(ckpt_dir)
        wh = parse_size(size) if size else (w0, h0)
        frames = frame_num or f0
        cmd = command_line(ckpt_dir, wh, frames, backends, what, repeat, warmup, precision, interleave,
                           sample_steps, cache, cache_threshold, fp8_keep, profile)
        typer.echo(cmd)
        report = run(ckpt_dir, size=wh, frame_num=frames, backends=backends, what=what, repeat=repeat,
                     warmup=warmup, precision=precision, device=device, engine_dir=engine_dir,
                     sample_steps=sample_steps, seed=seed, interleave=interleave, json_path=json_out,
                     plot_path=plot_out, log=lambda s: typer.echo(s, err=True), command=cmd, cache=cache,
                     cache_threshold=cache_threshold, fp8_keep=fp8_keep, profile=profile)
    except (BenchUsageError, CheckpointError, EngineError, ValueError, FileNotFoundError, RuntimeError,
            ImportError) as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    from wanrt.bench.report import print_report

    print_report(report)
    if json_out:
        typer.echo(f"wrote {json_out}")
    if plot_out and any("no plot" in n for n in report.notes):
        typer.echo("no plot written (matplotlib missing)")
    elif plot_out:
        typer.echo(f"wrote {plot_out}")
    if report.failed:  # unavailable backends are expected on many machines; a failure is a bug to look at
        raise typer.Exit(code=1)
