"""Events: what the core reported, oldest first — the session's recent history, then live.

Metrics and progress ticks are left out (they are many a second and say nothing an operator
reads back). The screen keeps its own bounded buffer so the filter can re-draw what it hides;
live events are written in batches so a burst costs one repaint.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, ClassVar, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Header, Input, RichLog

from ..core.events import Event
from ..widgets.core_events import FollowsCore
from ..widgets.key_bar import KeyBar

if TYPE_CHECKING:
    from ..app import InfraSimApp

KEEP = 2000  # lines kept (and shown) at most
BATCH = 0.05  # seconds: live events are written together
QUIET = ("vm.metrics", "volume.progress")

ERROR_TYPES = ("vm.start_refused", "volume.integrity_failed", "session.disconnected")
WARN_TYPES = ("vm.deleted", "volume.deleted", "snapshot.deleted", "network.deleted",
              "console.deleted", "vm.orphan_killed", "vm.reconciled")


def severity(ev: Event) -> str:
    """Pure: ``error``, ``warning``, ``success`` or ``info`` — how the line is coloured."""
    if ev.type in ERROR_TYPES or ev.type.endswith(("_failed", ".error")):
        return "error"
    if ev.type == "vm.state":
        new = str(ev.data.get("new", "")).upper()
        if new == "ERROR":
            return "error"
        if new in ("STOPPED", "PAUSED"):
            return "warning"
        return "success" if new == "RUNNING" else "info"
    if ev.type in WARN_TYPES:
        return "warning"
    if ev.type.endswith((".created", ".signed", ".restored", ".reattached")):
        return "success"
    return "info"


def event_line(ev: Event) -> str:
    """Pure: ``MM-DD HH:MM:SS kind name type message`` in aligned columns."""
    when = time.strftime("%m-%d %H:%M:%S", time.localtime(ev.ts))
    return f"{when} {ev.kind:<8} {ev.name or '-':<16} {ev.type:<24} {ev.message}"


class EventsScreen(FollowsCore, Screen[None]):
    """The event log with a substring filter; follows new events unless told not to."""

    DEFAULT_CSS = """
    EventsScreen #events-log { height: 1fr; }
    EventsScreen #events-filter { dock: bottom; }
    EventsScreen #events-filter.-hidden { display: none; }
    EventsScreen > .events--error { color: $error; }
    EventsScreen > .events--warning { color: $warning; }
    EventsScreen > .events--success { color: $success; }
    EventsScreen > .events--info { }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"events--error", "events--warning",
                                             "events--success", "events--info"}

    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("f", "toggle_follow", "Follow"),
        Binding("c", "clear", "Clear"),
        Binding("escape", "escape", "Back", show=False),
    ]

    TITLE = "Events"

    def __init__(self, filter_text: str = "") -> None:
        super().__init__()
        self.filter_text = filter_text
        self.follow = True
        self.events: deque[Event] = deque(maxlen=KEEP)
        self._batch: list[Event] = []
        self._flush: Timer | None = None

    @property
    def infrasim(self) -> InfraSimApp:
        return cast("InfraSimApp", self.app)

    def recreate(self) -> EventsScreen:
        return EventsScreen(self.filter_text)

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="events-log", max_lines=KEEP, wrap=False, markup=False,
                      auto_scroll=True)
        yield Input(self.filter_text, placeholder="filter: substring (Enter keeps, Esc hides)",
                    id="events-filter", classes="" if self.filter_text else "-hidden")
        yield KeyBar()

    def on_mount(self) -> None:
        session = self.infrasim.session
        self.events.extend(ev for ev in session.recent if ev.type not in QUIET)
        self.follow_core(self._on_core_event)
        self.redraw()
        self.query_one(RichLog).focus()
        self._update_subtitle()


    # -- data -------------------------------------------------------------------------------

    def _on_core_event(self, ev: Event) -> None:
        """Session listener: runs in the session's task (maybe another app's context), so it
        only hands the event over to this screen's own message loop."""
        if ev.type not in QUIET:
            self.call_later(self._enqueue, ev)

    def _enqueue(self, ev: Event) -> None:
        self._batch.append(ev)
        if self._flush is None:
            self._flush = self.set_timer(BATCH, self._write_batch)

    def _write_batch(self) -> None:
        self._flush = None
        batch, self._batch = self._batch, []
        log = self.query_one(RichLog)
        for ev in batch:
            self.events.append(ev)
            if self.matches(ev):
                log.write(self._text(ev), scroll_end=self.follow)

    def matches(self, ev: Event) -> bool:
        needle = self.filter_text.lower()
        return not needle or needle in event_line(ev).lower()

    def _text(self, ev: Event) -> Text:
        style = self.get_component_rich_style(f"events--{severity(ev)}", partial=True)
        return Text(event_line(ev), style=style, no_wrap=True, end="")

    def redraw(self) -> None:
        """Re-write the whole log from the buffer (after the filter changed)."""
        log = self.query_one(RichLog)
        log.clear()
        for ev in self.events:
            if self.matches(ev):
                log.write(self._text(ev), scroll_end=self.follow)

    def visible_lines(self) -> list[str]:
        """The text of the lines the log currently holds (for tests and copy-out)."""
        return [strip.text for strip in self.query_one(RichLog).lines]

    def _update_subtitle(self) -> None:
        parts = ["following" if self.follow else "paused"]
        if self.filter_text:
            parts.append(f"filter: {self.filter_text}")
        self.sub_title = " · ".join(parts)

    # -- keys -------------------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#events-filter", Input)
        box.remove_class("-hidden")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "events-filter":
            self.filter_text = event.value
            self.redraw()
            self._update_subtitle()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "events-filter":
            event.stop()
            if not event.value:
                event.input.add_class("-hidden")
            self.query_one(RichLog).focus()

    def action_escape(self) -> None:
        """Esc in the filter box leaves it (hidden when empty; the filter stays); elsewhere it
        goes back as everywhere."""
        box = self.query_one("#events-filter", Input)
        if box.has_focus:
            if not box.value:
                box.add_class("-hidden")
            self.query_one(RichLog).focus()
        else:
            self.infrasim.action_go_back()

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        log = self.query_one(RichLog)
        log.auto_scroll = self.follow
        if self.follow:
            log.scroll_end(animate=False)
        self._update_subtitle()
        self.notify("following new events" if self.follow else "not following", timeout=2)

    def action_clear(self) -> None:
        self.events.clear()
        self.query_one(RichLog).clear()


__all__ = ["EventsScreen", "event_line", "severity"]
