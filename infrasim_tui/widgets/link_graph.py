"""The focused link's graph: throughput and delay over the session's history, by plotext.

plotext rebuilds the whole plot on every draw (8-17 ms a pane), so this widget keeps the
samples it is given and draws at most ``REDRAW_HZ`` times a second, only when something
changed and only while its screen is the one shown; the text is built by plotext with ANSI
colours and handed to Rich, sized to the widget's content area.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import plotext as plt
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from ..session import LinkPoint

REDRAW_HZ = 2.0
WINDOW_S = 60.0  # the x axis covers at least the last minute
RATE_UNITS = ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s"), (1.0, "bit/s"))
THROUGHPUT_COLOR = 14  # ANSI colours, so the terminal's (and Textual's) palette applies
P50_COLOR = 11
P99_COLOR = 9
TICK_WIDTH = 7  # both panels' y labels padded alike, so their plot areas line up


def rate_unit(values: Sequence[float]) -> tuple[float, str]:
    """Pure: (divisor, unit) that keeps the largest throughput between 1 and 1000."""
    top = max((v for v in values if math.isfinite(v)), default=0.0)
    for factor, unit in RATE_UNITS:
        if top >= factor:
            return factor, unit
    return 1.0, "bit/s"


def _ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    values = [lo, (lo + hi) / 2, hi]
    return values, [f"{v:{TICK_WIDTH}.1f}" for v in values]


def delay_range(points: Sequence[LinkPoint]) -> tuple[float, float]:
    """Pure: the delay axis, around the measured p50..p99 with a margin (jitter stays
    visible on a 200 ms LoRa link), never below 0."""
    values = [v for p in points for v in (p.delay_p50_ms, p.delay_p99_ms) if math.isfinite(v)]
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    margin = max((hi - lo) * 0.2, 0.5)
    return max(0.0, lo - margin), hi + margin


def graph_text(points: Sequence[LinkPoint], width: int, height: int) -> str:
    """The plot as ANSI text of ``width`` x ``height`` cells, or "" when it cannot be drawn.

    Two panels over the same time axis (seconds before the newest sample): throughput on
    top, delay p50 and p99 below. plotext keeps one module-level figure: it is cleared,
    built and cleared again in this one synchronous call, so viewers never share a plot.
    """
    if width < 24 or height < 8 or not points:
        return ""
    last = points[-1].ts
    xs = [p.ts - last for p in points]
    factor, _ = rate_unit([p.throughput_bps for p in points])
    rates = [p.throughput_bps / factor for p in points]
    left = min(-WINDOW_S, xs[0])
    top = max(max(rates) * 1.1, 1.0)
    lo, hi = delay_range(points)
    _reset()
    try:
        plt.subplots(2, 1)
        plt.plotsize(width, height)
        plt.theme("pro")
        plt.subplot(1, 1)
        plt.plot(xs, rates, color=THROUGHPUT_COLOR, marker="hd")
        plt.xlim(left, 0.0)
        plt.ylim(0.0, top)
        plt.yticks(*_ticks(0.0, top))
        plt.xticks([])
        plt.subplot(2, 1)
        plt.plot(xs, [p.delay_p50_ms for p in points], color=P50_COLOR, marker="hd")
        plt.plot(xs, [p.delay_p99_ms for p in points], color=P99_COLOR, marker="hd")
        plt.xlim(left, 0.0)
        plt.ylim(lo, hi)
        plt.yticks(*_ticks(lo, hi))
        text: str = plt.build()
    finally:
        _reset()
    return text


def _reset() -> None:
    """Back to an empty main figure (``clear_figure`` alone clears only the active subplot,
    and a second ``subplots`` would nest a grid inside it)."""
    plt.main()
    plt.clear_figure()


def legend(points: Sequence[LinkPoint]) -> Text:
    """Pure: the line above the plot naming each colour (plotext's own legend would sit on
    the data in a pane this small)."""
    _, unit = rate_unit([p.throughput_bps for p in points])
    text = Text(no_wrap=True, overflow="crop")
    for color, label in ((THROUGHPUT_COLOR, unit), (P50_COLOR, "p50 ms"),
                         (P99_COLOR, "p99 ms")):
        text.append(" ━━ ", Style(color=Color.from_ansi(color), bold=True))
        text.append(label)
    text.append("  (x: seconds ago)", "dim")
    return text


class LinkGraph(Static):
    """Shows :func:`graph_text` for the samples of :meth:`show`, redrawn lazily."""

    DEFAULT_CSS = """
    LinkGraph { height: 1fr; min-height: 6; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__("", id=id, classes=classes)
        self._points: list[LinkPoint] = []
        self._title = ""
        self._placeholder = "move the cursor to a link to see its graph"
        self._dirty = True
        self._drawn_size: tuple[int, int] = (0, 0)
        self.draws = 0  # plots built (tests and CPU checks)
        self.draw_ms = 0.0  # time spent building the last one

    def on_mount(self) -> None:
        self.set_interval(1.0 / REDRAW_HZ, self.draw_if_needed)

    def on_resize(self) -> None:
        self._dirty = True

    def show(self, title: str, points: Sequence[LinkPoint], placeholder: str = "") -> None:
        """The link to draw: cheap, call it on every sample; the plot follows at 2 Hz."""
        points = list(points)
        if (title, points) != (self._title, self._points):
            self._title, self._points = title, points
            self._dirty = True
        if placeholder and placeholder != self._placeholder:
            self._placeholder = placeholder
            self._dirty = True

    @property
    def visible_now(self) -> bool:
        """Drawn only while the Networks screen is the active one and this pane has room."""
        try:
            current = self.app.screen is self.screen
        except Exception:  # not mounted on a screen (yet)
            return False
        return current and self.display and self.size.width > 0 and self.size.height > 0

    def draw_if_needed(self) -> None:
        size = (self.content_size.width, self.content_size.height)
        if not self.visible_now or (not self._dirty and size == self._drawn_size):
            return
        self._dirty = False
        self._drawn_size = size
        self.draw()

    def draw(self) -> None:
        width, height = self.content_size.width, self.content_size.height
        start = time.perf_counter()
        text = graph_text(self._points, width, height - 1)
        self.draw_ms = (time.perf_counter() - start) * 1000
        renderable: Any
        if text:
            self.draws += 1
            renderable = legend(self._points)
            renderable.append("\n")
            renderable.append_text(Text.from_ansi(text, no_wrap=True, overflow="crop"))
        else:
            renderable = Text("no samples yet" if self._title else self._placeholder,
                              style="dim")
        self.update(renderable)


__all__ = ["LinkGraph", "delay_range", "graph_text", "legend", "rate_unit"]
