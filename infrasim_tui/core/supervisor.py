"""The QEMU supervisor: spawn detached, connect, continue; watch; stop; adopt after a restart.

QEMU runs in its own session with a pidfile, so it outlives the process that started it (and
never sees that process's Ctrl+C). It starts paused (``-S``): the supervisor connects QMP and
the serial socket first — so no boot output is lost — then sends ``cont``. Exit is noticed by
the QMP connection closing; the reason comes from QMP's SHUTDOWN event, the wait status (when
QEMU is our child), QEMU's own stderr log and the last serial lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from .console import SerialConsole, last_lines, read_log_tail
from .errors import HostPortInUse, QemuError
from .qmp import QmpSession

ExitCallback = Callable[["QemuProcess", "ExitInfo"], Awaitable[None]]


@dataclass(frozen=True)
class ExitInfo:
    """Why QEMU went away. ``clean`` means it should be STOPPED, not ERROR."""

    clean: bool
    reason: str
    last_lines: tuple[str, ...] = ()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def is_our_qemu(pid: int, marker: str) -> bool:
    """True when ``pid`` is a live QEMU whose command line mentions ``marker`` (its run dir's
    socket), so a recycled pid is never mistaken for our VM."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmd) and "qemu" in os.path.basename(cmd[0]) and any(marker in a for a in cmd)


def read_pidfile(path: str | Path) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def unlink_quietly(*paths: str) -> None:
    for p in paths:
        if p:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


class QemuProcess:
    """One running QEMU: its pid, QMP session and serial console, and a watcher task."""

    def __init__(self, *, vm_id: str, qmp_socket: str, serial_socket: str, serial_log: str,
                 stderr_log: str, pidfile: str, name: str = "") -> None:
        self.vm_id = vm_id
        self.name = name
        self.qmp_socket = qmp_socket
        self.serial_socket = serial_socket
        self.serial_log = serial_log
        self.stderr_log = stderr_log
        self.pidfile = pidfile
        self.pid = 0
        self._popen: subprocess.Popen[bytes] | None = None  # only when QEMU is our child
        self.qmp = QmpSession(qmp_socket, name=f"infrasim-{vm_id}")
        self.console = SerialConsole(serial_socket, serial_log)
        self.shutdown_event: dict[str, object] | None = None
        self.expected_exit: str = ""  # set before we ask QEMU to go away, to word the reason
        self.exited = asyncio.Event()
        self.exit_info: ExitInfo | None = None
        self._watch: asyncio.Task[None] | None = None
        self._on_exit: ExitCallback | None = None
        self._on_state: Callable[[str], Awaitable[None]] | None = None

    # -- start / adopt ----------------------------------------------------------------------

    async def spawn(self, argv: list[str], *, forward_fields: dict[int, str] | None = None,
                    connect_timeout: float = 10.0) -> None:
        """Start QEMU paused and connect to it. On failure nothing is left running."""
        unlink_quietly(self.qmp_socket, self.serial_socket, self.pidfile)
        with open(self.stderr_log, "ab") as err:
            err.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
            err.flush()
            try:
                self._popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                raise QemuError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        self.pid = self._popen.pid
        try:
            await self.qmp.connect(timeout=connect_timeout, alive=self._child_alive)
            self.qmp_version = self.qmp.version
            self.console.seed_from_log()
            await self.console.connect()
        except (QemuError, OSError) as exc:
            await self._reap_failed_start()
            raise self._start_error(exc, forward_fields or {}) from exc

    def _child_alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    async def _reap_failed_start(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
            await asyncio.get_running_loop().run_in_executor(None, self._popen.wait)
        await self.qmp.disconnect()
        await self.console.close()
        unlink_quietly(self.qmp_socket, self.serial_socket)

    def _start_error(self, exc: Exception, forward_fields: dict[int, str]) -> Exception:
        stderr = stderr_tail(self.stderr_log)
        if "host forwarding rule" in stderr or "Could not set up host forwarding" in stderr:
            for port, fld in forward_fields.items():
                if str(port) in stderr:
                    return HostPortInUse(fld, port)
        if stderr:
            return QemuError(f"QEMU failed to start: {stderr}")
        return QemuError(str(exc))

    async def adopt(self, pid: int) -> None:
        """Attach to a QEMU started by an earlier process (reattach after a restart)."""
        self.pid = pid
        await self.qmp.connect(timeout=3.0, alive=lambda: pid_alive(pid))
        self.qmp_version = self.qmp.version
        self.console.seed_from_log()
        # On failure the log file still has everything; input is unavailable until next start.
        with contextlib.suppress(OSError):
            await self.console.connect()

    def watch(self, on_exit: ExitCallback, on_state: Callable[[str], Awaitable[None]]) -> None:
        self._on_exit = on_exit
        self._on_state = on_state
        self._watch = asyncio.create_task(self._run_watch(), name=f"watch:{self.vm_id}")

    async def _run_watch(self) -> None:
        events = asyncio.create_task(self._pump_events())
        try:
            await self.qmp.wait_disconnected()
        finally:
            events.cancel()
        info = await self._collect_exit()
        self.exit_info = info
        await self.qmp.disconnect()
        await self.console.close()
        unlink_quietly(self.qmp_socket, self.serial_socket)
        try:
            if self._on_exit is not None:
                await self._on_exit(self, info)
        finally:
            self.exited.set()  # after the record is written, so waiters read the final state

    async def _pump_events(self) -> None:
        while True:
            ev = await self.qmp.next_event()
            name = ev.get("event")
            if name == "SHUTDOWN":
                self.shutdown_event = dict(ev.get("data", {}))
            elif name in ("STOP", "RESUME") and self._on_state is not None:
                if self.shutdown_event is not None or self.expected_exit:
                    continue  # QEMU pauses on its way out; that is not a user-visible pause
                await self._on_state("PAUSED" if name == "STOP" else "RUNNING")

    async def _collect_exit(self) -> ExitInfo:
        """QMP closed: wait (briefly) for the process to be gone and word why it went."""
        status: int | None = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self._popen is not None:
                status = self._popen.poll()
                if status is not None:
                    break
            elif not pid_alive(self.pid):
                break
            await asyncio.sleep(0.01)
        lines = tuple(self.console.last_lines(10))
        if self.shutdown_event is not None:
            why = str(self.shutdown_event.get("reason", ""))
            if self.shutdown_event.get("guest") or why in ("guest-shutdown", "guest-panic"):
                if why == "guest-panic":
                    return ExitInfo(False, "guest kernel panicked", lines)
                return ExitInfo(True, self.expected_exit or "guest powered off", lines)
            return ExitInfo(True, self.expected_exit or f"QEMU shut down ({why})", lines)
        if self.expected_exit and status is not None and status <= 0:
            return ExitInfo(True, self.expected_exit, lines)
        err = stderr_tail(self.stderr_log)
        if status is not None and status < 0:
            sig = signal.Signals(-status).name
            reason = f"QEMU was killed by signal {-status} ({sig})"
        elif status is not None:
            reason = f"QEMU exited with status {status}"
        else:
            reason = "QEMU exited unexpectedly (killed or crashed; not a guest power-off)"
        if err:
            reason += f": {err}"
        return ExitInfo(False, reason, lines)

    # -- control ----------------------------------------------------------------------------

    async def powerdown(self, timeout: float) -> bool:
        """ACPI/GPIO power button; True when the guest powered off within ``timeout``."""
        self.expected_exit = "stopped by operator (guest powered off)"
        try:
            await self.qmp.execute("system_powerdown")
        except QemuError:
            if self.exited.is_set():
                return True
            raise
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def quit(self, reason: str, timeout: float = 5.0) -> None:
        """Ask QEMU to exit now (the guest gets no say); SIGKILL if it does not."""
        self.expected_exit = reason
        with contextlib.suppress(QemuError):
            await self.qmp.execute("quit", timeout=2.0)
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            self.kill()
            await asyncio.wait_for(self.exited.wait(), timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def detach(self) -> None:
        """Let go of QEMU without stopping it (the core is shutting down)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.qmp.disconnect()
        await self.console.close()
        if self._popen is not None:
            # Keep subprocess from reaping (or warning about) a child that must live on.
            self._popen.returncode = 0


def stderr_tail(path: str, max_lines: int = 3) -> str:
    """QEMU's last words from its stderr log (after our last start marker)."""
    data = read_log_tail(path, 8192).decode("utf-8", "replace")
    data = data.rsplit("--- ", 1)[-1].split("\n", 1)[-1] if "--- " in data else data
    lines = [ln.strip() for ln in data.splitlines() if ln.strip()]
    return " | ".join(lines[-max_lines:])


__all__ = ["ExitInfo", "QemuProcess", "is_our_qemu", "last_lines", "pid_alive", "read_pidfile"]
