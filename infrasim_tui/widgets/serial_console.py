"""A VM's serial console inside the TUI: the shared pyte screen of a :class:`ConsoleModel`.

Built on the Line API (``ScrollView.render_line``) so a frame redraws only the rows the guest
changed; the virtual height is scrollback plus screen. Focused, the widget takes every key
(app bindings such as ``q`` and ``ctrl+q`` do not fire) and sends it to the guest, except
Ctrl+] which posts :class:`SerialConsole.Detached`. Shift+PageUp enters a scrollback mode in
which keys scroll and search instead (``/`` then Enter, ``n`` older, ``N`` newer, Esc/End to
follow the output again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.content import Content
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.worker import Worker

from .console_model import ConsoleHub, ConsoleModel
from .keys import DETACH_KEY, detach_key, key_to_bytes

if TYPE_CHECKING:
    from ..session import Session

PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"
# What a read-only viewer takes from the app while following (scrollback mode takes all keys).
_BROWSE_KEYS = frozenset({"up", "down", "pageup", "pagedown", "home", "end", "shift+pageup",
                          "shift+pagedown", "slash"})
_DENIED_PAUSE = 5.0  # seconds without asking again after the app refused console input


class SerialConsole(ScrollView, can_focus=True):
    """One VM's serial console; any number of these share the VM's model and stream."""

    DEFAULT_CSS = """
    SerialConsole {
        height: 1fr;
        width: 1fr;
        background: $background;
        color: $foreground;
        border: round $border-blurred;
        border-title-color: $foreground;
        border-subtitle-color: $foreground-muted;
        &:focus { border: round $border; }
        & > .serial-console--match { background: $warning 40%; }
        & > .serial-console--current-match { background: $warning; color: $background; }
        & > .serial-console--prompt { background: $panel; color: $foreground; }
    }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "serial-console--match", "serial-console--current-match", "serial-console--prompt",
    }

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(DETACH_KEY, "detach", "Detach", key_display="^]", priority=True),
    ]

    class Detached(Message):
        """Ctrl+] was pressed in the console: the parent decides (usually moves focus)."""

        def __init__(self, console: SerialConsole) -> None:
            super().__init__()
            self.console = console

        @property
        def control(self) -> SerialConsole:
            return self.console

    class _Frame(Message, bubble=False):
        """The model decoded a frame (posted so it is handled in this widget's own app)."""

    def __init__(self, session: Session, vm_id: str, *, vm_name: str = "",
                 read_only: bool = False, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.session = session
        self.vm_id = vm_id
        self.vm_name = vm_name
        self.read_only = read_only
        self.model: ConsoleModel | None = None
        self.follow = True  # stick to the bottom as output arrives
        self.scrollback_mode = False  # keys scroll/search instead of going to the guest
        self.pattern = ""  # the last search
        self.match: tuple[int, int] | None = None  # (absolute line, column) of the hit
        self._prompt: str | None = None  # the search being typed
        self._message = ""  # one-line feedback in the prompt row ("not found")
        self._hub: ConsoleHub | None = None
        self._worker: Worker[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        self._gone = False  # unmounted: a late acquire must give its model back
        self._dirty: set[int] = set()
        self._posted = False
        self._first_line = 0
        self._generation = -1
        self._auto_scroll = False
        self._denied_until = 0.0
        self._title = ""
        self._subtitle = ""
        self.key_time = 0.0  # perf_counter() of the last key handled (latency benchmark)

    # -- attach / detach --------------------------------------------------------------------

    def on_mount(self) -> None:
        self._hub = ConsoleHub.of(self.session)
        self._worker = self.run_worker(self._connect(), name=f"console:{self.vm_id}",
                                       exit_on_error=False)
        self._retitle()

    async def _connect(self) -> None:
        assert self._hub is not None
        model = await self._hub.acquire(self.vm_id)
        if self._gone:  # unmounted while the stream was opening
            self._hub.release(self.vm_id)
            return
        self.model = model
        self._unlisten = model.listen(self._on_model_frame)
        self._dirty.update(range(model.lines))
        self._apply()

    def on_unmount(self) -> None:
        self._gone = True
        if self._worker is not None:
            self._worker.cancel()
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self.model is not None and self._hub is not None:
            self.model = None
            self._hub.release(self.vm_id)

    def _on_model_frame(self, dirty: set[int], scrolled: int) -> None:
        # Called from the model's frame tick, maybe in another app's context: only queue.
        self._dirty |= dirty
        if not self._posted:
            self._posted = True
            self.post_message(self._Frame())

    def on_serial_console__frame(self, message: SerialConsole._Frame) -> None:
        message.stop()
        self._apply()

    def _apply(self) -> None:
        """Bring the view up to date with the model: size, scroll position, dirty rows."""
        self._posted = False
        model = self.model
        dirty, self._dirty = self._dirty, set()
        if model is None:
            return
        if model.generation != self._generation:  # a new boot: start over at the bottom
            self._generation = model.generation
            self._first_line = model.first_line
            self.match = None
            self.follow = True
            self.scrollback_mode = False
            self.refresh()
        evicted = model.first_line - self._first_line
        self._first_line = model.first_line
        size = Size(model.columns, model.line_count)
        if self.virtual_size != size:
            self.virtual_size = size
        scroll_y = self.scroll_offset.y
        if self.follow:
            self._scroll_to_line(self.max_scroll_y)
        elif evicted:  # keep the same lines in view while old ones fall off the top
            self._scroll_to_line(max(0, scroll_y - evicted))
        if evicted:  # every row index now names another line
            self.refresh()
        elif self.scroll_offset.y == scroll_y:  # (a scroll already repaints everything)
            self._refresh_rows(dirty, model)
        self._retitle()

    def _refresh_rows(self, dirty: set[int], model: ConsoleModel) -> None:
        top = self.scroll_offset.y
        height = self.scrollable_content_region.height
        base = len(model.scrollback)
        rows = sorted(r + base for r in dirty if top <= r + base < top + height)
        start = prev = -2
        for y in [*rows, -1]:
            if y != prev + 1:
                if start >= 0:
                    self.refresh_lines(start, prev - start + 1)
                start = y
            prev = y

    def _scroll_to_line(self, y: int) -> None:
        self._auto_scroll = True
        try:
            self.scroll_to(y=y, animate=False, force=True, immediate=True)
        finally:
            self._auto_scroll = False

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if not self._auto_scroll and not self.scrollback_mode:
            self.follow = round(new_value) >= self.max_scroll_y  # the wheel leaves follow
            self._retitle()

    def on_resize(self, event: events.Resize) -> None:
        if self.follow:
            self._scroll_to_line(self.max_scroll_y)

    # -- title ------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """What the border title says after the VM's name."""
        model = self.model
        parts: list[str] = []
        if model is None:
            parts.append("connecting")
        else:
            if model.closed:
                parts.append(f"closed ({model.reason})" if model.reason else "closed")
            elif model.vm_state == "paused":
                parts.append("paused")
        parts.append("scrollback" if self.scrollback_mode or not self.follow else "following")
        if model is not None and model.skipped_bytes:
            kib = max(1, model.skipped_bytes // 1024)
            parts.append(f"{kib} KiB skipped — full output in the log")
        return " · ".join(parts)

    def _retitle(self) -> None:
        title = f"{self.vm_name or self.vm_id} — {self.status}"
        hints = []
        if self.read_only:
            hints.append("read-only")
        if self._prompt is not None:
            hints.append("Enter search · Esc cancel")
        elif self.scrollback_mode:
            hints.append("↑↓ PgUp PgDn · / search · n/N · Esc follow")
        elif self.has_focus and not self.read_only:
            hints.append("^] detach · Shift+PgUp scrollback")
        subtitle = " · ".join(hints)
        if title != self._title:
            self._title = title
            self.border_title = Content(title)
        if subtitle != self._subtitle:
            self._subtitle = subtitle
            self.border_subtitle = Content(subtitle) if subtitle else None

    def on_focus(self) -> None:
        self.call_next(self._retitle)  # Widget._on_focus (which sets has_focus) runs after us

    def on_blur(self) -> None:
        self.call_next(self._retitle)

    # -- rendering --------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == self.scrollable_content_region.height - 1 and (
                self._prompt is not None or self._message):
            return self._prompt_strip(width)
        model = self.model
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        if model is None or index >= model.line_count:
            return Strip.blank(width, base)
        strip = Strip(model.line_segments(index), model.columns)
        if self.pattern and (self.scrollback_mode or self.read_only or not self.follow):
            strip = self._highlight(strip, model, index)
        cursor = model.cursor
        if (cursor.visible and self.has_focus and not self.read_only and not model.closed
                and index == len(model.scrollback) + cursor.y):
            strip = self._overlay(strip, cursor.x, cursor.x + 1, None)
        return strip.apply_style(base).crop_extend(scroll_x, scroll_x + width, base)

    @staticmethod
    def _overlay(strip: Strip, start: int, end: int, style: Style | None) -> Strip:
        """Restyle cells [start, end) on top of their own style (None: toggle reverse)."""
        end = min(end, strip.cell_length)
        if start >= end:
            return strip
        before, middle, after = strip.divide([start, end, strip.cell_length])
        if style is None:
            cell = next(iter(middle), Segment(" "))
            reversed_ = bool(cell.style and cell.style.reverse)
            style = Style(reverse=not reversed_)
        middle = Strip(Segment.apply_style(middle, post_style=style), end - start)
        return Strip.join([before, middle, after])

    def _highlight(self, strip: Strip, model: ConsoleModel, index: int) -> Strip:
        pattern = self.pattern
        fold = pattern == pattern.lower()
        text = model.line_text(index)
        if fold:
            text = text.lower()
        found = text.find(pattern)
        if found < 0:
            return strip
        match_style = self.get_component_rich_style("serial-console--match")
        current_style = self.get_component_rich_style("serial-console--current-match")
        absolute = model.first_line + index
        while found >= 0:
            current = self.match == (absolute, found)
            strip = self._overlay(strip, found, found + len(pattern),
                                  current_style if current else match_style)
            found = text.find(pattern, found + max(1, len(pattern)))
        return strip

    def _prompt_strip(self, width: int) -> Strip:
        style = self.get_component_rich_style("serial-console--prompt")
        if self._prompt is not None:
            text = "/" + self._prompt
            segments = [Segment(text, style), Segment(" ", style + Style(reverse=True))]
            length = len(text) + 1
        else:
            segments = [Segment(self._message, style)]
            length = len(self._message)
        return Strip(segments, length).crop_extend(0, width, style)

    # -- keys -------------------------------------------------------------------------------

    def check_consume_key(self, key: str, character: str | None) -> bool:
        """Take every key from the app's bindings while focused (so Ctrl+Q reaches the guest);
        a read-only viewer takes only its scrolling keys."""
        if detach_key(key):
            return False
        if self.read_only and self._prompt is None and not self.scrollback_mode:
            return key in _BROWSE_KEYS
        return True

    def action_detach(self) -> None:
        self.post_message(self.Detached(self))

    async def _on_key(self, event: events.Key) -> None:
        event.prevent_default()  # no Widget key dispatch: the guest gets the keys
        self.key_time = time.perf_counter()
        key = event.key
        if self._message and self._prompt is None:
            self._message = ""
            self._refresh_prompt_row()
        if self._prompt is not None:
            event.stop()
            self._prompt_key(key, event.character)
            return
        if self.scrollback_mode or key in ("shift+pageup", "shift+pagedown") or self.read_only:
            if self._browse_key(key, event.character):
                event.stop()
            elif not self.read_only:
                event.stop()  # scrollback mode swallows the rest: nothing reaches the guest
            return
        event.stop()
        model = self.model
        if model is None:
            return
        data = key_to_bytes(key, event.character, application_cursor=model.application_cursor)
        if data:
            self.send(data)

    def _browse_key(self, key: str, character: str | None) -> bool:
        """Scrolling and searching keys (scrollback mode, or a read-only viewer)."""
        height = max(1, self.scrollable_content_region.height - 1)
        if key in ("shift+pageup", "pageup"):
            self._enter_scrollback()
            self._scroll_by(-height)
        elif key in ("shift+pagedown", "pagedown"):
            self._scroll_by(height)
        elif key == "up":
            self._enter_scrollback()
            self._scroll_by(-1)
        elif key == "down":
            self._scroll_by(1)
        elif key == "home":
            self._enter_scrollback()
            self._scroll_to_line(0)
        elif key in ("end", "escape", "q"):
            if key == "q" and not self.scrollback_mode:
                return False
            self.leave_scrollback()
        elif character == "/":
            self._enter_scrollback()
            self._prompt = ""
            self._refresh_prompt_row()
            self._retitle()
        elif character == "n" and self.pattern:
            self.find(backwards=True)
        elif character == "N" and self.pattern:
            self.find(backwards=False)
        else:
            return False
        return True

    def _prompt_key(self, key: str, character: str | None) -> None:
        assert self._prompt is not None
        if key == "enter":
            pattern, self._prompt = self._prompt, None
            if pattern:
                self.pattern = pattern
                self.match = None
                self.find(backwards=True)
        elif key == "escape":
            self._prompt = None
        elif key == "backspace":
            self._prompt = self._prompt[:-1]
        elif key == "ctrl+u":
            self._prompt = ""
        elif character and character.isprintable():
            self._prompt += character
        self._refresh_prompt_row()
        self._retitle()

    def _refresh_prompt_row(self) -> None:
        region = self.scrollable_content_region
        self.refresh_line(self.scroll_offset.y + region.height - 1)

    def _enter_scrollback(self) -> None:
        if not self.scrollback_mode:
            self.scrollback_mode = True
            self.follow = False
            self._retitle()

    def leave_scrollback(self) -> None:
        """Back to following the output (Esc or End in scrollback mode)."""
        self.scrollback_mode = False
        self._prompt = None
        self.follow = True
        self._scroll_to_line(self.max_scroll_y)
        self.refresh()
        self._retitle()

    def _scroll_by(self, lines: int) -> None:
        target = max(0, min(self.max_scroll_y, self.scroll_offset.y + lines))
        self._scroll_to_line(target)
        if not self.scrollback_mode:
            self.follow = target >= self.max_scroll_y
        self._retitle()

    def find(self, pattern: str | None = None, *, backwards: bool = True) -> bool:
        """Search scrollback+screen (older matches first, from the bottom of the view) and
        bring the hit into view; False (and a message) when there is none."""
        model = self.model
        if pattern is not None:
            self.pattern = pattern
            self.match = None
        if model is None or not self.pattern:
            return False
        self._enter_scrollback()
        if self.match is not None and self.match[0] >= model.first_line:
            start = (self.match[0] - model.first_line, self.match[1])
        else:  # from the bottom of the view (or its top, forwards)
            bottom = self.scroll_offset.y + self.scrollable_content_region.height - 1
            start = (min(bottom, model.line_count - 1),
                     model.columns + 1) if backwards else (self.scroll_offset.y, -1)
        hit = model.search(self.pattern, start, backwards)
        if hit is None:
            self._message = f"Pattern not found: {self.pattern}"
            self._refresh_prompt_row()
            return False
        line, col = hit
        self.match = (model.first_line + line, col)
        height = self.scrollable_content_region.height
        top = self.scroll_offset.y
        if not top <= line < top + height - 1:
            self._scroll_to_line(max(0, line - height // 2))
        self.refresh()
        return True

    async def _on_paste(self, event: events.Paste) -> None:
        event.prevent_default()
        event.stop()
        if self._prompt is not None:
            self._prompt += event.text.splitlines()[0] if event.text else ""
            self._refresh_prompt_row()
            return
        model = self.model
        if model is None or self.read_only or self.scrollback_mode or not event.text:
            return
        # A terminal sends CR for Enter; a pasted end marker must not end the paste early.
        text = event.text.replace("\r\n", "\r").replace("\n", "\r")
        data = text.encode("utf-8").replace(PASTE_END, b"")
        if model.bracketed_paste:
            data = PASTE_START + data + PASTE_END
        self.send(data)

    def send(self, data: bytes) -> bool:
        """Send input to the guest (snapping back to the bottom); False when not allowed."""
        model = self.model
        if model is None or self.read_only:
            return False
        check = getattr(self.app, "check_action_allowed", None)
        if check is not None:
            now = time.monotonic()
            if now < self._denied_until:
                return False
            if not check("console_input"):
                self._denied_until = now + _DENIED_PAUSE
                return False
        if not self.follow:
            self.follow = True
            self._scroll_to_line(self.max_scroll_y)
            self._retitle()
        model.send(data)
        return True


__all__ = ["SerialConsole"]
