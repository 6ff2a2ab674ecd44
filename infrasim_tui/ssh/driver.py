"""A Textual driver that draws on an SSH channel instead of the process's terminal.

Every SSH session runs its own App in the server's event loop, so this driver must touch
nothing process-wide: no signal handlers, no termios, no threads (Textual's LinuxDriver does
all three). Output goes to the channel; input bytes come from the channel through Textual's
xterm parser. The parser is a private Textual API: ``textual`` is pinned to 8.2.x and
``tests/test_ssh.py`` drives this end to end.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from typing import Any, Protocol

from textual import events
from textual._xterm_parser import XTermParser
from textual.app import App
from textual.driver import Driver
from textual.geometry import Size
from textual.message import Message

log = logging.getLogger(__name__)

ESCAPE_TICK = 0.15  # s: after Textual's 100 ms escape delay, so a lone Esc is delivered


class Terminal(Protocol):
    """What the driver needs from the SSH session it draws on (``app.ssh_terminal``)."""

    size: tuple[int, int]

    def send(self, data: bytes) -> None:
        """Queue output for the client (the session enforces the stall cap)."""

    def attach(self, driver: SSHDriver | None) -> None:
        """Route the channel's input to ``driver`` (None: stop)."""


class SSHDriver(Driver):
    """Draws one App on one SSH channel. The app must carry ``ssh_terminal: Terminal``."""

    def __init__(self, app: App[Any], *, debug: bool = False, mouse: bool = True,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__(app, debug=debug, mouse=mouse, size=size)
        self.terminal: Terminal = app.ssh_terminal  # type: ignore[attr-defined]
        self._parser = XTermParser(debug)
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._tick: asyncio.TimerHandle | None = None
        self._input = False

    # -- output -----------------------------------------------------------------------------

    def write(self, data: str) -> None:
        self.terminal.send(data.encode("utf-8", "replace"))

    # -- input ------------------------------------------------------------------------------

    def send_message(self, message: Message) -> None:
        # We are on the app's loop already: post directly, which also keeps key order.
        self._app.post_message(message)

    def feed(self, data: bytes) -> None:
        """Bytes typed by the client (invalid UTF-8 becomes U+FFFD, never a disconnect)."""
        if not self._input:
            return
        text = self._decode(data)
        if not text:
            return
        try:
            for event in self._parser.feed(text):
                self.process_message(event)
        except Exception:  # a malformed sequence must not end the session
            log.exception("ssh input parse failed")
            self._parser = XTermParser(self._debug)
        if self._tick is not None:
            self._tick.cancel()
        self._tick = self._loop.call_later(ESCAPE_TICK, self._run_tick)

    def _run_tick(self) -> None:
        """Deliver a pending lone Escape once the parser's timeout has passed."""
        self._tick = None
        for event in self._parser.tick():
            self.process_message(event)

    def resize(self, width: int, height: int) -> None:
        size = Size(max(width, 1), max(height, 1))
        self._app.post_message(events.Resize(size, size))

    # -- application mode -------------------------------------------------------------------

    def start_application_mode(self) -> None:
        width, height = self._size or self.terminal.size
        self.write("\x1b[?1049h")  # alt screen
        self.write("\x1b[?25l")  # hide cursor
        self.write("\x1b[?1004h")  # focus in/out
        if self._mouse:
            self.write("\x1b[?1000h\x1b[?1003h\x1b[?1015h\x1b[?1006h")
        self.write("\x1b[?2004h")  # bracketed paste
        self.write("\x1b[?7l")  # no line wrap
        self._input = True
        self.terminal.attach(self)
        self.resize(width, height)

    def disable_input(self) -> None:
        self._input = False
        self.terminal.attach(None)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def stop_application_mode(self) -> None:
        self.disable_input()
        if self._mouse:
            self.write("\x1b[?1000l\x1b[?1003l\x1b[?1015l\x1b[?1006l")
        self.write("\x1b[?2004l\x1b[?7h\x1b[?1004l")
        self.write("\x1b[?1049l\x1b[?25h")  # leave the alt screen, show the cursor


__all__ = ["SSHDriver", "Terminal"]
