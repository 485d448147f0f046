"""Frames <-> files: image loading for the pipeline, H.264 mp4 writing and reading with PyAV.

Every file is written under a temporary name in the target folder and renamed into place, so a
failed or interrupted write never leaves a half-written video behind.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from wanrt._files import as_if_opened


class MediaError(Exception):
    """An input image or output video path is unusable."""


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8, exactly as the official `cache_video`:
    clamp, (x + 1) / 2, * 255, truncate (not round)."""
    x = video.float().clamp(-1, 1).add(1).div(2).mul(255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def load_image(image) -> torch.Tensor:
    """A path, PIL image or HxWx3 uint8 array -> (3, H, W) float32 in [-1, 1] (official TF.to_tensor)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise MediaError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise MediaError(f"cannot read image {path}: {e}") from None
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise MediaError(f"image array must be H x W x 3, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise MediaError(f"image array must be uint8, got {arr.dtype}")
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise MediaError(f"image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return image.float()
    else:
        raise MediaError(f"unsupported image type {type(image).__name__}; use a path, PIL image or uint8 array")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def check_writable(path: str | Path) -> Path:
    """Fail early (before any model work) if the output cannot be created."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise MediaError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MediaError(f"output folder {folder} is not writable")
    if path.is_dir():
        raise MediaError(f"output path {path} is a folder")
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """(F, H, W, 3) uint8 -> H.264 yuv420p mp4. Odd sizes are padded by one edge pixel (yuv420p needs
    even sizes). Written to a temporary file in the same folder, then renamed.

    The encoder runs in a fresh thread: x264's decisions use floating point, and a thread that has run
    PyTorch's CPU kernels can carry another floating-point state (denormal handling), which made the
    same frames encode to different files depending on what the process computed before (measured:
    mean |delta| up to 1 of 255 after decoding). From a fresh thread the same frames always give the
    same file, so a fixed seed reproduces the video byte for byte."""
    path = check_writable(path)
    f, h, w, _ = frames.shape
    ph, pw = h + (h % 2), w + (w % 2)
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    failure: list[BaseException] = []

    def encode() -> None:
        try:
            _encode_h264(frames, tmp, fps, crf)
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    try:
        worker = threading.Thread(target=encode, name="wanrt-mp4-encoder")
        worker.start()
        worker.join()
        if failure:
            raise failure[0]
        as_if_opened(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _encode_h264(frames: np.ndarray, path: str, fps: int, crf: int) -> None:
    import av

    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_mp4(path: str | Path) -> np.ndarray:
    """All frames of a video as (F, H, W, 3) uint8."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_png(frame: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(frame).save(tmp, format="PNG")
        as_if_opened(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
