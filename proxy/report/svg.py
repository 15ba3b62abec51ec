"""Inline SVG charts generated from numbers: no JavaScript, no network, no plotting library.

Every chart is a standalone ``<svg class="plot plot-<kind>">`` string; every piece of text
placed in it goes through ``html.escape``. Element classes (``band``, ``estimate``,
``bar``, ``interval``, ``threshold``) are stable: the browser check looks for them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

STATUS_COLOURS = {"pass": "#1a7f37", "inconclusive": "#9a6700", "fail": "#cf222e"}
ROLE_COLOURS = {"champion": "#1f6feb", "candidate": "#e36209"}
BAND_FILL = "#cfe0f5"  # solid, so the band's colour is exact in a screenshot
ESTIMATE = "#1f3b73"
THRESHOLD = "#cf222e"
GRID = "#e6e8eb"
INK = "#24292f"
MUTED = "#57606a"

WIDTH = 640
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 30, 44


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _n(value: float) -> str:
    """Coordinates with two decimals: short output, stable text."""
    return f"{value:.2f}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def fmt_tick(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-4):
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class _Scale:
    lo: float
    hi: float
    a: float  # pixel of lo
    b: float  # pixel of hi

    def __call__(self, v: float) -> float:
        if self.hi == self.lo:
            return (self.a + self.b) / 2
        return self.a + (v - self.lo) * (self.b - self.a) / (self.hi - self.lo)


def _pad(lo: float, hi: float, frac: float = 0.05) -> tuple[float, float]:
    if hi <= lo:
        span = abs(lo) * 0.1 or 1.0
        return lo - span, hi + span
    span = hi - lo
    return lo - span * frac, hi + span * frac


def _open(kind: str, title: str, height: int) -> list[str]:
    return [
        f'<svg class="plot plot-{kind}" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" role="img" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text class="chart-title" x="{LEFT}" y="18" font-size="13" font-weight="600" '
        f'fill="{INK}">{_e(title)}</text>',
    ]


def _y_axis(parts: list[str], ys: _Scale, x0: float, x1: float, label: str) -> None:
    ticks = [t for t in nice_ticks(ys.lo, ys.hi) if ys.lo <= t <= ys.hi]
    for t in ticks:
        y = ys(t)
        parts.append(
            f'<line class="grid" x1="{_n(x0)}" y1="{_n(y)}" x2="{_n(x1)}" y2="{_n(y)}" '
            f'stroke="{GRID}"/>'
        )
        parts.append(
            f'<text x="{_n(x0 - 6)}" y="{_n(y + 4)}" font-size="11" text-anchor="end" '
            f'fill="{MUTED}">{_e(fmt_tick(t, ticks))}</text>'
        )
    if label:
        yc = (ys.a + ys.b) / 2
        parts.append(
            f'<text x="14" y="{_n(yc)}" font-size="11" text-anchor="middle" fill="{MUTED}" '
            f'transform="rotate(-90 14 {_n(yc)})">{_e(label)}</text>'
        )


def _x_axis(parts: list[str], xs: _Scale, y0: float, label: str, height: int) -> None:
    ticks = [t for t in nice_ticks(xs.lo, xs.hi, 6) if xs.lo <= t <= xs.hi]
    parts.append(
        f'<line x1="{_n(xs.a)}" y1="{_n(y0)}" x2="{_n(xs.b)}" y2="{_n(y0)}" stroke="{MUTED}"/>'
    )
    for t in ticks:
        x = xs(t)
        parts.append(
            f'<line x1="{_n(x)}" y1="{_n(y0)}" x2="{_n(x)}" y2="{_n(y0 + 4)}" stroke="{MUTED}"/>'
        )
        parts.append(
            f'<text x="{_n(x)}" y="{_n(y0 + 16)}" font-size="11" text-anchor="middle" '
            f'fill="{MUTED}">{_e(fmt_tick(t, ticks))}</text>'
        )
    if label:
        parts.append(
            f'<text x="{_n((xs.a + xs.b) / 2)}" y="{height - 6}" font-size="11" '
            f'text-anchor="middle" fill="{MUTED}">{_e(label)}</text>'
        )


HALO = 'paint-order="stroke" stroke="#ffffff" stroke-width="3"'


def _hline(
    parts: list[str], xs: _Scale, y: float, cls: str, colour: str, label: str, *, at_end: bool
) -> None:
    parts.append(
        f'<line class="{cls}" x1="{_n(xs.a)}" y1="{_n(y)}" x2="{_n(xs.b)}" y2="{_n(y)}" '
        f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4"/>'
    )
    if label:
        # Zero labelled at the start, the threshold at the end: they never collide.
        x, anchor = (xs.b - 4, "end") if at_end else (xs.a + 4, "start")
        parts.append(
            f'<text x="{_n(x)}" y="{_n(y - 5)}" font-size="11" text-anchor="{anchor}" '
            f'fill="{colour}" {HALO}>{_e(label)}</text>'
        )


def _vline(parts: list[str], x: float, ys: _Scale, cls: str, colour: str, label: str) -> None:
    top, bottom = min(ys.a, ys.b), max(ys.a, ys.b)
    parts.append(
        f'<line class="{cls}" x1="{_n(x)}" y1="{_n(top)}" x2="{_n(x)}" y2="{_n(bottom)}" '
        f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4"/>'
    )
    if label:
        parts.append(
            f'<text x="{_n(x + 4)}" y="{_n(top + 10)}" font-size="11" fill="{colour}" '
            f"{HALO}>{_e(label)}</text>"
        )


@dataclass(frozen=True)
class BandPoint:
    n: int
    estimate: float
    lower: float
    upper: float


def band_chart(
    points: Sequence[BandPoint],
    *,
    title: str,
    threshold: float | None,
    x_label: str = "labelled pairs (n)",
    y_label: str = "",
    height: int = 260,
) -> str:
    """Running estimate with its confidence band, the zero line and the decision threshold."""
    parts = _open("band", title, height)
    if not points:
        parts.append(_empty_note(height))
        return "\n".join([*parts, "</svg>"])
    # The first looks have very wide bands; scaling to them would flatten the part of the
    # chart where the decision happens. Scale to the later 80% and clip the early band.
    settled = points[len(points) // 5 :] if len(points) >= 5 else points
    y_values = [v for p in settled for v in (p.lower, p.upper, p.estimate)]
    y_values.append(0.0)
    if threshold is not None:
        y_values.append(threshold)
    ylo, yhi = _pad(min(y_values), max(y_values))
    xlo, xhi = min(p.n for p in points), max(p.n for p in points)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    xs = _Scale(xlo, xhi, LEFT, WIDTH - RIGHT)
    ys = _Scale(ylo, yhi, height - BOTTOM, TOP)
    _y_axis(parts, ys, LEFT, WIDTH - RIGHT, y_label)
    # Deterministic id (same document, same page); distinct per chart content.
    key = repr((title, [(p.n, p.estimate, p.lower, p.upper) for p in points])).encode()
    clip = "clip-" + hashlib.sha256(key).hexdigest()[:12]
    parts.append(
        f'<clipPath id="{clip}"><rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{height - TOP - BOTTOM}"/></clipPath><g clip-path="url(#{clip})">'
    )
    upper = [f"{_n(xs(p.n))},{_n(ys(p.upper))}" for p in points]
    lower = [f"{_n(xs(p.n))},{_n(ys(p.lower))}" for p in reversed(points)]
    parts.append(
        f'<polygon class="band" points="{" ".join(upper + lower)}" fill="{BAND_FILL}" '
        f'stroke="{BAND_FILL}"/>'
    )
    _hline(parts, xs, ys(0.0), "zero", MUTED, "0", at_end=False)
    if threshold is not None:
        _hline(
            parts,
            xs,
            ys(threshold),
            "threshold",
            THRESHOLD,
            f"threshold {threshold:g}",
            at_end=True,
        )
    line = " ".join(f"{_n(xs(p.n))},{_n(ys(p.estimate))}" for p in points)
    parts.append(
        f'<polyline class="estimate" points="{line}" fill="none" stroke="{ESTIMATE}" '
        f'stroke-width="2"/></g>'
    )
    last = points[-1]
    parts.append(
        f'<circle class="last" cx="{_n(xs(last.n))}" cy="{_n(ys(last.estimate))}" r="3.5" '
        f'fill="{ESTIMATE}"><title>n={last.n}: {last.estimate:.4g} '
        f"[{last.lower:.4g}, {last.upper:.4g}]</title></circle>"
    )
    _x_axis(parts, xs, height - BOTTOM, x_label, height)
    return "\n".join([*parts, "</svg>"])


@dataclass(frozen=True)
class Histogram:
    label: str  # champion | candidate (selects the colour) or any name
    edges: Sequence[float]
    counts: Sequence[int]


def histogram_chart(
    series: Sequence[Histogram], *, title: str, x_label: str, height: int = 260
) -> str:
    """Overlaid histograms as shares of each series' total, so unequal n compare fairly."""
    parts = _open("histogram", title, height)
    usable = [h for h in series if len(h.counts) and sum(h.counts) > 0]
    if not usable:
        parts.append(_empty_note(height))
        return "\n".join([*parts, "</svg>"])
    xlo = min(h.edges[0] for h in usable)
    # End at the last non-empty bin: fixed bin ranges often leave a long empty tail.
    xhi = max(h.edges[max(i for i, c in enumerate(h.counts) if c > 0) + 1] for h in usable)
    shares = [[c / sum(h.counts) for c in h.counts] for h in usable]
    yhi = max(max(s) for s in shares) * 1.08
    xs = _Scale(xlo, xhi, LEFT, WIDTH - RIGHT)
    ys = _Scale(0.0, yhi, height - BOTTOM, TOP)
    _y_axis(parts, ys, LEFT, WIDTH - RIGHT, "share of requests")
    for h, share in zip(usable, shares, strict=True):
        colour = ROLE_COLOURS.get(h.label, ESTIMATE)
        for i, s in enumerate(share):
            if s <= 0:
                continue
            x0, x1 = xs(h.edges[i]), xs(h.edges[i + 1])
            y = ys(s)
            parts.append(
                f'<rect class="bar bar-{_e(h.label)}" x="{_n(x0)}" y="{_n(y)}" '
                f'width="{_n(max(x1 - x0 - 0.5, 0.5))}" height="{_n(ys.a - y)}" '
                f'fill="{colour}" fill-opacity="0.5"><title>{_e(h.label)} '
                f"{h.edges[i]:.4g}-{h.edges[i + 1]:.4g}: {h.counts[i]}</title></rect>"
            )
    _legend(parts, [h.label for h in usable])
    _x_axis(parts, xs, height - BOTTOM, x_label, height)
    return "\n".join([*parts, "</svg>"])


def _legend(parts: list[str], labels: Sequence[str]) -> None:
    x = WIDTH - RIGHT - 110 * len(labels)
    for label in labels:
        colour = ROLE_COLOURS.get(label, ESTIMATE)
        parts.append(
            f'<rect class="legend" x="{x}" y="9" width="12" height="12" fill="{colour}" '
            f'fill-opacity="0.5"/><text x="{x + 17}" y="19" font-size="11" fill="{INK}">'
            f"{_e(label)}</text>"
        )
        x += 110


@dataclass(frozen=True)
class Interval:
    label: str
    estimate: float | None
    lower: float | None
    upper: float | None
    status: str


def interval_chart(
    rows: Sequence[Interval],
    *,
    title: str,
    threshold: float | None,
    x_label: str,
    row_height: int = 26,
) -> str:
    """One row per slice: estimate and confidence interval, zero and threshold lines."""
    height = TOP + BOTTOM + row_height * max(len(rows), 1)
    parts = _open("interval", title, height)
    values = [v for r in rows for v in (r.estimate, r.lower, r.upper) if v is not None]
    if not values:
        parts.append(_empty_note(height))
        return "\n".join([*parts, "</svg>"])
    values.append(0.0)
    if threshold is not None:
        values.append(threshold)
    left = 170  # room for slice labels
    xs = _Scale(*_pad(min(values), max(values)), left, WIDTH - RIGHT)
    ys = _Scale(0, len(rows), TOP, height - BOTTOM)
    _vline(parts, xs(0.0), ys, "zero", MUTED, "")
    if threshold is not None:
        _vline(parts, xs(threshold), ys, "threshold", THRESHOLD, f"{threshold:g}")
    for i, r in enumerate(rows):
        y = ys(i + 0.5)
        colour = STATUS_COLOURS.get(r.status, MUTED)
        parts.append(
            f'<text x="{left - 8}" y="{_n(y + 4)}" font-size="12" text-anchor="end" '
            f'fill="{INK}">{_e(r.label)}</text>'
        )
        if r.lower is not None and r.upper is not None:
            parts.append(
                f'<line class="interval interval-{_e(r.status)}" x1="{_n(xs(r.lower))}" '
                f'y1="{_n(y)}" x2="{_n(xs(r.upper))}" y2="{_n(y)}" stroke="{colour}" '
                f'stroke-width="3"/>'
            )
        if r.estimate is not None:
            parts.append(
                f'<circle class="point" cx="{_n(xs(r.estimate))}" cy="{_n(y)}" r="5" '
                f'fill="{colour}"><title>{_e(r.label)}: {r.estimate:.4g}</title></circle>'
            )
    _x_axis(parts, xs, height - BOTTOM, x_label, height)
    return "\n".join([*parts, "</svg>"])


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None
    status: str


def bar_chart(
    bars: Sequence[Bar],
    *,
    title: str,
    threshold: float | None,
    x_label: str,
    row_height: int = 24,
) -> str:
    """Horizontal bars (e.g. PSI per feature) coloured by status, with the threshold."""
    height = TOP + BOTTOM + row_height * max(len(bars), 1)
    parts = _open("bar", title, height)
    values = [b.value for b in bars if b.value is not None]
    if not values:
        parts.append(_empty_note(height))
        return "\n".join([*parts, "</svg>"])
    top = max([*values, threshold or 0.0]) * 1.1 or 1.0
    left = 170
    xs = _Scale(0.0, top, left, WIDTH - RIGHT)
    ys = _Scale(0, len(bars), TOP, height - BOTTOM)
    for i, b in enumerate(bars):
        y0 = ys(i) + 4
        parts.append(
            f'<text x="{left - 8}" y="{_n(ys(i + 0.5) + 4)}" font-size="12" '
            f'text-anchor="end" fill="{INK}">{_e(b.label)}</text>'
        )
        if b.value is None:
            continue
        parts.append(
            f'<rect class="bar bar-{_e(b.status)}" x="{left}" y="{_n(y0)}" '
            f'width="{_n(max(xs(b.value) - left, 1.0))}" height="{row_height - 8}" '
            f'fill="{STATUS_COLOURS.get(b.status, MUTED)}"><title>{_e(b.label)}: '
            f"{b.value:.4g}</title></rect>"
        )
    if threshold is not None:
        _vline(parts, xs(threshold), ys, "threshold", THRESHOLD, f"{threshold:g}")
    _x_axis(parts, xs, height - BOTTOM, x_label, height)
    return "\n".join([*parts, "</svg>"])


def _empty_note(height: int) -> str:
    return (
        f'<text class="empty" x="{WIDTH / 2}" y="{height / 2}" font-size="12" '
        f'text-anchor="middle" fill="{MUTED}">no data</text>'
    )
