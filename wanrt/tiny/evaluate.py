"""Does the tiny model do FLF2V? Generated clips against the ground truth of held-out synthetic clips.

Per clip: PSNR of the given frames (first, last) and of the generated middle frames, and the centroid
path error: the object's centroid in every middle frame (mask = pixels far from the clip's known
background) against the ground truth's, in pixels and as a fraction of the start-end distance. A static
baseline (the first frame repeated) says what "no motion" scores, so a model that merely copies its
inputs cannot pass. Per middle frame also: is there one compact object (a cross-fade shows two faint
ones, a smear one too large; `crossfaded` counts the frames that fail), and is its colour the input's
(`color_error`: the largest channel difference, 0-255, between the mean colour of the object's inner
pixels and that of the given first frame's object, worst middle frame).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from wanrt.metrics import psnr

from . import data


@dataclass
class ClipScore:
    seed: int
    prompt: str
    psnr_first: float
    psnr_last: float
    psnr_middle: float
    centroid_error: float  # mean over middle frames, pixels
    static_psnr_middle: float
    static_centroid_error: float
    missing: int  # middle frames where the generated object was not found (scored as half the diagonal)
    travel: float = float("nan")  # start-end distance of the true path, pixels
    relative_centroid_error: float = float("nan")  # centroid_error / travel
    crossfaded: int = 0  # middle frames without exactly one compact object of the right size
    color_error: float = float("nan")  # worst middle frame, 0-255 (see the module docstring)

    def as_dict(self) -> dict:
        return asdict(self)


def centroid_error(frames: np.ndarray, clip: data.Clip) -> tuple[float, int]:
    """Mean distance (px) between generated and true object centroids over the middle frames."""
    h, w = frames.shape[1:3]
    truth = data.centroids(clip.frames[1:-1], clip.background)
    got = data.centroids(frames[1:-1], clip.background)
    d = np.linalg.norm(got - truth, axis=1)
    missing = np.isnan(d)
    d[missing] = 0.5 * np.hypot(h, w)  # not found: as bad as being half a frame away
    return float(d.mean()), int(missing.sum())


def components(mask: np.ndarray) -> list[int]:
    """Sizes of the 8-connected components of a 2D bool mask, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    sizes = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, n = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        sizes.append(n)
    return sorted(sizes, reverse=True)


def _inner(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one pixel (4-neighbourhood): the object without its anti-aliased rim."""
    m = np.pad(mask, 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def _mean_color(frame: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    inner = _inner(mask)
    return frame[inner].astype(np.float64).mean(0) if inner.any() else None


def object_checks(frames: np.ndarray, clip: data.Clip, single: float = 0.9, area: tuple[float, float] = (0.5, 2.0)
                  ) -> tuple[int, float]:
    """(middle frames that are not one compact object, worst colour error) of a single-object clip.

    A frame passes when its largest component holds >= `single` of the object pixels and its size is within
    `area` times the true object's in that frame. A cross-fade shows the object twice at partial strength
    (two components, or one too small with the wrong colour), a smear shows one too large."""
    truth = data.object_mask(clip.frames, clip.background)
    got = data.object_mask(frames, clip.background)
    ref = _mean_color(clip.frames[0], truth[0])  # what the user gave
    bad, worst = 0, 0.0
    for i in range(1, len(frames) - 1):
        sizes = components(got[i])
        true_area = int(truth[i].sum())
        ok = bool(sizes) and sizes[0] >= single * sum(sizes) and area[0] <= sizes[0] / true_area <= area[1]
        bad += not ok
        color = _mean_color(frames[i], got[i])
        worst = max(worst, 255.0 if color is None else float(np.abs(color - ref).max()))
    return bad, worst


def score(frames: np.ndarray, clip: data.Clip, seed: int = -1) -> ClipScore:
    """frames (F, H, W, 3) uint8 generated from clip's first and last frame."""
    if frames.shape != clip.frames.shape:
        raise ValueError(f"generated {frames.shape} vs ground truth {clip.frames.shape}")
    gt = clip.frames
    static = np.repeat(gt[:1], len(gt), axis=0)
    err, missing = centroid_error(frames, clip)
    travel = float(np.hypot(*(clip.centers[-1] - clip.centers[0])))
    crossfaded, color_error = object_checks(frames, clip) if clip.objects == 1 else (0, float("nan"))
    return ClipScore(
        seed=seed, prompt=clip.prompt,
        psnr_first=psnr(frames[0], gt[0]), psnr_last=psnr(frames[-1], gt[-1]),
        psnr_middle=psnr(frames[1:-1], gt[1:-1]), centroid_error=err,
        static_psnr_middle=psnr(static[1:-1], gt[1:-1]), static_centroid_error=centroid_error(static, clip)[0],
        missing=missing, travel=travel, relative_centroid_error=err / travel, crossfaded=crossfaded,
        color_error=color_error)


def summarize(scores: list[ClipScore]) -> dict[str, float]:
    keys = ("psnr_first", "psnr_last", "psnr_middle", "centroid_error", "static_psnr_middle",
            "static_centroid_error")
    out = {k: float(np.mean([getattr(s, k) for s in scores])) for k in keys}
    out["min_psnr_first"] = float(min(s.psnr_first for s in scores))
    out["min_psnr_last"] = float(min(s.psnr_last for s in scores))
    out["missing"] = int(sum(s.missing for s in scores))
    out["crossfaded"] = int(sum(s.crossfaded for s in scores))
    out["max_color_error"] = float(max(s.color_error for s in scores))
    out["max_relative_centroid_error"] = float(max(s.relative_centroid_error for s in scores))
    out["clips"] = len(scores)
    return out


def generate(pipe, clip: data.Clip, steps: int, guide_scale: float | None = None, shift: float | None = None,
             seed: int = 0, solver: str = "unipc") -> np.ndarray:
    """Run the pipeline on the clip's first/last frame and prompt at the clip's size and length (guide_scale,
    shift None: the pipeline's defaults, those of `wanrt generate`)."""
    f, h, w = clip.frames.shape[:3]
    video = pipe(clip.frames[0], clip.frames[-1], clip.prompt, max_area=h * w, frame_num=f, sample_steps=steps,
                 guide_scale=guide_scale, sample_shift=shift, sample_solver=solver, seed=seed, progress=False)
    return video.frames


# The issue-18 targets' held-out clips: one disk or square on a gradient.
SIMPLE = ("disk", "square")
TARGET_SIZES = ((64, 64), (64, 48), (48, 64), (96, 64))  # (width, height): every size the model is trained at


def evaluate(pipe, seeds: list[int], steps: int, frames: int = data.FRAMES, width: int = data.SIZE,
             height: int = data.SIZE, shapes: tuple[str, ...] = data.SHAPES, **kwargs
             ) -> tuple[dict[str, float], list[ClipScore]]:
    scores = []
    for s in seeds:
        clip = data.make_clip(s, frames, width, height, shapes=shapes)
        scores.append(score(generate(pipe, clip, steps, **kwargs), clip, s))
    return summarize(scores), scores


def meets_targets(s: ClipScore) -> bool:
    """The issue-18 targets for one held-out clip (scripts/eval_tiny.py --targets)."""
    return (s.psnr_first >= 25 and s.psnr_last >= 25 and s.crossfaded == 0 and s.color_error <= 40
            and s.relative_centroid_error <= 0.2)


@torch.no_grad()
def vae_round_trip(pipe, frames: np.ndarray) -> np.ndarray:
    """The clip through the pipeline's VAE encode and decode and its uint8 conversion (the VAE's own
    reconstruction limit: what any DiT output would be at best)."""
    from wanrt.video import to_uint8_frames

    from .train import frames_to_tensor

    return to_uint8_frames(pipe.vae_decode(pipe.vae_encode(frames_to_tensor(frames[None])))[0])


def latent_headroom(pipe, frames: np.ndarray, steps: int = 150, lr: float = 0.02
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """(the clip through the VAE, the clip decoded by the same decoder from a latent optimised to reproduce it,
    the latent's relative change). Adam on the latent alone, mean squared error against the true frames: where
    the second passes and the first fails, the decoder can draw the clip and the encoder is what stops it
    (scripts/vae_headroom.py)."""
    from wanrt.models.vae import decode_chunks
    from wanrt.video import to_uint8_frames

    from .train import frames_to_tensor

    x = frames_to_tensor(frames[None])
    with torch.no_grad():
        z0 = pipe.vae_encode(x)
        through = to_uint8_frames(pipe.vae_decode(z0)[0])
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (decode_chunks(pipe.backends.vae.decode_chunk, z) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return through, to_uint8_frames(pipe.vae_decode(z)[0]), float((z - z0).norm() / z0.norm())


def targets(pipe, seeds: list[int], width: int, height: int, steps: int = 20, vae_only: bool = False,
            **kwargs) -> tuple[dict[str, float], list[ClipScore]]:
    """Held-out single disks/squares, 17 frames, generated (or, vae_only, the true clip through the VAE)."""
    if not vae_only:
        return evaluate(pipe, seeds, steps, width=width, height=height, shapes=SIMPLE, **kwargs)
    scores = []
    for s in seeds:
        clip = data.make_clip(s, data.FRAMES, width, height, shapes=SIMPLE)
        scores.append(score(vae_round_trip(pipe, clip.frames), clip, s))
    return summarize(scores), scores


def strip(frames_list: list[np.ndarray], every: int = 2, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows of videos (each (F, H, W, 3)) as one uint8 image: every `every`-th frame plus the last."""
    rows = []
    for frames in frames_list:
        idx = sorted(set(range(0, len(frames), every)) | {len(frames) - 1})
        tiles = [np.kron(frames[i], np.ones((scale, scale, 1), np.uint8)) for i in idx]
        pad = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([x for t in tiles for x in (t, pad)][:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    hpad = np.full((gap, width, 3), 255, np.uint8)
    return np.concatenate([x for r in rows for x in (r, hpad)][:-1], axis=0)
