"""FP8 calibration: "max" statistics of the DiT's quantised linears over real denoising steps.

It runs the pipeline, so it lives above it (layers: ... < pipeline < calibration < parallel < bench/cli);
the export layer only reads the stored table (ENGINE_DIR/calibration/fp8_scales.json). The pipeline
is assembled by the one assembler (wanrt.runtime.load_backends), and its memory (GPU included) is
released before this returns, so a TensorRT build that follows has the whole device.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from wanrt.export.fp8 import excluded_blocks, recipe_linears

# several prompts: activation ranges differ by content, and one prompt under-covers them
PROMPTS = ("a large dark bird flies up and to the right",
           "a city street at night, cars pass in the rain, neon reflections",
           "close-up of a person smiling and turning their head, soft daylight")


class AttentionAmax:
    """An attention implementation for the seam that records, per call of one DiT forward (the j-th
    attention of the forward = the j-th Softmax of the exported graph), max |q / sqrt(D)|, max |k|, max |v|,
    then runs the attention the pipeline had chosen."""

    NAME = "_calibrate_fp8"

    def __init__(self, inner: str):
        self.inner, self.index, self.amax = inner, None, []

    def __call__(self, q, k, v):
        from wanrt.kernels import attention as seam

        if self.index is not None:  # inside the DiT's forward (the VAE's attention is not counted)
            got = [(q * q.shape[-1] ** -0.5).abs().max().float().item(), k.abs().max().float().item(),
                   v.abs().max().float().item()]
            if self.index == len(self.amax):
                self.amax.append(got)
            else:
                self.amax[self.index] = [max(a, b) for a, b in zip(self.amax[self.index], got)]
            self.index += 1
        with seam.use(self.inner):
            return seam.attention(q, k, v)


@torch.no_grad()
def calibrate(pipe, target, steps: int = 4, prompts: Sequence[str] = PROMPTS, frames=None,
              recipe: str = "nvidia", attention: bool = False) -> dict:
    """Run `steps` denoising steps per prompt of the eager pipeline at the target size and record, per
    linear of the recipe, the max |input| ("max" calibration) and max |weight|; with `attention`, also the
    maxima of every attention's pre-scaled q, k and v (for FP8 attention Q/DQ). Returns the scale table."""
    from wanrt.kernels import attention as seam
    from wanrt.kernels.fusion import is_fused
    from wanrt.samples import sample_frames

    dit = pipe.backends.dit.model
    if is_fused(dit):  # the Q/DQ graph quantises q, k and v one by one, by their official names
        raise ValueError("FP8 calibration records the official q/k/v linears; load the pipeline with fuse=False")
    amax: dict[str, float] = {}
    hooks = []
    recorder = AttentionAmax(pipe.attention)
    chosen = pipe.attention
    if attention:
        seam.register(AttentionAmax.NAME)(recorder)
        pipe.attention = AttentionAmax.NAME
        hooks.append(dit.register_forward_pre_hook(lambda m, a: setattr(recorder, "index", 0)))
        hooks.append(dit.register_forward_hook(lambda m, a, o: setattr(recorder, "index", None)))
    for name in recipe_linears(dit, recipe):
        def hook(module, args, name=name):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().float().item())

        hooks.append(dit.get_submodule(name).register_forward_pre_hook(hook))
    try:
        first, last = frames or sample_frames()
        for i, prompt in enumerate(prompts):
            pipe(first, last, prompt, frame_num=target.frame_num, max_area=target.width * target.height,
                 sample_steps=steps, seed=i, progress=False)
    finally:
        pipe.attention = chosen
        for h in hooks:
            h.remove()
    weights = {n: dit.get_submodule(n).weight.detach().abs().max().float().item() for n in amax}
    extra = {"attention_amax": recorder.amax} if attention else {}
    return {**extra, "format": "float8_e4m3fn", "method": "max", "steps": steps, "prompts": list(prompts),
            "recipe": recipe, "bf16_blocks": excluded_blocks(dit.cfg.num_layers) if recipe == "nvidia" else [],
            "target": [target.width, target.height, target.frame_num],
            "activation_amax": amax, "weight_amax": weights}


def calibrate_to(ckpt_dir, out, target, steps: int = 4, log: Callable[[str], None] = print,
                 recipe: str = "nvidia", device=None, attention: bool = False, lora=None) -> dict:
    """Calibrate with the eager pipeline (on CUDA when present) and store out/calibration/fp8_scales.json.
    Everything the calibration loaded is released (and the CUDA cache emptied) before returning.
    With `lora`, the DiT is calibrated with the LoRAs merged (its weight scales depend on them)."""
    from wanrt.engine.manifest import write_json_atomic
    from wanrt.models.lora import identities
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.runtime.backends import load_backends

    lora_ids = identities(lora)
    path = Path(out) / "calibration" / "fp8_scales.json"
    want = [target.width, target.height, target.frame_num]
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("steps") == steps and data.get("target") == want and data.get("recipe") == recipe \
                and ("attention_amax" in data or not attention) and data.get("lora", []) == lora_ids:
            log(f"fp8: using the calibration in {path}")
            return data
    log(f"fp8: calibrating on {steps} denoising steps x {len(PROMPTS)} prompts at "
        f"{target.width}x{target.height}x{target.frame_num} (recipe {recipe})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    got = load_backends(ckpt_dir, device, lora=lora)
    pipe = FLF2VPipeline(got.backends, got.config, got.tokenizer, device)
    try:
        data = calibrate(pipe, target, steps, recipe=recipe, attention=attention) | {"lora": lora_ids}
    finally:
        del pipe, got
        release(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return data


def release(device: torch.device) -> None:
    """Drop unreachable models and return the CUDA caching allocator's memory to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
