"""A Line-API table for the Networks screen: segments and their links, LoRa links, profiles.

Each row is one cached Strip re-rendered only when its text changes (the fleet table's
pattern), so a segment's links at 2 Hz cost a few strips, not a DataTable layout. The row
text comes from pure functions (``link_cells``, ``lora_cells``, ``profile_cells``,
``sparkline``) that the tests check without a terminal; the widget only draws and moves a
cursor. A "group" row (a network) spans the whole width above its links.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..core.model import DROP_CAUSES, LinkStats, QosProfile, QosProfileSpec

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 20

Column = tuple[str, str, int]  # key, title, width

LINK_COLUMNS: list[Column] = [
    ("vm", "VM", 14), ("nic", "NIC", 5), ("dir", "DIR", 7), ("profile", "PROFILE", 11),
    ("rate", "RATE", 8), ("activity", "LAST 60s", SPARK_WIDTH), ("frames", "FRAMES", 7),
    ("drops", "DROPS", 22), ("p50", "P50", 7), ("p99", "P99", 7), ("queue", "QUEUE", 6),
]
LORA_COLUMNS: list[Column] = [
    ("link", "LINK", 16), ("dir", "DIR", 3), ("sf", "SF", 4), ("rssi", "RSSI", 8),
    ("snr", "SNR", 7), ("toa", "TOA", 9), ("ok", "DELIV", 6), ("lost", "LOST", 6),
]
PROFILE_COLUMNS: list[Column] = [
    ("name", "NAME", 14), ("rate", "RATE", 9), ("burst", "BURST", 7), ("delay", "DELAY", 13),
    ("loss", "LOSS", 12), ("dup", "DUP", 6), ("reorder", "REORD", 6), ("dir", "DIR", 7),
    ("lora", "LORA", 22), ("seed", "SEED", 6), ("use", "VMS", 4),
]
DROP_ABBREV = {"bucket": "bkt", "loss": "loss", "lora_sensitivity": "sens", "collision": "coll",
               "duty_cycle": "duty", "overflow": "ovf"}


# -- pure text -------------------------------------------------------------------------------


def resample(values: Sequence[float], width: int) -> list[float]:
    """Pure: at most ``width`` values, each the mean of a run of consecutive samples (the
    newest run ends the series), so 120 samples fit a 20-character sparkline."""
    vals = list(values)
    if width <= 0 or not vals:
        return []
    if len(vals) <= width:
        return vals
    step = math.ceil(len(vals) / width)
    out: list[float] = []
    end = len(vals)
    while end > 0 and len(out) < width:
        run = vals[max(0, end - step):end]
        out.append(sum(run) / len(run))
        end -= step
    out.reverse()
    return out


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH, top: float = 0.0) -> str:
    """Pure: ``values`` as block characters, right-aligned in ``width`` cells.

    Scaled to ``top`` or, when 0, to the largest value; a zero is the lowest block, so an
    idle link still shows that it is sampled. Negative and non-finite values count as 0.
    """
    vals = [v if math.isfinite(v) and v > 0 else 0.0 for v in resample(values, width)]
    if not vals:
        return ""
    scale = max(top, max(vals))
    last = len(SPARK) - 1
    if scale <= 0:
        return (SPARK[0] * len(vals)).rjust(width)
    return "".join(SPARK[min(last, max(0, math.ceil(v / scale * last)))]
                   for v in vals).rjust(width)


def _num(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def format_bps(bps: float) -> str:
    """Pure: bits/s in at most 8 characters, SI as tc and link speeds: ``8.0Mbit``,
    ``950kbit``, ``0``."""
    if not math.isfinite(bps) or bps <= 0:
        return "0"
    for factor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if bps >= factor:
            return _num(bps / factor) + unit + "bit"
    return f"{bps:.0f}bit"


def format_count(n: int) -> str:
    """Pure: a counter in at most 6 characters (``1234``, ``12.3k``, ``4.5M``)."""
    if n < 10_000:
        return str(n)
    for factor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return str(n)  # pragma: no cover - unreachable


def format_ms(ms: float) -> str:
    """Pure: a delay (``0.3ms``, ``40ms``, ``1.2s``); ``-`` when nothing was measured."""
    if not math.isfinite(ms) or ms <= 0:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.1f}s"
    return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"


def format_bytes(n: int) -> str:
    """Pure: a queue or burst size (``0``, ``1514``, ``32K``, ``1.5M``), binary units."""
    if n <= 0:
        return "0"
    for shift, unit in ((20, "M"), (10, "K")):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.1f}{unit}" if v < 10 and v != int(v) else f"{v:.0f}{unit}"
    return str(n)


def drops_text(drops: dict[str, int]) -> str:
    """Pure: non-zero drop counters by cause, in DROP_CAUSES order (``loss 12 bkt 3``)."""
    order = [c for c in DROP_CAUSES if drops.get(c)] + sorted(
        c for c in drops if c not in DROP_CAUSES and drops[c])
    return " ".join(f"{DROP_ABBREV.get(c, c)} {format_count(drops[c])}" for c in order) or "-"


def link_cells(st: LinkStats, throughput: Sequence[float], indent: str = "├ ") -> tuple[str, ...]:
    """Pure: one link direction's columns (LINK_COLUMNS), ``throughput`` its history;
    ``indent`` draws the tree under the network's row."""
    return (
        indent + (st.vm or st.vm_id),
        st.nic,
        st.direction,
        st.profile or "-",
        format_bps(st.throughput_bps),
        sparkline(throughput, SPARK_WIDTH),
        format_count(st.frames),
        drops_text(st.drops),
        format_ms(st.delay_p50_ms),
        format_ms(st.delay_p99_ms),
        format_bytes(st.queue_bytes),
    )


def lora_cells(st: LinkStats) -> tuple[str, ...]:
    """Pure: a LoRa link's radio columns (LORA_COLUMNS); the link must have ``lora``."""
    lo = st.lora
    if lo is None:
        return (f"{st.vm}/{st.nic}", st.direction[:3], "-", "-", "-", "-", "-", "-")
    sent = lo.delivered + lo.lost
    return (
        f"{st.vm or st.vm_id}/{st.nic}",
        {"egress": "out", "ingress": "in"}.get(st.direction, st.direction[:3]),
        f"SF{lo.spreading_factor}" if lo.spreading_factor else "-",
        f"{lo.rssi_dbm:.1f}" if sent else "-",
        f"{lo.snr_db:.1f}" if sent else "-",
        f"{lo.airtime_ms:.1f}ms" if lo.airtime_ms else "-",
        format_count(lo.delivered),
        format_count(lo.lost) + (f" {lo.lost * 100 // sent}%" if sent and lo.lost else ""),
    )


def _pct(value: float) -> str:
    return f"{value:g}%"


def loss_summary(spec: QosProfileSpec) -> str:
    """Pure: random loss, or the Gilbert-Elliott pair (``GE 1%/30%``)."""
    if spec.ge_p_pct > 0:
        return f"GE {_pct(spec.ge_p_pct)}/{_pct(spec.ge_r_pct)}"
    return _pct(spec.loss_pct) if spec.loss_pct else "-"


def profile_cells(prof: QosProfile) -> tuple[str, ...]:
    """Pure: a QoS profile's columns (PROFILE_COLUMNS)."""
    spec = prof.spec
    delay = "-"
    if spec.delay_ms or spec.jitter_ms:
        delay = f"{spec.delay_ms:g}±{spec.jitter_ms:g}ms" if spec.jitter_ms else \
            f"{spec.delay_ms:g}ms"
        if spec.jitter_ms and spec.distribution != "uniform":
            delay += f" {spec.distribution[:4]}"
    lora = "-"
    if spec.lora is not None:
        lo = spec.lora
        dist = f"{lo.distance_m / 1000:g}km" if lo.distance_m >= 1000 else f"{lo.distance_m:g}m"
        lora = f"SF{lo.spreading_factor} {lo.bandwidth_khz}k 4/{lo.coding_rate} {dist}"
    return (
        prof.meta.name,
        format_bps(spec.rate_bps) if spec.rate_bps else "-",
        format_bytes(spec.burst_bytes) if spec.burst_bytes else "-",
        delay,
        loss_summary(spec),
        _pct(spec.duplicate_pct) if spec.duplicate_pct else "-",
        _pct(spec.reorder_pct) if spec.reorder_pct else "-",
        spec.direction,
        lora,
        str(spec.seed) if spec.seed else "-",
        str(len(prof.status.attached_vm_ids)),
    )


# -- the widget ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line: ``cells`` per column, or for a ``group`` row one text across the width.
    ``warn`` names the columns drawn in the warning style (non-zero drops, say)."""

    key: str
    cells: tuple[str, ...]
    group: bool = False
    warn: frozenset[str] = frozenset()


class LinkTable(ScrollView, can_focus=True):
    """Rows under a fixed header line, one cached Strip per row, a row cursor."""

    COMPONENT_CLASSES = {
        "linktable--header", "linktable--cursor", "linktable--group", "linktable--spark",
        "linktable--warn", "linktable--empty",
    }
    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home,g", "jump(0)", "Top", show=False),
        Binding("end,G", "jump(-1)", "Bottom", show=False),
        Binding("enter", "select", "Select", show=False),
    ]
    DEFAULT_CSS = """
    LinkTable { height: 1fr; }
    LinkTable > .linktable--header { text-style: bold; background: $panel; }
    LinkTable > .linktable--cursor { background: $panel-lighten-2; }
    LinkTable:focus > .linktable--cursor {
        background: $accent 40%; color: $text; text-style: bold;
    }
    LinkTable > .linktable--group { text-style: bold; color: $text; }
    LinkTable > .linktable--spark { color: $success; }
    LinkTable > .linktable--warn { color: $warning; }
    LinkTable > .linktable--empty { color: $text-muted; }
    """

    class Highlighted(Message):
        """The cursor moved to another row (``key`` "" when the table is empty)."""

        def __init__(self, table: LinkTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> LinkTable:
            return self.table

    class Selected(Message):
        def __init__(self, table: LinkTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> LinkTable:
            return self.table

    def __init__(self, columns: list[Column], *, empty: str = "", id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.columns = columns
        self.empty = empty  # shown where the first row would be when there are none
        self._rows: list[Row] = []
        self._strips: dict[str, tuple[Row, bool, int, Strip]] = {}
        self.cursor_row = 0
        self._width = sum(w + 1 for _, _, w in columns)
        self.strips_rendered = 0  # for tests and CPU checks: rows actually re-rendered

    # -- data -------------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[Row]:
        return list(self._rows)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self._rows]

    def current_key(self) -> str:
        if 0 <= self.cursor_row < len(self._rows):
            return self._rows[self.cursor_row].key
        return ""

    def show(self, rows: Iterable[Row]) -> int:
        """Display ``rows`` in order, keeping the cursor on the same key; returns how many
        lines were refreshed."""
        rows = list(rows)
        keep = self.current_key()
        same_order = [r.key for r in rows] == self.keys
        old = {r.key: r for r in self._rows}
        self._rows = rows
        self.virtual_size = Size(self._width, len(rows) + 1)
        if not same_order:
            index = {r.key: i for i, r in enumerate(rows)}
            if keep in index:
                self.cursor_row = index[keep]
            self.cursor_row = max(0, min(self.cursor_row, len(rows) - 1))
            self.refresh()
            if self.current_key() != keep:
                self.post_message(self.Highlighted(self, self.current_key()))
            return len(rows)
        changed = 0
        for i, row in enumerate(rows):
            if old.get(row.key) != row:
                changed += 1
                self.refresh_line(i + 1)
        return changed

    # -- drawing ----------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.virtual_size = Size(self._width, 1)

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(name, partial=True)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()

    def _restyle_cursor(self) -> None:
        """The cursor row looks different with focus; only that strip is re-rendered."""
        key = self.current_key()
        self._strips.pop(key, None)
        self.refresh_line(self.cursor_row + 1)

    def on_focus(self) -> None:
        self._restyle_cursor()

    def on_blur(self) -> None:
        self._restyle_cursor()

    @staticmethod
    def _fit(text: str, width: int) -> str:
        return text[:width].ljust(width) + " "

    def _line_width(self) -> int:
        return max(self.size.width, self._width)

    def _header_strip(self) -> Strip:
        base = self.rich_style + self._style("linktable--header")
        text = "".join(self._fit(title, w) for _, title, w in self.columns)
        return Strip([Segment(text.ljust(self._line_width()), base)])

    def _row_strip(self, i: int) -> Strip:
        row = self._rows[i]
        cursor = i == self.cursor_row
        width = self._line_width()
        cached = self._strips.get(row.key)
        if cached is not None and cached[:3] == (row, cursor, width):
            return cached[3]
        self.strips_rendered += 1
        base = self.rich_style
        # the cursor goes on top: a warning colour must not vanish into the cursor's
        cursor_style = self._style("linktable--cursor") if cursor else Style()
        segs: list[Segment] = []
        if row.group:
            text = row.cells[0] if row.cells else ""
            segs.append(Segment(text[:width].ljust(width),
                                base + self._style("linktable--group") + cursor_style))
        else:
            for c, (key, _, w) in enumerate(self.columns):
                style = base
                if key in row.warn:
                    style = base + self._style("linktable--warn")
                elif key == "activity":
                    style = base + self._style("linktable--spark")
                cell = row.cells[c] if c < len(row.cells) else ""
                segs.append(Segment(self._fit(cell, w), style + cursor_style))
            base = base + cursor_style
            if width > self._width:
                segs.append(Segment(" " * (width - self._width), base))
        strip = Strip(segs)
        self._strips[row.key] = (row, cursor, width, strip)
        return strip

    def render_line(self, y: int) -> Strip:
        x0, x1 = self.scroll_offset.x, self.scroll_offset.x + self.size.width
        if y == 0:
            return self._header_strip().crop(x0, x1)
        i = self.scroll_offset.y + y - 1
        if not self._rows and i == 0 and self.empty:
            style = self.rich_style + self._style("linktable--empty")
            return Strip([Segment(self.empty[:self.size.width].ljust(self.size.width),
                                  style)])
        if not 0 <= i < len(self._rows):
            return Strip.blank(self.size.width, self.rich_style)
        return self._row_strip(i).crop(x0, x1)

    # -- cursor -----------------------------------------------------------------------------

    def move_cursor(self, row: int) -> None:
        if not self._rows:
            return
        old = self.cursor_row
        self.cursor_row = max(0, min(row, len(self._rows) - 1))
        rows_visible = max(1, self.size.height - 1)
        top = int(self.scroll_offset.y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + rows_visible:
            self.scroll_to(y=self.cursor_row - rows_visible + 1, animate=False)
        self.refresh_line(old + 1)
        self.refresh_line(self.cursor_row + 1)
        if old != self.cursor_row:
            self.post_message(self.Highlighted(self, self.current_key()))

    def move_to(self, key: str) -> None:
        for i, row in enumerate(self._rows):
            if row.key == key:
                self.move_cursor(i)
                return

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * max(1, self.size.height - 2))

    def action_jump(self, where: int) -> None:
        self.move_cursor(0 if where == 0 else len(self._rows) - 1)

    def action_select(self) -> None:
        if self._rows:
            self.post_message(self.Selected(self, self.current_key()))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            return
        row = int(self.scroll_offset.y) + event.y - 1
        if 0 <= row < len(self._rows):
            if row == self.cursor_row and event.chain >= 2:
                self.action_select()
            self.move_cursor(row)


__all__ = [
    "LINK_COLUMNS",
    "LORA_COLUMNS",
    "PROFILE_COLUMNS",
    "LinkTable",
    "Row",
    "drops_text",
    "format_bps",
    "format_bytes",
    "format_count",
    "format_ms",
    "link_cells",
    "lora_cells",
    "loss_summary",
    "profile_cells",
    "resample",
    "sparkline",
]
