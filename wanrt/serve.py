"""`wanrt serve`: one loaded pipeline behind an HTTP API (FastAPI + uvicorn; `pip install wanrt[serve]`).

    wanrt serve --ckpt_dir tiny --port 8000
    curl -s localhost:8000/health
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "a bird flies", "sample_steps": 8, "seed": 1}' -o out.mp4

POST /generate takes a JSON object (schema: `GenerateRequest`; GET /openapi.json has it):
first_frame / last_frame (base64 PNG/JPEG; both or neither: the built-in sample frames), prompt, and
any of negative_prompt, max_area, frame_num, sample_steps, sample_shift, guide_scale, sample_solver,
seed, timeout_s, cache, cache_threshold. It answers `video/mp4`, or JSON `{"error": "..."}` naming
the field or the problem:
400 bad request (a value the pipeline refuses), 413 body over --max_body_mb (refused from its
Content-Length, before it is read), 422 wrong type / unknown key / non-finite number, 503 queue full
(--max_queue requests waiting or running), 504 cancelled after timeout_s, 500 the model failed (e.g.
non-finite values). The server survives every malformed request. Requests run one at a time on the
pipeline (one device); the equal request gives the same mp4 bytes (the encoder runs in a fresh thread).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

SOLVERS = ("unipc", "dpm++")


class GenerateRequest(BaseModel):
    """One video request; unknown keys (a typo such as `steps`) are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str
    first_frame: str | None = Field(None, description="base64 PNG/JPEG")
    last_frame: str | None = Field(None, description="base64 PNG/JPEG")
    negative_prompt: str | None = None
    max_area: int | None = Field(None, ge=256)
    frame_num: int | None = Field(None, ge=5)
    sample_steps: int = Field(50, ge=1, le=1000)
    sample_shift: float | None = Field(None, gt=0, description="default: the checkpoint's (official 16)")
    guide_scale: float | None = Field(None, ge=0, description="default: the checkpoint's (official 5.0)")
    sample_solver: Literal[SOLVERS] = "unipc"
    seed: int = Field(0, ge=0, lt=2**63)
    timeout_s: float = Field(600.0, gt=0)
    cache: Literal["none", "teacache"] = "none"
    cache_threshold: float | None = Field(None, ge=0)

    @field_validator("sample_shift", "guide_scale", "timeout_s", "cache_threshold", mode="before")
    @classmethod
    def _numbers(cls, v):  # strict mode refuses ints for floats; 5 is a fine guide scale
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class _Problem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _image(data: str, field: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise _Problem(400, f"field '{field}': not a base64 PNG/JPEG image ({e})") from None


def create_app(pipe, max_body_mb: float = 64.0, max_queue: int = 4) -> FastAPI:
    """The HTTP app over a loaded FLF2VPipeline (tests drive it with FastAPI's TestClient)."""
    from wanrt.pipeline import NonFiniteError
    from wanrt.runtime.step import Cancelled
    from wanrt.samples import sample_frames

    app = FastAPI(title="wanrt", description="Wan2.1 FLF2V video generation")
    limit = int(max_body_mb * 2**20)
    slots = threading.BoundedSemaphore(max_queue)  # requests waiting for the pipeline or running on it
    state = {"in_flight": 0}
    lock = threading.Lock()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():  # also '-1': the request could not be framed
                return error(411 if length is None else 400, f"Content-Length must be a byte count, got {length!r}")
            if int(length) > limit:
                return error(413, f"body of {int(length)} bytes is over the limit of {limit} bytes (--max_body_mb)")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        what = "unknown key" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
        return error(422, f"field '{where}': {what}")

    @app.exception_handler(_Problem)
    async def problem(_request: Request, exc: _Problem):
        return error(exc.status, exc.message)

    @app.get("/health")
    def health():
        return {"ok": True, "backends": pipe.backends.names, "in_flight": state["in_flight"], "max_queue": max_queue}

    @app.post("/generate", response_class=Response, responses={200: {"content": {"video/mp4": {}}}})
    async def generate(req: GenerateRequest):
        if (req.first_frame is None) != (req.last_frame is None):
            raise _Problem(400, "give both 'first_frame' and 'last_frame', or neither (the sample frames)")
        if req.first_frame is None:
            first, last = sample_frames()
        else:
            first, last = _image(req.first_frame, "first_frame"), _image(req.last_frame, "last_frame")
        if not slots.acquire(blocking=False):
            raise _Problem(503, f"busy: {max_queue} requests queued or running (--max_queue); retry later")
        try:
            with lock:
                state["in_flight"] += 1
            return await run_in_threadpool(_run, req, first, last)
        finally:
            with lock:
                state["in_flight"] -= 1
            slots.release()

    def _run(req: GenerateRequest, first, last) -> Response:
        options = req.model_dump(exclude={"prompt", "first_frame", "last_frame", "timeout_s"}, exclude_none=True)
        cancel = threading.Event()
        timer = threading.Timer(req.timeout_s, cancel.set)
        timer.start()
        try:
            video = pipe(first, last, req.prompt, progress=False, cancel=cancel, **options)
        except Cancelled as e:
            raise _Problem(504, f"cancelled after timeout_s={req.timeout_s:g}: {e}") from None
        except NonFiniteError as e:
            raise _Problem(500, str(e)) from None
        except ValueError as e:  # InputError, MediaError: the request's fault
            raise _Problem(400, str(e)) from None
        finally:
            timer.cancel()
        with tempfile.TemporaryDirectory() as tmp:
            data = video.save(Path(tmp) / "video.mp4").read_bytes()
        return Response(data, media_type="video/mp4", headers={"x-wanrt-seed": str(video.seed)})

    return app


def serve(pipe, host: str = "127.0.0.1", port: int = 8000, max_body_mb: float = 64.0, max_queue: int = 4) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    if not math.isfinite(max_body_mb) or max_body_mb <= 0 or max_queue < 1:
        raise ValueError(f"--max_body_mb must be > 0 and --max_queue >= 1, got {max_body_mb} and {max_queue}")
    uvicorn.run(create_app(pipe, max_body_mb, max_queue), host=host, port=port, log_level="warning")
