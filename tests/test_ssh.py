"""The console over SSH, end to end: a real embedded core, the real server on port 0 in this
loop, and asyncssh clients with a PTY whose output is rendered by pyte and read as text."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncssh
import pyte
import pytest

from infrasim_tui.core.access import Role
from infrasim_tui.core.errors import PermissionDenied
from infrasim_tui.core.guest import READY_BANNER, GuestKit
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.session import Session
from infrasim_tui.ssh.audit import read_audit
from infrasim_tui.ssh.keys import KeyFile, parse_public_key
from infrasim_tui.ssh.server import (
    RateLimiter,
    RunningSSH,
    SSHOptions,
    color_system_for,
    parse_ssh_listen,
    start_ssh,
)

from .conftest import guest_spec

KEYS: dict[Role, asyncssh.SSHKey] = {}


def key_for(role: Role) -> asyncssh.SSHKey:
    if role not in KEYS:  # generating is cheap, but keep one per role per run
        KEYS[role] = asyncssh.generate_private_key("ssh-ed25519")
    return KEYS[role]


class Screen(asyncssh.SSHClientSession[bytes]):
    """The client's terminal: pyte renders what the server sends."""

    def __init__(self, width: int = 120, height: int = 40) -> None:
        self.screen = pyte.Screen(width, height)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.closed = asyncio.Event()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.raw += data
        self.stream.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def text(self) -> str:
        return "\n".join(self.screen.display)


@dataclass
class Client:
    conn: asyncssh.SSHClientConnection
    chan: asyncssh.SSHClientChannel[bytes]
    term: Screen

    async def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.term.text()):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.term.text()}")

    async def see(self, text: str, timeout: float = 10) -> None:
        await self.wait(lambda s: text in s, repr(text), timeout)

    def type(self, keys: str) -> None:
        self.chan.write(keys.encode())

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()


async def connect(port: int, key: asyncssh.SSHKey | None,
                  **kw: Any) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", port, username="alice", known_hosts=None,
                                  client_keys=[key] if key else [], agent_path=None,
                                  preferred_auth="publickey,password", **kw)


async def login(ssh: RunningSSH, role: Role, size: tuple[int, int] = (120, 40),
                **kw: Any) -> Client:
    conn = await connect(ssh.port, key_for(role))
    chan, term = await conn.create_session(lambda: Screen(*size), term_type="xterm-256color",
                                           term_size=size, encoding=None, **kw)
    assert isinstance(term, Screen)
    return Client(conn, chan, term)


@pytest.fixture
async def env(orch: Orchestrator, data_dir: Path) -> AsyncIterator[tuple[Session, Path]]:
    keys = KeyFile.of(data_dir)
    for role in Role:
        pub = key_for(role).export_public_key().decode()
        keys.add(parse_public_key(pub, role))
    session = Session(orch, mode="embedded", data_dir=str(data_dir))
    await session.start()
    try:
        yield session, data_dir
    finally:
        await session.close()


OPTS = SSHOptions(port=0, idle_timeout=0, rate_burst=100, rate_per_minute=6000)


@pytest.fixture
async def ssh(env: tuple[Session, Path]) -> AsyncIterator[RunningSSH]:
    running = await start_ssh(env[0], env[1], OPTS)
    try:
        yield running
    finally:
        await running.close()


async def wait_for(pred: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- pure helpers -----------------------------------------------------------------------------


def test_listen_and_colours() -> None:
    assert parse_ssh_listen("2222") == ("127.0.0.1", 2222)
    assert parse_ssh_listen("0.0.0.0:22") == ("0.0.0.0", 22)
    assert parse_ssh_listen("[::1]:2222") == ("::1", 2222)
    with pytest.raises(Exception, match="ADDR"):
        parse_ssh_listen("nope")
    assert color_system_for("xterm-256color", {}).name == "EIGHT_BIT"
    assert color_system_for("xterm", {"COLORTERM": "truecolor"}).name == "TRUECOLOR"
    assert color_system_for("vt100", {}).name == "STANDARD"


def test_rate_limiter_bucket() -> None:
    rl = RateLimiter(per_minute=60, burst=2)
    assert rl.allow("a", 0) and rl.allow("a", 0) and not rl.allow("a", 0)
    assert rl.allow("b", 0)  # per address
    assert rl.allow("a", 1.01)  # one per second refills


# -- end to end -------------------------------------------------------------------------------


async def test_operator_session_journey(ssh: RunningSSH, env: tuple[Session, Path],
                                        orch: Orchestrator, cloud_kit: GuestKit) -> None:
    await orch.create_vm("alpha-vm", guest_spec(cloud_kit))
    await orch.create_vm("beta-vm", guest_spec(cloud_kit))
    c = await login(ssh, Role.OPERATOR)
    await c.see("alpha-vm")
    await c.see("beta-vm")
    await c.see(ssh.fingerprint[:19])  # the host key is in the header
    assert "\x1b[38;5;" in c.term.raw.decode(errors="replace")  # 256 colours from TERM
    c.type("/")
    await c.see("filter: text")
    c.type("beta")
    await c.wait(lambda s: "beta-vm" in s and "alpha-vm" not in s, "the filter")
    c.type("\r")  # the input takes enter, then enter opens the VM
    await asyncio.sleep(0.2)
    c.type("\r")
    await c.see("Snapshots")
    c.chan.change_terminal_size(100, 30)
    c.term.screen.resize(30, 100)
    await c.wait(lambda s: "beta-vm" in s and len(s.splitlines()) == 30, "the resize")
    c.type("\x1b")  # lone Escape: back to the fleet (after the parser's timeout)
    await c.see("VMs /beta")
    c.type("\x1b")  # and again: clears the filter
    await c.see("alpha-vm")
    c.type("q")
    await asyncio.wait_for(c.chan.wait_closed(), 10)
    assert c.chan.get_exit_status() == 0
    await c.close()
    await wait_for(lambda: not ssh.sessions, "the session to end")


async def test_live_serial_console_over_ssh(ssh: RunningSSH, orch: Orchestrator,
                                            cloud_kit: GuestKit) -> None:
    vm = await orch.create_vm("live-1", guest_spec(cloud_kit))
    await orch.start_vm(vm.meta.id)
    c = await login(ssh, Role.OPERATOR)
    await c.see("live-1")
    c.type("\r")
    await c.see(READY_BANNER, timeout=60)
    await c.close()


async def test_refusals(ssh: RunningSSH, env: tuple[Session, Path]) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(ssh.port, stranger)
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(ssh.port, None, password="hunter2")
    conn = await connect(ssh.port, key_for(Role.ADMIN))
    result = await conn.run("infrasim vm list")  # exec, no PTY
    assert result.exit_status == 1 and "needs a terminal" in str(result.stderr)
    result = await conn.run()  # shell without a PTY (ssh -T)
    assert result.exit_status == 1 and "ssh -t" in str(result.stderr)
    conn.close()
    records = read_audit(env[1] / "ssh" / "audit.log")
    assert any(r["type"] == "ssh.auth" and not r["ok"] for r in records)
    assert (env[1] / "ssh" / "audit.log").stat().st_mode & 0o777 == 0o600
    assert (env[1] / "ssh" / "host_key").stat().st_mode & 0o777 == 0o600


async def test_viewer_cannot_stop(ssh: RunningSSH, env: tuple[Session, Path],
                                  orch: Orchestrator, cloud_kit: GuestKit) -> None:
    vm = await orch.create_vm("ro-1", guest_spec(cloud_kit))
    await orch.start_vm(vm.meta.id)
    c = await login(ssh, Role.VIEWER)
    await c.see("ro-1")
    await c.see("viewer")
    c.type("x")
    await asyncio.sleep(0.5)
    assert str((await orch.get_vm("ro-1")).status.state) == "RUNNING"
    (sess,) = ssh.sessions.values()
    assert sess.app is not None and sess.conn.key is not None
    assert sess.conn.key.role == Role.VIEWER
    with pytest.raises(PermissionDenied, match="operator role"):
        await sess.app.core.stop_vm("ro-1")
    refused = [r for r in read_audit(env[1] / "ssh" / "audit.log")
               if r["type"] == "ssh.action" and not r["allowed"]]
    assert any(r["action"] == "stop_vm" and r["target"] == "ro-1" for r in refused), refused
    await wait_for(lambda: any(e.type == "ssh.action" for e in env[0].recent),
                   "the refusal as a core event")
    await c.close()


async def test_rate_limit(env: tuple[Session, Path]) -> None:
    ssh = await start_ssh(env[0], env[1], replace(OPTS, rate_burst=3, rate_per_minute=1))
    try:
        for _ in range(3):
            (await connect(ssh.port, key_for(Role.VIEWER))).close()
        with pytest.raises((asyncssh.Error, OSError)):
            await connect(ssh.port, key_for(Role.VIEWER))
    finally:
        await ssh.close()
    assert any(r["type"] == "ssh.refused" for r in read_audit(env[1] / "ssh" / "audit.log"))


async def test_idle_timeout_and_recording(env: tuple[Session, Path]) -> None:
    ssh = await start_ssh(env[0], env[1], replace(OPTS, idle_timeout=1.0, record=True))
    try:
        c = await login(ssh, Role.VIEWER)
        await c.see("InfraSim")
        await asyncio.wait_for(c.term.closed.wait(), 5)
        assert c.chan.get_exit_status() == 1
        assert b"idle timeout" in c.term.raw
    finally:
        await ssh.close()
    (cast,) = (env[1] / "ssh" / "recordings").iterdir()
    assert cast.stat().st_mode & 0o777 == 0o600
    assert (cast.parent.stat().st_mode & 0o777) == 0o700
    lines = cast.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (120, 40)
    assert header["env"]["TERM"] == "xterm-256color"
    events = [json.loads(x) for x in lines[1:]]
    assert events and all(e[1] in ("o", "r") for e in events)
    assert "InfraSim" in "".join(e[2] for e in events)


async def test_stalled_client_is_dropped_others_continue(env: tuple[Session, Path],
                                                         orch: Orchestrator,
                                                         cloud_kit: GuestKit) -> None:
    await orch.create_vm("st-1", guest_spec(cloud_kit))
    ssh = await start_ssh(env[0], env[1], replace(OPTS, write_cap=32 << 10))
    try:
        slow = await login(ssh, Role.VIEWER, window=8192, max_pktsize=4096)
        ok = await login(ssh, Role.VIEWER)
        await slow.see("st-1")
        await ok.see("st-1")
        slow.chan.pause_reading()
        for i in range(40):  # every resize is a full redraw the slow client never reads
            slow.chan.change_terminal_size(100 + i % 20, 30 + i % 10)
            await asyncio.sleep(0.02)
            if len(ssh.sessions) == 1:
                break
        await wait_for(lambda: len(ssh.sessions) == 1, "the stalled session to be dropped")
        ok.type("/")
        await ok.see("filter: text")
        ok.type("zzz")
        await ok.wait(lambda s: "st-1" not in s, "the other session to keep working")
        reasons = [r.get("reason", "") for r in read_audit(env[1] / "ssh" / "audit.log")
                   if r["type"] == "ssh.session_end"]
        assert any("stopped reading" in r for r in reasons)
        await ok.close()
    finally:
        await ssh.close()


async def test_max_session_length_and_sessions_per_key(env: tuple[Session, Path]) -> None:
    ssh = await start_ssh(env[0], env[1], replace(OPTS, max_session=1.5,
                                                  max_sessions_per_key=1))
    try:
        first = await login(ssh, Role.OPERATOR)
        await first.see("InfraSim")
        second = await login(ssh, Role.OPERATOR)  # the same key again: over its cap
        await asyncio.wait_for(second.term.closed.wait(), 5)
        assert b"already has 1" in second.term.raw and second.chan.get_exit_status() != 0
        other = await login(ssh, Role.VIEWER)  # another key is not affected
        await other.see("InfraSim")
        await asyncio.wait_for(first.term.closed.wait(), 5)  # 1.5 s after it started
        assert b"limit" in first.term.raw and first.chan.get_exit_status() == 1
        await other.close()
    finally:
        await ssh.close()


async def test_login_timeout(env: tuple[Session, Path]) -> None:
    ssh = await start_ssh(env[0], env[1], replace(OPTS, login_timeout=1.0))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ssh.port)
        banner = await asyncio.wait_for(reader.readline(), 5)
        assert banner.startswith(b"SSH-2.0-")
        # never authenticate: the server hangs up after the login timeout
        t0 = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 10)
        assert time.monotonic() - t0 < 5 and reader.at_eof(), rest
        writer.close()
    finally:
        await ssh.close()
