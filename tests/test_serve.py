"""`wanrt serve`: the schema refuses what it must (naming the field), the server survives malformed
requests, the queue bound answers 503, and one real uvicorn process answers over loopback.
Oracle: the pipeline called directly with the same arguments (same mp4 bytes)."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="wanrt serve needs the `serve` extra (fastapi, uvicorn)")
from fastapi.testclient import TestClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"prompt": "a bird flies", "sample_steps": 2, "frame_num": 5, "max_area": 32 * 32, "seed": 1}


@pytest.fixture(scope="module")
def pipe(tiny_official):
    from wanrt.pipeline import FLF2VPipeline

    return FLF2VPipeline.from_pretrained(tiny_official, device="cpu")


@pytest.fixture(scope="module")
def client(pipe):
    from wanrt.serve import create_app

    return TestClient(create_app(pipe, max_body_mb=1.0, max_queue=2))


def _png(seed: int) -> str:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_generate_answers_the_same_mp4_as_the_pipeline(client, pipe, tmp_path):
    body = SMALL | {"first_frame": _png(0), "last_frame": _png(1)}
    r1, r2 = client.post("/generate", json=body), client.post("/generate", json=body)
    assert r1.status_code == 200 and r1.headers["content-type"] == "video/mp4"
    assert r1.content == r2.content  # equal requests, equal bytes, in one long-lived process
    from PIL import Image

    frames = [Image.open(io.BytesIO(base64.b64decode(body[k]))) for k in ("first_frame", "last_frame")]
    direct = pipe(*frames, body["prompt"], sample_steps=2, frame_num=5, max_area=32 * 32, seed=1, progress=False)
    assert direct.save(tmp_path / "v.mp4").read_bytes() == r1.content


def test_concurrent_requests_are_all_served(client):
    from wanrt.video import read_mp4

    bodies = [SMALL | {"seed": i, **({"first_frame": _png(i), "last_frame": _png(i + 1)} if i % 2 else {})}
              for i in range(2)]  # max_queue=2: both fit
    out = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, client.post("/generate", json=bodies[i])))
               for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, r in enumerate(out):
        assert r.status_code == 200, r.text
        path = Path(f"/tmp/wanrt-serve-test-{os.getpid()}-{i}.mp4")
        path.write_bytes(r.content)
        assert read_mp4(path).shape[0] == 5
        path.unlink()


@pytest.mark.parametrize("body, field", [
    ({"sample_steps": "2"}, "sample_steps"),  # wrong type
    ({"steps": 2}, "steps"),  # a typo: unknown keys are refused, not ignored
    ({"seed": -1}, "seed"),
    ({"sample_solver": "euler?"}, "sample_solver"),
    ({"prompt": 3}, "prompt"),
])
def test_bad_fields_get_422_naming_the_field(client, body, field):
    r = client.post("/generate", json=SMALL | body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(f"field '{field}'"), r.json()


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"null", b"{not json", b'{"prompt": "x", "guide_scale": NaN}',
                                 b'{"prompt": "x", "sample_shift": Infinity}'])
def test_non_objects_and_non_finite_numbers_are_refused_and_the_server_lives(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "error" in r.json()
    assert client.get("/health").json()["ok"] is True


def test_bad_images_and_sizes_get_400_with_the_reason(client):
    r = client.post("/generate", json=SMALL | {"first_frame": "not-base64!", "last_frame": _png(1)})
    assert r.status_code == 400 and "first_frame" in r.json()["error"]
    r = client.post("/generate", json=SMALL | {"first_frame": _png(0)})
    assert r.status_code == 400 and "both" in r.json()["error"]
    r = client.post("/generate", json=SMALL | {"frame_num": 6})  # the pipeline's own check
    assert r.status_code == 400 and "4n+1" in r.json()["error"]


def test_large_bodies_get_413_before_being_read(client):
    big = b"x" * (2 * 2**20)  # over the 1 MB limit of the fixture
    r = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = client.post("/generate", content=b"{}", headers={"content-type": "application/json",
                                                          "content-length": "-1"})
    assert r.status_code == 400


def test_a_full_queue_answers_503(pipe):
    from wanrt.serve import create_app

    gate, entered = threading.Event(), threading.Event()

    class Slow:  # the real pipeline behind a gate: holds the only slot until released
        backends = pipe.backends

        def __call__(self, *a, **k):
            entered.set()
            gate.wait(60)
            return pipe(*a, **k)

    client = TestClient(create_app(Slow(), max_queue=1))
    held = threading.Thread(target=lambda: client.post("/generate", json=SMALL))
    held.start()
    assert entered.wait(60)
    r = client.post("/generate", json=SMALL)
    assert r.status_code == 503 and "max_queue" in r.json()["error"]
    gate.set()
    held.join(60)
    assert client.post("/generate", json=SMALL).status_code == 200  # the slot came back


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wanrt_serve_process_answers_over_loopback(tmp_path):
    import httpx

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "wanrt", "serve", "--ckpt_dir", "tiny-random", "--device", "cpu",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        assert health.json()["ok"] is True
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json=SMALL, timeout=300)
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"
        r = httpx.post(f"http://127.0.0.1:{port}/generate", content=b"[]", timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422
    finally:
        proc.terminate()
        proc.wait(30)
