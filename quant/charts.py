"""Simple, readable bar charts drawn with Pillow into ComfyUI IMAGE tensors ([1, H, W, 3] float in [0, 1])."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_GRID = (225, 225, 225)
_PALETTE = ((66, 114, 196), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96))


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    intervals: Sequence[tuple[float, float]] | None = None,
    colors: Sequence[int] | None = None,
    value_format: str = "{:.3g}",
    width: int = 960,
) -> torch.Tensor:
    """Horizontal bar chart, one row per label, top to bottom → fp32 [1, H, W, 3] in [0, 1].

    values must be finite and >= 0 (errors, ratios). intervals: optional (low, high) whiskers per bar
    (e.g. 95% CIs). colors: optional palette index per bar (to tell variants apart).
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(labels) != len(values) or (intervals is not None and len(intervals) != len(values)):
        raise ValueError("bar_chart: labels, values and intervals must have the same length")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError("bar_chart: values must be finite and non-negative")
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=18)
    row, top, bottom = 24, 48, 28
    label_width = min(max((int(font.getlength(str(label))) for label in labels), default=0) + 16, width // 2)
    value_width = 90
    plot_left, plot_right = label_width, width - value_width
    height = top + row * max(len(labels), 1) + bottom
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), title, fill=_TEXT, font=title_font)

    highs = [v if intervals is None else max(v, intervals[i][1]) for i, v in enumerate(values)]
    scale_max = max([h for h in highs if math.isfinite(h)], default=0.0) or 1.0
    span = plot_right - plot_left

    def x_of(v: float) -> float:
        return plot_left + span * min(max(v, 0.0), scale_max) / scale_max

    for tick in range(5):
        x = plot_left + span * tick / 4
        draw.line([(x, top - 4), (x, height - bottom)], fill=_GRID)
        draw.text(
            (x - 14, height - bottom + 6), value_format.format(scale_max * tick / 4), fill=_TEXT, font=font
        )
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * row
        text = str(label)
        while font.getlength(text) > label_width - 12 and len(text) > 4:
            text = "…" + text[2:]
        draw.text((6, y + 4), text, fill=_TEXT, font=font)
        color = _PALETTE[(colors[i] if colors is not None else 0) % len(_PALETTE)]
        draw.rectangle([plot_left, y + 4, max(x_of(value), plot_left + 1), y + row - 4], fill=color)
        if intervals is not None:
            low, high = intervals[i]
            mid = y + row / 2
            draw.line([(x_of(low), mid), (x_of(high), mid)], fill=_TEXT, width=2)
            for end in (low, high):
                draw.line([(x_of(end), mid - 5), (x_of(end), mid + 5)], fill=_TEXT, width=2)
        draw.text((x_of(highs[i]) + 6, y + 4), value_format.format(value), fill=_TEXT, font=font)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.copy())[None]
