"""The operator console over SSH: ``infrasim serve --ssh [ADDR:]PORT``.

Every SSH session gets its own :class:`~infrasim_tui.app.InfraSimApp` running in *this* event
loop (no subprocess, no thread) over the daemon's one shared Session, so per-VM models such as
the serial consoles' pyte screens are shared by every viewer. The authorized key decides the
role, and the role wraps the core in a GuardedCore: a viewer is refused by the API, not only
by hidden keys. Public-key auth only; sessions without a PTY are refused; logins are rate
limited per IP; idle, maximum-length and stalled sessions are closed; everything is written
to an append-only audit log (and optionally recorded as asciicast v2).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from rich.color import ColorSystem

from ..app import InfraSimApp
from ..core.access import GuardedCore, Role
from ..core.errors import InfraSimError, InvalidSpec
from ..session import Session
from .audit import AuditLog
from .driver import SSHDriver
from .keys import AuthorizedKey, KeyFile

log = logging.getLogger(__name__)

REFUSE_NO_PTY = ("infrasim: the console needs a terminal and runs no commands; "
                 "connect with `ssh -t HOST` (no command, no -T)")


@dataclass(frozen=True)
class SSHOptions:
    """Listening address and limits; 0 disables a timeout."""

    host: str = "127.0.0.1"
    port: int = 2222
    record: bool = False  # asciicast v2 per session in <data>/ssh/recordings/
    login_timeout: float = 30.0  # s from TCP connect to successful auth
    idle_timeout: float = 1800.0  # s without input
    max_session: float = 12 * 3600.0  # s per session
    rate_per_minute: float = 10.0  # new connections per IP, refilled continuously
    rate_burst: int = 5
    max_sessions_per_key: int = 8
    write_cap: int = 4 << 20  # bytes of pending output before a client counts as stalled
    keepalive: float = 30.0


def parse_ssh_listen(text: str) -> tuple[str, int]:
    """Pure: ``[ADDR:]PORT`` (``[v6]:PORT`` too) -> (host, port); the address defaults to
    loopback so a console is never exposed by accident."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]") if sep else ""
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidSpec("ssh", f"{text!r} is not [ADDR:]PORT (e.g. 2222 or "
                                 "0.0.0.0:2222)") from None
    if not 0 <= port <= 65535:
        raise InvalidSpec("ssh", f"port {port} is out of range 0-65535")
    return host or "127.0.0.1", port


def color_system_for(term: str, env: dict[str, str]) -> ColorSystem:
    """Pure: the client's colour depth from its TERM (OpenSSH sends no COLORTERM unless
    configured to, so honour it when present)."""
    colorterm = env.get("COLORTERM", "").lower()
    if colorterm in ("truecolor", "24bit") or term.endswith(("-truecolor", "-direct")):
        return ColorSystem.TRUECOLOR
    if "256" in term:
        return ColorSystem.EIGHT_BIT
    return ColorSystem.STANDARD


def load_or_create_host_key(data_root: Path) -> asyncssh.SSHKey:
    """``<data>/ssh/host_key`` (ed25519, 0600), made on first start and reused after, so
    clients' known_hosts stay valid across restarts."""
    path = data_root / "ssh" / "host_key"
    if path.exists():
        return asyncssh.read_private_key(str(path))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    os.replace(tmp, path)
    return key


class RateLimiter:
    """A token bucket per remote address: ``burst`` at once, then ``per_minute``."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, addr: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(addr, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[addr] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > 10000:  # forget addresses whose buckets are full again
            self._buckets = {a: (t, ts) for a, (t, ts) in self._buckets.items()
                             if min(self.burst, t + (now - ts) * self.rate) < self.burst}
        return ok


class Recorder:
    """asciicast v2: a header line then ``[t, "o", text]`` events; owner-only files."""

    def __init__(self, path: Path, width: int, height: int, term: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.path = path
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._start = time.monotonic()
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._write({"version": 2, "width": width, "height": height,
                     "timestamp": int(time.time()), "env": {"TERM": term}})

    def _write(self, obj: object) -> None:
        try:
            self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        except (OSError, ValueError) as err:  # a full disk stops the recording, not the session
            log.error("recording %s stopped: %s", self.path, err)

    def output(self, data: bytes) -> None:
        text = self._decode(data)
        if text:
            self._write([round(time.monotonic() - self._start, 6), "o", text])

    def resize(self, width: int, height: int) -> None:
        self._write([round(time.monotonic() - self._start, 6), "r", f"{width}x{height}"])

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.close()


class SSHConsoleApp(InfraSimApp):
    """The console for one SSH session: the key's role, this session's driver and colours."""

    def __init__(self, session: Session, *, role: Role, terminal: SSHSession,
                 host_fingerprint: str, username: str, color_system: ColorSystem) -> None:
        super().__init__(session, role=role)
        self.ssh_terminal = terminal
        self.driver_class = SSHDriver
        self.core = GuardedCore(session.core, role, audit=terminal.audit_action)
        self.console._color_system = color_system
        self.host_fingerprint = host_fingerprint
        self.ssh_username = username
        # Textual redirects sys.stdout/err process-wide while an app runs; with many apps
        # ending out of order that would leave sys.stdout pointing at a dead app. Redirect to
        # the stream already in place instead, so any unwinding order restores the same one.
        self._capture_stdout = sys.stdout  # type: ignore[assignment]
        self._capture_stderr = sys.stderr  # type: ignore[assignment]

    @property
    def mode_label(self) -> str:
        return f"{self.session.mode} │ ssh {self.host_fingerprint[:19]}…"


class SSHSession(asyncssh.SSHServerSession[bytes]):
    """One SSH channel: checks, timers, output cap, recording and the app's task."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.server = conn.server
        self.id = f"{conn.id}.{next(self.server.session_ids)}"
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.size = (80, 24)
        self.term = ""
        self.pty = False
        self.command: str | None = None
        self.app: SSHConsoleApp | None = None
        self.task: asyncio.Task[None] | None = None
        self.driver: SSHDriver | None = None
        self.recorder: Recorder | None = None
        self.reason = ""
        self.status = 0
        self.closed = False
        self.started = time.monotonic()
        self.first_frame = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- asyncssh callbacks -----------------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Any) -> bool:
        self.pty, self.term = True, term_type or "xterm"
        if term_size[0] and term_size[1]:
            self.size = (term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command  # accepted only to refuse it with a message
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def session_started(self) -> None:
        key = self.conn.key
        self.server.audit.record("ssh.session", self.conn.id, f"session {self.id} requested",
                                 session=self.id, username=self.conn.username,
                                 term=self.term, size=list(self.size), pty=self.pty,
                                 command=self.command, fingerprint=key.fingerprint if key else "")
        if key is None:  # cannot happen after auth; belt and braces
            self.refuse("infrasim: not authenticated")
        elif not self.pty or self.command is not None:
            self.refuse(REFUSE_NO_PTY)
        elif self.server.sessions_of(key.fingerprint) >= self.server.options.max_sessions_per_key:
            self.refuse(f"infrasim: this key already has {self.server.options.max_sessions_per_key}"
                        " console sessions open; close one (or raise the limit)")
        else:
            self.server.sessions[self.id] = self
            self.task = asyncio.create_task(self._run(key), name=f"ssh-{self.id}")

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._arm("idle", self.server.options.idle_timeout, self._idle)
        if self.driver is not None:
            self.driver.feed(data)

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        if width and height:
            self.size = (width, height)
            if self.recorder is not None:
                self.recorder.resize(width, height)
            if self.driver is not None:
                self.driver.resize(width, height)

    def break_received(self, msec: int) -> bool:
        return False

    def eof_received(self) -> bool:
        self.end("client closed its input")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.end(f"connection lost: {exc}" if exc else "client disconnected")

    # -- Terminal (for the driver) ----------------------------------------------------------

    def attach(self, driver: SSHDriver | None) -> None:
        self.driver = driver

    def send(self, data: bytes) -> None:
        chan = self.chan
        if self.closed or chan is None:
            return
        if self.recorder is not None:
            self.recorder.output(data)
        try:
            chan.write(data)
        except (OSError, asyncssh.Error):
            self.closed = True
            self.end("channel closed")
            return
        self.first_frame.set()
        pending = chan.get_write_buffer_size()
        if pending > self.server.options.write_cap:
            self.closed = True  # drop everything from now on: the client is not reading
            self.end(f"client stopped reading ({pending} bytes of output pending)", status=1)
            chan.abort()

    # -- lifecycle --------------------------------------------------------------------------

    def audit_action(self, action: str, target: str, allowed: bool) -> None:
        key = self.conn.key
        self.server.audit.record(
            "ssh.action", self.conn.id,
            f"{self.conn.username}: {action} {target} {'allowed' if allowed else 'REFUSED'}",
            session=self.id, username=self.conn.username, action=action, target=target,
            allowed=allowed, role=key.role.name.lower() if key else "",
            fingerprint=key.fingerprint if key else "")

    def refuse(self, message: str) -> None:
        chan = self.chan
        if chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                chan.write_stderr((message + "\r\n").encode())
                chan.exit(1)

    def _arm(self, name: str, delay: float, callback: Any) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        if delay > 0 and not self.reason:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _idle(self) -> None:
        self.end(f"disconnected after {self.server.options.idle_timeout:g}s without input "
                 "(idle timeout)", status=1)

    def _too_long(self) -> None:
        self.end(f"session reached its {self.server.options.max_session:g}s limit", status=1)

    def end(self, reason: str, status: int = 0) -> None:
        """Stop this session's app (first reason wins); ``_run`` then says why and exits."""
        if self.reason:
            return
        self.reason, self.status = reason, status
        for timer in self._timers.values():
            timer.cancel()
        app = self.app
        if app is not None and app.is_running:
            app.exit(return_code=status)

    async def _run(self, key: AuthorizedKey) -> None:
        opts = self.server.options
        chan = self.chan
        assert chan is not None
        env = dict(chan.get_environment())
        if opts.record:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            path = self.server.data_root / "ssh" / "recordings" / f"{stamp}-{self.id}.cast"
            try:
                self.recorder = Recorder(path, *self.size, self.term)
            except OSError as err:
                log.error("cannot record session %s: %s", self.id, err)
        self._arm("idle", opts.idle_timeout, self._idle)
        self._arm("max", opts.max_session, self._too_long)
        code = 1
        try:
            self.app = SSHConsoleApp(self.server.session, role=key.role, terminal=self,
                                     host_fingerprint=self.server.fingerprint,
                                     username=self.conn.username,
                                     color_system=color_system_for(self.term, env))
            await self.app.run_async(size=self.size)
            code = int(self.app.return_code or 0) if not self.status else self.status
        except Exception as err:  # one broken session must never disturb the others
            log.exception("ssh session %s failed", self.id)
            self.reason = self.reason or f"console failed: {type(err).__name__}: {err}"
        finally:
            self.server.sessions.pop(self.id, None)
            for timer in self._timers.values():
                timer.cancel()
            if self.recorder is not None:
                self.recorder.close()
            self.server.audit.record(
                "ssh.session_end", self.conn.id, f"session {self.id} ended: "
                f"{self.reason or 'quit'}", session=self.id, username=self.conn.username,
                duration=round(time.monotonic() - self.started, 3),
                reason=self.reason or "quit", exit_status=code)
            if not self.closed:
                with contextlib.suppress(OSError, asyncssh.Error):
                    if self.reason:
                        chan.write(f"\r\ninfrasim: {self.reason}\r\n".encode())
                    chan.exit(code)


class _Connection(asyncssh.SSHServer):
    """One TCP connection: rate limit, public-key auth against authorized_keys, audit."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.id = f"c{next(server.conn_ids)}"
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""
        self.username = ""
        self.key: AuthorizedKey | None = None
        self.started = time.monotonic()
        self.refused = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = str(peer[0])
        self.server.audit.record("ssh.connect", self.id, f"connection from {self.peer}",
                                 remote=f"{self.peer}:{peer[1]}")
        if not self.server.limiter.allow(self.peer):
            self.refused = "rate limited"
            self.server.audit.record("ssh.refused", self.id, f"{self.peer}: too many "
                                     "connections", remote=self.peer, reason=self.refused)
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS,
                "too many connections from your address; wait a minute and retry")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.audit.record("ssh.disconnect", self.id, f"{self.peer} disconnected",
                                 remote=self.peer, username=self.username,
                                 fingerprint=self.key.fingerprint if self.key else "",
                                 duration=round(time.monotonic() - self.started, 3),
                                 reason=self.refused or (str(exc) if exc else "closed"))

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return not self.refused

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        blob = key.public_data
        (n,) = struct.unpack(">I", blob[:4])
        key_type = blob[4:4 + n].decode(errors="replace")
        try:
            found = KeyFile.of(self.server.data_root).find(key_type, blob)
        except InfraSimError as err:  # a broken file locks everyone out: say where
            log.error("cannot read SSH authorized keys: %s", err)
            found = None
        if found is None:
            self.server.audit.record("ssh.auth", self.id, f"{username}: key refused",
                                     username=username, remote=self.peer, ok=False,
                                     fingerprint=key.get_fingerprint("sha256"))
            return False
        self.key = found
        return True

    def auth_completed(self) -> None:
        key = self.key
        assert key is not None
        self.server.audit.record("ssh.auth", self.id, f"{self.username} logged in as "
                                 f"{key.role.name.lower()}", username=self.username,
                                 remote=self.peer, ok=True, fingerprint=key.fingerprint,
                                 role=key.role.name.lower(), comment=key.comment)

    def session_requested(self) -> SSHSession:
        return SSHSession(self)


@dataclass
class _Server:
    session: Session
    data_root: Path
    options: SSHOptions
    fingerprint: str
    audit: AuditLog
    limiter: RateLimiter
    sessions: dict[str, SSHSession] = field(default_factory=dict)
    conn_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    session_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def sessions_of(self, fingerprint: str) -> int:
        return sum(1 for s in self.sessions.values()
                   if s.conn.key is not None and s.conn.key.fingerprint == fingerprint)


@dataclass
class RunningSSH:
    """The SSH console being served; :meth:`close` ends every session (VMs keep running)."""

    host: str
    port: int
    fingerprint: str  # the host key's ``SHA256:…``, for clients' known_hosts
    _acceptor: asyncssh.SSHAcceptor
    _server: _Server

    @property
    def sessions(self) -> dict[str, SSHSession]:
        """Live console sessions by id (``c3.1``), with their ``app`` and ``conn.key``."""
        return self._server.sessions

    async def close(self) -> None:
        sessions = list(self._server.sessions.values())
        for s in sessions:
            s.end("the server is shutting down", status=1)
        tasks = [s.task for s in sessions if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._acceptor.close()
        await self._acceptor.wait_closed()
        self._server.audit.close()


async def start_ssh(session: Session, data_root: Path, options: SSHOptions) -> RunningSSH:
    """Listen for SSH console logins in the running loop (port 0 picks a free port)."""
    host_key = load_or_create_host_key(data_root)
    fingerprint = host_key.get_fingerprint("sha256")
    server = _Server(session, data_root, options, fingerprint, AuditLog.of(data_root, session),
                     RateLimiter(options.rate_per_minute, options.rate_burst))
    try:
        acceptor = await asyncssh.create_server(
            lambda: _Connection(server), options.host, options.port,
            server_host_keys=[host_key], line_editor=False, encoding=None,
            login_timeout=options.login_timeout or None,
            keepalive_interval=options.keepalive or None, keepalive_count_max=3,
            agent_forwarding=False, x11_forwarding=False, gss_host=None,
            allow_scp=False)
    except OSError as err:
        server.audit.close()
        raise InvalidSpec("ssh", f"cannot listen on {options.host}:{options.port}: "
                          f"{err.strerror or err}") from None
    port = acceptor.sockets[0].getsockname()[1] if acceptor.sockets else options.port
    return RunningSSH(options.host, int(port), fingerprint, acceptor, server)


__all__ = ["RunningSSH", "SSHConsoleApp", "SSHOptions", "SSHSession", "color_system_for",
           "load_or_create_host_key", "parse_ssh_listen", "start_ssh"]
