"""A small modal asking for a snapshot's name and an optional description.

Used by the snapshot tree for "take" and "branch"; the name is checked for shape here so a typo
is caught while the prompt is still open, and the core still has the last word.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from ..core.errors import InvalidSpec
from ..core.validation import validate_name


@dataclass(frozen=True)
class SnapshotRequest:
    """What the operator typed: the snapshot's name and its (possibly empty) description."""

    name: str
    description: str


class SnapshotPrompt(ModalScreen[SnapshotRequest | None]):
    """Dismisses with a :class:`SnapshotRequest`, or None on Esc / Cancel."""

    DEFAULT_CSS = """
    SnapshotPrompt { align: center middle; }
    SnapshotPrompt #snapshot-prompt {
        width: 72; height: auto; padding: 1 2; border: thick $primary; background: $panel;
    }
    SnapshotPrompt #snapshot-prompt-title { text-style: bold; }
    SnapshotPrompt #snapshot-prompt-note { margin-bottom: 1; }
    SnapshotPrompt #snapshot-name-error { height: auto; color: $error; }
    SnapshotPrompt #snapshot-name-error.-empty { display: none; }
    SnapshotPrompt #snapshot-prompt-buttons { height: auto; margin-top: 1; align: right middle; }
    SnapshotPrompt #snapshot-prompt-buttons Button { margin-left: 1; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, *, name: str = "", note: str = "", ok: str = "Take") -> None:
        super().__init__()
        self.title_text = title
        self.default_name = name
        self.note = note
        self.ok = ok

    def compose(self) -> ComposeResult:
        with Vertical(id="snapshot-prompt"):
            yield Label(self.title_text, id="snapshot-prompt-title", markup=False)
            if self.note:
                yield Label(self.note, id="snapshot-prompt-note", markup=False)
            yield Input(self.default_name, placeholder="name (lowercase, digits, -)",
                        id="snapshot-name", validate_on=())
            yield Label("", id="snapshot-name-error", classes="-empty", markup=False)
            yield Input(placeholder="description (optional)", id="snapshot-description")
            with Horizontal(id="snapshot-prompt-buttons"):
                yield Button(self.ok, id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#snapshot-name", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "snapshot-name":
            self._show_error("")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "snapshot-name":
            self.query_one("#snapshot-description", Input).focus()
        else:
            self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "ok":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _submit(self) -> None:
        name = self.query_one("#snapshot-name", Input).value.strip()
        try:
            validate_name(name)
        except InvalidSpec as err:
            self._show_error(err.reason)
            self.query_one("#snapshot-name", Input).focus()
            return
        description = self.query_one("#snapshot-description", Input).value.strip()
        self.dismiss(SnapshotRequest(name, description))

    def _show_error(self, message: str) -> None:
        label = self.query_one("#snapshot-name-error", Label)
        label.update(message)
        label.set_class(not message, "-empty")
        self.query_one("#snapshot-name", Input).set_class(bool(message), "-invalid")


__all__ = ["SnapshotPrompt", "SnapshotRequest"]
