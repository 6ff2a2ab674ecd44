"""The serial console's pure parts: key mapping, the pyte-backed model and the per-VM hub."""

from __future__ import annotations

import asyncio
import time

import pyte
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.color import Color
from textual._xterm_parser import XTermParser

from infrasim_tui.core.events import Event
from infrasim_tui.session import Session
from infrasim_tui.widgets.console_model import ConsoleHub, ConsoleModel, _Screen
from infrasim_tui.widgets.keys import DETACH_KEY, detach_key, key_to_bytes

# -- keys -----------------------------------------------------------------------------------


def parse_keys(data: bytes) -> list[str]:
    parser = XTermParser()
    return [e.key for e in parser.feed(data.decode()) if hasattr(e, "key")]


def test_textual_names_ctrl_right_bracket_as_the_detach_key() -> None:
    assert parse_keys(b"\x1d") == [DETACH_KEY]
    assert detach_key(DETACH_KEY) and not detach_key("ctrl+c") and not detach_key("escape")


@pytest.mark.parametrize(("key", "char", "expected"), [
    ("a", "a", b"a"), ("A", "A", b"A"), ("question_mark", "?", b"?"), ("é", "é", "é".encode()),
    ("space", " ", b" "), ("enter", "\r", b"\r"), ("backspace", "\x7f", b"\x7f"),
    ("backspace", "\x08", b"\x7f"), ("tab", "\t", b"\t"), ("shift+tab", None, b"\x1b[Z"),
    ("escape", "\x1b", b"\x1b"), ("ctrl+a", None, b"\x01"), ("ctrl+c", None, b"\x03"),
    ("ctrl+z", None, b"\x1a"), ("ctrl+q", None, b"\x11"), ("ctrl+@", None, b"\x00"),
    ("ctrl+backslash", None, b"\x1c"), ("ctrl+underscore", None, b"\x1f"),
    ("up", None, b"\x1b[A"), ("down", None, b"\x1b[B"), ("right", None, b"\x1b[C"),
    ("left", None, b"\x1b[D"), ("home", None, b"\x1b[H"), ("end", None, b"\x1b[F"),
    ("pageup", None, b"\x1b[5~"), ("pagedown", None, b"\x1b[6~"), ("insert", None, b"\x1b[2~"),
    ("delete", None, b"\x1b[3~"), ("f1", None, b"\x1bOP"), ("f4", None, b"\x1bOS"),
    ("f5", None, b"\x1b[15~"), ("f12", None, b"\x1b[24~"), ("ctrl+up", None, b"\x1b[1;5A"),
    ("shift+f1", None, b"\x1b[1;2P"), ("alt+x", "x", b"\x1bx"), ("ctrl+j", "\n", b"\n"),
])
def test_key_to_bytes(key: str, char: str | None, expected: bytes) -> None:
    assert key_to_bytes(key, char) == expected


def test_arrows_follow_application_cursor_mode() -> None:
    assert key_to_bytes("up", application_cursor=True) == b"\x1bOA"
    assert key_to_bytes("left", application_cursor=True) == b"\x1bOD"
    assert key_to_bytes("home", application_cursor=True) == b"\x1bOH"
    # Modified arrows are CSI whatever the mode, as in xterm.
    assert key_to_bytes("ctrl+left", application_cursor=True) == b"\x1b[1;5D"
    assert key_to_bytes("pageup", application_cursor=True) == b"\x1b[5~"


def test_unknown_keys_send_nothing() -> None:
    assert key_to_bytes("f30") is None
    assert key_to_bytes("ctrl+f30") is None


@pytest.mark.parametrize("key", [
    "up", "down", "left", "right", "home", "end", "pageup", "pagedown", "insert", "delete",
    "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "f11", "f12", "shift+tab",
    "ctrl+up", "shift+left", "ctrl+shift+right", "shift+pageup", "ctrl+delete", "alt+up",
    "ctrl+a", "ctrl+c", "ctrl+z", "enter", "tab", "escape", "backspace", DETACH_KEY,
])
def test_textual_parses_our_bytes_back_to_the_same_key(key: str) -> None:
    """What we send is what a real xterm would: Textual's own parser reads it back."""
    data = key_to_bytes(key)
    assert data is not None
    events = parse_keys(data)
    if key == "escape":  # a lone ESC is resolved by the parser's timeout, not by feed()
        assert data == b"\x1b"
        return
    assert events == [key]


# -- the model ------------------------------------------------------------------------------


def decoded(data: bytes, **kw: int) -> ConsoleModel:
    model = ConsoleModel(**kw)
    model.feed(data)
    model.flush()
    return model


def test_decodes_text_and_cursor() -> None:
    model = decoded(b"hello\r\nworld", columns=20, lines=5)
    assert model.screen_lines()[:2] == ["hello".ljust(20), "world".ljust(20)]
    assert (model.cursor.x, model.cursor.y, model.cursor.visible) == (5, 1, True)
    model.feed(b"\x1b[?25l")
    model.flush()
    assert not model.cursor.visible
    assert model.total_bytes == model.decoded_bytes == 18 and model.skipped_bytes == 0


def test_scrollback_captures_lines_scrolled_off_the_top() -> None:
    model = decoded(b"".join(f"line {i}\r\n".encode() for i in range(30)), columns=20,
                    lines=10, scrollback=15)
    # 30 lines + the empty cursor line = 31 rows: 21 scrolled off, only the last 15 kept.
    assert len(model.scrollback) == 15 and model.first_line == 6
    assert model.line_text(0).rstrip() == "line 6"
    assert model.line_text(14).rstrip() == "line 20"
    assert model.line_text(15).rstrip() == "line 21"  # screen row 0
    assert model.line_count == 25
    assert model.screen_text().splitlines()[0] == "line 21"


def test_scroll_region_lines_are_not_captured() -> None:
    # A pager keeps a status line: scrolling inside rows 1-9 must not fill the scrollback.
    model = decoded(b"\x1b[1;9r\x1b[9;1H" + b"x\n" * 20 + b"\x1b[r", columns=10, lines=10)
    assert len(model.scrollback) == 0


class Reference(pyte.Screen):
    delete_lines = _Screen.delete_lines  # pyte 0.8.2's leaves a line when the next is blank


def test_delete_lines_clears_a_line_whose_replacement_was_never_written() -> None:
    model = decoded(b"abc\x1b[M", columns=10, lines=3)
    assert model.screen_text().strip() == ""
    model = decoded(b"a\r\nb\r\nc\x1b[1;1H\x1b[M", columns=10, lines=3)
    assert model.screen_lines()[:2] == ["b".ljust(10), "c".ljust(10)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"abc", b"hello world ", b"\r\n", b"\n", b"\r", b"\x1b[31m", b"\x1b[0m", b"\x1b[1;4m",
    b"\x1b[2J", b"\x1b[H", b"\x1b[5;3H", b"\x1b[K", b"\x1b[2A", b"\x1b[3C", b"\x08", b"\t",
    "\u4f60\u597d".encode(), "e\u0301".encode(), b"\x1b[1;5r", b"\x1b[r", b"\x1bM", b"\x1b[L",
    b"\x1b[M", b"\x1b[4h", b"\x1b[4l", b"\x1b(0qqq\x1b(B", b"\x1b[?7l", b"\x1b[?7h",
    b"0123456789" * 3, b"\x1b[38;5;208m", b"\x1b[48;2;1;2;3m", b"\x1b[7m", b"\x1bD",
]), max_size=60), st.integers(1, 6))
def test_matches_plain_pyte_and_keeps_render_caches_right(chunks: list[bytes],
                                                          frames: int) -> None:
    """The fast paths (draw, index) change nothing a plain pyte Screen would show, and the
    row caches kept across frames and scrolls equal a fresh render."""
    data = b"".join(chunks)
    reference = Reference(20, 6)
    pyte.ByteStream(reference).feed(data)
    model = ConsoleModel(columns=20, lines=6, scrollback=50, max_bytes_per_frame=8)
    step = max(1, len(data) // frames)
    for i in range(0, len(data), step):
        model.feed(data[i:i + step])
        model.flush()
        for n in range(model.line_count):  # populate the caches between frames
            model.line_segments(n)
            model.line_text(n)
    cells = [[reference.buffer[y][x].data or " " for x in range(20)] for y in range(6)]
    assert model.screen_lines() == ["".join(row) for row in cells]  # one char per cell
    screen = model._screen
    for row in range(model.lines):
        index = len(model.scrollback) + row
        assert model.line_segments(index) == model._render(screen.row(row))
        assert model.line_text(index) == model._text(screen.row(row))


def test_listeners_get_only_the_rows_that_changed() -> None:
    model = decoded(b"".join(f"l{i}\r\n".encode() for i in range(30)), columns=20, lines=10)
    calls: list[tuple[set[int], int]] = []
    model.listen(lambda dirty, scrolled: calls.append((dirty, scrolled)))
    model.feed(b"x")
    model.flush()
    assert calls == [({9}, 0)]  # one character on the cursor row
    calls.clear()
    model.feed(b"\x1b[3;1Hab")
    model.flush()
    assert calls == [({2, 9}, 0)]  # the written row, and the rows the cursor left/entered
    calls.clear()
    model.feed(b"\x1b[10;2Hy\r\nz\r\n")
    model.flush()
    # Two lines scrolled into the scrollback. In absolute terms only rows 7 ("xy", moved up
    # from 9), 8 ("z") and 9 (blank, new cursor) changed, plus row 0: the line the cursor
    # left ("ab", row 2 before the scroll) is redrawn without it.
    (dirty, scrolled), = calls
    assert scrolled == 2
    assert dirty == {0, 7, 8, 9}
    assert model.line_text(len(model.scrollback) + 7).rstrip() == "xy"


def test_a_frame_decodes_at_most_max_bytes_per_frame() -> None:
    model = ConsoleModel(max_bytes_per_frame=16 * 1024, frame_budget=10.0)
    model.feed(b"y\r\n" * 20000)  # 60,000 bytes
    assert model.run_frame() == 16 * 1024
    assert model.decoded_bytes == 16 * 1024 and model.pending_bytes == 60000 - 16 * 1024
    model.flush()
    assert model.frames == 4 and model.pending_bytes == 0


def test_a_flood_beyond_the_backlog_cap_drops_the_oldest_bytes() -> None:
    model = ConsoleModel(max_backlog=64 * 1024)
    lines = [f"{i:07d}\n".encode() for i in range(30000)]  # 240,000 bytes, 8 per line
    for i in range(0, len(lines), 100):
        model.feed(b"".join(lines[i:i + 100]))
    assert model.total_bytes == 240000
    assert model.pending_bytes <= 64 * 1024
    assert model.skipped_bytes == 240000 - model.pending_bytes
    model.flush()
    assert model.decoded_bytes + model.skipped_bytes == model.total_bytes
    # The cut is after a newline, so the first line decoded is a whole one, not a fragment.
    first = model.line_text(0).strip()
    assert len(first) == 7 and first.isdigit()
    assert "0029999" in model.screen_text()


def test_live_backlog_is_bounded_by_decode_time_and_history_is_exempt() -> None:
    model = ConsoleModel(fps=30, frame_budget=0.015, max_lag=1.0)
    model.decode_rate = 200 * 1024  # as if measured: 1 s at a 45% share of the loop
    assert model.backlog_cap == 90 * 1024
    model.decode_rate = 100 * 1024
    assert model.backlog_cap == 64 * 1024  # the floor
    history = b"".join(f"history {i:06d}\r\n".encode() for i in range(20000))  # 320,000 B
    model.feed(history, history=True)
    assert model.skipped_bytes == 0 and model.pending_bytes == len(history)
    model.feed(b"live\r\n" * 1000)  # 6,000 B of live output on top: within the allowance
    assert model.skipped_bytes == 0
    model.feed(b"flood\r\n" * 20000)  # 140,000 B: the oldest bytes (history first) go
    assert model.pending_bytes <= len(history) + 64 * 1024
    assert model.skipped_bytes == model.total_bytes - model.pending_bytes
    model.flush()
    assert model.decode_rate != 100 * 1024  # measured while decoding
    assert "flood" in model.screen_text()


def test_a_hard_byte_cap_bounds_even_history() -> None:
    model = ConsoleModel(max_backlog=100_000)
    model.feed(b"h\r\n" * 50_000, history=True)
    assert model.pending_bytes <= 100_000 and model.skipped_bytes >= 50_000


async def test_the_frame_tick_coalesces_bursts_and_idles_when_nothing_is_pending() -> None:
    model = ConsoleModel(fps=30)
    frames: list[float] = []
    model.listen(lambda d, s: frames.append(time.monotonic()))
    t0 = time.monotonic()
    model.feed(b"first")
    await asyncio.sleep(0.005)
    assert len(frames) == 1 and frames[0] - t0 < 0.02  # an isolated echo is shown at once
    for i in range(20):  # a burst within one frame interval: one more frame, not twenty
        model.feed(f"{i} ".encode())
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.1)
    assert len(frames) <= 3
    assert "19" in model.screen_text()
    assert model._timer is None  # idle: nothing armed


def test_colours_and_attributes_render_as_rich_styles() -> None:
    model = decoded(b"\x1b[31ma\x1b[0m\x1b[1;3;4;7mb\x1b[0m\x1b[38;5;208mc\x1b[0m"
                    b"\x1b[48;2;10;20;30md\x1b[0m\x1b[94me\x1b[0m\x1b[33mf\x1b[0m\x1b[9mg",
                    columns=10, lines=2)
    segs = model.line_segments(0)
    assert [s.text for s in segs[:7]] == list("abcdefg")
    styles = [s.style for s in segs[:7]]
    assert styles[0] is not None and styles[0].color == Color.parse("red")
    assert styles[1] is not None and styles[1].bold and styles[1].italic \
        and styles[1].underline and styles[1].reverse
    assert styles[2] is not None and styles[2].color == Color.parse("#ff8700")  # 256 colour
    assert styles[3] is not None and styles[3].bgcolor == Color.parse("#0a141e")  # truecolor
    assert styles[4] is not None and styles[4].color == Color.parse("bright_blue")
    assert styles[5] is not None and styles[5].color == Color.parse("yellow")  # pyte's brown
    assert styles[6] is not None and styles[6].strike
    assert sum(s.cell_length for s in segs) == 10


def test_wide_characters_keep_their_columns() -> None:
    model = decoded("\u4f60\u597dab".encode(), columns=10, lines=2)
    assert sum(s.cell_length for s in model.line_segments(0)) == 10
    assert model.line_text(0).startswith("\u4f60 \u597d ab")
    assert model.search("ab") == (0, 4)


def test_modes_for_keys_and_paste() -> None:
    model = decoded(b"\x1b[?1h\x1b[?2004h")
    assert model.application_cursor and model.bracketed_paste
    model.feed(b"\x1b[?1l\x1b[?2004l")
    model.flush()
    assert not model.application_cursor and not model.bracketed_paste


def test_search_scrollback_and_screen() -> None:
    text = b"".join(f"entry {i}{' boot' if i in (3, 40) else ''}\r\n".encode() for i in range(50))
    model = decoded(text, columns=30, lines=10)
    assert len(model.scrollback) == 41
    assert model.search("boot") == (3, 8)
    assert model.search("BOOT") is None  # an upper-case letter makes it case-sensitive
    assert model.search("Boot".lower(), backwards=True) == (40, 9)  # newest first
    assert model.search("boot", (40, 9), backwards=True) == (3, 8)
    assert model.search("boot", (3, 8), backwards=True) == (40, 9)  # wraps around
    assert model.search("boot", (3, 8), backwards=True, wrap=False) is None
    assert model.search("boot", (3, 8)) == (40, 9)
    assert model.search("entry 49") == (49, 0)  # on the screen
    assert model.search("nowhere") is None


# -- the hub --------------------------------------------------------------------------------


class FakeStream:
    """A console stream in memory: push() output, read written input."""

    def __init__(self, history: bytes = b"") -> None:
        self.history = history
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.written = bytearray()
        self.closed = False

    async def read(self) -> bytes | None:
        return await self.queue.get()

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("closed")
        self.written += data

    async def close(self) -> None:
        self.closed = True

    def push(self, data: bytes | None) -> None:
        self.queue.put_nowait(data)


class FakeVMs:
    """Consoles for a static Session: VMs that run (or not), and every stream opened."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.running: dict[str, bytes] = {}  # vm_id -> history its next stream starts with
        self.streams: list[FakeStream] = []
        session.shared["open_console"] = self.open

    async def open(self, vm_id: str) -> FakeStream:
        from infrasim_tui.core.errors import WrongState

        if vm_id not in self.running:
            raise WrongState("the VM is not running")
        stream = FakeStream(self.running[vm_id])
        self.streams.append(stream)
        return stream

    def state(self, vm_id: str, new: str) -> None:
        self.session.inject(Event(type="vm.state", kind="vm", resource_id=vm_id, name=vm_id,
                                  message="", data={"old": "", "new": new, "reason": ""}))


@pytest.fixture
def session() -> Session:
    return Session(None, mode="static", data_dir="")


async def settle(model: ConsoleModel, until: object = None, timeout: float = 2.0) -> None:
    """Let the pump and the frame tick run (until a predicate holds, if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        if model.pending_bytes == 0 and (until is None or until()):  # type: ignore[operator]
            return
    raise AssertionError("console did not settle")


async def test_one_stream_and_one_model_per_vm_however_many_viewers(session: Session) -> None:
    vms = FakeVMs(session)
    vms.running["vm1"] = b"booted\r\n"
    hub = ConsoleHub.of(session)
    assert ConsoleHub.of(session) is hub and session.shared["console_hub"] is hub
    first, second = await asyncio.gather(hub.acquire("vm1"), hub.acquire("vm1"))
    assert first is second and len(vms.streams) == 1 and hub.viewers("vm1") == 2
    stream = vms.streams[0]
    stream.push(b"live output\r\n")
    await settle(first, lambda: "live output" in first.screen_text())
    assert "booted" in second.screen_text() and first.state == "live"
    assert await first.write(b"ls\r")
    second.send(b"a")
    second.send(b"b")
    await asyncio.sleep(0.02)
    assert bytes(stream.written) == b"ls\rab"
    hub.release("vm1")
    await asyncio.sleep(0.01)
    assert not stream.closed  # one viewer is still watching
    hub.release("vm1")
    await asyncio.sleep(0.02)
    assert stream.closed and hub.model("vm1") is None
    third = await hub.acquire("vm1")
    assert third is not first and len(vms.streams) == 2  # a fresh attach replays history
    await hub.aclose()


async def test_a_stopped_vm_gets_a_model_that_opens_when_it_runs(session: Session) -> None:
    vms = FakeVMs(session)
    await session.start()
    hub = ConsoleHub.of(session)
    model = await hub.acquire("vm1")
    await settle(model)
    assert model.state == "closed" and "not running" in model.reason
    assert "VM is not running" in model.screen_text() and not vms.streams
    assert not await model.write(b"x")
    vms.running["vm1"] = b"first boot\r\n"
    vms.state("vm1", "RUNNING")  # the core's VMState values are upper-case
    await settle(model, lambda: model.state == "live" and "first boot" in model.screen_text())
    assert "not running" not in model.screen_text()  # the new stream starts a clean screen
    # The VM stops: its stream ends, the model says so and keeps what was shown.
    del vms.running["vm1"]
    vms.streams[0].push(None)
    await settle(model, lambda: model.closed)
    assert "first boot" in model.screen_text() and "console closed" in model.screen_text()
    generation = model.generation
    # It starts again: the screen resets and shows the new stream's history.
    vms.running["vm1"] = b"second boot\r\n"
    vms.state("vm1", "running")
    await settle(model, lambda: model.state == "live" and "second boot" in model.screen_text())
    assert "first boot" not in model.screen_text() and model.generation > generation
    assert len(vms.streams) == 2 and vms.streams[0].closed
    hub.release("vm1")
    await hub.aclose()
    await session.close()


async def test_a_stop_event_ends_a_stream_that_never_saw_its_end(session: Session) -> None:
    vms = FakeVMs(session)
    vms.running["vm1"] = b""
    hub = ConsoleHub.of(session)
    model = await hub.acquire("vm1")
    assert model.state == "live"
    vms.state("vm1", "STOPPED")
    await settle(model, lambda: model.closed)
    assert vms.streams[0].closed
    hub.release("vm1")
    await hub.aclose()
