"""Attach the local terminal to a VM's serial console (raw mode, Ctrl+] detaches).

Frontend code: it takes any reader (``history`` + async iteration of chunks, like the core's
ConsoleReader or the API client's RemoteReader) and an async ``write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol


class Reader(Protocol):
    history: bytes

    def __aiter__(self) -> AsyncIterator[bytes]: ...


async def attach_console(reader: Reader, write: Callable[[bytes], Awaitable[None]], *,
                         detach_key: bytes = b"\x1d", history: bool = True) -> None:
    """Copy console output to stdout and stdin to the console until detach, EOF or VM exit."""
    loop = asyncio.get_running_loop()
    out = sys.stdout.buffer
    fd_in = sys.stdin.fileno()
    is_tty = os.isatty(fd_in)
    done: asyncio.Future[None] = loop.create_future()
    inbox: asyncio.Queue[bytes] = asyncio.Queue()

    def on_stdin() -> None:
        try:
            data = os.read(fd_in, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd_in)
            inbox.put_nowait(b"")
            return
        inbox.put_nowait(data)

    async def pump_in() -> None:
        while True:
            data = await inbox.get()
            if not data:  # EOF on a pipe: give the guest a moment to answer, then leave
                await asyncio.sleep(1.0)
                break
            if detach_key in data:
                before = data.split(detach_key, 1)[0]
                if before:
                    await write(before)
                break
            await write(data)
        if not done.done():
            done.set_result(None)

    async def pump_out() -> None:
        if history and reader.history:
            out.write(reader.history)
            out.flush()
        async for chunk in reader:
            out.write(chunk)
            out.flush()
        if not done.done():
            done.set_result(None)  # the VM went away

    saved = termios.tcgetattr(fd_in) if is_tty else None
    try:
        if is_tty:
            tty.setraw(fd_in)
        loop.add_reader(fd_in, on_stdin)
        tasks = [asyncio.create_task(pump_in()), asyncio.create_task(pump_out())]
        await done
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, Exception):
                await t
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(fd_in)
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
