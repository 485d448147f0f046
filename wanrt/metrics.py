"""Quality metrics shared by tests, benchmarks and `wanrt bench`."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 (or same-scale) arrays; inf when identical."""
    if a.shape != b.shape:
        raise ValueError(f"psnr of different shapes {a.shape} and {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
