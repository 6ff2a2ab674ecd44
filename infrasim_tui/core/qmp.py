"""QMP sessions over ``qemu.qmp``: connect with retry, errors as :class:`QemuError`, HMP
errors detected, background jobs awaited, and a signal when QEMU goes away.

``qemu.qmp`` gives the async protocol; this layer adds what the supervisor needs on top and
turns QEMU's failures into messages an operator can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from .errors import QemuError

Message = dict[str, Any]


class QmpSession:
    """One QMP connection to one QEMU."""

    def __init__(self, socket_path: str, name: str = "infrasim") -> None:
        self.socket_path = socket_path
        self._client = QMPClient(name)
        self._events = EventListener()
        self._client.register_listener(self._events)
        self.version: str = ""

    async def connect(self, timeout: float = 5.0,
                      alive: Callable[[], bool] | None = None) -> None:
        """Connect, retrying while QEMU creates its socket (30-60 ms after spawn).

        ``alive`` lets the caller stop waiting as soon as the process has died.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not os.path.exists(self.socket_path):  # spare qemu.qmp's error log
                    raise FileNotFoundError(self.socket_path)
                await self._client.connect(self.socket_path)
                break
            except (ConnectError, OSError) as exc:
                if alive is not None and not alive():
                    raise QemuError("QEMU exited before its QMP socket was ready") from exc
                if time.monotonic() > deadline:
                    raise QemuError(f"QMP socket {self.socket_path} not ready after {timeout}s: "
                                    f"{exc}") from exc
                await asyncio.sleep(0.002)  # a stat per poll is cheap; latency matters more
        greeting = self._client.greeting
        if greeting is not None:
            v: Any = greeting.QMP.version.get("qemu", {})
            self.version = f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                return await self._client.execute(cmd, args)
        except ExecuteError as exc:
            raise QemuError(f"QEMU refused {cmd}: {exc.error.error.desc}") from exc
        except (QMPError, EOFError, ConnectionError) as exc:
            raise QemuError(f"QMP {cmd} failed: {exc or type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise QemuError(f"QMP {cmd} got no answer within {timeout}s") from exc

    async def hmp(self, command_line: str) -> str:
        """Run an HMP command; its errors arrive as text, so look for them."""
        out = str(await self.execute("human-monitor-command", {"command-line": command_line}))
        for line in out.splitlines():
            if line.startswith("Error:") or line.startswith("Error "):
                raise QemuError(f"QEMU: {line}")
        return out

    async def run_job(self, cmd: str, args: dict[str, Any], timeout: float = 120.0) -> None:
        """Start a background job and wait until it concludes.

        Its error comes only through query-jobs, never as the command's reply.
        """
        job_id = str(args["job-id"])
        done = asyncio.get_running_loop().create_future()

        def concluded(ev: Any) -> bool:
            data = ev.get("data", {})
            return bool(ev["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job_id
                        and data.get("status") == "concluded")

        with self._client.listener("JOB_STATUS_CHANGE", concluded) as lst:
            await self.execute(cmd, args)

            async def wait() -> None:
                await lst.get()
                done.set_result(None)

            try:
                await asyncio.wait_for(wait(), timeout)
            except TimeoutError as exc:
                raise QemuError(f"{cmd} job {job_id} did not finish within {timeout}s") from exc
        jobs = await self.execute("query-jobs")
        error = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
        with contextlib.suppress(QemuError):
            await self.execute("job-dismiss", {"id": job_id})
        if error:
            raise QemuError(f"{cmd} failed: {error}")

    async def next_event(self) -> Message:
        return dict(await self._events.get())

    async def wait_disconnected(self) -> None:
        """Return once the connection is gone (QEMU exited, was killed, or we disconnected)."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()

    async def disconnect(self) -> None:
        with contextlib.suppress(EOFError, ConnectionError, QMPError, OSError):
            await self._client.disconnect()
