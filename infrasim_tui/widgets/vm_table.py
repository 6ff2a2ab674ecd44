"""The fleet table: one row per VM, updated cell by cell from pushed events.

The row text is computed by pure functions (``row_cells``, ``sparkline``, ``parse_filter``) so
the rules are unit-tested without a terminal; the widget only diffs rows and touches the cells
that changed, which keeps a few hundred rows at 2 Hz cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..core.model import VM, VMState

SPARK = "▁▂▃▄▅▆▇█"
COLUMNS: list[tuple[str, str, int]] = [  # key, title, width
    ("mark", " ", 1), ("name", "NAME", 18), ("state", "STATE", 9), ("machine", "MACHINE", 8),
    ("accel", "ACCEL", 5), ("cpus", "CPUS", 4), ("memory", "MEM", 6), ("cpu", "CPU%", 6),
    ("rss", "RSS", 6), ("uptime", "UPTIME", 8), ("activity", "ACTIVITY", 12),
]
SORT_KEYS = [c[0] for c in COLUMNS if c[0] not in ("mark", "activity")]
STATE_ICON = {"running": "●", "paused": "◐", "stopped": "○", "pending": "◌", "crashed": "✗",
              "error": "✗", "stopping": "◌"}


@dataclass(frozen=True)
class Live:
    """What the dashboard knows about a VM's process beyond its record."""

    cpu_percent: float | None = None
    rss_bytes: int | None = None
    history: tuple[float, ...] = ()


def sparkline(values: Sequence[float], width: int = 12, top: float = 100.0) -> str:
    """Pure: the last ``width`` values as block characters, scaled to ``top`` (CPU %)."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    scale = max(top, max(vals)) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / scale * (len(SPARK) - 1) + 0.5))]
                   for v in vals)


def compact_size(n: int) -> str:
    """Pure: bytes in at most 5 characters (``128M``, ``1.5G``) for narrow columns."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.1f}{unit}" if v < 10 and v != int(v) else f"{v:.0f}{unit}"
    return f"{n}B"


def format_uptime(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def state_name(vm: VM) -> str:
    """The state as operators read it: lower case, ERROR shown as crashed."""
    name = vm.status.state.value.lower()
    return "crashed" if name == "error" else name


def state_counts(vms: Iterable[VM]) -> dict[str, int]:
    """Pure: how many VMs are in each state (as :func:`state_name` spells it)."""
    counts: dict[str, int] = {}
    for vm in vms:
        counts[state_name(vm)] = counts.get(state_name(vm), 0) + 1
    return counts


def is_live(vm: VM) -> bool:
    return vm.status.state in (VMState.RUNNING, VMState.PAUSED)


def row_cells(vm: VM, live: Live, now: float, marked: bool) -> tuple[str, ...]:
    """Pure: the text of each column for one VM."""
    st = vm.status
    up = format_uptime(now - st.started_at) if is_live(vm) and st.started_at else "-"
    cpu = f"{live.cpu_percent:5.1f}" if live.cpu_percent is not None and is_live(vm) else "-"
    rss = compact_size(live.rss_bytes) if live.rss_bytes and is_live(vm) else "-"
    return (
        "✓" if marked else " ",
        vm.meta.name,
        f"{STATE_ICON.get(state_name(vm), '?')} {state_name(vm)}",
        vm.spec.machine.value,
        (st.accelerator or vm.spec.accelerator.value) if is_live(vm) else
        vm.spec.accelerator.value,
        str(vm.spec.cpu_cores),
        compact_size(vm.spec.memory_mb * 1024 * 1024),
        cpu,
        rss,
        up,
        sparkline(live.history) if is_live(vm) else "",
    )


def parse_filter(text: str) -> Callable[[VM], bool]:
    """Pure: the `/` filter. Substring or regex on name/state/machine; ``!`` inverts;
    ``key=value`` matches a label (``key=`` any value); an invalid regex is a substring."""
    text = text.strip()
    if not text:
        return lambda vm: True
    inverse = text.startswith("!")
    if inverse:
        text = text[1:].strip()
    if "=" in text and re.fullmatch(r"[A-Za-z0-9_.\-/]+=[^\s]*", text):
        key, value = text.split("=", 1)

        def match(vm: VM) -> bool:
            return key in vm.meta.labels and (not value or vm.meta.labels[key] == value)
    else:
        try:
            rx = re.compile(text, re.IGNORECASE)
        except re.error:
            rx = re.compile(re.escape(text), re.IGNORECASE)

        def match(vm: VM) -> bool:
            return any(rx.search(s) for s in
                       (vm.meta.name, state_name(vm), vm.spec.machine.value))
    return (lambda vm: not match(vm)) if inverse else match


def sort_value(vm: VM, live: Live, key: str, now: float) -> tuple[float, str]:
    """Pure: a sortable value for column ``key`` (numbers sort numerically, ties by name)."""
    numeric: dict[str, float] = {
        "cpus": vm.spec.cpu_cores, "memory": vm.spec.memory_mb,
        "cpu": (live.cpu_percent or 0.0) if is_live(vm) else -1.0,
        "rss": float(live.rss_bytes or 0) if is_live(vm) else -1.0,
        "uptime": (now - vm.status.started_at) if is_live(vm) and vm.status.started_at
        else -1.0,
    }
    if key in numeric:
        return (numeric[key], vm.meta.name)
    text = {"name": vm.meta.name, "state": state_name(vm),
            "machine": vm.spec.machine.value, "accel": vm.status.accelerator}.get(key, "")
    return (0.0, f"{text}\0{vm.meta.name}")


class VMTable(ScrollView, can_focus=True):
    """A fleet-sized table drawn with the Line API: one cached Strip per row.

    Textual's DataTable lays out every visible cell through Rich on each change, which cost
    ~30 % of a core for 250 rows at 2 Hz; here a row is re-rendered only when its text changed,
    and only its line is refreshed. The header stays on the first line while rows scroll.
    """

    COMPONENT_CLASSES = {
        "vmtable--header", "vmtable--cursor", "vmtable--running", "vmtable--paused",
        "vmtable--stopped", "vmtable--crashed", "vmtable--pending", "vmtable--marked",
    }
    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home,g", "jump(0)", "Top", show=False),
        Binding("end,G", "jump(-1)", "Bottom", show=False),
        Binding("enter", "select", "Open", show=False),
    ]
    DEFAULT_CSS = """
    VMTable { height: 1fr; }
    VMTable > .vmtable--header { text-style: bold; background: $panel; }
    VMTable > .vmtable--cursor { background: $accent 40%; text-style: bold; }
    """

    class RowSelected(Message):
        def __init__(self, vm_id: str) -> None:
            super().__init__()
            self.vm_id = vm_id

    class HeaderSelected(Message):
        def __init__(self, column: str) -> None:
            super().__init__()
            self.column = column

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._rows: list[tuple[str, tuple[str, ...], str]] = []
        self._index: dict[str, int] = {}
        self._strips: dict[str, tuple[tuple[str, ...], str, bool, int, Strip]] = {}
        self.cursor_row = 0
        self._width = sum(w + 1 for _, _, w in COLUMNS)
        self._styles: dict[str, Style] = {}

    # -- data -------------------------------------------------------------------------------

    @property
    def shown_ids(self) -> list[str]:
        return [r[0] for r in self._rows]

    @property
    def row_count(self) -> int:
        return len(self._rows)

    def current_id(self) -> str | None:
        if 0 <= self.cursor_row < len(self._rows):
            return self._rows[self.cursor_row][0]
        return None

    def show(self, rows: Iterable[tuple[str, tuple[str, ...], str]]) -> int:
        """Display ``(vm_id, cells, state)`` in order; returns the number of rows redrawn."""
        rows = list(rows)
        keep = self.current_id()
        same_order = [r[0] for r in rows] == self.shown_ids
        old = {r[0]: r for r in self._rows}
        self._rows = rows
        self._index = {r[0]: i for i, r in enumerate(rows)}
        self.virtual_size = Size(self._width, len(rows) + 1)
        if not same_order:
            if keep in self._index:
                self.cursor_row = self._index[keep]
            self.cursor_row = max(0, min(self.cursor_row, len(rows) - 1))
            self.refresh()
            return len(rows)
        changed = 0
        for i, row in enumerate(rows):
            if old.get(row[0]) != row:
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

    @staticmethod
    def _fit(text: str, width: int) -> str:
        return text[:width].ljust(width) + " "

    def _header_strip(self) -> Strip:
        base = self.rich_style + self._style("vmtable--header")
        text = "".join(self._fit(title, w) for _, title, w in COLUMNS)
        return Strip([Segment(text.ljust(self.size.width), base)])

    def _row_strip(self, i: int) -> Strip:
        vm_id, cells, state = self._rows[i]
        cursor = i == self.cursor_row
        cached = self._strips.get(vm_id)
        if cached is not None and cached[:4] == (cells, state, cursor, self.size.width):
            return cached[4]
        base = self.rich_style
        if cursor:
            base = base + self._style("vmtable--cursor")
        group = {"error": "crashed", "stopping": "pending"}.get(state.lower(), state.lower())
        segs = []
        for c, (key, _, w) in enumerate(COLUMNS):
            style = base
            if key == "state":
                style = base + self._style(f"vmtable--{group}")
            elif key == "mark" and cells[0].strip():
                style = base + self._style("vmtable--marked")
            segs.append(Segment(self._fit(cells[c], w), style))
        pad = self.size.width - self._width
        if pad > 0:
            segs.append(Segment(" " * pad, base))
        strip = Strip(segs)
        self._strips[vm_id] = (cells, state, cursor, self.size.width, strip)
        return strip

    def render_line(self, y: int) -> Strip:
        if y == 0:
            return self._header_strip().crop(self.scroll_offset.x,
                                             self.scroll_offset.x + self.size.width)
        i = self.scroll_offset.y + y - 1
        if not 0 <= i < len(self._rows):
            return Strip.blank(self.size.width, self.rich_style)
        return self._row_strip(i).crop(self.scroll_offset.x,
                                       self.scroll_offset.x + self.size.width)

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

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * max(1, self.size.height - 2))

    def action_jump(self, where: int) -> None:
        self.move_cursor(0 if where == 0 else len(self._rows) - 1)

    def action_select(self) -> None:
        current = self.current_id()
        if current is not None:
            self.post_message(self.RowSelected(current))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            x, pos = event.x + int(self.scroll_offset.x), 0
            for key, _, w in COLUMNS:
                if pos <= x < pos + w + 1:
                    self.post_message(self.HeaderSelected(key))
                    return
                pos += w + 1
            return
        row = int(self.scroll_offset.y) + event.y - 1
        if 0 <= row < len(self._rows):
            if row == self.cursor_row and event.chain >= 2:
                self.action_select()
            self.move_cursor(row)


__all__ = [
    "Live",
    "VMTable",
    "compact_size",
    "format_uptime",
    "parse_filter",
    "row_cells",
    "sort_value",
    "sparkline",
    "state_counts",
    "state_name",
]
