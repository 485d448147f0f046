"""Markdown tables for the README's performance section, from `wanrt bench --json` files.

    python benchmarks/table.py benchmarks/results/cpu-tiny.json benchmarks/results/cpu-small.json

One table per file, headed by the device and the exact command that produced it, so every number in
the README can be traced to a JSON file and rerun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _time(s):
    if s is None:
        return "-"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _mib(n):
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def table(doc: dict) -> str:
    s, dev = doc["settings"], doc["device"]
    lines = [f"**{s['config']}** at {s['size'][0]}*{s['size'][1]} x {s['frame_num']} frames ({s['tokens']} tokens), "
             f"{s['precision']}, {dev['label']}; median of {s['repeat']} interleaved runs after {s['warmup']} "
             f"warm-up, torch {doc['versions'].get('torch')}, onnxruntime {doc['versions'].get('onnxruntime', '-')}",
             "", f"`{s['command']}`" if s.get("command") else "", "",
             "| component | backend | vs eager | median | min - max | TFLOP/s | % peak | peak mem (+call) | PSNR dB "
             "| max abs err | rel L2 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        t = r["times"]
        if r["status"] != "ok":
            lines.append(f"| {r['component']} | {r['backend']} | | | | | | | | | {r['status']} |")
            continue
        psnr = "ref" if r["backend"] == "eager" else ("identical" if r["psnr"] is None else f"{r['psnr']:.1f}")
        mem = r["memory"]
        pct = "n/a" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2g}"
        ratio = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        rel = "-" if r.get("rel_l2") is None else f"{r['rel_l2']:.2e}"
        lines.append(
            f"| {r['component']} | {r['backend']} | {ratio} | {_time(t['median_s'])} | "
            f"{_time(t['min_s'])} - {_time(t['max_s'])} | {r['tflops']:.3g} | {pct} | "
            f"{_mib(mem.get('peak_bytes'))} (+{_mib(mem.get('delta_bytes'))}) | {psnr} | {err} | {rel} |")
    profiled = [r for r in doc["results"] if r.get("profile")]
    if profiled:
        lines += ["", "| backend | class | time | share | TFLOP/s | GB/s (est.) |", "|---|---|---:|---:|---:|---:|"]
        for r in profiled:
            for name, c in r["profile"]["classes"].items():
                share = "-" if c["share"] is None else f"{100 * c['share']:.0f}%"
                lines.append(f"| {r['backend']} | {name} | {_time(c['time_s'])} | {share} | "
                             f"{c['tflops'] or '-'} | {c['gbps'] or '-'} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for p in paths:
        print(table(json.loads(Path(p).read_text())))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
