"""The fleet table: one row per VM, updated cell by cell from pushed events.

The row text is computed by pure functions (``row_cells``, ``sparkline``, ``parse_filter``) so
the rules are unit-tested without a terminal; the widget only diffs rows and touches the cells
that changed, which keeps a few hundred rows at 2 Hz cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

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


class VMTable(DataTable[str | Text]):
    """DataTable keyed by VM id; :meth:`show` diffs against what is displayed."""

    COMPONENT_CLASSES = {
        "vmtable--running", "vmtable--paused", "vmtable--stopped", "vmtable--crashed",
        "vmtable--pending", "vmtable--marked",
    }
    DEFAULT_CSS = """
    VMTable { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]
        self._shown: list[str] = []
        self._cells: dict[str, tuple[str, ...]] = {}
        self._cols: list[ColumnKey] = []

    def on_mount(self) -> None:
        for key, title, width in COLUMNS:
            self._cols.append(self.add_column(title, key=key, width=width))

    @property
    def shown_ids(self) -> list[str]:
        return list(self._shown)

    def current_id(self) -> str | None:
        if not self._shown or self.cursor_row < 0 or self.cursor_row >= len(self._shown):
            return None
        return self._shown[self.cursor_row]

    def _styled(self, cells: tuple[str, ...], state: str) -> list[str | Text]:
        group = {"error": "crashed", "stopping": "pending"}.get(state.lower(), state.lower())
        style = self.get_component_rich_style(f"vmtable--{group}", partial=True)
        out: list[str | Text] = list(cells)
        out[2] = Text(cells[2], style=style)
        if cells[0].strip():
            out[0] = Text(cells[0], style=self.get_component_rich_style("vmtable--marked",
                                                                        partial=True))
        return out

    def show(self, rows: Iterable[tuple[str, tuple[str, ...], str]]) -> int:
        """Display ``(vm_id, cells, state)`` in order; returns the number of cells written."""
        rows = list(rows)
        ids = [r[0] for r in rows]
        written = 0
        if ids != self._shown:
            keep = self.current_id()
            self.clear()
            self._cells.clear()
            for vm_id, cells, state in rows:
                self.add_row(*self._styled(cells, state), key=vm_id)
                self._cells[vm_id] = cells
                written += len(cells)
            self._shown = ids
            if keep in ids:
                self.move_cursor(row=ids.index(keep), animate=False)
            return written
        for vm_id, cells, state in rows:
            old = self._cells.get(vm_id)
            if old == cells:
                continue
            styled = self._styled(cells, state)
            for i, value in enumerate(cells):
                if old is None or old[i] != value:
                    self.update_cell(RowKey(vm_id), self._cols[i], styled[i])
                    written += 1
            self._cells[vm_id] = cells
        return written


__all__ = [
    "Live",
    "VMTable",
    "compact_size",
    "format_uptime",
    "parse_filter",
    "row_cells",
    "sort_value",
    "sparkline",
    "state_name",
]
