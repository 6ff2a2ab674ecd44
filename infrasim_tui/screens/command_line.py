"""`:` command mode, as in k9s and vim: `:vm web-1`, `:volumes`, `:theme light`, `:q`."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Input

COMMANDS = ["vm", "vms", "volumes", "events", "networks", "snapshots", "new", "theme", "help",
            "quit", "start", "stop", "pause", "resume", "restart"]
ALIASES = {"q": "quit", "dash": "vms", "dashboard": "vms", "home": "vms", "vol": "volumes",
           "vols": "volumes", "ev": "events", "snap": "snapshots", "create": "new", "?": "help",
           "net": "networks", "nets": "networks", "network": "networks", "qos": "networks"}
NEEDS_ARG = {"vm", "theme", "start", "stop", "pause", "resume", "restart"}


def parse_command(line: str) -> tuple[str, str]:
    """Pure: ``"vm web-1"`` → ``("vm", "web-1")``; unknown verbs raise ValueError."""
    parts = line.strip().lstrip(":").split(None, 1)
    if not parts:
        raise ValueError("empty command")
    verb = ALIASES.get(parts[0].lower(), parts[0].lower())
    arg = parts[1].strip() if len(parts) > 1 else ""
    if verb not in COMMANDS:
        raise ValueError(f"unknown command {parts[0]!r}; try: {', '.join(COMMANDS)}")
    if verb in NEEDS_ARG and not arg:
        raise ValueError(f":{verb} needs an argument, e.g. :{verb} NAME")
    return verb, arg


class CommandLine(ModalScreen[str | None]):
    """A one-line prompt docked at the bottom; Enter runs, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        names = [f"vm {vm.meta.name}" for vm in getattr(self.app, "vm_cache", {}).values()]
        yield Input(placeholder=":vm NAME  :volumes  :events  :snapshots  :theme light  :q",
                    suggester=SuggestFromList(names + COMMANDS, case_sensitive=False),
                    id="command-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
