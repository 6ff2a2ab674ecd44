"""What a console (or any interactive frontend) needs from one core, embedded or attached.

A :class:`Session` wraps either the in-process Orchestrator or a RemoteCore (the daemon over
gRPC) behind the same surface: the core's API, one live event stream fanned out to listeners,
per-VM metric history, per-link traffic history (from ``network.stats``), and serial console
streams. One Session serves every app in a process (each SSH viewer later), so there is one
event subscription and one metrics sampler however many screens watch; a frontend's own shared
caches (the per-VM pyte screens) hang off :attr:`Session.shared`.
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
from .core.model import VM, LinkStats, VMSpec, from_dict

log = logging.getLogger(__name__)

Listener = Callable[[Event], None]
RECENT = 1000  # events kept for the Events screen and each VM's recent events
LINK_HISTORY = 120  # samples kept per link direction: 60 s at the core's 2 Hz

#: One switch port in one direction: (network id, VM id, NIC, direction).
LinkKey = tuple[str, str, str, str]


def link_key(stats: LinkStats) -> LinkKey:
    return (stats.network_id, stats.vm_id, stats.nic, stats.direction)


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


@dataclass(frozen=True)
class LinkPoint:
    """What the graphs need of one LinkStats sample (the full record is kept only for the
    latest one, so 120 samples of many links stay small)."""

    ts: float
    throughput_bps: float
    delay_p50_ms: float
    delay_p99_ms: float
    queue_bytes: int


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
        self._links: dict[str, list[LinkStats]] = {}  # network id -> latest sample per link
        self._link_history: dict[LinkKey, deque[LinkPoint]] = {}
        self.link_samples = 0  # network.stats events stored: views redraw when it moves

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
        elif ev.type == "network.stats":
            self._store_links(ev)
        else:
            if ev.seq and self.recent and ev.seq <= self.recent[-1].seq:
                return  # already replayed
            self.recent.append(ev)
            if ev.type == "vm.state" and str(ev.data.get("new", "")).upper() in ("STOPPED",
                                                                                 "ERROR"):
                self._metrics.pop(ev.resource_id, None)
                self._forget_links(vm_id=ev.resource_id)
            elif ev.type == "vm.deleted":
                self._forget_links(vm_id=ev.resource_id)
            elif ev.type == "network.deleted":
                self._forget_links(network_id=ev.resource_id)
        for listener in list(self._listeners):
            try:
                listener(ev)
            except Exception:  # one broken viewer never stops the others
                log.exception("event listener failed")

    def metrics(self, vm_id: str) -> deque[MetricPoint]:
        return self._metrics.get(vm_id) or deque()

    # -- link statistics --------------------------------------------------------------------

    def _store_links(self, ev: Event) -> None:
        """A segment's ``network.stats``: its links now replace the previous set (a port that
        is gone loses its history); a malformed sample is skipped, never raised."""
        raw = ev.data.get("links", [])
        try:
            if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
                raise TypeError("links must be a list of objects")
            links = [from_dict(LinkStats, d) for d in raw]
        except (TypeError, ValueError, KeyError, AttributeError):
            log.warning("malformed network.stats for %s", ev.name or ev.resource_id)
            return
        for st in links:
            st.network_id = st.network_id or ev.resource_id
            st.network = st.network or ev.name
            st.at = st.at or ev.ts
        old = {link_key(st) for st in self._links.get(ev.resource_id, [])}
        self._links[ev.resource_id] = links
        for st in links:
            key = link_key(st)
            old.discard(key)
            ring = self._link_history.get(key)
            if ring is None:
                ring = self._link_history[key] = deque(maxlen=LINK_HISTORY)
            ring.append(LinkPoint(st.at, st.throughput_bps, st.delay_p50_ms, st.delay_p99_ms,
                                  st.queue_bytes))
        for key in old:
            self._link_history.pop(key, None)
        self.link_samples += 1

    def _forget_links(self, *, vm_id: str = "", network_id: str = "") -> None:
        """A stopped VM's ports are gone, and a segment with no ports sends no more stats."""
        for net_id in list(self._links):
            if network_id and net_id != network_id:
                continue
            keep = []
            for st in self._links[net_id]:
                if vm_id and st.vm_id != vm_id:
                    keep.append(st)
                else:
                    self._link_history.pop(link_key(st), None)
            if keep:
                self._links[net_id] = keep
            else:
                del self._links[net_id]
        self.link_samples += 1

    def link_stats(self, network_id: str = "") -> list[LinkStats]:
        """The latest sample of every link of one segment ("" = every segment)."""
        if network_id:
            return list(self._links.get(network_id, []))
        return [st for links in self._links.values() for st in links]

    def link_history(self, key: LinkKey) -> deque[LinkPoint]:
        return self._link_history.get(key) or deque()

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


__all__ = ["LINK_HISTORY", "ConsoleStream", "LinkKey", "LinkPoint", "MetricPoint", "Session",
           "link_key"]
