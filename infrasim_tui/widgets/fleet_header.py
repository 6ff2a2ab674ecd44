"""The console's top line: where we are, counts per state, the core's mode and event rate.

The event rate is shown so an operator can see the view is live (k9s shows its refresh
interval; ours is pushed, so we show what actually arrived).
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

ORDER = [("running", "●"), ("paused", "◐"), ("stopped", "○"), ("crashed", "✗")]


def header_text(crumbs: str, counts: Mapping[str, int], mode: str, rate: float,
                role: str, styles: Mapping[str, Style] | None = None) -> Text:
    """Pure: the header line's text (``styles`` colours each state's count)."""
    styles = styles or {}
    t = Text()
    t.append(" InfraSim ", style="bold reverse")
    t.append(f" {crumbs} ", style="bold")
    for state, icon in ORDER:
        n = counts.get(state, 0) + (counts.get("error", 0) if state == "crashed" else 0)
        t.append(f" {icon} {n} {state}", style=styles.get(state, ""))
    other = sum(v for k, v in counts.items() if k not in {s for s, _ in ORDER} | {"error"})
    if other:
        t.append(f" ◌ {other} busy")
    t.append(f"  │ {mode}")
    if role != "admin":
        t.append(f" │ {role}", style="bold")
    t.append(f" │ {rate:4.1f} ev/s")
    return t


class FleetHeader(Static):
    COMPONENT_CLASSES = {f"fleetheader--{s}" for s, _ in ORDER}
    DEFAULT_CSS = """
    FleetHeader { height: 1; width: 1fr; background: $panel; }
    """

    def update_header(self, crumbs: str, counts: Mapping[str, int], mode: str, rate: float,
                      role: str) -> None:
        styles = {s: self.get_component_rich_style(f"fleetheader--{s}", partial=True)
                  for s, _ in ORDER}
        self.update(header_text(crumbs, counts, mode, rate, role, styles))
