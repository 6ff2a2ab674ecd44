"""`?`: every key of the view it was opened from, then the app's global keys."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Static


def key_rows(screen: Screen[Any]) -> list[tuple[str, str, str]]:
    """(scope, key, description) for every binding reachable from ``screen``."""
    rows: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    scopes: list[tuple[str, Any]] = [(type(screen).__name__.removesuffix("Screen") or "View",
                                      screen)]
    focused = screen.focused
    if focused is not None:
        scopes.insert(0, (type(focused).__name__, focused))
    scopes.append(("Global", screen.app))
    for scope, node in scopes:
        for binding in getattr(node, "BINDINGS", []):
            if not isinstance(binding, Binding):
                continue
            key = binding.key_display or binding.key
            hidden = node is focused and not binding.show  # a widget's cursor keys
            if (scope, key) in seen or not binding.description or hidden:
                continue
            seen.add((scope, key))
            rows.append((scope, key, binding.description))
    rows.append(("Global", "ctrl+p", "Command palette (every action)"))
    return rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, of: Screen[Any]) -> None:
        super().__init__()
        self.of = of

    def compose(self) -> ComposeResult:
        yield Static("Keys — Esc closes", id="help-title")
        table: DataTable[str] = DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("Where", "Key", "Does")
        for row in key_rows(self.of):
            table.add_row(*row)
        yield table

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
