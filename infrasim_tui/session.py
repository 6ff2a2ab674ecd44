"""What a console (or any interactive frontend) needs from one core, embedded or attached.

A :class:`Session` wraps either the in-process Orchestrator or a RemoteCore (the daemon over
gRPC) behind the same surface: the core's API, one live event stream fanned out to listeners,
per-VM metric history, and serial console streams. One Session serves every app in a process
(each SSH viewer later), so there is one event subscription and one metrics sampler however
many screens watch; a frontend's own shared caches (the per-VM pyte screens) hang off
:attr:`Session.shared`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .core.errors import InfraSimError, Unavailable
from .core.events import Event
from .core.metrics import HISTORY
from .core.model import VM, VMSpec

log = logging.getLogger(__name__)

Listener = Callable[[Event], None]
RECENT = 1000  # events kept for the Events screen and each VM's recent events


class ConsoleStream(Protocol):
    """One viewer's attachment to a VM's serial port: the ring's history, then live bytes."""

    history: bytes

    async def read(self) -> bytes | None: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class MetricPoint:
    cpu_percent: float
    rss_bytes: int
    ts: float


class _LocalStream:
    """An embedded console: a reader on the core's SerialConsole plus its input path."""

    def __init__(self, console: Any) -> None:
        self._console = console
        self._reader = console.subscribe()
        self.history: bytes = self._reader.history

    async def read(self) -> bytes | None:
        chunk: bytes | None = await self._reader.read()
        return chunk

    async def write(self, data: bytes) -> None:
        await self._console.write(data)

    async def close(self) -> None:
        self._reader.close()


class _RemoteStream:
    def __init__(self, console: Any, reader: Any) -> None:
        self._console = console
        self._reader = reader
        self.history: bytes = reader.history

    async def read(self) -> bytes | None:
        try:
            chunk: bytes | None = await self._reader.read()
        except Exception:  # the daemon went away: the same as the console closing
            return None
        return chunk

    async def write(self, data: bytes) -> None:
        await self._console.write(data)

    async def close(self) -> None:
        await self._console.close()
        self._reader.close()


class Session:
    """One core for every frontend in this process. Use :meth:`start` then :meth:`close`."""

    def __init__(self, core: Any, *, mode: str, data_dir: str, address: str = "") -> None:
        self.core = core  # Orchestrator (embedded) or RemoteCore (attached)
        self.mode = mode  # "embedded" | "attached" | "static" (tests)
        self.data_dir = data_dir
        self.address = address  # where the API is served (embedded) or reached (attached)
        self.shared: dict[str, Any] = {}
        self._listeners: set[Listener] = set()
        self._metrics: dict[str, deque[MetricPoint]] = {}
        self._pump: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.event_count = 0
        self.recent: deque[Event] = deque(maxlen=RECENT)  # non-metric events, oldest first

    @property
    def embedded(self) -> bool:
        return self.mode == "embedded"

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._run(), name="session-events")

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None

    async def _run(self) -> None:
        if self.mode == "embedded":
            orch = self.core
            with orch.bus.subscribe(maxsize=16384) as sub, orch.metrics.using():
                last = await orch.store.last_event_seq()
                for rec in await orch.store.events(since_seq=max(0, last - RECENT),
                                                   limit=RECENT):
                    self.recent.append(Event(type=rec.type, kind=rec.kind,
                                             resource_id=rec.resource_id, name=rec.name,
                                             message=rec.message, data=dict(rec.data),
                                             ts=rec.ts, seq=rec.seq))
                self.connected.set()
                async for ev in sub:
                    self._dispatch(ev)
        elif self.mode == "attached":
            while True:
                try:
                    self.recent.clear()
                    async for ev in self.core.watch(metrics=True, tail=RECENT,
                                                    subscribed=self.connected):
                        self._dispatch(ev)
                except InfraSimError as err:
                    log.warning("event stream lost: %s", err)
                self.connected.clear()
                self._dispatch(Event(type="session.disconnected", kind="session",
                                     resource_id="", name="", message="event stream lost; "
                                     "reconnecting"))
                await asyncio.sleep(1.0)
        else:
            self.connected.set()
            await asyncio.Event().wait()

    # -- events -----------------------------------------------------------------------------

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (on the loop, synchronously) for every event; returns unlisten."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def inject(self, event: Event) -> None:
        """Deliver an event as if the core had sent it (synthetic sources, benchmarks)."""
        self._dispatch(event)

    def _dispatch(self, ev: Event) -> None:
        self.event_count += 1
        if ev.type == "vm.metrics":
            ring = self._metrics.get(ev.resource_id)
            if ring is None:
                ring = self._metrics[ev.resource_id] = deque(maxlen=HISTORY)
            ring.append(MetricPoint(float(ev.data.get("cpu_percent", 0.0)),
                                    int(ev.data.get("rss_bytes", 0)), ev.ts))
        else:
            if ev.seq and self.recent and ev.seq <= self.recent[-1].seq:
                return  # already replayed
            self.recent.append(ev)
            if ev.type == "vm.state" and str(ev.data.get("new", "")).upper() in ("STOPPED",
                                                                                 "ERROR"):
                self._metrics.pop(ev.resource_id, None)
        for listener in list(self._listeners):
            try:
                listener(ev)
            except Exception:  # one broken viewer never stops the others
                log.exception("event listener failed")

    def metrics(self, vm_id: str) -> deque[MetricPoint]:
        return self._metrics.get(vm_id) or deque()

    # -- consoles and helpers ---------------------------------------------------------------

    async def open_console(self, vm_id: str) -> ConsoleStream:
        """Attach to a running VM's serial port (WrongState when it is not running)."""
        if self.mode == "embedded":
            return _LocalStream(self.core.console(vm_id))
        if self.mode == "attached":
            console = self.core.console(vm_id)
            reader = await console.open(history=True)
            return _RemoteStream(console, reader)
        opener = self.shared.get("open_console")
        if opener is None:
            raise Unavailable("this session has no consoles")
        stream: ConsoleStream = await opener(vm_id)
        return stream

    async def validate(self, name: str, spec: VMSpec, labels: dict[str, str] | None) -> None:
        await self.core.validate(name, spec, labels)

    async def trusted_key_names(self) -> list[str]:
        keys = self.core.trusted_keys()
        if asyncio.iscoroutine(keys):
            keys = await keys
        return [k.name for k in keys]

    async def list_vms(self) -> list[VM]:
        vms: list[VM] = await self.core.list_vms()
        return vms


__all__ = ["ConsoleStream", "MetricPoint", "Session"]
