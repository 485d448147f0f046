"""Flow-matching samplers of the official Wan2.1 pipeline, as precomputed linear-combination tables.

Both official solvers (UniPC bh2 with the UniC corrector, and DPM-Solver++ 2M) are linear multistep
methods: every quantity they produce is a linear combination of the current sample, the model output and a
few remembered tensors, with weights that depend only on the sigma grid. We therefore compute all weights
once, at ``set_timesteps``, in float64, and a step is a handful of in-place multiply-adds with no host
logic. That is what lets the runtime capture DiT + guidance + scheduler update in one CUDA graph and replay
it with a device-side step index.

Reference: wan/utils/fm_solvers_unipc.py and wan/utils/fm_solvers.py in Wan-Video/Wan2.1 (see
docs spec section 7). Our own implementation; tests/_vendor holds the official code as the test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Columns of ``coefficients`` (one row per step k). One step, with x = sample, v = model output:
#   m  = x - SIGMA * v                                                   x0 prediction at sigma_k
#   xc = C_X*x + C_M*m + C_M1*m_prev + C_M2*m_prev2 + C_XL*x_last         UniC corrector (identity if none)
#   x' = P_X*xc + P_M*m + P_M1*m_prev                                     predictor -> sample at sigma_{k+1}
#   then x_last <- xc, m_prev2 <- m_prev, m_prev <- m
SIGMA, C_X, C_M, C_M1, C_M2, C_XL, P_X, P_M, P_M1 = range(9)
NUM_COLUMNS = 9


def shift_sigmas(s, shift: float):
    """The flow-matching timestep shift, sigma' = shift * s / (1 + (shift - 1) * s), for numpy arrays or
    tensors alike (the samplers shift their grid with it; the tiny model's training draws sigmas with it)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass
class SchedulerState:
    """Preallocated per-run tensors, all updated in place by ``step_with_state``.

    ``m``, ``m_prev``, ``m_prev2``: x0 predictions at steps k, k-1, k-2; ``x_last``: the (corrected)
    sample the previous predictor started from; ``coefficients``: the scheduler's table on the sample's
    device; ``row``: (1, NUM_COLUMNS) scratch that receives the current row when k is a device tensor.
    Buffers start at zero so that the zero weights of not-yet-existing history never multiply garbage.
    """

    coefficients: torch.Tensor
    row: torch.Tensor
    m: torch.Tensor
    m_prev: torch.Tensor
    m_prev2: torch.Tensor
    x_last: torch.Tensor


class _LinearMultistepScheduler:
    """Shared machinery: sigma grid, timesteps, coefficient table and the table-driven step.

    After ``set_timesteps(n)``: ``timesteps`` (n,) int64 (what the DiT is fed: sigma*1000 truncated),
    ``sigmas`` (n+1,) float32 ending in 0, ``coefficients`` (n, NUM_COLUMNS) float32 with the column
    meaning documented at the top of this module (SIGMA, C_*, P_* constants).
    """

    sigma_max: float  # top of the unshifted grid; differs between the two official code paths

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 16.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None,
                      timesteps=None) -> None:
        """Build the schedule and coefficient table for ``num_inference_steps``; resets all step state.

        ``timesteps``: an explicit descending list in (0, num_train_timesteps] (e.g. 1000, 750, 500, 250 for
        4-step distilled models) instead of the solver's uniform grid; it sets the step count and, like the
        grid, is shifted by ``shift`` (sigma = shift(t / T), the LightX2V / Self-Forcing convention; shift 1
        takes the values as given). The last step always ends at sigma 0."""
        if timesteps is not None:
            s = check_timesteps(timesteps, self.num_train_timesteps) / self.num_train_timesteps
            n = len(s)
        else:
            n = int(num_inference_steps)
            if n < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            s = np.linspace(self.sigma_max, 0.0, n + 1)[:-1]
        s = shift_sigmas(s, self.shift)
        # Official: int64 cast of the float64 sigma*T (truncation), while the math uses float32 sigmas.
        self.timesteps = torch.from_numpy(s * self.num_train_timesteps).to(device=device, dtype=torch.int64)
        sig32 = np.concatenate([s, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sig32)
        # The weights are derived from the float32-rounded sigmas, exactly the values the official code uses.
        sig = sig32.astype(np.float64)
        with np.errstate(divide="ignore"):
            lam = np.log(1.0 - sig) - np.log(sig)  # log-SNR; +inf at sigma=0, -inf at sigma=1
        table = self._build_table(sig, lam)
        if not np.isfinite(table).all():
            raise ValueError(f"non-finite scheduler coefficients for steps={n}, shift={self.shift}")
        self.coefficients = torch.from_numpy(table.astype(np.float32))
        self.num_inference_steps = n
        self._step_index = 0
        self._state: SchedulerState | None = None

    def _build_table(self, sig: np.ndarray, lam: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _predictor_table(sig: np.ndarray) -> np.ndarray:
        """The start of a table for a solver without a corrector: each step's sigma, C_* the identity."""
        t = np.zeros((len(sig) - 1, NUM_COLUMNS))
        t[:, SIGMA] = sig[:-1]
        t[:, C_X] = 1.0
        return t

    def init_state(self, sample: torch.Tensor) -> SchedulerState:
        """Allocate the per-run state for samples like ``sample`` (do this once, before graph capture)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() first")

        def zeros() -> torch.Tensor:
            return torch.zeros_like(sample, memory_format=torch.contiguous_format)

        coeffs = self.coefficients.to(sample.device)
        return SchedulerState(coeffs, coeffs.new_zeros(1, NUM_COLUMNS), zeros(), zeros(), zeros(), zeros())

    def step_with_state(
        self, k: int | torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor, state: SchedulerState
    ) -> torch.Tensor:
        """Advance ``sample`` from sigma_k to sigma_{k+1} IN PLACE (and return it); no allocations.

        ``k`` is a Python int or a (1,) int64 tensor on the sample's device (graph replay). ``state`` comes
        from ``init_state`` and must have seen steps 0..k-1 of this schedule in order.
        """
        if isinstance(k, torch.Tensor):
            torch.index_select(state.coefficients, 0, k.view(1), out=state.row)
            c = state.row[0].unbind(0)
        else:
            c = state.coefficients[k].unbind(0)
        x, m = sample, state.m
        m.copy_(x).addcmul_(model_output, c[SIGMA], value=-1.0)
        x.mul_(c[C_X]).addcmul_(m, c[C_M]).addcmul_(state.m_prev, c[C_M1])
        x.addcmul_(state.m_prev2, c[C_M2]).addcmul_(state.x_last, c[C_XL])
        state.x_last.copy_(x)
        x.mul_(c[P_X]).addcmul_(m, c[P_M]).addcmul_(state.m_prev, c[P_M1])
        state.m_prev2.copy_(state.m_prev)
        state.m_prev.copy_(m)
        return x

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """Official-style call: returns the next sample (a new tensor, same shape/dtype as ``sample``).

        Steps are taken in schedule order with an internal counter; ``timestep`` is accepted for call
        compatibility but not looked up (the official lookup only differs when timesteps repeat, where it
        skips step 0 and then runs off the end of the schedule).
        """
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() first")
        if self._step_index >= self.num_inference_steps:
            raise RuntimeError(f"all {self.num_inference_steps} steps already taken; call set_timesteps()")
        if self._step_index == 0:
            self._state = self.init_state(sample)  # fresh zeroed history for every run
        out = self.step_with_state(self._step_index, model_output, sample.clone(), self._state)
        self._step_index += 1
        return out


class FlowUniPCScheduler(_LinearMultistepScheduler):
    """Official FlowUniPCMultistepScheduler as used by Wan FLF2V (order 2, bh2, x0-prediction, UniC
    corrector at every step k > 0, lower_order_final: order 1 on the first and the last step).

    Grid: linspace(0.999, 0, n+1)[:-1] shifted by ``shift`` (0.999 is float32(1 - 1/T), the ctor's
    sigma_max). Step k uses predictor order p_k = min(2, n - k, k + 1); its corrector uses p_{k-1}.
    Columns of ``coefficients`` and the state tensors: see the module header and ``SchedulerState``.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 16.0):
        super().__init__(num_train_timesteps, shift)
        # The official ctor builds float32 training sigmas; its top one is float32(0.999), not 1.
        self.sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))

    def _build_table(self, sig: np.ndarray, lam: np.ndarray) -> np.ndarray:
        n = len(sig) - 1
        order = [min(2, n - k, k + 1) for k in range(n)]
        t = np.zeros((n, NUM_COLUMNS))
        for k in range(n):
            t[k, SIGMA] = sig[k]
            if k == 0:
                t[k, C_X] = 1.0  # nothing to correct yet
            else:
                # UniC from sigma_{k-1} to sigma_k: re-solves the previous step using m_k as well.
                h = lam[k] - lam[k - 1]
                a, phi = 1.0 - sig[k], np.expm1(-h)  # bh2: B(h) = h*phi_1(h) = expm1(-h)
                if order[k - 1] == 1:
                    r0, r_last, rk = 0.0, 0.5, 1.0  # official shortcut rhos_c = [0.5]
                else:
                    rk = (lam[k - 2] - lam[k - 1]) / h
                    # b_i = h_phi_{i+1} * i! / B(h), the official recursion h_phi <- h_phi / hh - 1/i!
                    hp1 = phi / -h - 1.0
                    hp2 = hp1 / -h - 0.5
                    r0, r_last = np.linalg.solve([[1.0, 1.0], [rk, 1.0]], [hp1 / phi, 2.0 * hp2 / phi])
                t[k, C_XL] = sig[k] / sig[k - 1]
                t[k, C_M] = -a * phi * r_last
                t[k, C_M1] = -a * phi * (1.0 - r_last - r0 / rk)
                t[k, C_M2] = -a * phi * r0 / rk
            # UniP from sigma_k to sigma_{k+1}; at sigma_{k+1}=0 (lambda=+inf) this reduces to x' = m.
            h = lam[k + 1] - lam[k]
            a, phi = 1.0 - sig[k + 1], np.expm1(-h)
            t[k, P_X] = sig[k + 1] / sig[k]
            t[k, P_M] = -a * phi
            if order[k] == 2:
                rk = (lam[k - 1] - lam[k]) / h
                t[k, P_M] += 0.5 * a * phi / rk  # official fixes rhos_p = [0.5] for order 2
                t[k, P_M1] = -0.5 * a * phi / rk
        return t


class FlowDPMSolverScheduler(_LinearMultistepScheduler):
    """Official FlowDPMSolverMultistepScheduler on the ``sample_solver='dpm++'`` path (dpmsolver++,
    midpoint, order 2, final_sigmas_type='zero'; sigmas from get_sampling_sigmas(n, shift)).

    Grid: linspace(1, 0, n+1)[:-1] shifted, so sigma_0 = 1 exactly and timesteps[0] = 1000 (not 999).
    Order 1 on the first and the last step, order 2 (2M midpoint) otherwise. There is no corrector: the
    C_* columns are the identity and ``m_prev2``/``x_last`` only ride along.
    """

    sigma_max = 1.0

    def _build_table(self, sig: np.ndarray, lam: np.ndarray) -> np.ndarray:
        n = len(sig) - 1
        t = self._predictor_table(sig)
        for k in range(n):
            h = lam[k + 1] - lam[k]
            a, em1 = 1.0 - sig[k + 1], np.exp(-h) - 1.0
            t[k, P_X] = sig[k + 1] / sig[k]
            t[k, P_M] = -a * em1
            if 0 < k < n - 1:
                # At k=1, lambda_0 = -inf (sigma_0 = 1) makes r0 infinite and the D1 term vanish, as upstream.
                r0 = (lam[k] - lam[k - 1]) / h
                t[k, P_M] -= 0.5 * a * em1 / r0
                t[k, P_M1] = 0.5 * a * em1 / r0
        return t


class FlowEulerScheduler(_LinearMultistepScheduler):
    """First-order flow-matching Euler, x' = x + (sigma_{k+1} - sigma_k) * v, what step- and CFG-distilled
    Wan models (LightX2V, Self-Forcing/CausVid LoRAs) are trained to be sampled with, usually on an explicit
    4-step list. In x0 form (m = x - sigma_k * v): x' = (sigma_{k+1}/sigma_k) * x + (1 - sigma_{k+1}/sigma_k) * m.
    Grid: linspace(1, 0, n+1)[:-1] shifted, like dpm++; no history, so the C_* and P_M1 columns are identity/zero.
    """

    sigma_max = 1.0

    def _build_table(self, sig: np.ndarray, lam: np.ndarray) -> np.ndarray:
        t = self._predictor_table(sig)
        t[:, P_X] = sig[1:] / sig[:-1]
        t[:, P_M] = 1.0 - t[:, P_X]
        return t


SOLVERS = ("unipc", "dpm++", "euler")


def check_timesteps(timesteps, num_train_timesteps: int = 1000) -> np.ndarray:
    """An explicit timestep list as float64, or a one-line ValueError: non-empty, finite, strictly
    descending, each in (0, num_train_timesteps]."""
    try:
        t = np.asarray([float(v) for v in timesteps], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"timesteps must be a list of numbers, got {timesteps!r}") from None
    if t.size == 0:
        raise ValueError("timesteps is empty; give a descending list such as 1000,750,500,250")
    if not np.isfinite(t).all():
        raise ValueError(f"timesteps must be finite, got {t.tolist()}")
    if t.min() <= 0 or t.max() > num_train_timesteps:
        raise ValueError(f"timesteps must lie in (0, {num_train_timesteps}], got {t.tolist()} "
                         "(the sampler ends at 0 by itself)")
    if (np.diff(t) >= 0).any():
        raise ValueError(f"timesteps must be strictly descending, got {t.tolist()}")
    return t


def make_scheduler(name: str, shift: float) -> _LinearMultistepScheduler:
    """Scheduler for the CLI/runtime solver name: "unipc" (official default), "dpm++" or "euler"."""
    if name == "unipc":
        return FlowUniPCScheduler(shift=shift)
    if name == "dpm++":
        return FlowDPMSolverScheduler(shift=shift)
    if name == "euler":
        return FlowEulerScheduler(shift=shift)
    raise ValueError(f"unknown sample solver {name!r}; expected 'unipc', 'dpm++' or 'euler'")
