"""Frames <-> files: image loading for the pipeline, H.264 mp4 writing and reading with PyAV.

Every file is written under a temporary name in the target folder and renamed into place, so a
failed or interrupted write never leaves a half-written video behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from wanrt._files import as_if_opened, umask


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


VIDEO_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # extension -> PyAV format


def check_writable(path: str | Path, kind: str = "video") -> Path:
    """Fail early (before any model work) if the output cannot be written; returns the path to write.

    A symlink is followed (its target is written, the link stays); anything at the target that is not a
    regular file (a device such as /dev/full, a FIFO, a socket) is refused: it would be replaced by the
    atomic rename. A video path must end in a container wanrt writes (VIDEO_CONTAINERS)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    _writable_folder(path.parent if str(path.parent) else Path("."))
    if path.is_dir():
        raise MediaError(f"output path {path} is a folder")
    if path.exists() and not path.is_file():
        raise MediaError(f"output path {path} is not a regular file (a device, FIFO or socket); give a file path")
    if kind == "video" and path.suffix.lower() not in VIDEO_CONTAINERS:
        raise MediaError(f"output path {path} must end in {', '.join(VIDEO_CONTAINERS)} (a video container); "
                         "for lossless PNG frames use --save_frames DIR")
    return path


def _writable_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise MediaError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MediaError(f"output folder {folder} is not writable")


def _place(tmp: str, path: Path, exclusive: bool) -> Path:
    """Rename a finished temporary file into place. exclusive: never replace an existing file; a taken
    name gets the first free `_1`, `_2`, ... suffix instead (two runs never share a default name)."""
    as_if_opened(tmp)
    if not exclusive:
        os.replace(tmp, path)
        return path
    for i in range(10_000):
        candidate = path if i == 0 else path.with_name(f"{path.stem}_{i}{path.suffix}")
        try:
            os.link(tmp, candidate)  # atomic and fails if the name exists, unlike rename
        except FileExistsError:
            continue
        os.unlink(tmp)
        return candidate
    raise MediaError(f"no free file name next to {path}")


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18, exclusive: bool = False) -> Path:
    """(F, H, W, 3) uint8 -> H.264 yuv420p video, container from the extension (mp4, mov, mkv). Odd
    sizes are padded by one edge pixel (yuv420p needs even sizes). Written to a temporary file in the
    same folder, then renamed.

    The encoder runs in a fresh thread: x264's decisions use floating point, and a thread that has run
    PyTorch's CPU kernels can carry another floating-point state (denormal handling), which made the
    same frames encode to different files depending on what the process computed before (measured:
    mean |delta| up to 1 of 255 after decoding). From a fresh thread the same frames always give the
    same file, so a fixed seed reproduces the video byte for byte. exclusive: see `_place`; returns
    the path written."""
    path = check_writable(path)
    container = VIDEO_CONTAINERS[path.suffix.lower()]
    f, h, w, _ = frames.shape
    ph, pw = h + (h % 2), w + (w % 2)
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    failure: list[BaseException] = []

    def encode() -> None:
        try:
            _encode_h264(frames, tmp, fps, crf, container)
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    try:
        worker = threading.Thread(target=encode, name="wanrt-mp4-encoder")
        worker.start()
        worker.join()
        if failure:
            raise failure[0]
        return _place(tmp, path, exclusive)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode_h264(frames: np.ndarray, path: str, fps: int, crf: int, fmt: str = "mp4") -> None:
    import av

    with av.open(path, mode="w", format=fmt) as container:
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

    path = check_writable(path, kind="image")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(frame).save(tmp, format="PNG")
        return _place(tmp, path, exclusive=False)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_frames_folder(folder: str | Path) -> Path:
    """A folder for `write_frames`: new or empty, in a writable parent."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise MediaError(f"frames folder {folder} must be new or empty; give another --save_frames folder")
    _writable_folder(folder.parent if str(folder.parent) else Path("."))
    return folder


def write_frames(frames: np.ndarray, folder: str | Path) -> Path:
    """Every frame as a lossless PNG (frame_0000.png, ...) in `folder` (created; must not hold frames
    already), for exact comparisons that mp4's lossy coding would blur. All or nothing: the frames are
    written to a temporary folder beside it and renamed into place."""
    folder = check_frames_folder(folder)
    parent = folder.parent if str(folder.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    try:
        for i, frame in enumerate(frames):
            write_png(frame, tmp / f"frame_{i:04d}.png")
        os.chmod(tmp, 0o777 & ~umask())
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
