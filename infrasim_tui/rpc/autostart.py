"""Client side: find the daemon of a data dir, starting one in the background if needed.

:func:`ensure_daemon` is what the CLI calls before talking to the API. It never starts a second
daemon for a data dir: the daemon takes the data dir lock before it touches the socket, so of
two daemons started at once (two CLIs racing) one exits, and the CLI that started the loser
goes on waiting for the winner's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from ..core.errors import Unavailable
from ..core.lock import DataDirLock
from ..core.paths import SUN_PATH_BUDGET, DataDir

DAEMON_LOG = "daemon.log"
_POLL_INTERVAL = 0.05
# After our daemon exited: how long the lock owner may take to write its pid into the lock
# file (owner_pid() says None meanwhile). Microseconds in practice.
_OWNER_GRACE = 0.3
_LOG_TAIL_LINES = 15
_LOG_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class DaemonEndpoint:
    """Where a client reaches a daemon.

    ``target`` is a gRPC target: ``unix:///abs/path/infrasim.sock`` or ``host:port``. ``token``
    and ``tls_ca`` (a PEM file path) only matter for TCP targets.
    """

    target: str
    token: str = ""
    tls_ca: str = ""

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> DaemonEndpoint:
        return cls(target=f"unix://{DataDir(data_dir).socket}")

    @property
    def is_unix(self) -> bool:
        return self.target.startswith("unix:")


def open_channel(endpoint: DaemonEndpoint) -> grpc.aio.Channel:
    """A grpc.aio channel to ``endpoint`` with the right credentials for its transport.

    Unix socket: plain. TCP with ``tls_ca``: TLS plus the token as call credentials. TCP
    without: plain text, the token added by interceptors (it travels in clear).
    """
    # Imported here: TLS and token helpers (ssl) cost every CLI start otherwise.
    from .auth import bearer_client_interceptors, channel_credentials, token_call_credentials

    if endpoint.is_unix:
        return grpc.aio.insecure_channel(endpoint.target)
    if endpoint.tls_ca:
        creds = channel_credentials(Path(endpoint.tls_ca))
        if endpoint.token:
            creds = grpc.composite_channel_credentials(
                creds, token_call_credentials(endpoint.token)
            )
        return grpc.aio.secure_channel(endpoint.target, creds)
    interceptors = bearer_client_interceptors(endpoint.token) if endpoint.token else None
    return grpc.aio.insecure_channel(endpoint.target, interceptors=interceptors)


async def socket_answers(sock: Path, timeout: float = 0.5) -> bool:
    """True if something accepts connections on the unix socket ``sock``.

    A real connect, not a file check: the socket file of a killed daemon stays behind, and
    connecting to it is refused.
    """
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(sock)), timeout
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def ensure_daemon(
    data_dir: Path,
    *,
    autostart: bool,
    serve_argv: list[str],
    log: Callable[[str], None],
    timeout: float = 15.0,
) -> None:
    """Return once a daemon answers on ``<data_dir>/infrasim.sock``, starting one if allowed.

    ``serve_argv`` starts a daemon for this data dir (e.g. ``[sys.executable, "-m",
    "infrasim_tui", "--data-dir", D, "serve"]``); it runs detached (own session, stdin and
    stdout on /dev/null, stderr appended to ``<data_dir>/daemon.log``). ``log`` gets one line
    for the operator once a daemon started here answers. :class:`Unavailable` when autostart
    is off, when the daemon exits before answering (quoting the end of daemon.log), or when no
    daemon answers within ``timeout`` seconds.
    """
    data = DataDir(data_dir)
    sock = data.socket
    if len(os.fsencode(str(sock))) >= SUN_PATH_BUDGET:
        raise Unavailable(
            f"the API socket path {sock} is too long for a unix socket; use a --data-dir "
            "with a shorter path"
        )
    if await socket_answers(sock):
        return
    if not autostart:
        raise Unavailable(
            f"no InfraSim daemon answers on {sock}; start one with `infrasim serve` or drop "
            "--no-autostart"
        )
    deadline = time.monotonic() + timeout
    log_path = data.root / DAEMON_LOG

    # Someone owns the data dir already: a daemon still starting up (another CLI's autostart,
    # or `infrasim serve` run by hand). Starting ours would only lose the lock: wait for it.
    owner = DataDirLock.owner_pid(data)
    if owner is not None:
        if await _wait_for_owner(data, owner, deadline):
            return
        if DataDirLock.owner_pid(data) is not None:
            raise _owner_silent(data, owner, timeout, log_path, 0)
        # The owner died without serving: start our own below.

    offset = _log_size(log_path)
    proc = _spawn(data, serve_argv, log_path)
    while True:
        if await socket_answers(sock):
            owner = DataDirLock.owner_pid(data)
            ours = owner == proc.pid or (owner is None and proc.poll() is None)
            _reap_in_background(proc)
            if ours:
                log(
                    f"started an InfraSim daemon (pid {proc.pid}) for {data.root}; "
                    f"logs: {log_path}"
                )
            elif owner is not None:
                log(_meanwhile(owner, data))
            return
        if proc.poll() is not None:
            break
        if time.monotonic() >= deadline:
            _reap_in_background(proc)
            raise Unavailable(
                f"the InfraSim daemon started for {data.root} (pid {proc.pid}) does not "
                f"answer on {sock} after {timeout:g}s; it is still running: see {log_path}"
                f"{_log_tail(log_path, offset)}"
            )
        await asyncio.sleep(_POLL_INTERVAL)

    # Our daemon exited before answering. If another process holds the lock, it lost a race
    # against that one (another CLI's autostart): wait for the winner's socket.
    winner = await _current_owner(data, exclude=proc.pid)
    if winner is None:
        raise Unavailable(
            f"the InfraSim daemon for {data.root} exited (status {proc.returncode}) before "
            f"answering on {sock}{_log_tail(log_path, offset)}"
        )
    if await _wait_for_owner(data, winner, deadline):
        log(_meanwhile(winner, data))
        return
    raise _owner_silent(data, winner, timeout, log_path, offset)


async def _wait_for_owner(data: DataDir, owner: int, deadline: float) -> bool:
    """Wait for the socket while ``owner`` holds the lock: True once it answers.

    False at the deadline, or as soon as the lock is free (the owner died); a new owner (the
    lock changed hands) is waited for in turn.
    """
    while True:
        if await socket_answers(data.socket):
            return True
        if time.monotonic() >= deadline:
            return False
        current = await _current_owner(data, exclude=None)
        if current is None:
            return await socket_answers(data.socket)
        await asyncio.sleep(_POLL_INTERVAL)


async def _current_owner(data: DataDir, *, exclude: int | None) -> int | None:
    """The lock owner's pid; ``exclude`` (our dead daemon) and None get a short grace.

    owner_pid() is None both for a free lock and for an owner that has not yet written its
    pid, so None is re-checked for a moment before it is believed.
    """
    end = time.monotonic() + _OWNER_GRACE
    while True:
        pid = DataDirLock.owner_pid(data)
        if pid is not None and pid != exclude:
            return pid
        if time.monotonic() >= end:
            return None
        await asyncio.sleep(0.02)


def _meanwhile(pid: int, data: DataDir) -> str:
    return f"an InfraSim daemon (pid {pid}) was started for {data.root} meanwhile; using it"


def _owner_silent(
    data: DataDir, owner: int, timeout: float, log_path: Path, offset: int
) -> Unavailable:
    return Unavailable(
        f"data dir {data.root} is owned by process {owner}, which does not answer on "
        f"{data.socket} after {timeout:g}s; if it is not an InfraSim daemon (e.g. a TUI "
        f"session), stop it or run `infrasim serve` there instead"
        f"{_log_tail(log_path, offset)}"
    )


def _spawn(data: DataDir, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    if not argv:
        raise ValueError("serve_argv is empty")
    try:
        data.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise Unavailable(f"cannot open the daemon log {log_path}: {exc.strerror}") from None
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"--- {stamp} autostart by pid {os.getpid()}: {shlex.join(argv)}\n".encode())
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fd,
                start_new_session=True,  # no SIGINT/SIGHUP from the CLI's terminal
                close_fds=True,
            )
        except OSError as exc:
            raise Unavailable(
                f"cannot start the InfraSim daemon ({shlex.join(argv)}): {exc.strerror}"
            ) from None
    finally:
        os.close(fd)


def _reap_in_background(proc: subprocess.Popen[bytes]) -> None:
    """Collect the daemon's exit status whenever it ends, so it never lingers as a zombie of a
    long-lived client (and Popen never warns about a child still running)."""
    if proc.poll() is not None:
        return
    threading.Thread(
        target=proc.wait, name=f"infrasim-daemon-reaper-{proc.pid}", daemon=True
    ).start()


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_tail(path: Path, offset: int) -> str:
    """The last lines written to the daemon log since ``offset``, ready to append to an error."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(offset, size - _LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return f"; {path} has nothing new"
    tail = lines[-_LOG_TAIL_LINES:]
    return f"; last lines of {path}:\n" + "\n".join(f"  {line}" for line in tail)
