"""The terminal behind each VM's serial console: one pyte screen per VM, shared by all viewers.

No Textual here, so the decoding, scrollback, throttling and sharing are testable (and
benchmarkable) without an App. Why it is built this way:

* pyte decodes ~0.3-0.75 MiB/s and a guest flooding its console can send far more, so
  :meth:`feed` only queues bytes; a frame tick (~30 fps, armed only while bytes are pending)
  decodes at most ``max_bytes_per_frame`` within ``frame_budget`` seconds, leaving the loop
  to keys and other viewers. A backlog worth more than ``max_lag`` seconds of decoding (or
  ``max_backlog`` bytes) loses its oldest bytes, counted in ``skipped_bytes``, so the screen
  is never more than about a second behind the guest; the core's serial log keeps every
  byte. Attach-time history is exempt from the lag bound.
* ``pyte.HistoryScreen`` is 4x slower than a plain Screen; lines that scroll off the top are
  captured by overriding ``index()`` instead, into a bounded deque.
* Viewers are told which rows changed, so they redraw only those; rendered rows (rich
  segments) are cached here, once for every viewer.
* :class:`ConsoleHub` keeps one model and one console stream per VM however many viewers
  (SSH sessions, panes) watch it, and reopens the stream when the VM starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyte
import pyte.charsets
from pyte import modes as mo
from pyte.screens import Char, StaticDefaultDict
from rich.color import Color, ColorParseError
from rich.segment import Segment
from rich.style import Style

from ..core.errors import InfraSimError, WrongState

if TYPE_CHECKING:
    from ..core.events import Event
    from ..session import ConsoleStream, Session

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * 1024

# pyte keeps private (DEC) modes shifted left by 5; it has no names for these two.
DECCKM = 1 << 5  # ESC [ ? 1 h: application cursor keys (arrows send ESC O A)
BRACKETED_PASTE = 2004 << 5  # ESC [ ? 2004 h: the guest wants pastes wrapped

Line = StaticDefaultDict[int, Char]
Listener = Callable[[set[int], int], None]
"""Called after each frame with (changed screen rows, lines scrolled into the scrollback)."""
ConsoleState = Literal["connecting", "live", "closed"]

_DECODE_SLICE = KIB  # bytes per pyte call: ~3 ms of `y` lines, so the budget holds
_ANSI_NAMES = {
    "black": "black", "red": "red", "green": "green", "brown": "yellow", "yellow": "yellow",
    "blue": "blue", "magenta": "magenta", "cyan": "cyan", "white": "white",
    "brightblack": "bright_black", "brightred": "bright_red", "brightgreen": "bright_green",
    "brightbrown": "bright_yellow", "brightyellow": "bright_yellow",
    "brightblue": "bright_blue", "brightmagenta": "bright_magenta",
    "bfightmagenta": "bright_magenta",  # sic: pyte 0.8.2's name for SGR 105
    "brightcyan": "bright_cyan", "brightwhite": "bright_white",
}


def _color(name: str) -> Color | None:
    """A pyte colour (a name, or 6 hex digits for 256-colour and truecolor) as a rich Color."""
    if name == "default":
        return None
    ansi = _ANSI_NAMES.get(name)
    try:
        if ansi is not None:
            return Color.parse(ansi)
        if len(name) == 6:
            return Color.parse("#" + name)
    except ColorParseError:
        pass
    return None


class _Screen(pyte.Screen):
    """A pyte Screen that captures lines scrolled off the top, and scrolls cheaply.

    ``HistoryScreen`` wraps every event and is 4x slower; here only ``index()`` (a line feed at
    the bottom) is overridden. Only scrolls of the whole screen are captured, as xterm does: a
    scroll region (a pager's status line kept in place) shuffles lines still on the screen.
    A full-screen scroll moves rows up by one key without creating blank lines and, instead of
    marking every row dirty, moves the rows already dirty to ``dirty_lines`` (absolute line
    numbers, which a scroll does not change), so the model keeps its rendered rows.
    ``draw()`` has a fast path for plain ASCII that fits on the line, the bulk of what a
    serial console prints.
    """

    def __init__(self, columns: int, lines: int, scrollback: deque[Line]) -> None:
        self.scrollback = scrollback
        self.captured = 0  # lines ever appended to the scrollback (absolute numbering)
        self.dirty_lines: set[int] = set()  # absolute numbers of lines changed, then scrolled
        super().__init__(columns, lines)

    def index(self) -> None:
        bottom = self.lines - 1
        margins = self.margins
        if self.cursor.y != bottom or (margins is not None and margins != (0, bottom)):
            super().index()
            return
        dirty = self.dirty
        if dirty:
            base = self.captured
            add = self.dirty_lines.add
            for y in dirty:
                add(base + y)
            dirty.clear()
        buf = self.buffer
        top = buf.pop(0, None)
        if top is None:
            top = StaticDefaultDict[int, Char](self.default_char)
        self.scrollback.append(top)
        self.captured += 1
        pop = buf.pop
        for y in range(1, self.lines):
            line = pop(y, None)
            if line is not None:
                buf[y - 1] = line
        dirty.add(bottom)

    def draw(self, data: str) -> None:
        cursor = self.cursor
        x = cursor.x
        end = x + len(data)
        if (end > self.columns or not data.isascii() or not data.isprintable()
                or self.charset or self.g0_charset is not _LATIN1 or mo.IRM in self.mode):
            super().draw(data)
            return
        line = self.buffer[cursor.y]
        attrs = cursor.attrs
        if attrs == _PLAIN:
            for ch in data:
                line[x] = _PLAIN_CHARS.get(ch) or _plain(ch)
                x += 1
        else:
            rest = attrs[1:]
            for ch in data:
                line[x] = Char(ch, *rest)
                x += 1
        cursor.x = end
        self.dirty.add(cursor.y)

    def delete_lines(self, count: int | None = None) -> None:
        """pyte 0.8.2's, except that a line is cleared when the one replacing it was blank
        (pyte left it in place when the row below had never been written)."""
        count = count or 1
        top, bottom = self.margins or (0, self.lines - 1)
        if top <= self.cursor.y <= bottom:
            self.dirty.update(range(self.cursor.y, self.lines))
            buf = self.buffer
            for y in range(self.cursor.y, bottom + 1):
                line = buf.pop(y + count, None) if y + count <= bottom else None
                if line is not None:
                    buf[y] = line
                else:
                    buf.pop(y, None)
            self.carriage_return()

    def row(self, y: int) -> Line:
        """Row ``y`` without creating it: rendering must never change what pyte decodes."""
        line = self.buffer.get(y)
        return line if line is not None else StaticDefaultDict[int, Char](self.default_char)


_LATIN1 = pyte.charsets.LAT1_MAP
_PLAIN = Char(" ")  # pyte's default attributes (default colours, no bold...)
_PLAIN_CHARS: dict[str, Char] = {}


def _plain(ch: str) -> Char:
    """A shared default-attribute Char per character: cells are immutable tuples."""
    char = _PLAIN_CHARS[ch] = Char(ch)
    return char


@dataclass(frozen=True)
class CursorInfo:
    """Where the guest's cursor is (screen row/column) and whether it asked to show it."""

    x: int
    y: int
    visible: bool


class ConsoleModel:
    """One VM's terminal: queued bytes, a fixed-size pyte screen, scrollback and render cache.

    All methods run on the event loop; the frame tick is armed only while bytes are pending,
    so an idle console costs nothing.
    """

    def __init__(self, vm_id: str = "", *, columns: int = 80, lines: int = 24,
                 scrollback: int = 5000, fps: float = 30.0,
                 max_bytes_per_frame: int = 32 * KIB, frame_budget: float = 0.015,
                 max_lag: float = 1.0, max_backlog: int = 2 * MIB) -> None:
        self.vm_id = vm_id
        self.columns = columns
        self.lines = lines
        self.interval = 1.0 / fps
        self.max_bytes_per_frame = max_bytes_per_frame
        self.frame_budget = frame_budget  # seconds of decoding per frame, whatever the bytes
        self.max_lag = max_lag  # seconds of decoding the live backlog may hold
        self.max_backlog = max_backlog  # bytes, whatever the decode speed
        self.decode_rate = 512.0 * KIB  # bytes/s while decoding, measured (moving average)
        self._history_left = 0  # queued bytes that are attach-time history
        self.scrollback: deque[Line] = deque(maxlen=scrollback)
        self._screen = _Screen(columns, lines, self.scrollback)
        self._stream = pyte.ByteStream(self._screen)
        self._pending: deque[bytes] = deque()
        self._pending_len = 0
        self._timer: asyncio.TimerHandle | None = None
        self._last_frame = -1e9
        self._listeners: list[Listener] = []
        self._rows: dict[int, list[Segment]] = {}  # screen row -> rendered segments
        self._row_text: dict[int, str] = {}
        self._old: dict[int, list[Segment]] = {}  # absolute scrollback line -> segments
        self._old_text: dict[int, str] = {}
        self._styles: dict[tuple[Any, ...], Style | None] = {}
        self._cursor = CursorInfo(0, 0, True)
        self._captured = 0  # screen.captured at the last frame
        self._writer: ConsoleStream | None = None
        self._outbox: list[bytes] = []
        self._sending: asyncio.Task[None] | None = None
        self.total_bytes = 0  # bytes received from the guest (history included)
        self.decoded_bytes = 0
        self.skipped_bytes = 0  # dropped from the backlog because the guest outran pyte
        self.frames = 0
        self.generation = 0  # bumped by reset(): viewers drop their positions and matches
        self.state: ConsoleState = "connecting"
        self.reason = ""  # why the console is not live, for the viewer's title
        self.vm_state = ""  # the VM's last known state from vm.state events ("running"...)

    # -- input from the guest ---------------------------------------------------------------

    def feed(self, data: bytes, *, history: bool = False) -> None:
        """Queue guest output; decoding happens on the next frame tick.

        ``history`` marks what the stream replayed on attach: it is shown whole however long
        it takes (only ``max_backlog`` bounds it), while live output keeps to ``max_lag``.
        """
        if not data:
            return
        self.total_bytes += len(data)
        if history:
            self._history_left += len(data)
        self._enqueue(data)

    def note(self, text: str) -> None:
        """Show a line of our own (console closed, VM not running) after the queued output."""
        start = b"" if self.total_bytes == 0 and self._screen.cursor.x == 0 else b"\r\n"
        self._enqueue(start + f"\x1b[0;1;33m[{text}]\x1b[0m\r\n".encode())

    def _enqueue(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_len += len(data)
        cap = self.backlog_cap
        if self._pending_len > cap:
            self._drop_backlog(self._pending_len - cap)
        self._arm()

    @property
    def backlog_cap(self) -> int:
        """Queued bytes allowed now: ``max_lag`` seconds of decoding at the frame budget's
        share of the loop (64 KiB at least), plus any history still queued."""
        duty = min(1.0, self.frame_budget / self.interval)
        live = max(64 * KIB, int(self.decode_rate * duty * self.max_lag))
        return min(self.max_backlog, self._history_left + live)

    def _drop_backlog(self, excess: int) -> None:
        """Drop the oldest queued bytes, cutting after a newline so decoding resumes cleanly."""
        dropped = 0
        while self._pending and dropped + len(self._pending[0]) <= excess:
            dropped += len(self._pending.popleft())
        if self._pending and dropped < excess:
            head = self._pending[0]
            cut = excess - dropped
            nl = head.find(b"\n", cut, cut + 4 * KIB)
            cut = nl + 1 if nl >= 0 else cut
            self._pending[0] = head[cut:]
            dropped += cut
            if not self._pending[0]:
                self._pending.popleft()
        self._pending_len -= dropped
        self._history_left = max(0, self._history_left - dropped)
        self.skipped_bytes += dropped

    @property
    def pending_bytes(self) -> int:
        return self._pending_len

    def _arm(self) -> None:
        if self._timer is not None or not self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # fed outside a loop (tests, benchmarks): run_frame() decodes
            return
        # An isolated keystroke echo is decoded at once; bursts coalesce to one frame per tick.
        delay = max(0.0, self._last_frame + self.interval - time.monotonic())
        self._timer = loop.call_later(delay, self._frame)

    def _frame(self) -> None:
        self._timer = None
        self.run_frame()
        self._arm()

    def run_frame(self) -> int:
        """Decode one frame's worth of queued bytes now and notify viewers; returns bytes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_frame = time.monotonic()  # frames start one interval apart (loop clock)
        start = time.perf_counter()
        deadline = start + self.frame_budget
        budget = self.max_bytes_per_frame
        feed = self._stream.feed
        while self._pending and budget > 0:
            head = self._pending[0]
            n = min(len(head), budget, _DECODE_SLICE)
            if n == len(head):
                self._pending.popleft()
                chunk = head
            else:
                chunk = head[:n]
                self._pending[0] = head[n:]
            self._pending_len -= n
            budget -= n
            try:
                feed(chunk)
            except Exception:  # a pyte bug must not stop the console
                log.exception("pyte failed on console output of %s", self.vm_id)
            if time.perf_counter() >= deadline:
                break
        done = self.max_bytes_per_frame - budget
        self.decoded_bytes += done
        self._history_left = max(0, self._history_left - done)
        elapsed = time.perf_counter() - start
        if done >= _DECODE_SLICE and elapsed > 0:
            self.decode_rate = 0.8 * self.decode_rate + 0.2 * (done / elapsed)
        self.frames += 1
        self._settle()
        return done

    def flush(self) -> None:
        """Decode everything queued now, frame by frame (tests; the viewer never waits)."""
        while self._pending:
            self.run_frame()

    def _settle(self) -> None:
        """Invalidate caches for what changed, then tell every viewer which rows to redraw."""
        screen = self._screen
        captured = screen.captured
        scrolled = captured - self._captured
        self._captured = captured
        dirty = set(screen.dirty)
        screen.dirty.clear()
        if screen.dirty_lines:
            dirty.update(n - captured for n in screen.dirty_lines if n >= captured)
            screen.dirty_lines.clear()
        if scrolled:  # rendered rows move up with their lines
            self._rows = {r - scrolled: v for r, v in self._rows.items() if r >= scrolled}
            self._row_text = {r - scrolled: v for r, v in self._row_text.items()
                              if r >= scrolled}
        for row in dirty:
            self._rows.pop(row, None)
            self._row_text.pop(row, None)
        first = self.first_line
        if len(self._old) > 2 * (self.scrollback.maxlen or 0) + 64:
            self._old = {k: v for k, v in self._old.items() if k >= first}
            self._old_text = {k: v for k, v in self._old_text.items() if k >= first}
        cursor = self.cursor
        if cursor != self._cursor:  # the viewer draws the cursor: both rows need a redraw
            dirty.add(cursor.y)
            if self._cursor.y >= scrolled:
                dirty.add(self._cursor.y - scrolled)
            self._cursor = cursor
        self._notify(dirty, scrolled)

    def _notify(self, dirty: set[int], scrolled: int) -> None:
        for listener in list(self._listeners):
            try:
                listener(dirty, scrolled)
            except Exception:  # one broken viewer never stops the others
                log.exception("console listener failed")

    def reset(self) -> None:
        """Forget everything (a new boot): screen, scrollback, queue and counters."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._pending_len = 0
        self.scrollback.clear()
        self._screen = _Screen(self.columns, self.lines, self.scrollback)
        self._stream = pyte.ByteStream(self._screen)
        self._rows.clear()
        self._row_text.clear()
        self._old.clear()
        self._old_text.clear()
        self.total_bytes = self.decoded_bytes = self.skipped_bytes = 0
        self._history_left = 0
        self._captured = 0
        self.generation += 1
        self._cursor = self.cursor
        self._notify(set(range(self.lines)), 0)

    # -- viewers ----------------------------------------------------------------------------

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(dirty_rows, scrolled)`` after every frame; returns unlisten."""
        self._listeners.append(listener)

        def unlisten() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unlisten

    def set_state(self, state: ConsoleState, reason: str = "") -> None:
        """Record the stream's state and let viewers retitle themselves."""
        if (state, reason) != (self.state, self.reason):
            self.state = state
            self.reason = reason
            self._notify(set(), 0)

    def set_vm_state(self, state: str) -> None:
        """Record the VM's state from a ``vm.state`` event (viewers show "paused")."""
        if state != self.vm_state:
            self.vm_state = state
            self._notify(set(), 0)

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def cursor(self) -> CursorInfo:
        c = self._screen.cursor
        return CursorInfo(min(c.x, self.columns - 1), c.y, not c.hidden)

    @property
    def application_cursor(self) -> bool:
        """DECCKM: arrows must be sent as ``ESC O A`` rather than ``ESC [ A``."""
        return DECCKM in self._screen.mode

    @property
    def bracketed_paste(self) -> bool:
        """Mode 2004: pastes must be wrapped in ``ESC [ 200 ~`` ... ``ESC [ 201 ~``."""
        return BRACKETED_PASTE in self._screen.mode

    @property
    def title(self) -> str:
        """What the guest set with OSC 0/2, if anything."""
        return str(self._screen.title)

    @property
    def first_line(self) -> int:
        """Absolute number of the oldest scrollback line (lines evicted so far)."""
        return self._screen.captured - len(self.scrollback)

    @property
    def line_count(self) -> int:
        """Scrollback plus screen rows: the height of the whole virtual console."""
        return len(self.scrollback) + self.lines

    def screen_lines(self) -> list[str]:
        """The screen's rows as text (trailing blanks kept), for tests and snapshots."""
        return [self.line_text(len(self.scrollback) + y) for y in range(self.lines)]

    def screen_text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen_lines())

    def line_segments(self, index: int) -> list[Segment]:
        """Line ``index`` of scrollback+screen as styled segments, ``columns`` cells wide."""
        sb = len(self.scrollback)
        if index >= sb:
            row = index - sb
            segs = self._rows.get(row)
            if segs is None:
                segs = self._rows[row] = self._render(self._screen.row(row)) \
                    if row < self.lines else [Segment(" " * self.columns)]
            return segs
        key = self.first_line + index
        segs = self._old.get(key)
        if segs is None:
            segs = self._old[key] = self._render(self.scrollback[index])
        return segs

    def line_text(self, index: int) -> str:
        """Line ``index`` of scrollback+screen as plain text (one char per cell)."""
        sb = len(self.scrollback)
        if index >= sb:
            row = index - sb
            text = self._row_text.get(row)
            if text is None:
                text = self._row_text[row] = self._text(self._screen.row(row)) \
                    if row < self.lines else " " * self.columns
            return text
        key = self.first_line + index
        text = self._old_text.get(key)
        if text is None:
            text = self._old_text[key] = self._text(self.scrollback[index])
        return text

    def _text(self, line: Line) -> str:
        if not line:
            return " " * self.columns
        default = line.default
        # A wide character's stub cell holds "": keep one char per cell so columns line up.
        return "".join(line.get(x, default).data or " " for x in range(self.columns))

    def _render(self, line: Line) -> list[Segment]:
        default = line.default
        if not line:
            return [Segment(" " * self.columns, self._style(default))]
        segs: list[Segment] = []
        run: list[str] = []
        run_key: tuple[Any, ...] | None = None
        get = line.get
        for x in range(self.columns):
            char = get(x, default)
            data = char.data
            if not data:
                continue  # the stub cell after a wide character
            key = char[1:]
            if key != run_key:
                if run:
                    segs.append(Segment("".join(run), self._style_of(run_key)))
                run = [data]
                run_key = key
            else:
                run.append(data)
        if run:
            segs.append(Segment("".join(run), self._style_of(run_key)))
        return segs

    def _style(self, char: Char) -> Style | None:
        return self._style_of(char[1:])

    def _style_of(self, key: tuple[Any, ...] | None) -> Style | None:
        if key is None:
            return None
        style = self._styles.get(key, False)
        if style is False:
            fg, bg, bold, italics, underscore, strike, reverse, blink = key
            style = Style(color=_color(fg), bgcolor=_color(bg), bold=bold or None,
                          italic=italics or None, underline=underscore or None,
                          strike=strike or None, reverse=reverse or None, blink=blink or None)
            if not style:
                style = None
            self._styles[key] = style
        return style  # type: ignore[return-value]

    # -- search -----------------------------------------------------------------------------

    def search(self, pattern: str, start: tuple[int, int] | None = None,
               backwards: bool = False, *, wrap: bool = True) -> tuple[int, int] | None:
        """Find ``pattern`` in scrollback+screen text: (line index, column) or None.

        Searches from just after ``start`` (or just before it, ``backwards``); with no start,
        from the top (or, backwards, from the bottom). Case-insensitive unless the pattern has
        an upper-case letter, as in less and vim.
        """
        if not pattern:
            return None
        fold = pattern == pattern.lower()
        needle = pattern.lower() if fold else pattern
        count = self.line_count

        def text(i: int) -> str:
            t = self.line_text(i)
            return t.lower() if fold else t

        if backwards:
            line, col = start if start is not None else (count - 1, self.columns + 1)
            line = min(line, count - 1)
            found = text(line).rfind(needle, 0, max(0, col - 1 + len(needle)))
            if found >= 0 and found < col:
                return line, found
            order = [*range(line - 1, -1, -1), *(range(count - 1, line - 1, -1) if wrap else ())]
            for i in order:
                found = text(i).rfind(needle)
                if found >= 0:
                    return i, found
            return None
        line, col = start if start is not None else (0, -1)
        line = max(0, line)
        found = text(line).find(needle, col + 1)
        if found >= 0:
            return line, found
        order = [*range(line + 1, count), *(range(0, line + 1) if wrap else ())]
        for i in order:
            found = text(i).find(needle)
            if found >= 0:
                return i, found
        return None

    # -- output to the guest ----------------------------------------------------------------

    def attach(self, stream: ConsoleStream | None) -> None:
        """The stream input goes through (the hub sets it; None while not live)."""
        self._writer = stream

    def send(self, data: bytes) -> None:
        """Queue input for the guest, in order, without waiting (for key handlers)."""
        if not data or self._writer is None:
            return
        self._outbox.append(data)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(
                self._drain(), name=f"console-input:{self.vm_id}")

    async def _drain(self) -> None:
        while self._outbox:
            data = b"".join(self._outbox)
            self._outbox.clear()
            if not await self.write(data):
                self._outbox.clear()

    async def write(self, data: bytes) -> bool:
        """Send input through the VM's one console stream; False when it is not live."""
        stream = self._writer
        if stream is None:
            return False
        try:
            await stream.write(data)
        except (ConnectionError, OSError, InfraSimError) as err:
            log.debug("console input to %s dropped: %s", self.vm_id, err)
            return False
        return True


@dataclass
class _Feed:
    """The hub's bookkeeping for one VM: its model, viewers and the pump task."""

    vm_id: str
    model: ConsoleModel
    refs: int = 0
    task: asyncio.Task[None] | None = None
    reader: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class ConsoleHub:
    """One :class:`ConsoleModel` and one console stream per VM for the whole process.

    Get it with :meth:`of`; viewers :meth:`acquire` a model and :meth:`release` it. The stream
    is opened by the first viewer and closed after the last leaves; a VM that is not running
    still gets a model (saying so) that comes alive when a ``vm.state`` event says it runs.
    """

    KEY = "console_hub"

    def __init__(self, session: Session, *, columns: int = 80, lines: int = 24,
                 scrollback: int = 5000, **model_options: Any) -> None:
        self.session = session
        self.columns = columns
        self.lines = lines
        self.scrollback = scrollback
        self.model_options = model_options
        self._feeds: dict[str, _Feed] = {}
        self._unlisten: Callable[[], None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0  # streams opened so far (tests and diagnostics)

    @classmethod
    def of(cls, session: Session, **options: Any) -> ConsoleHub:
        """The session's hub, created on first use (``options`` apply only then)."""
        hub = session.shared.get(cls.KEY)
        if not isinstance(hub, ConsoleHub):
            hub = session.shared[cls.KEY] = cls(session, **options)
        return hub

    def model(self, vm_id: str) -> ConsoleModel | None:
        feed = self._feeds.get(vm_id)
        return feed.model if feed is not None else None

    def viewers(self, vm_id: str) -> int:
        feed = self._feeds.get(vm_id)
        return feed.refs if feed is not None else 0

    async def acquire(self, vm_id: str) -> ConsoleModel:
        """The VM's model, its stream opened (or its absence explained) before this returns."""
        feed = self._feeds.get(vm_id)
        if feed is None:
            model = ConsoleModel(vm_id, columns=self.columns, lines=self.lines,
                                 scrollback=self.scrollback, **self.model_options)
            feed = self._feeds[vm_id] = _Feed(vm_id, model)
            if self._unlisten is None:
                self._unlisten = self.session.listen(self._on_event)
            feed.task = asyncio.get_running_loop().create_task(
                self._pump(feed), name=f"console-pump:{vm_id}")
        feed.refs += 1
        try:
            await feed.ready.wait()
        except asyncio.CancelledError:  # the viewer went away while the stream was opening
            self.release(vm_id)
            raise
        return feed.model

    def release(self, vm_id: str) -> None:
        """One viewer left; after the last, the stream is closed (in the background)."""
        feed = self._feeds.get(vm_id)
        if feed is None:
            return
        feed.refs -= 1
        if feed.refs > 0:
            return
        del self._feeds[vm_id]
        feed.model.attach(None)
        if feed.task is not None:
            feed.task.cancel()
            self._closing.add(feed.task)
            feed.task.add_done_callback(self._closing.discard)
        if not self._feeds and self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def aclose(self) -> None:
        """Close every stream now (app shutdown); models already handed out stay readable."""
        for vm_id in list(self._feeds):
            feed = self._feeds[vm_id]
            feed.refs = 1
            self.release(vm_id)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_event(self, ev: Event) -> None:
        if ev.type != "vm.state":
            return
        feed = self._feeds.get(ev.resource_id)
        if feed is None:
            return
        new = str(ev.data.get("new", "")).lower()
        feed.model.set_vm_state(new)
        if new in ("running", "paused"):  # QEMU is up: its console can be opened
            feed.wake.set()
        elif new in ("stopped", "error", "crashed") and feed.reader is not None:
            # QEMU is gone; a reader that has not seen the end yet never will.
            feed.reader.cancel()

    async def _open(self, feed: _Feed) -> ConsoleStream | None:
        try:
            stream = await self.session.open_console(feed.vm_id)
        except WrongState:
            reason = "VM is not running"
        except InfraSimError as err:
            reason = err.message
        except (ConnectionError, OSError) as err:
            reason = f"console unavailable: {err}"
        except Exception as err:  # never leave the viewer waiting on a broken opener
            log.exception("opening the console of %s failed", feed.vm_id)
            reason = f"console unavailable: {err}"
        else:
            self.opened += 1
            return stream
        if feed.model.reason != reason:
            feed.model.note(f"{reason}; the console opens when the VM runs")
        feed.model.set_state("closed", reason)
        return None

    async def _pump(self, feed: _Feed) -> None:
        model = feed.model
        retry = self.session.mode == "attached"  # the daemon may come back with the VM up
        try:
            while True:
                feed.wake.clear()
                stream = await self._open(feed)
                if stream is None:
                    feed.ready.set()
                    await feed.wake.wait()
                    continue
                model.reset()
                model.feed(stream.history, history=True)
                model.attach(stream)
                model.set_state("live")
                feed.ready.set()
                feed.reader = asyncio.get_running_loop().create_task(self._read(stream, model))
                try:
                    await asyncio.wait([feed.reader])
                finally:
                    feed.reader.cancel()
                    feed.reader = None
                    model.attach(None)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(stream.close()), 5.0)
                model.note("console closed")
                model.set_state("closed", "console closed")
                if retry and not feed.wake.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(feed.wake.wait(), 2.0)
                else:
                    await feed.wake.wait()
        finally:
            feed.ready.set()

    @staticmethod
    async def _read(stream: ConsoleStream, model: ConsoleModel) -> None:
        while (chunk := await stream.read()) is not None:
            model.feed(chunk)


__all__ = ["BRACKETED_PASTE", "DECCKM", "ConsoleHub", "ConsoleModel", "CursorInfo", "Line",
           "Listener"]
