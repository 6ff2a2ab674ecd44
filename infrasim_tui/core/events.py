"""The in-process event bus: every state transition and resource change is published here.

Subscribers get their own bounded queue, so a slow consumer (a console pane, a remote stream)
loses its oldest events instead of stalling the core; ``dropped`` tells it so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``type`` is a dotted name such as ``vm.state``."""

    type: str
    kind: str  # resource kind ("vm", ...)
    resource_id: str
    name: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    seq: int = 0  # position in the store's event log once persisted (0 = not persisted)


class Subscription:
    """A bounded queue of events for one consumer; iterate it with ``async for``."""

    def __init__(self, bus: EventBus, maxsize: int, accept: Callable[[Event], bool] | None) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._accept = accept
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        if self._accept is not None and not self._accept(event):
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()

    def get_nowait(self) -> Event | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def subscribe(
        self, accept: Callable[[Event], bool] | None = None, maxsize: int = 1024
    ) -> Subscription:
        sub = Subscription(self, maxsize, accept)
        self._subs.add(sub)
        return sub

    def publish(self, event: Event) -> None:
        for sub in list(self._subs):
            sub._offer(event)
