"""Serial consoles: one connection to each VM's serial socket, fanned out to many readers.

QEMU's serial chardev accepts a single client and drops output while none is connected (its
``logfile=`` keeps everything), so the core holds the one connection, keeps a bounded ring
buffer seeded from the log file on reattach, and hands bytes to any number of readers. Input
from all writers goes through one path so keystrokes never interleave mid-sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

RING_BYTES = 256 * 1024
READER_QUEUE_CHUNKS = 4096
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")


class ConsoleReader:
    """One consumer's view: ``history`` (what the ring held when it joined) then live chunks.

    A reader that falls behind by more than its queue loses the oldest chunks; ``lost`` counts
    them so a UI can say so instead of freezing the whole console.
    """

    def __init__(self, console: SerialConsole, history: bytes) -> None:
        self._console = console
        self.history = history
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(READER_QUEUE_CHUNKS)
        self.lost = 0

    def _offer(self, chunk: bytes | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.lost += 1
        self._queue.put_nowait(chunk)

    async def read(self) -> bytes | None:
        """Next chunk, or None once the console has closed (QEMU exited or core shut down)."""
        return await self._queue.get()

    def close(self) -> None:
        self._console._readers.discard(self)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while (chunk := await self.read()) is not None:
            yield chunk

    def __enter__(self) -> ConsoleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialConsole:
    """The core's side of one VM's serial port."""

    def __init__(self, socket_path: str, log_path: str) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._ring = bytearray()
        self.total_bytes = 0  # bytes seen since this object was created (history included)
        self.live_start = 0  # offset where live output began (after the seeded history)
        self._readers: set[ConsoleReader] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._input_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self.closed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    def seed_from_log(self, max_bytes: int = RING_BYTES) -> None:
        """Load the tail of the log file so history survives a core restart."""
        self._append(read_log_tail(self.log_path, max_bytes))

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        self._writer = writer
        self.live_start = self.total_bytes
        self._pump = asyncio.create_task(self._run(reader), name=f"serial:{self.socket_path}")

    async def _run(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self._append(chunk)
                for r in list(self._readers):
                    r._offer(chunk)
                async with self._changed:
                    self._changed.notify_all()
        except (ConnectionError, OSError):
            pass
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for r in list(self._readers):
            r._offer(None)
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self._finish()
        async with self._changed:
            self._changed.notify_all()

    def _append(self, chunk: bytes) -> None:
        self._ring += chunk
        self.total_bytes += len(chunk)
        if len(self._ring) > RING_BYTES:
            del self._ring[: len(self._ring) - RING_BYTES]

    # -- reading ----------------------------------------------------------------------------

    def history(self) -> bytes:
        return bytes(self._ring)

    def subscribe(self) -> ConsoleReader:
        reader = ConsoleReader(self, bytes(self._ring))
        self._readers.add(reader)
        return reader

    @property
    def reader_count(self) -> int:
        return len(self._readers)

    def last_lines(self, n: int = 10) -> list[str]:
        return last_lines(bytes(self._ring[-16384:]), n)

    async def wait_for(self, pattern: bytes | re.Pattern[bytes], timeout: float,
                       start: int | None = None) -> int:
        """Wait until ``pattern`` shows up after byte offset ``start`` (default: now).

        Returns the offset just past the match. Raises TimeoutError with the console's tail,
        which is what an operator needs to see when a boot hangs.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        begin = self.total_bytes if start is None else start

        def search() -> int | None:
            ring_start = self.total_bytes - len(self._ring)
            offset = max(begin, ring_start) - ring_start
            m = regex.search(self._ring, offset)
            return ring_start + m.end() if m else None

        async def loop() -> int:
            async with self._changed:
                while True:
                    found = search()
                    if found is not None:
                        return found
                    if self.closed.is_set():
                        raise ConnectionError("serial console closed (QEMU exited)")
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            tail = "\n".join(self.last_lines(5))
            raise TimeoutError(f"{regex.pattern!r} not seen within {timeout}s; console tail:\n"
                               f"{tail}") from None

    # -- writing ----------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self._writer is None or self.closed.is_set():
            raise ConnectionError("serial console is not connected")
        async with self._input_lock:
            self._writer.write(data)
            await self._writer.drain()


def last_lines(data: bytes, n: int) -> list[str]:
    """The last ``n`` non-blank lines of terminal output, escape sequences stripped."""
    text = _ANSI.sub(b"", data).decode("utf-8", "replace").replace("\r", "")
    lines = [ln.rstrip() for ln in text.split("\n") if ln.strip()]
    return lines[-n:]


def read_log_tail(path: str | Path, max_bytes: int = 16384) -> bytes:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            return f.read()
    except FileNotFoundError:
        return b""
