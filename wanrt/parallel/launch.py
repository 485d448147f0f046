"""Running as one of N processes: `torchrun --nproc_per_node=N -m wanrt generate ...` or
`wanrt generate --nproc N` (which starts the same N processes itself, see `spawn`).

A process learns its place from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). `session()` opens the process group (NCCL on CUDA, one GPU per local rank; gloo on the
CPU) and always closes it. Decisions that must be identical everywhere (the seed, the output path)
are taken on rank 0 and broadcast (`Session.on_main`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class LaunchEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def env_rank() -> LaunchEnv:
    """This process's place from the launcher's environment; (0, 1, 0) when launched alone."""
    return LaunchEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


@dataclass(frozen=True)
class Session:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # the device this rank must use; None: the caller's choice

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0; its result on every rank. If it raises, every rank raises the same error
        (so all ranks stop together instead of waiting for rank 0 in a collective)."""
        if self.world_size == 1:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                box[0] = (False, e if _picklable(e) else RuntimeError(str(e)))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value


def _picklable(obj) -> bool:
    try:  # round trip: exceptions with extra __init__ arguments pickle but fail to unpickle
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def session(device: str | None = None) -> Iterator[Session]:
    """The process group of this run for the duration of the block; a no-op when launched alone.

    device: the user's --device; "cpu..." forces gloo on the CPU even where CUDA exists. With CUDA,
    rank r uses cuda:LOCAL_RANK (one GPU per process, as torchrun lays them out).
    """
    rank, world, local = env_rank()
    if world == 1:
        yield Session()
        return
    use_cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        yield Session(rank=rank, world_size=world, local_rank=local, device=dev)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- --nproc spawning


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(nproc: int, cmd: Sequence[str], *, cwd: str | None = None, timeout: float | None = None,
          grace: float = 5.0) -> int:
    """Run `cmd` as ranks 0..nproc-1 of a localhost job (torchrun's environment) and wait.

    Rank 0 keeps this process's stdout/stderr; the other ranks' stderr goes to temporary files and is
    shown only when such a rank fails on its own. When any rank fails the others are stopped (a rank
    left waiting in a collective would otherwise hang), after `grace` seconds for rank 0 to report the
    error itself. Returns the job's exit code (124 on timeout).
    """
    port = free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))  # what torchrun would do: no oversubscription
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        logs = [None] + [stack.enter_context(tempfile.TemporaryFile()) for _ in range(1, nproc)]
        stack.callback(_stop, procs)  # registered last, so it runs first: children stop before logs close
        for r in range(nproc):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                       WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
            env.setdefault("OMP_NUM_THREADS", threads)
            procs.append(subprocess.Popen(list(cmd), env=env, cwd=cwd, stderr=logs[r]))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return 0
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: the {nproc}-process job timed out after {timeout:.0f} s", file=sys.stderr)
                return 124
            time.sleep(0.05)
        culprit = failed[0]
        if culprit != 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[0].wait(timeout=grace)
        if procs[0].poll() not in (None, 0):
            return procs[0].returncode  # rank 0 printed the error
        print(f"error: rank {culprit}: {_last_error(logs[culprit], culprit)}", file=sys.stderr)
        return procs[culprit].returncode or 1


def _stop(procs: list[subprocess.Popen]) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    for p in alive:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _last_error(log, rank: int) -> str:
    """The rank's last `error: ...` line (the CLI writes `error: rank r: ...`), else its last line."""
    log.seek(0)
    lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = (errors or lines or ["exited without a message"])[-1]
    return line.removeprefix("error:").strip().removeprefix(f"rank {rank}:").strip()


def command_argv(ctx, drop: Sequence[str] = ("nproc",)) -> list[str]:
    """The arguments that re-run a (typer or click) context's command with the values it parsed
    (options at their default are left out), minus the options named in `drop`."""
    argv = [ctx.info_name]
    for p in ctx.command.params:
        if getattr(p, "param_type_name", None) != "option" or p.name in drop:
            continue
        value = ctx.params.get(p.name)
        if getattr(p, "multiple", False):  # a repeatable option (--lora a --lora b): each value, none if empty
            for item in value or ():
                argv += [p.opts[0], str(item)]
            continue
        if value is None or value == p.default:
            continue
        if p.is_flag:
            if value:
                argv.append(p.opts[0])
            elif p.secondary_opts:
                argv.append(p.secondary_opts[0])
        else:
            argv += [p.opts[0], str(value)]
    return argv
