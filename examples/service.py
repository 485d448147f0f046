"""wanrt embedded in an HTTP service, with the standard library only.

    python examples/service.py --ckpt_dir tiny --port 8000
    curl -s localhost:8000/health
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "a bird flies", "sample_steps": 8, "seed": 1}' -o out.mp4

POST /generate takes JSON: prompt (required), first_frame / last_frame (base64 PNG/JPEG; default: the
built-in sample frames), and any of negative_prompt, max_area, frame_num, sample_steps, sample_shift,
guide_scale, sample_solver, seed, cache, cache_threshold, timeout_s (the request is cancelled between
denoising steps after that many seconds). It answers an mp4 (video/mp4) or a JSON {"error": "..."} with status 400
(bad request), 408 (cancelled) or 500. The pipeline is loaded once; requests from concurrent clients
are served by threads and serialized on the pipeline (one device).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OPTIONS = ("negative_prompt", "max_area", "frame_num", "sample_steps", "sample_shift", "guide_scale",
           "sample_solver", "seed", "cache", "cache_threshold")


def _image(data: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def make_handler(pipe):
    from wanrt.runtime.step import Cancelled
    from wanrt.samples import sample_frames

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default; a real service would use logging
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), "application/json")

        def do_GET(self):
            if self.path == "/health":
                self._send(HTTPStatus.OK, json.dumps({"ok": True, "backends": pipe.backends.names}).encode(),
                           "application/json")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

        def do_POST(self):
            if self.path != "/generate":
                return self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not isinstance(req.get("prompt"), str):
                    raise ValueError("'prompt' (a string) is required")
                if "first_frame" in req:
                    first, last = _image(req["first_frame"]), _image(req["last_frame"])
                else:
                    first, last = sample_frames()
                kwargs = {k: req[k] for k in OPTIONS if k in req}
            except (ValueError, KeyError, OSError) as e:
                return self._error(HTTPStatus.BAD_REQUEST, f"bad request: {e}")
            cancel = threading.Event()
            timer = threading.Timer(float(req.get("timeout_s", 600)), cancel.set)
            timer.start()
            try:
                video = pipe(first, last, req["prompt"], progress=False, cancel=cancel, **kwargs)
            except Cancelled as e:
                return self._error(HTTPStatus.REQUEST_TIMEOUT, str(e))
            except ValueError as e:  # InputError and friends: the request's fault
                return self._error(HTTPStatus.BAD_REQUEST, str(e))
            except Exception as e:  # noqa: BLE001 - report, keep serving
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            finally:
                timer.cancel()
            with tempfile.TemporaryDirectory() as tmp:
                path = video.save(Path(tmp) / "video.mp4")
                self._send(HTTPStatus.OK, path.read_bytes(), "video/mp4")

    return Handler


def serve(pipe, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); call .shutdown() to stop it. port 0 picks a free one."""
    server = ThreadingHTTPServer((host, port), make_handler(pipe))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    from wanrt import FLF2VPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt_dir", default="tiny")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--engine_dir", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    pipe = FLF2VPipeline.from_pretrained(args.ckpt_dir, backend=args.backend, engine_dir=args.engine_dir)
    server = serve(pipe, args.host, args.port)
    print(f"serving on http://{args.host}:{server.server_address[1]} (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
