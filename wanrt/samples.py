"""Built-in sample frames for the demo: a dark bird low on the left, then high on the right (4:3).

They are drawn by the same renderer as the synthetic clips the built-in `tiny` model was trained on
(wanrt/tiny/data.py: a sprite over a two-colour gradient), at 64x48 by default, so the demo is in the
model's distribution: `wanrt generate --ckpt_dir tiny --size 64*64` shows the bird flying between them.
Deterministic; the package ships no binary images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SAMPLE_PROMPT = "a large dark bird flies up and to the right"

_SKY, _GRASS = (70, 130, 215), (150, 205, 120)  # the gradient's top and bottom colours
_BIRD = (35, 35, 40)


def sample_background(width: int = 64, height: int = 48) -> np.ndarray:
    """(H, W, 3) uint8: the sample frames without the bird (to find the bird in a generated video)."""
    from wanrt.tiny.data import gradient

    return np.clip(np.rint(gradient(width, height, _SKY, _GRASS, np.pi / 2)), 0, 255).astype(np.uint8)


def sample_frames(width: int = 64, height: int = 48) -> tuple[Image.Image, Image.Image]:
    """(first, last): the bird near the bottom left, then near the top right, at any size (sprite sizes
    scale with max(width, height) / 64, as in the training clips)."""
    from wanrt.tiny.data import SIZE, gradient, render

    u = max(width, height) / SIZE
    background = gradient(width, height, _SKY, _GRASS, np.pi / 2)
    centers = np.array([[0.27 * width, 0.68 * height], [0.72 * width, 0.32 * height]])
    first, last = render(background, "bird", centers, 7.0 * u, 1.0, _BIRD)
    return Image.fromarray(first), Image.fromarray(last)
