"""The denoising step: DiT batch-2 CFG call + guidance + scheduler update, on static buffers.

Everything that depends only on the request (context of both prompts, CLIP tokens, the conditioning
latent y, and for the eager DiT their embeddings and the timestep embeddings of the whole schedule) is
placed into fixed buffers once. A step reads the step index `k` from a device tensor, gathers its
timestep, calls the DiT once, combines `uncond + g * (cond - uncond)`, updates the latent in place
with the scheduler's precomputed coefficients and increments `k`: no host logic, no shape logic, no
new buffers of our own. On CUDA the whole step is captured once as a CUDA graph and replayed.

With a step cache (runtime/cache.py) the request's decisions are known before the loop: a computed
step calls the DiT and stores every branch's prediction, a cached step reuses it. Each kind of step is
its own CUDA graph.
"""

from __future__ import annotations

import threading

import torch

_SIDE: dict[torch.device, tuple[torch.cuda.Stream, threading.Lock]] = {}
_SIDE_LOCK = threading.Lock()


def side_stream(device: torch.device) -> tuple[torch.cuda.Stream, threading.Lock]:
    """The one stream per device that warms up and captures every request's step graphs, and the lock that
    keeps two threads' captures apart on it. One stream, not one per request: cuBLAS keeps a workspace for
    each (handle, stream) it has met until the process ends, so a fresh stream per request left more
    memory allocated after every request (32 MiB on an H200; memory that `empty_cache` cannot return)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _SIDE_LOCK:
        if device not in _SIDE:
            _SIDE[device] = (torch.cuda.Stream(device), threading.Lock())
        return _SIDE[device]


class Cancelled(Exception):
    """The request was cancelled between two denoising steps."""


class CFGStep:
    """Advances `self.latent` (1, 16, T, h, w) fp32 from sigma_k to sigma_{k+1} in place, k = 0, 1, ..."""

    def __init__(self, dit, context: torch.Tensor, clip_fea: torch.Tensor, y: torch.Tensor, guide_scale: float,
                 scheduler, latent: torch.Tensor, cache_plan: list[bool] | None = None):
        device = latent.device
        self.device = device
        self.guide_scale = torch.tensor(float(guide_scale), device=device)  # a tensor: no per-step scalar boxing
        self.latent = latent.to(torch.float32).contiguous().clone()
        self.batch = context.shape[0]  # 2: [cond, uncond] with CFG; 1: the cond branch only (guidance 1.0)
        if self.batch not in (1, 2):
            raise ValueError(f"the DiT step runs batch 2 (CFG) or 1 (no CFG), got a context of batch {self.batch}")
        self.x = torch.empty((self.batch, *self.latent.shape[1:]), dtype=torch.float32, device=device)
        self.t = torch.empty(self.batch, dtype=torch.int64, device=device)
        self.k = torch.zeros(1, dtype=torch.int64, device=device)  # the step index, on the device
        self.one = torch.ones(1, dtype=torch.int64, device=device)
        self.context = context.contiguous()  # (B, 512, text_dim): cond[, uncond]
        self.clip_fea = clip_fea.expand(self.batch, *clip_fea.shape[1:]).contiguous()
        self.y = y.expand(self.batch, *y.shape[1:]).contiguous()
        self.guided = torch.empty_like(self.latent)
        self.timesteps = scheduler.timesteps.to(device)
        self.num_steps = len(self.timesteps)
        self.scheduler = scheduler
        self.state = scheduler.init_state(self.latent)
        self.capturable = getattr(dit, "capturable", False)
        if hasattr(dit, "bind"):  # the eager DiT precomputes the request-constant parts once
            self.call = dit.bind(self.context, self.clip_fea, self.y, self.timesteps)
        else:
            def call(x, t):
                return dit(x, t, self.context, self.clip_fea, self.y)

            self.call = call
        self.graph: torch.cuda.CUDAGraph | None = None
        self.cache = None  # a StepCache when some step reuses a prediction
        if cache_plan is not None:
            from wanrt.runtime.cache import StepCache

            if len(cache_plan) != self.num_steps:
                raise ValueError(f"cache plan of {len(cache_plan)} steps for a {self.num_steps}-step schedule")
            self.cache = StepCache(cache_plan, self.x)
        self.dit_calls = 0  # DiT forward calls made (a batched CFG call counts once)

    def step(self, compute: bool = True) -> None:
        """One step at index self.k (device-side); every op is capturable. compute=False: reuse the
        cached prediction instead of calling the DiT (only with a step cache)."""
        torch.index_select(self.timesteps, 0, self.k, out=self.t[:1])
        self.t[1:].copy_(self.t[:1])
        self.x.copy_(self.latent.expand_as(self.x))
        if compute:
            pred = self.call(self.x, self.t)  # (B, 16, T, h, w)
            if self.cache is not None:
                self.cache.store(self.x, pred)
        else:
            pred = self.cache.predict(self.x)
        if self.batch == 2:
            torch.sub(pred[0:1], pred[1:2], out=self.guided)
            self.guided.mul_(self.guide_scale).add_(pred[1:2])
        else:  # no CFG: the cond prediction is the guided one (uncond + 1 * (cond - uncond))
            self.guided.copy_(pred)
        self.scheduler.step_with_state(self.k, self.guided, self.latent, self.state)
        self.k.add_(self.one)

    def run(self, cuda_graph: bool = True, cancel: threading.Event | None = None, progress=None) -> torch.Tensor:
        """All steps. On CUDA (and cuda_graph, and a DiT backend that can be captured): step 0 runs
        eagerly on a side stream (it is also the warm-up), step 1 is captured, and the graph is
        replayed for steps 1..n-1. With a step cache the same happens per kind of step: the first
        computed and the first cached step run eagerly, then each kind is captured once and replayed."""
        use_graph = cuda_graph and self.capturable and self.device.type == "cuda" and self.num_steps > 1
        plan = self.cache.plan if self.cache is not None else [True] * self.num_steps
        graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # one per kind of step: computed, cached
        for i in range(self.num_steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after {i} of {self.num_steps} steps")
            kind = plan[i]
            if use_graph and kind in graphs:
                graphs[kind].replay()
            elif use_graph and kind in plan[i + 1:]:  # first of its kind, and it recurs: run it, then capture
                side, lock = side_stream(self.device)
                with lock:
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        self.step(kind)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graphs[kind] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graphs[kind], stream=side):
                        self.step(kind)  # recorded, not run: the state still holds this step's result
                if kind:
                    self.graph = graphs[kind]
            else:
                self.step(kind)
            self.dit_calls += kind
            if progress is not None:
                progress()
        return self.latent
