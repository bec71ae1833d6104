"""Bar chart of the subject/baseline ratios, with a mark at each case's target.

A second panel, below, shows the cases with a target on their own value (``target_value``):
each bar is the value over its target (target over value when lower is better), so that 1 is
the target and above 1 is better, labelled with the value itself.

Uses matplotlib when it is installed. Without it, writes a plain PNG itself (zlib + struct):
the same bars and marks, but no text (colours: green PASS, red MISS, blue no target, grey
stub = no subject result; black tick = target; grey line = ratio 1).
"""

from __future__ import annotations

import importlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Rgb = tuple[int, int, int]

_GREEN: Rgb = (46, 160, 67)
_RED: Rgb = (214, 39, 40)
_BLUE: Rgb = (31, 119, 180)
_GREY: Rgb = (170, 170, 170)
_BLACK: Rgb = (0, 0, 0)
_WHITE: Rgb = (255, 255, 255)


@dataclass(frozen=True)
class Bar:
    name: str
    ratio: float | None  # None: no subject result
    target: float | None
    verdict: str  # "PASS", "MISS", "-" or "n/a"


@dataclass(frozen=True)
class ValueBar:
    """A case's own value against its absolute target."""

    name: str
    score: float | None  # value / target (target / value when lower is better); None: no value
    label: str  # the value and its target, in the case's unit
    verdict: str  # "PASS" (target met) or "MISS"


def value_score(value: float, target: float, higher_is_better: bool) -> float:
    """The value against its target, oriented so that 1 is the target and above 1 is better.

    A lower-is-better target of 0 (nothing may be lost) scores 1 when met, 0 otherwise."""
    if higher_is_better:
        return value / target if target > 0 else (1.0 if value >= target else 0.0)
    if value <= 0:
        return 1.0 if target >= value else 0.0
    return target / value


def draw(bars: Sequence[Bar], path: Path, title: str, value_bars: Sequence[ValueBar] = ()) -> bool:
    """Write the chart to ``path``; True if matplotlib drew it, False for the plain fallback."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        path.write_bytes(plain_png(bars, value_bars=value_bars))
        return False

    colours = {"PASS": _GREEN, "MISS": _RED}
    width = max(6.0, 0.8 * max(len(bars), len(value_bars)) + 2)
    if value_bars:
        fig, (ax, vax) = plt.subplots(2, 1, figsize=(width, 9.0))
        _draw_values(vax, value_bars)
    else:
        fig, ax = plt.subplots(figsize=(width, 4.5))
    xs = list(range(len(bars)))
    heights = [b.ratio if b.ratio is not None else 0.0 for b in bars]
    face = [tuple(c / 255 for c in colours.get(b.verdict, _BLUE)) for b in bars]
    ax.bar(xs, heights, color=face, width=0.6)
    for x, b in zip(xs, bars, strict=True):
        if b.target is not None:
            ax.hlines(b.target, x - 0.4, x + 0.4, colors="black", linewidth=2)
        label = f"{b.ratio:.2f}" if b.ratio is not None else "n/a"
        ax.text(x, heights[x], label, ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(xs, [b.name for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("subject / baseline (> 1 is better)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _draw_values(ax: Any, value_bars: Sequence[ValueBar]) -> None:
    colours = {"PASS": _GREEN, "MISS": _RED}
    xs = list(range(len(value_bars)))
    heights = [b.score if b.score is not None else 0.0 for b in value_bars]
    face = [tuple(c / 255 for c in colours.get(b.verdict, _GREY)) for b in value_bars]
    ax.bar(xs, heights, color=face, width=0.6)
    for x, b in zip(xs, value_bars, strict=True):
        ax.hlines(1.0, x - 0.4, x + 0.4, colors="black", linewidth=2)
        ax.text(x, heights[x], b.label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [b.name for b in value_bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("value / absolute target (> 1 is better)")
    ax.set_title("cases with an absolute target (black mark: the target)", fontsize=10)


def plain_png(
    bars: Sequence[Bar],
    width: int = 800,
    height: int = 400,
    value_bars: Sequence[ValueBar] = (),
) -> bytes:
    """The chart as PNG bytes, drawn without any plotting library (and without text); the
    value panel, if any, below the ratio panel, as tall as it."""
    canvas = _Canvas(width, height * 2 if value_bars else height)
    _plain_panel(canvas, 0, height, bars)
    if value_bars:
        as_bars = [
            Bar(b.name, b.score, 1.0, b.verdict if b.score is not None else "n/a")
            for b in value_bars
        ]
        _plain_panel(canvas, height, height, as_bars)
    return canvas.png()


def _plain_panel(canvas: _Canvas, y0: int, height: int, bars: Sequence[Bar]) -> None:
    width = canvas.width
    left, right, top, bottom = 30, 10, y0 + 10, 20
    plot_w, plot_h = width - left - right, height - 10 - bottom
    values = [b.ratio for b in bars if b.ratio is not None]
    values += [b.target for b in bars if b.target is not None]
    y_max = max([1.0, *values]) * 1.15

    def y_of(value: float) -> int:
        return top + plot_h - round(min(value, y_max) / y_max * plot_h)

    base = y_of(0.0)
    for x in range(left, left + plot_w, 8):  # dashed line at ratio 1
        canvas.rect(x, y_of(1.0), x + 4, y_of(1.0) + 1, _GREY)
    slot = plot_w / max(1, len(bars))
    for i, b in enumerate(bars):
        x0 = left + round(i * slot + slot * 0.2)
        x1 = left + round(i * slot + slot * 0.8)
        if b.ratio is None:
            canvas.rect(x0, base - 3, x1, base, _GREY)
        else:
            colour = {"PASS": _GREEN, "MISS": _RED}.get(b.verdict, _BLUE)
            canvas.rect(x0, y_of(b.ratio), x1, base, colour)
        if b.target is not None:
            t = y_of(b.target)
            canvas.rect(left + round(i * slot + slot * 0.1), t - 1,
                        left + round(i * slot + slot * 0.9), t + 2, _BLACK)  # fmt: skip
    canvas.rect(left, base, left + plot_w, base + 2, _BLACK)  # x axis
    canvas.rect(left - 2, top, left, base + 2, _BLACK)  # y axis


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(_WHITE) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: Rgb) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 >= x1:
            return
        row = bytes(colour) * (x1 - x0)
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def png(self) -> bytes:
        stride = self.width * 3
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height)
        )
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b"")
        )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
