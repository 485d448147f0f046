"""Does the tiny model do FLF2V? Generated clips against the ground truth of held-out synthetic clips.

Per clip: PSNR of the given frames (first, last) and of the generated middle frames, and the centroid
path error: the object's centroid in every middle frame (mask = pixels far from the clip's known
background) against the ground truth's, in pixels. A static baseline (the first frame repeated) says
what "no motion" scores, so a model that merely copies its inputs cannot pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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


def score(frames: np.ndarray, clip: data.Clip, seed: int = -1) -> ClipScore:
    """frames (F, H, W, 3) uint8 generated from clip's first and last frame."""
    if frames.shape != clip.frames.shape:
        raise ValueError(f"generated {frames.shape} vs ground truth {clip.frames.shape}")
    gt = clip.frames
    static = np.repeat(gt[:1], len(gt), axis=0)
    err, missing = centroid_error(frames, clip)
    return ClipScore(
        seed=seed, prompt=clip.prompt,
        psnr_first=psnr(frames[0], gt[0]), psnr_last=psnr(frames[-1], gt[-1]),
        psnr_middle=psnr(frames[1:-1], gt[1:-1]), centroid_error=err,
        static_psnr_middle=psnr(static[1:-1], gt[1:-1]), static_centroid_error=centroid_error(static, clip)[0],
        missing=missing)


def summarize(scores: list[ClipScore]) -> dict[str, float]:
    keys = ("psnr_first", "psnr_last", "psnr_middle", "centroid_error", "static_psnr_middle",
            "static_centroid_error")
    out = {k: float(np.mean([getattr(s, k) for s in scores])) for k in keys}
    out["min_psnr_first"] = float(min(s.psnr_first for s in scores))
    out["min_psnr_last"] = float(min(s.psnr_last for s in scores))
    out["missing"] = int(sum(s.missing for s in scores))
    out["clips"] = len(scores)
    return out


def generate(pipe, clip: data.Clip, steps: int, guide_scale: float = 5.0, shift: float = 16.0, seed: int = 0,
             solver: str = "unipc") -> np.ndarray:
    """Run the pipeline on the clip's first/last frame and prompt at the clip's size and length."""
    f, h, w = clip.frames.shape[:3]
    video = pipe(clip.frames[0], clip.frames[-1], clip.prompt, max_area=h * w, frame_num=f, sample_steps=steps,
                 guide_scale=guide_scale, sample_shift=shift, sample_solver=solver, seed=seed, progress=False)
    return video.frames


def evaluate(pipe, seeds: list[int], steps: int, frames: int = data.FRAMES, width: int = data.SIZE,
             height: int = data.SIZE, **kwargs) -> tuple[dict[str, float], list[ClipScore]]:
    scores = []
    for s in seeds:
        clip = data.make_clip(s, frames, width, height)
        scores.append(score(generate(pipe, clip, steps, **kwargs), clip, s))
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
