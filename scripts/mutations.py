"""Does the test suite notice when a feature is switched off? Mutation check for issue 19.

Each mutation below breaks one feature the README promises, in a way that still runs (no crash, no import
error): the request lock made a no-op, the `sequential` memory policy planned like `resident`, tensor
parallel / Ulysses / CFG-parallel replaced by the identity, the DiT's time table computed in fp32, FP8
fake-quantisation made the identity, the engine dir's manifest lock or its merge switched off, the ONNX
Runtime backend silently running the eager modules.

For each one the tracked and untracked (not ignored) files of this checkout are copied to a temporary
folder, the edit is applied there (never to the checkout itself), and only the test files that cover the
feature are run. A mutation is KILLED when pytest reports failing tests (exit code 1); any other outcome
(passes, or pytest cannot collect/run: exit codes 2-5) is reported as SURVIVED or BROKEN.

    python scripts/mutations.py                 # all mutations
    python scripts/mutations.py fp8 lock        # some of them (names below)
    python scripts/mutations.py --baseline      # also run each selection unmutated (it must pass)
    python scripts/mutations.py --list
Exit status: 0 when every selected mutation is killed (and every baseline passes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]  # (file, old text (must occur exactly once), new text)
    tests: tuple[str, ...]  # pytest arguments: the test files (and -k filters) that cover the feature


def before(file: str, anchor: str, text: str) -> tuple[str, str, str]:
    """An edit that inserts `text` just before `anchor`."""
    return file, anchor, text + anchor


ORT_EAGER = '''        from wanrt.export.graphs import graph_module
        from wanrt.models.loading import load as _load

        _models = _load(m.data["checkpoint"]["path"])

        def _eager(mod):
            def call(*tensors):
                with torch.no_grad():
                    out = mod(*tensors)
                return list(out) if isinstance(out, (list, tuple)) else [out]

            return call

        loaded = {g: _eager(graph_module(g, _models, target)) for g in graphs}
'''

MUTATIONS = (
    Mutation("lock", "the pipeline's request lock is a no-op",
             (("wanrt/pipeline.py", "self._lock = threading.Lock()",
               "self._lock = __import__('contextlib').nullcontext()"),),
             ("tests/test_runtime.py", "-k", "threads")),
    Mutation("sequential", "the `sequential` memory policy plans like `resident`",
             (("wanrt/runtime/memory.py", 'if name == "dit" or self.mode == "resident":',
               'if name == "dit" or self.mode in ("resident", "sequential"):'),),
             ("tests/test_runtime.py", "-k", "memory")),
    Mutation("tp", "tensor parallelism (DiT and T5) is the identity",
             (before("wanrt/parallel/tp.py", "    if model.cfg.ffn_dim % axis.size:\n", "    return model\n"),
              before("wanrt/parallel/tp.py", "    m = encoder.model\n", "    return encoder\n")),
             ("tests/test_parallel.py", "-k", "parity or share")),
    Mutation("ulysses", "Ulysses sequence parallelism is the identity",
             (before("wanrt/parallel/ulysses.py", "    if model.cfg.num_heads % axis.size:\n", "    return model\n"),),
             ("tests/test_parallel.py", "-k", "parity or share")),
    Mutation("cfg", "CFG parallelism is the identity (each rank runs the whole batch-2 call)",
             (before("wanrt/parallel/cfg.py", "        i = slice(self.axis.rank, self.axis.rank + 1)\n",
                     "        return self.dit(x, t, context, clip_fea, y)\n"),),
             ("tests/test_parallel.py", "-k", "parity or share")),
    Mutation("sinusoid", "the DiT's time table is computed in fp32 instead of float64",
             (("wanrt/models/dit.py", "sinusoidal_embedding(torch.arange(cfg.num_train_timesteps + 1), cfg.freq_dim)",
               "sinusoidal_embedding(torch.arange(cfg.num_train_timesteps + 1), cfg.freq_dim, dtype=torch.float32)"),),
             ("tests/test_dit.py",)),
    Mutation("fp8", "FP8 fake-quantisation is the identity",
             (before("wanrt/export/fp8.py", "    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX)", "    return x\n"),),
             ("tests/test_fp8.py",)),
    Mutation("dir_lock", "the engine dir's manifest lock is a no-op (concurrent saves interleave)",
             (("wanrt/engine/manifest.py", "        with _dir_lock(self.root):\n",
               "        with contextlib.nullcontext():\n"),),
             ("tests/test_engine_layer.py", "-k", "writer")),
    Mutation("merge", "a manifest save writes this process's view (another build's entries are dropped)",
             (("wanrt/engine/manifest.py", "            disk = _read(self.root / NAME)\n",
               "            disk = None\n"),),
             ("tests/test_engine_layer.py", "-k", "writer")),
    Mutation("ort_eager", "the onnxruntime backend silently runs the eager modules",
             (("wanrt/runtime/backends.py", "        loaded = load_graphs(engine_dir, target, device, graphs)\n",
               ORT_EAGER),),
             ("tests/test_runtime.py", "-k", "every_backend and onnxruntime")),
)


def copy_tree(dst: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files (what `git status` would show)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def apply(tree: Path, mutation: Mutation) -> None:
    for rel, old, new in mutation.edits:
        path = tree / rel
        text = path.read_text()
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"error: mutation {mutation.name}: expected the text once in {rel}, found it {n} times "
                             "(the code changed: update scripts/mutations.py)")
        path.write_text(text.replace(old, new))


def run_tests(tree: Path, tests: tuple[str, ...], log: Path) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("WANRT_CACHE", None)  # tests/conftest.py gives each run its own cache
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--baseline", action="store_true", help="also run each selection on the unmutated copy")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--logs", default=None, help="folder for the pytest logs (default: a temp folder)")
    args = ap.parse_args()
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<12} {m.what}  [{' '.join(m.tests)}]")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        raise SystemExit(f"error: unknown mutation(s) {unknown}; choose from {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTATIONS)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="wanrt-mutations-"))
    logs.mkdir(parents=True, exist_ok=True)
    ok = True
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"wanrt-mut-{m.name}-") as tmp:
            tree = Path(tmp)
            copy_tree(tree)
            if args.baseline:
                rc, secs = run_tests(tree, m.tests, logs / f"{m.name}.baseline.log")
                print(f"{m.name:<12} baseline  {'passes' if rc == 0 else f'FAILS (exit {rc})'} in {secs:.0f} s",
                      flush=True)
                ok &= rc == 0
            apply(tree, m)
            rc, secs = run_tests(tree, m.tests, logs / f"{m.name}.log")
        verdict = {0: "SURVIVED", 1: "killed"}.get(rc, f"BROKEN (pytest exit {rc})")
        print(f"{m.name:<12} {verdict:<9} in {secs:4.0f} s: {m.what}  [{' '.join(m.tests)}]", flush=True)
        ok &= rc == 1
    print(f"logs: {logs}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
