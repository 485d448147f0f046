"""Peak host memory of `wanrt export` against the weight size, on a ~1B-parameter random DiT.

The export traces the graph on the meta device and streams every weight from the checkpoint into the
ONNX (external data) one tensor at a time, so its peak RSS should stay far below the weights' size
(and nowhere near twice it). This writes a random official-layout checkpoint (fp32 DiT safetensors),
then runs `wanrt export --components dit` in a child process and reads that child's peak RSS.

    python benchmarks/export_memory.py                  # ~0.94B-parameter DiT, bf16 export
    python benchmarks/export_memory.py --precision fp32 --keep /tmp/ckpt1b
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--keep", default=None, help="folder for the random checkpoint (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from wanrt.models import tiny
    from wanrt.models.config import WanConfig

    cfg = WanConfig.tiny()
    cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, dim=args.dim, ffn_dim=4 * args.dim,
                                              num_heads=args.dim // 128, num_layers=args.layers, freq_dim=256))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.keep or Path(tmp) / "ckpt")
        if not (ckpt / "diffusion_pytorch_model.safetensors").is_file():
            t0 = time.perf_counter()
            tiny.write(ckpt, layout="official", config=cfg)
            print(f"wrote a random checkpoint to {ckpt} in {time.perf_counter() - t0:.0f} s")
        dit_file = ckpt / "diffusion_pytorch_model.safetensors"
        from safetensors import safe_open

        with safe_open(str(dit_file), "pt") as f:
            params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
        out = Path(tmp) / "engine"
        cmd = [sys.executable, "-m", "wanrt", "export", "--ckpt_dir", str(ckpt), "--out", str(out),
               "--components", "dit", "--precision", args.precision, "--size", "256*256", "--frame_num", "17"]
        t0 = time.perf_counter()
        # Through a small launcher: Linux's peak RSS of a child counts what it held between fork and exec,
        # i.e. this process's pages, and this process just wrote a multi-GB checkpoint (measured: 4.15 GiB
        # reported for an export whose own resident set never passed 0.8 GiB). The launcher is small, so
        # the peak it reads of its one child is the export's own.
        got = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak = int(got.stdout.split()[-1]) * 1024  # KiB on Linux
        manifest = json.loads((out / "manifest.json").read_text())
        exported = next(e["weight_bytes"] for k, e in manifest["graphs"].items() if k.startswith("dit@"))
        result = {"params": params, "checkpoint_bytes": dit_file.stat().st_size, "exported_weight_bytes": exported,
                  "precision": args.precision, "export_peak_rss_bytes": peak, "export_seconds": round(seconds, 1)}
    print(f"DiT parameters:           {params / 1e9:.2f} B")
    print(f"checkpoint (fp32) on disk: {result['checkpoint_bytes'] / 2**30:.2f} GiB")
    print(f"exported weights ({args.precision}):  {exported / 2**30:.2f} GiB")
    print(f"export peak RSS:           {peak / 2**30:.2f} GiB "
          f"({peak / result['checkpoint_bytes']:.2f}x the checkpoint, {peak / exported:.2f}x the exported weights)")
    print(f"export time:               {seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


_LAUNCH = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
