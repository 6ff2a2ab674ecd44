"""Live CPU and memory samples of each running VM's QEMU process, shared by every viewer.

Sampling reads ``/proc`` through psutil (it never talks to QEMU or the guest), and runs only
while someone wants it: the console's panes and each ``WatchEvents(metrics=true)`` stream take a
reference, and the last one out stops the timer. Samples are published on the event bus as
``vm.metrics`` (never persisted) and kept in a short ring per VM for sparklines, so twenty
viewers cost one sample, not twenty.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

from .events import Event, EventBus

HISTORY = 120  # samples kept per VM (two minutes at 1 Hz)
DEFAULT_INTERVAL = 1.0


@dataclass(frozen=True)
class Sample:
    vm_id: str
    name: str
    pid: int
    cpu_percent: float
    rss_bytes: int
    ts: float

    def event(self) -> Event:
        return Event(type="vm.metrics", kind="vm", resource_id=self.vm_id, name=self.name,
                     message=f"{self.name}: cpu {self.cpu_percent:.1f}% "
                             f"rss {self.rss_bytes >> 20} MiB",
                     data={"cpu_percent": self.cpu_percent, "rss_bytes": self.rss_bytes,
                           "pid": self.pid},
                     ts=self.ts)


class ProcessSampler:
    """CPU % needs two readings of the same process: keep one psutil handle per pid."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, vm_id: str, name: str, pid: int) -> Sample | None:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)
            cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss
        except psutil.Error:
            self._procs.pop(pid, None)
            return None
        return Sample(vm_id, name, pid, cpu, rss, time.time())

    def forget_except(self, pids: set[int]) -> None:
        for pid in set(self._procs) - pids:
            del self._procs[pid]


class Metrics:
    """Reference-counted sampler publishing ``vm.metrics`` on the bus."""

    def __init__(self, bus: EventBus, live: Callable[[], list[tuple[str, str, int]]],
                 interval: float = DEFAULT_INTERVAL) -> None:
        self._bus = bus
        self._live = live  # () -> [(vm_id, name, pid)] of running QEMUs, from memory
        self.interval = interval
        self._sampler = ProcessSampler()
        self._users = 0
        self._task: asyncio.Task[None] | None = None
        self.history: dict[str, deque[Sample]] = {}

    def latest(self, vm_id: str) -> Sample | None:
        ring = self.history.get(vm_id)
        return ring[-1] if ring else None

    def acquire(self) -> None:
        self._users += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="metrics")

    def release(self) -> None:
        self._users = max(0, self._users - 1)
        if not self._users and self._task is not None:
            self._task.cancel()
            self._task = None

    @contextlib.contextmanager
    def using(self) -> Iterator[Metrics]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def sample_now(self) -> list[Sample]:
        live = self._live()
        out = []
        for vm_id, name, pid in live:
            s = self._sampler.sample(vm_id, name, pid)
            if s is None:
                continue
            ring = self.history.get(vm_id)
            if ring is None:
                ring = self.history[vm_id] = deque(maxlen=HISTORY)
            ring.append(s)
            out.append(s)
        self._sampler.forget_except({pid for _, _, pid in live})
        for vm_id in set(self.history) - {v for v, _, _ in live}:
            del self.history[vm_id]
        return out

    async def _run(self) -> None:
        while True:
            for s in self.sample_now():
                self._bus.publish(s.event())
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
