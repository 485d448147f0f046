"""Presenting a bench Report: the ratio-to-eager summary, a rich table, JSON and a PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import Report, Row


def _time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _flops(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} FLOP"


def _psnr(row: Row) -> str:
    if row.backend == "eager":
        return "ref"
    if row.psnr is None:
        return "identical" if row.max_abs_err == 0 else "-"
    return f"{row.psnr:.1f}"


def summary_lines(report: Report) -> list[str]:
    """One line per component: each backend's speed relative to eager (the headline), first."""
    lines = []
    for component in report.settings["components"]:
        parts = []
        for row in (r for r in report.rows if r.component == component and r.backend != "eager"):
            if row.ok and row.speedup_vs_eager is not None:
                parts.append(f"{row.backend} {row.speedup_vs_eager:.2f}x eager")
            elif row.ok:
                parts.append(f"{row.backend} {_time(row.median_s)} (no eager reference)")
            else:
                parts.append(f"{row.backend} {row.status.split(':', 1)[0]}")
        eager = next((r for r in report.rows if r.component == component and r.backend == "eager"), None)
        head = f"{component}: eager {_time(eager.median_s)}" if eager is not None and eager.ok else f"{component}:"
        lines.append(head + ("; " + "; ".join(parts) if parts else ""))
    return lines


def table(report: Report):
    """A rich Table: one row per (component, backend)."""
    from rich.table import Table

    s = report.settings
    title = (f"wanrt bench: {s['config']} {s['size'][0]}*{s['size'][1]} x {s['frame_num']} frames "
             f"({s['tokens']} tokens), {s['precision']}, {report.device.label}")
    t = Table(title=title, title_justify="left")
    for col, justify in (("component", "left"), ("backend", "left"), ("vs eager", "right"), ("median", "right"),
                         ("min", "right"), ("max", "right"), ("FLOPs", "right"), ("TFLOP/s", "right"),
                         ("% peak", "right"), ("peak mem", "right"), ("+call mem", "right"), ("PSNR dB", "right"),
                         ("max |err|", "right"), ("rel L2", "right"), ("gate", "left"), ("status", "left")):
        t.add_column(col, justify=justify)
    for row in report.rows:
        ok = row.ok
        t.add_row(
            row.component, row.backend,
            f"{row.speedup_vs_eager:.2f}x" if row.speedup_vs_eager is not None else "-",
            _time(row.median_s), _time(min(row.times_s)) if ok else "-", _time(max(row.times_s)) if ok else "-",
            _flops(row.flops),
            f"{row.tflops:.3g}" if row.tflops is not None else "-",
            f"{row.pct_peak:.1f}" if row.pct_peak is not None else ("n/a" if ok else "-"),
            _bytes(row.memory.get("peak_bytes")) if ok else "-",
            _bytes(row.memory.get("delta_bytes")) if ok else "-",
            _psnr(row) if ok else "-",
            f"{row.max_abs_err:.3g}" if row.max_abs_err is not None else "-",
            f"{row.rel_l2:.2e}" if row.rel_l2 is not None else "-",
            _gate(row),
            _short_status(row),
        )
    return t


def _gate(row: Row) -> str:
    """The quality gate's verdict (bench.runner.QUALITY_GATE): pass, FAIL, or - where no gate applies."""
    if row.quality is None:
        return "-"
    return "pass" if row.quality == "pass" else "[red]FAIL[/red]"


def _short_status(row: Row) -> str:
    """The table says ok / unavailable / failed; the reasons follow it in full (they are long)."""
    if row.status == "ok":
        return "ok"
    kind = row.status.split(":", 1)[0]
    return f"[yellow]{kind}[/yellow]" if kind == "unavailable" else f"[red]{kind}[/red]"


def reasons(report: Report) -> list[str]:
    """'backend: status' once per backend and reason (the same reason usually covers every component)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for row in report.rows:
        if row.status != "ok":
            seen.setdefault((row.backend, row.status), []).append(row.component)
    return [f"{backend} ({', '.join(comps)}): {status}" for (backend, status), comps in seen.items()]


def print_report(report: Report, console=None) -> None:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped to a file or a log: the default 80 columns would wrap every cell
            console = Console(width=180)
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False)
    console.print(table(report))
    for line in reasons(report):
        console.print(line, markup=False, highlight=False)
    for r in report.rows:
        if r.quality not in (None, "pass"):
            console.print(f"quality gate: {r.backend} {r.component}: {r.quality}", markup=False, highlight=False)
    profiled = [r for r in report.rows if r.profile]
    if profiled:
        from .profile import format_line

        console.print("per-op-class breakdown of one call (profiler self time; elementwise GB/s estimated):",
                      markup=False, highlight=False)
        for r in profiled:
            console.print("  " + format_line(r.backend, r.component, r.profile), markup=False, highlight=False)
    mem = next((r.memory.get("kind") for r in report.rows if r.memory), None)
    if mem:
        what = {"cuda": "torch CUDA allocator peak during the call",
                "rss": "process resident set peak during the call (all backends' weights are resident)",
                "rss_lifetime": "process lifetime peak RSS (the OS cannot reset it per call)"}[mem]
        console.print(f"peak mem: {what}; +call mem: its rise over the memory in use before the call; "
                      "PSNR: peak = eager output's value range (255 for e2e frames); gate: dit_step rel L2 <= 2e-2, "
                      "e2e video PSNR >= 30 dB vs eager",
                      markup=False, highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


def _clean(value):
    """JSON has no inf/nan: they become null (PSNR of identical outputs, a diverged output's error)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report.to_dict()), indent=2, allow_nan=False) + "\n")
    return path


def plot(report: Report, path: str | Path) -> Path | None:
    """Bar chart of median time per backend, one panel per component, min-max whiskers; None without
    matplotlib (an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    components = report.settings["components"]
    ncols = min(3, len(components))
    nrows = -(-len(components) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(components):]:
        ax.set_visible(False)
    colors = {"eager": "#7f7f7f", "onnxruntime": "#1f77b4", "aoti": "#2ca02c", "tensorrt": "#d62728"}
    for ax, component in zip(axes.flat, components):
        rows = [r for r in report.rows if r.component == component]
        labels, medians, lo, hi, cols = [], [], [], [], []
        for r in rows:
            labels.append(r.backend)
            if r.ok:
                m = r.median_s
                medians.append(m)
                lo.append(m - min(r.times_s))
                hi.append(max(r.times_s) - m)
            else:
                medians.append(0.0)
                lo.append(0.0)
                hi.append(0.0)
            cols.append(colors.get(r.backend, "#9467bd"))
        scale, unit = (1.0, "s") if max(medians, default=0) >= 1 else (1e3, "ms")
        xs = range(len(rows))
        ax.bar(xs, [m * scale for m in medians], yerr=[[v * scale for v in lo], [v * scale for v in hi]],
               color=cols, capsize=4)
        ax.set_xticks(list(xs), labels, rotation=20)
        ax.set_ylabel(f"median time per call ({unit})")
        ax.set_title(component)
        ax.margins(y=0.15)  # headroom for the labels above the whiskers
        for x, r, m, up in zip(xs, rows, medians, hi):
            if r.ok:
                text = f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager is not None else ""
            else:
                text = r.status.split(":")[0]  # "unavailable" / "failed"
            ax.annotate(text, (x, (m + up) * scale), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
    s = report.settings
    fig.suptitle(f"{s['config']} {s['size'][0]}*{s['size'][1]}x{s['frame_num']}, {s['precision']}, "
                 f"{report.device.label}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
