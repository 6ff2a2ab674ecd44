"""Client-side daemon autostart, against a fake daemon: a small script that takes the data dir
lock like the real one, then listens on the API socket until killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import psutil
import pytest

from infrasim_tui.core.errors import Unavailable
from infrasim_tui.core.lock import DataDirLock
from infrasim_tui.core.paths import DataDir
from infrasim_tui.rpc.auth import BearerTokenInterceptor
from infrasim_tui.rpc.autostart import (
    DAEMON_LOG,
    DaemonEndpoint,
    ensure_daemon,
    open_channel,
    socket_answers,
)

FAKE_DAEMON = r'''
import asyncio, sys, time
from pathlib import Path

from infrasim_tui.core.errors import DataDirLocked
from infrasim_tui.core.lock import DataDirLock
from infrasim_tui.core.paths import DataDir

data = DataDir(Path(sys.argv[1]))
mode = sys.argv[2]
pre_lock = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
if mode == "die":
    print("fake daemon: daemon.grpc_listen: 'junk' is not HOST:PORT", file=sys.stderr)
    sys.exit(3)
time.sleep(pre_lock)
lock = DataDirLock(data)
try:
    lock.acquire()
except DataDirLocked as exc:
    print(f"fake daemon: {exc}", file=sys.stderr)
    sys.exit(7)
if mode == "mute":  # owns the data dir but never serves
    while True:
        time.sleep(3600)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def serve() -> None:
    if mode.startswith("slow:"):
        await asyncio.sleep(float(mode[5:]))
    data.socket.unlink(missing_ok=True)  # we own the lock: a socket here is a dead daemon's
    await asyncio.start_unix_server(handle, path=str(data.socket))
    print("fake daemon: serving", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


asyncio.run(serve())
'''


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Path]:
    """The fake daemon script; every process running it is killed afterwards."""
    script = tmp_path / "fake_daemon.py"
    script.write_text(FAKE_DAEMON)
    try:
        yield script
    finally:
        for proc in _fakes(script, include_zombies=True):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        for proc in _fakes(script, include_zombies=True):
            with contextlib.suppress(psutil.Error):
                proc.wait(5)


def _fakes(script: Path, *, include_zombies: bool = False) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if str(script) not in (proc.info["cmdline"] or []):
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE and not include_zombies:
            continue
        out.append(proc)
    return out


def _argv(script: Path, data: Path, mode: str = "serve", pre_lock: float = 0.0) -> list[str]:
    return [sys.executable, str(script), str(data), mode, str(pre_lock)]


def _autostarts(data: Path) -> int:
    """How many daemons autostart launched (one header line in daemon.log each)."""
    log = data / DAEMON_LOG
    return log.read_text().count(" autostart by pid ") if log.exists() else 0


async def test_no_daemon_autostart_starts_one(data_dir: Path, fake: Path) -> None:
    lines: list[str] = []
    started = time.monotonic()
    await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir),
                        log=lines.append)
    assert time.monotonic() - started < 10
    assert await socket_answers(data_dir / "infrasim.sock")
    owner = DataDirLock.owner_pid(DataDir(data_dir))
    assert owner is not None
    assert lines == [
        f"started an InfraSim daemon (pid {owner}) for {data_dir}; "
        f"logs: {data_dir / DAEMON_LOG}"
    ]
    assert [p.pid for p in _fakes(fake)] == [owner]
    log = data_dir / DAEMON_LOG
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)
    # The daemon is detached: its own session, stdin/stdout on /dev/null.
    proc = psutil.Process(owner)
    assert proc.ppid() == psutil.Process().pid and os.getsid(owner) == owner

    # Now it answers: no second daemon, nothing said.
    await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir),
                        log=lines.append)
    await ensure_daemon(data_dir, autostart=False, serve_argv=[], log=lines.append)
    assert len(lines) == 1 and _autostarts(data_dir) == 1
    assert [p.pid for p in _fakes(fake)] == [owner]


async def test_no_autostart_is_unavailable(data_dir: Path, fake: Path) -> None:
    lines: list[str] = []
    with pytest.raises(Unavailable) as info:
        await ensure_daemon(data_dir, autostart=False, serve_argv=_argv(fake, data_dir),
                            log=lines.append)
    sock = data_dir / "infrasim.sock"
    assert info.value.message == (
        f"no InfraSim daemon answers on {sock}; start one with `infrasim serve` or drop "
        "--no-autostart"
    )
    assert lines == [] and _fakes(fake) == [] and _autostarts(data_dir) == 0


async def test_stale_socket_is_no_daemon(data_dir: Path, fake: Path) -> None:
    sock = data_dir / "infrasim.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.listen()
    dead.close()  # the file stays, like after a SIGKILLed daemon
    assert sock.exists()
    assert not await socket_answers(sock)
    with pytest.raises(Unavailable, match="no InfraSim daemon answers"):
        await ensure_daemon(data_dir, autostart=False, serve_argv=[], log=print)
    lines: list[str] = []
    await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir),
                        log=lines.append)
    assert await socket_answers(sock)
    assert len(lines) == 1 and lines[0].startswith("started an InfraSim daemon")


async def test_plain_file_at_socket_path_is_no_daemon(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("")
    assert not await socket_answers(path)
    assert not await socket_answers(tmp_path / "missing.sock")


async def test_daemon_dying_at_start_is_unavailable_with_its_log(
    data_dir: Path, fake: Path
) -> None:
    log = data_dir / DAEMON_LOG
    log.write_text("an older run's line that must not be quoted\n")
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir, "die"),
                            log=lines.append)
    assert time.monotonic() - started < 10
    msg = info.value.message
    assert "exited (status 3) before answering" in msg
    assert f"last lines of {log}" in msg
    assert "fake daemon: daemon.grpc_listen: 'junk' is not HOST:PORT" in msg
    assert "older run" not in msg
    assert lines == []
    assert _fakes(fake, include_zombies=True) == []  # reaped


async def test_two_racing_autostarts_leave_one_daemon(data_dir: Path, fake: Path) -> None:
    # The fake daemons wait before taking the lock, so both callers surely start one; the
    # loser exits on the lock before the winner serves, so its caller must wait for the
    # winner rather than fail.
    lines: list[str] = []
    argv = _argv(fake, data_dir, "slow:0.5", pre_lock=0.3)
    await asyncio.gather(
        ensure_daemon(data_dir, autostart=True, serve_argv=argv, log=lines.append),
        ensure_daemon(data_dir, autostart=True, serve_argv=argv, log=lines.append),
    )
    assert _autostarts(data_dir) == 2
    owner = DataDirLock.owner_pid(DataDir(data_dir))
    assert owner is not None
    deadline = time.monotonic() + 5
    while len(_fakes(fake)) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [p.pid for p in _fakes(fake)] == [owner]
    assert f"started an InfraSim daemon (pid {owner})" in lines[0] + lines[-1]
    assert len(lines) <= 2
    assert "is owned by process" in (data_dir / DAEMON_LOG).read_text()  # the loser said why


async def test_two_racing_cli_processes_leave_one_daemon(data_dir: Path, fake: Path) -> None:
    """The same race across processes, as two CLIs would run it."""
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from infrasim_tui.rpc.autostart import ensure_daemon\n"
        "asyncio.run(ensure_daemon(Path(sys.argv[1]), autostart=True, "
        "serve_argv=sys.argv[2:], log=print))\n"
    )
    argv = [sys.executable, "-c", code, str(data_dir),
            *_argv(fake, data_dir, "slow:0.5", pre_lock=0.2)]
    clis = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]
    try:
        outs = [c.communicate(timeout=15) for c in clis]
    finally:
        for c in clis:
            c.kill()
            c.wait()
    assert [c.returncode for c in clis] == [0, 0], outs
    owner = DataDirLock.owner_pid(DataDir(data_dir))
    assert owner is not None and await socket_answers(data_dir / "infrasim.sock")
    deadline = time.monotonic() + 5
    while len(_fakes(fake)) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [p.pid for p in _fakes(fake)] == [owner]


async def test_waits_for_a_daemon_that_is_starting(data_dir: Path, fake: Path) -> None:
    """A daemon that holds the lock but is not serving yet is waited for, not duplicated."""
    first = subprocess.Popen(_argv(fake, data_dir, "slow:1.0"), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while DataDirLock.owner_pid(DataDir(data_dir)) != first.pid:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        lines: list[str] = []
        await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir),
                            log=lines.append)
        assert await socket_answers(data_dir / "infrasim.sock")
        assert _autostarts(data_dir) == 0 and lines == []
        assert [p.pid for p in _fakes(fake)] == [first.pid]
    finally:
        first.kill()
        first.wait()


async def test_owner_that_never_serves_is_unavailable(data_dir: Path, fake: Path) -> None:
    mute = subprocess.Popen(_argv(fake, data_dir, "mute"))
    try:
        deadline = time.monotonic() + 5
        while DataDirLock.owner_pid(DataDir(data_dir)) != mute.pid:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        with pytest.raises(Unavailable) as info:
            await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir),
                                log=print, timeout=1.0)
        assert f"is owned by process {mute.pid}, which does not answer" in info.value.message
        assert _autostarts(data_dir) == 0
    finally:
        mute.kill()
        mute.wait()


async def test_started_daemon_that_never_answers_times_out(data_dir: Path, fake: Path) -> None:
    with pytest.raises(Unavailable) as info:
        await ensure_daemon(data_dir, autostart=True, serve_argv=_argv(fake, data_dir, "mute"),
                            log=print, timeout=1.0)
    assert "does not answer" in info.value.message and "still running" in info.value.message
    assert len(_fakes(fake)) == 1  # left running: it may just be slow


async def test_unstartable_command_is_unavailable(data_dir: Path) -> None:
    with pytest.raises(Unavailable, match="cannot start the InfraSim daemon"):
        await ensure_daemon(data_dir, autostart=True,
                            serve_argv=[str(data_dir / "no-such-binary")], log=print)


async def test_socket_path_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    with pytest.raises(Unavailable, match="too long"):
        await ensure_daemon(deep, autostart=False, serve_argv=[], log=print)


def _raw(data: bytes) -> bytes:
    return data


async def _echo(ch: grpc.aio.Channel) -> bytes:
    call = ch.unary_unary("/test.Echo/Unary", request_serializer=_raw, response_deserializer=_raw)
    return await call(b"hi", timeout=5)


async def test_open_channel_per_transport(data_dir: Path) -> None:
    token = "tok-tok-tok-tok-tok-tok"

    async def echo(req: bytes, ctx: object) -> bytes:
        return req

    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(token)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(
            "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(echo)})]
    )
    server.add_insecure_port(f"unix:{data_dir / 'infrasim.sock'}")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        unix = DaemonEndpoint.for_data_dir(data_dir)
        assert unix.target == f"unix://{data_dir}/infrasim.sock" and unix.is_unix
        for endpoint in (unix, DaemonEndpoint(f"127.0.0.1:{port}", token=token)):
            async with open_channel(endpoint) as ch:
                assert await _echo(ch) == b"hi"
        async with open_channel(DaemonEndpoint(f"127.0.0.1:{port}")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _echo(ch)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)
