"""Built-in sample frames for the demo: a bird on the ground, then the same bird high in the sky (4:3).

Drawn on the fly with PIL (deterministic), so the package ships no binary images.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

SAMPLE_PROMPT = "a bird takes off from the ground and flies high into the sky"


def _scene(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    horizon = int(height * 0.72)
    for y in range(horizon):  # sky gradient, deep blue at the top to pale near the horizon
        t = y / max(horizon - 1, 1)
        draw.line([(0, y), (width, y)], fill=(int(60 + 120 * t), int(120 + 100 * t), int(200 + 50 * t)))
    for y in range(horizon, height):  # grass
        t = (y - horizon) / max(height - horizon - 1, 1)
        draw.line([(0, y), (width, y)], fill=(int(70 - 30 * t), int(140 - 40 * t), int(60 - 20 * t)))
    r = height // 10
    draw.ellipse([width - 3 * r, r // 2, width - r, 2 * r + r // 2], fill=(255, 230, 120))  # sun
    return img


def _bird(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, wings_up: bool) -> None:
    body = (40, 40, 45)
    draw.ellipse([cx - 1.2 * s, cy - 0.5 * s, cx + 1.2 * s, cy + 0.5 * s], fill=body)
    draw.ellipse([cx + 0.8 * s, cy - 0.9 * s, cx + 1.6 * s, cy - 0.1 * s], fill=body)  # head
    draw.polygon([(cx + 1.6 * s, cy - 0.55 * s), (cx + 2.1 * s, cy - 0.4 * s), (cx + 1.6 * s, cy - 0.3 * s)],
                 fill=(240, 170, 40))  # beak
    tip = cy - 1.8 * s if wings_up else cy + 0.2 * s
    draw.polygon([(cx - 0.6 * s, cy - 0.2 * s), (cx + 0.4 * s, cy - 0.2 * s), (cx - 0.4 * s, tip)], fill=(70, 70, 80))


def sample_frames(width: int = 320, height: int = 240) -> tuple[Image.Image, Image.Image]:
    """(first, last): the bird standing on the grass at the left, then flying high at the right."""
    first, last = _scene(width, height), _scene(width, height)
    s = height / 18
    _bird(ImageDraw.Draw(first), width * 0.25, height * 0.72 - 0.6 * s, s, wings_up=False)
    _bird(ImageDraw.Draw(last), width * 0.68, height * 0.25, s, wings_up=True)
    return first, last
