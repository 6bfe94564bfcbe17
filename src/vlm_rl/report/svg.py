"""Inline SVG plots for the run report: line charts (with an optional mean +- std band) and
overlaid histograms, drawn in Python so the page needs no script or chart library.

Every chart is an ``<svg class="chart">`` whose series carry ``data-key`` (the metric) and
``data-last`` (the series' last value, as logged), so a test or a script can read the numbers
back from the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 380, 200
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 26, 34
MAX_POINTS = 800  # a longer series is thinned (evenly, keeping its last point)
SMOOTH_FROM = 60  # a series with more points also gets its running mean drawn over it
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

Series = Sequence[tuple[float, float]]


def number(value: float | None) -> str:
    """How the report writes a number: 4 significant digits ("-" for a missing value)."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart).

    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    >>> nice_ticks(3.0, 3.0, count=4)
    [2.5, 3.0, 3.5]
    """
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-6:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high - step * 1e-6:
        ticks.append(round(value, 12))
    return ticks


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the up to `window - 1` before it.

    >>> running_mean([0.0, 2.0, 4.0, 6.0], 2)
    [0.0, 1.0, 3.0, 5.0]
    """
    means, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        means.append(total / min(i + 1, window))
    return means


def _thin(points: Series) -> list[tuple[float, float]]:
    points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    kept = [points[int(i * stride)] for i in range(MAX_POINTS - 1)]
    return [*kept, points[-1]]


class _Frame:
    """Axes of one chart: maps data coordinates to pixels and draws the grid."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        self.x_ticks = nice_ticks(min(xs), max(xs), 5) if max(xs) > min(xs) else [min(xs)]
        self.y_ticks = nice_ticks(min(ys), max(ys), 4)
        self.x_low, self.x_high = (
            (self.x_ticks[0], self.x_ticks[-1]) if len(self.x_ticks) > 1 else (xs[0] - 1, xs[0] + 1)
        )
        self.y_low, self.y_high = self.y_ticks[0], self.y_ticks[-1]

    def px(self, x: float) -> float:
        return LEFT + (x - self.x_low) / (self.x_high - self.x_low) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y_low) / (self.y_high - self.y_low) * (HEIGHT - TOP - BOTTOM)

    def grid(self, x_label: str) -> list[str]:
        parts = []
        for tick in self.y_ticks:
            y = self.py(tick)
            parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            parts.append(
                f'<text x="{LEFT - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{tick + 0.0:.4g}</text>'
            )
        for tick in self.x_ticks:
            x = self.px(tick)
            parts.append(
                f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 13}" class="tick" text-anchor="middle">{tick + 0.0:.4g}</text>'
            )
        parts.append(
            f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" class="frame"/>'
        )
        parts.append(
            f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" class="axis" text-anchor="middle">{escape(x_label)}</text>'
        )
        return parts


def _open(css: str, title: str, keys: list[str], frame: _Frame, x_label: str) -> list[str]:
    """The opening of a chart: the svg element (its keys in data-keys), title, grid and axes."""
    return [
        f'<svg class="{css}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" data-keys="{escape(",".join(keys))}" role="img">',
        f'<text x="{LEFT}" y="16" class="title">{escape(title)}</text>',
        *frame.grid(x_label),
    ]


def line_chart(
    title: str,
    series: dict[str, Series],
    *,
    bands: dict[str, tuple[Series, Series]] | None = None,
    x_label: str = "step",
) -> str:
    """An SVG line chart of `series` (legend name -> [(x, y), ...]); `bands` (name -> (lower,
    upper)) shade a range around the series of the same name. Non-finite values are left out.
    Returns "" when no series has a finite point."""
    thinned = {name: _thin(points) for name, points in series.items()}
    thinned = {name: points for name, points in thinned.items() if points}
    if not thinned:
        return ""
    band_points = {
        name: (_thin(low), _thin(high)) for name, (low, high) in (bands or {}).items() if name in thinned
    }
    xs = [x for points in thinned.values() for x, _ in points]
    ys = [y for points in thinned.values() for _, y in points]
    for low, high in band_points.values():
        ys += [y for _, y in low] + [y for _, y in high]
    frame = _Frame(xs, ys)
    parts = _open("chart", title, list(thinned), frame, x_label)
    for index, (name, points) in enumerate(thinned.items()):
        color = COLORS[index % len(COLORS)]
        if name in band_points:
            low, high = band_points[name]
            outline = [(frame.px(x), frame.py(y)) for x, y in high] + [
                (frame.px(x), frame.py(y)) for x, y in reversed(low)
            ]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in outline)
            parts.append(f'<polygon points="{path}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
        coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in points)
        last = series[name][-1][1] if series[name] else points[-1][1]
        smooth = len(points) > SMOOTH_FROM
        parts.append(
            f'<polyline class="series" data-key="{escape(name)}" data-last="{last!r}" points="{coords}" '
            f'fill="none" stroke="{color}" stroke-width="{1.0 if smooth else 1.6}" '
            f'stroke-opacity="{0.3 if smooth else 1.0}"/>'
        )
        if smooth:  # a noisy training curve: the raw values faint, their running mean on top
            mean = running_mean([y for _, y in points], max(len(points) // 25, 2))
            coords = " ".join(
                f"{frame.px(x):.1f},{frame.py(y):.1f}" for (x, _), y in zip(points, mean, strict=True)
            )
            parts.append(
                f'<polyline class="smoothed" points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>'
            )
        if len(points) == 1:
            x, y = frame.px(points[0][0]), frame.py(points[0][1])
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        legend_y = TOP + 12 + 13 * index
        parts.append(
            f'<text x="{WIDTH - RIGHT - 4}" y="{legend_y}" class="legend" text-anchor="end" fill="{color}">'
            f"{escape(name)} {escape(number(last))}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def histogram(
    title: str, samples: dict[str, Sequence[float]], *, bins: int = 20, x_label: str = "score"
) -> str:
    """Overlaid histograms of `samples` (name -> values) on shared bins, as counts.
    Returns "" when there are no finite values."""
    clean = {name: [v for v in values if math.isfinite(v)] for name, values in samples.items()}
    clean = {name: values for name, values in clean.items() if values}
    if not clean:
        return ""
    low = min(min(values) for values in clean.values())
    high = max(max(values) for values in clean.values())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    counts = {
        name: [sum(1 for v in values if min(int((v - low) / width), bins - 1) == b) for b in range(bins)]
        for name, values in clean.items()
    }
    frame = _Frame([low, high], [0.0, float(max(max(c) for c in counts.values()))])
    parts = _open("chart histogram", title, list(clean), frame, x_label)
    for index, (name, bars) in enumerate(counts.items()):
        color = COLORS[index % len(COLORS)]
        parts.append(f'<g class="bars" data-key="{escape(name)}" data-count="{len(clean[name])}">')
        for b, count in enumerate(bars):
            if not count:
                continue
            x0, x1 = frame.px(low + b * width), frame.px(low + (b + 1) * width)
            y = frame.py(count)
            parts.append(
                f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                f'height="{frame.py(0) - y:.1f}" fill="{color}" fill-opacity="0.5"/>'
            )
        parts.append("</g>")
        mean = sum(clean[name]) / len(clean[name])
        parts.append(
            f'<text x="{WIDTH - RIGHT - 4}" y="{TOP + 12 + 13 * index}" class="legend" text-anchor="end" '
            f'fill="{color}">{escape(name)} (n={len(clean[name])}, mean {number(mean)})</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
