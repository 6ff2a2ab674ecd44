"""The SerialConsole widget in a tiny App: fake consoles for the keys, scrolling and search;
one real guest for the whole path (QEMU -> core -> session -> hub -> pyte -> screen -> keys)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.geometry import Region
from textual.widgets import Button

from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.session import Session
from infrasim_tui.widgets.console_model import ConsoleHub
from infrasim_tui.widgets.serial_console import SerialConsole

from .conftest import BANNER, guest_spec
from .test_console_model import FakeVMs


class ConsoleApp(App[None]):
    """One console (or two on the same VM), a button to take focus, and a quit binding."""

    BINDINGS = [Binding("q", "count('q')"), Binding("x", "count('x')")]

    def __init__(self, session: Session, *, read_only: bool = False, two: bool = False,
                 allow_input: bool = True) -> None:
        super().__init__()
        self.session = session
        self.read_only = read_only
        self.two = two
        self.allow_input = allow_input
        self.detached: list[SerialConsole] = []
        self.actions: list[str] = []
        self.checked: list[str] = []

    def compose(self) -> ComposeResult:
        yield Button("elsewhere", id="elsewhere")
        yield SerialConsole(self.session, "vm1", vm_name="web-1", read_only=self.read_only,
                            id="console")
        if self.two:
            yield SerialConsole(self.session, "vm1", vm_name="web-1", id="console2")

    def action_count(self, key: str) -> None:
        self.actions.append(key)

    def check_action_allowed(self, action: str) -> bool:
        self.checked.append(action)
        return self.allow_input

    def on_serial_console_detached(self, message: SerialConsole.Detached) -> None:
        self.detached.append(message.console)
        self.query_one("#elsewhere").focus()


@pytest.fixture
def session() -> Session:
    return Session(None, mode="static", data_dir="")


def visible(console: SerialConsole) -> list[str]:
    """The rows the widget shows inside its border, as text: through Textual's line cache, as
    the compositor draws them (so a row the widget failed to refresh shows up stale here)."""
    region, inner = console.region, console.scrollable_content_region
    strips = console.render_lines(Region(0, 0, region.width, region.height))
    x0, y0 = inner.x - region.x, inner.y - region.y
    return [strip.text[x0:x0 + inner.width] for strip in strips[y0:y0 + inner.height]]


async def wait_for(pilot: Any, pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.02)


async def started(session: Session, history: bytes = b"login: ready\r\n$ ",
                  **kw: Any) -> tuple[ConsoleApp, FakeVMs]:
    vms = FakeVMs(session)
    vms.running["vm1"] = history
    return ConsoleApp(session, **kw), vms


async def test_output_appears_and_keys_reach_the_guest(session: Session) -> None:
    app, vms = await started(session)
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        await wait_for(pilot, lambda: any("login: ready" in row for row in visible(console)))
        stream = vms.streams[0]
        stream.push(b"\x1b[32mgreen\x1b[0m output\r\n$ ")
        await wait_for(pilot, lambda: any("green output" in row for row in visible(console)))
        assert "web-1" in str(console.border_title) and "following" in str(console.border_title)
        console.focus()
        await pilot.press("l", "s", "space", "q", "x", "enter", "ctrl+c", "ctrl+q", "tab",
                          "up", "escape", "backspace")
        await pilot.pause(0.05)
        assert bytes(stream.written) == b"ls qx\r\x03\x11\t\x1b[A\x1b\x7f"
        assert app.actions == [] and app.is_running  # no app binding fired, ctrl+c/q did not quit
        assert set(app.checked) == {"console_input"}
        # Full-screen programs switch the arrows to application mode (DECCKM).
        stream.written.clear()
        stream.push(b"\x1b[?1h")
        await wait_for(pilot, lambda: console.model is not None
                       and console.model.application_cursor)
        await pilot.press("up", "left", "ctrl+up")
        await pilot.pause(0.05)
        assert bytes(stream.written) == b"\x1bOA\x1bOD\x1b[1;5A"
        # Focus elsewhere: the keys are the app's again.
        app.query_one("#elsewhere").focus()
        await pilot.press("q")
        assert app.actions == ["q"]


async def test_an_echoed_character_redraws_only_its_row(session: Session,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app, vms = await started(session, history=b"".join(b"boot %d\r\n" % i for i in range(60)))
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        await wait_for(pilot, lambda: any("boot 59" in r for r in visible(console)))
        await pilot.pause(0.05)
        lines: list[tuple[int, int]] = []
        full: list[object] = []
        refresh_lines, refresh = console.refresh_lines, console.refresh

        def spy_lines(y: int, count: int = 1) -> None:
            lines.append((y, count))
            refresh_lines(y, count)

        def spy(*regions: Any, **kw: Any) -> Any:
            if not regions:
                full.append(kw)
            return refresh(*regions, **kw)

        monkeypatch.setattr(console, "refresh_lines", spy_lines)
        monkeypatch.setattr(console, "refresh", spy)
        vms.streams[0].push(b"l")
        await wait_for(pilot, lambda: visible(console)[-1].startswith("l"))
        assert console.model is not None
        row = len(console.model.scrollback) + console.model.cursor.y
        assert lines == [(row, 1)] and full == []


async def test_the_cursor_is_drawn_reversed_when_focused(session: Session) -> None:
    app, _ = await started(session, history=b"$ ")
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        await wait_for(pilot, lambda: console.model is not None and console.model.state == "live")
        row = len(console.model.scrollback) if console.model else 0

        def cursor_reversed() -> bool:
            strip = console.render_line(row - console.scroll_offset.y)
            cells = list(strip.divide([2, 3])[1])
            return bool(cells and cells[0].style and cells[0].style.reverse)

        assert not cursor_reversed()
        console.focus()
        await pilot.pause(0.05)
        assert cursor_reversed()


async def test_ctrl_right_bracket_posts_detached(session: Session) -> None:
    app, vms = await started(session)
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        await pilot.press("a", "ctrl+right_square_bracket")
        await pilot.pause(0.05)
        assert app.detached == [console]
        assert not console.has_focus  # the parent moved the focus away
        assert bytes(vms.streams[0].written) == b"a"  # Ctrl+] never reaches the guest


async def test_paste_is_bracketed_when_the_guest_asks(session: Session) -> None:
    app, vms = await started(session)
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        stream = vms.streams[0]
        app.post_message(events.Paste("echo 1\necho 2"))
        await pilot.pause(0.05)
        assert bytes(stream.written) == b"echo 1\recho 2"
        stream.written.clear()
        stream.push(b"\x1b[?2004h")
        await wait_for(pilot, lambda: console.model is not None and console.model.bracketed_paste)
        app.post_message(events.Paste("rm x\x1b[201~; reboot\n"))
        await pilot.pause(0.05)
        assert bytes(stream.written) == b"\x1b[200~rm x; reboot\r\x1b[201~"


async def test_follow_scrollback_and_search(session: Session) -> None:
    app, vms = await started(session, history=b"")
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        stream = vms.streams[0]
        stream.push(b"".join(f"boot line {i}{' PANIC' if i == 12 else ''}\r\n".encode()
                             for i in range(300)))
        await wait_for(pilot, lambda: any("boot line 299" in r for r in visible(console)))
        assert console.follow and console.scroll_offset.y == console.max_scroll_y > 0
        # Shift+PageUp: scrollback mode; keys scroll instead of reaching the guest.
        await pilot.press("shift+pageup")
        assert console.scrollback_mode and "scrollback" in str(console.border_title)
        top = console.scroll_offset.y
        assert top < console.max_scroll_y
        stream.push(b"more output\r\n")
        await wait_for(pilot, lambda: "more output" in (console.model.screen_text()
                                                        if console.model else ""))
        await pilot.pause(0.05)
        assert console.scroll_offset.y == top  # new output does not move the view
        await pilot.press("up", "up", "k")
        assert console.scroll_offset.y == top - 2
        # / opens the prompt in the last row; Enter searches scrollback and screen.
        await pilot.press("slash", "p", "a", "n", "i", "c")
        assert visible(console)[-1].startswith("/panic")
        await pilot.press("enter")
        assert console.model is not None and console.match is not None
        line = console.match[0] - console.model.first_line
        assert console.model.line_text(line).startswith("boot line 12 PANIC")
        rows = visible(console)
        assert any(r.startswith("boot line 12 PANIC") for r in rows)
        assert stream.written == b""  # nothing typed in scrollback mode reached the guest
        await pilot.press("slash", "n", "o", "w", "h", "e", "r", "e", "enter")
        assert visible(console)[-1].startswith("Pattern not found")
        # Esc: back to following the output, keys go to the guest again.
        await pilot.press("escape")
        assert not console.scrollback_mode and console.follow
        assert console.scroll_offset.y == console.max_scroll_y
        await pilot.press("z")
        await pilot.pause(0.05)
        assert bytes(stream.written) == b"z"


async def test_a_full_scrollback_keeps_the_view_right(session: Session) -> None:
    ConsoleHub.of(session, scrollback=50)  # the app sizes its consoles before mounting them
    app, vms = await started(session, history=b"")
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        stream = vms.streams[0]
        stream.push(b"".join(f"old {i}\r\n".encode() for i in range(200)))
        await wait_for(pilot, lambda: any("old 199" in r for r in visible(console)))
        assert console.model is not None and len(console.model.scrollback) == 50
        for i in range(3):  # following: lines fall off the top, the view scrolls with them
            stream.push(f"new {i}\r\n".encode())
            await wait_for(pilot, lambda i=i: visible(console)[-2].startswith(f"new {i}"))
            assert visible(console)[-3].startswith(f"new {i - 1}" if i else "old 199")
        await pilot.press("shift+pageup")
        rows = visible(console)
        stream.push(b"".join(f"more {i}\r\n".encode() for i in range(5)))
        await wait_for(pilot, lambda: "more 4" in console.model.screen_text()
                       if console.model else False)
        await pilot.pause(0.05)
        assert visible(console) == rows  # in scrollback the lines stay put as old ones go


async def test_mouse_wheel_leaves_follow_and_typing_returns(session: Session) -> None:
    app, vms = await started(session, history=b"")
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        vms.streams[0].push(b"x\r\n" * 200)
        await wait_for(pilot, lambda: console.max_scroll_y > 100
                       and console.scroll_offset.y == console.max_scroll_y)
        for _ in range(3):  # the mouse wheel, as the driver reports it
            console.post_message(events.MouseScrollUp(console, 5, 5, 0, -1, 0, False, False,
                                                      False))
        await pilot.pause(0.05)
        assert not console.follow and console.scroll_offset.y < console.max_scroll_y
        await pilot.press("a")
        await pilot.pause(0.05)
        assert console.follow and console.scroll_offset.y == console.max_scroll_y


async def test_read_only_sends_nothing(session: Session) -> None:
    app, vms = await started(session, read_only=True)
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        await pilot.press("l", "s", "enter", "ctrl+c")
        app.post_message(events.Paste("rm -rf /"))
        await pilot.pause(0.05)
        assert bytes(vms.streams[0].written) == b""
        assert "read-only" in str(console.border_subtitle)
        assert console.send(b"x") is False
        await pilot.press("q")  # not the viewer's key: the app's binding runs
        assert app.actions == ["q"]


async def test_input_refused_by_the_app_is_not_sent(session: Session) -> None:
    app, vms = await started(session, allow_input=False)
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        console.focus()
        await wait_for(pilot, lambda: vms.streams)
        await pilot.press("a", "b")
        await pilot.pause(0.05)
        assert bytes(vms.streams[0].written) == b""
        assert app.checked == ["console_input"]  # asked once, then quiet for a while


async def test_two_widgets_share_one_stream_and_screen(session: Session) -> None:
    app, vms = await started(session, two=True)
    async with app.run_test(size=(100, 60)) as pilot:
        one = app.query_one("#console", SerialConsole)
        two = app.query_one("#console2", SerialConsole)
        await wait_for(pilot, lambda: one.model is not None and two.model is not None)
        assert one.model is two.model and len(vms.streams) == 1
        assert ConsoleHub.of(session).viewers("vm1") == 2
        vms.streams[0].push(b"shared\r\n")
        await wait_for(pilot, lambda: any("shared" in r for r in visible(two)))
        await one.remove()
        await pilot.pause(0.02)
        assert ConsoleHub.of(session).viewers("vm1") == 1 and not vms.streams[0].closed
        await two.remove()
        await pilot.pause(0.05)
        assert vms.streams[0].closed


async def test_a_vm_that_is_not_running_says_so_then_comes_alive(session: Session) -> None:
    vms = FakeVMs(session)
    app = ConsoleApp(session)
    async with app.run_test(size=(100, 30)) as pilot:
        console = app.query_one("#console", SerialConsole)
        await wait_for(pilot, lambda: console.model is not None and console.model.closed)
        assert "closed" in str(console.border_title)
        assert any("VM is not running" in r for r in visible(console))
        vms.running["vm1"] = b"fresh boot\r\n"
        vms.state("vm1", "RUNNING")
        await wait_for(pilot, lambda: any("fresh boot" in r for r in visible(console)))
        assert "closed" not in str(console.border_title)
        vms.state("vm1", "PAUSED")
        await wait_for(pilot, lambda: "paused" in str(console.border_title))


# -- a real guest ---------------------------------------------------------------------------


@pytest.mark.qemu
async def test_real_guest_console_types_and_shows(orch: Orchestrator,
                                                  cloud_kit: GuestKit) -> None:
    vm = await orch.create_vm("c1", guest_spec(cloud_kit))
    await orch.start_vm(vm.meta.id)
    session = Session(orch, mode="embedded", data_dir=str(orch.data.root))
    await session.start()
    app = App[None]()
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            console = SerialConsole(session, vm.meta.id, vm_name="c1")
            await app.mount(console)
            banner = BANNER.decode()
            deadline = time.monotonic() + 60

            def booted() -> bool:  # on the screen, or already scrolled into the scrollback
                model = console.model
                return model is not None and any(banner in model.line_text(i)
                                                 for i in range(model.line_count))

            while not booted():
                assert time.monotonic() < deadline, "no ready banner on the console"
                await pilot.pause(0.1)
            console.focus()
            await pilot.pause(0.2)
            await pilot.press(*"echo ok-$((40+2))", "enter")
            deadline = time.monotonic() + 30
            while not any(row.startswith("ok-42") for row in visible(console)):
                assert time.monotonic() < deadline, "\n".join(visible(console))
                await pilot.pause(0.1)
            # The typed line is echoed, not the answer: ok-42 appears only as output.
            assert any("echo ok-$((40+2))" in row for row in visible(console))
    finally:
        await ConsoleHub.of(session).aclose()
        await session.close()
        await asyncio.sleep(0)
