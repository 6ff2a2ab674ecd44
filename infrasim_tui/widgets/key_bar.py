"""The footer: every one-letter verb of the focused view, drawn as one line of text.

Textual's Footer mounts a widget per key and restyles each on every focus change; with a
dozen keys that was the largest part of opening a console (and of each SSH session's
memory). One Static redrawn from ``screen.active_bindings`` shows the same thing; clicking a
key is left to the mouse-free majority (every key is also in `?` and the palette).
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.screen import Screen
from textual.widgets import Static


def key_bar_text(items: list[tuple[str, str]], key_style: Style, width: int,
                 tail: str = "") -> Text:
    """Pure: ``key description`` pairs packed into one line, ``tail`` right-aligned."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for key, description in items:
        text.append(f" {key} ", key_style)
        text.append(f"{description} ")
    if tail:
        pad = width - text.cell_len - len(tail) - 1
        if pad > 0:
            text.append(" " * pad)
            text.append(f" {tail}", key_style)
    return text


class KeyBar(Static):
    COMPONENT_CLASSES = {"key-bar--key"}
    DEFAULT_CSS = """
    KeyBar { dock: bottom; height: 1; width: 1fr; background: $panel; color: $text-muted; }
    KeyBar > .key-bar--key { color: $accent; text-style: bold; }
    """

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self._bindings_changed(self.screen)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def on_resize(self) -> None:
        self._bindings_changed(self.screen)

    def _bindings_changed(self, screen: Screen[object]) -> None:
        seen: set[str] = set()
        items: list[tuple[str, str]] = []
        for binding_info in screen.active_bindings.values():
            binding, enabled = binding_info.binding, binding_info.enabled
            if not binding.show or not enabled or binding.action in seen:
                continue
            seen.add(binding.action)
            items.append((self.app.get_key_display(binding), binding.description))
        style = self.get_component_rich_style("key-bar--key", partial=True)
        # a focused serial console takes Ctrl+P for the guest: then do not advertise it
        palette = self.app.COMMAND_PALETTE_BINDING in screen.active_bindings
        self.update(key_bar_text(items, style, self.size.width,
                                 "^p palette" if palette else ""))
