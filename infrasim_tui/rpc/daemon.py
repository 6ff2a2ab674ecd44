"""``infrasim serve``: the core, headless, behind the ``infrasim.v1`` API.

One daemon per data dir (the core's lock says who owns it). It serves on the unix socket
``<data_dir>/infrasim.sock`` (0600: the file mode is the authentication), and on TCP only when
asked, then with a bearer token and optionally TLS. SIGTERM stops serving and lets go of the
VMs, which keep running; the next daemon reattaches to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..core.config import Config
from ..core.orchestrator import Orchestrator
from ..core.paths import DataDir
from .auth import BearerTokenInterceptor, load_or_create_token, parse_listen, server_credentials
from .gen.infrasim.v1 import infrasim_pb2_grpc as pbg
from .server import InfraSimServicer


@dataclass(frozen=True)
class ServeOptions:
    listen: str = ""  # HOST:PORT for TCP; "" = unix socket only
    tls_cert: str = ""
    tls_key: str = ""
    ssh: str = ""  # "[ADDR:]PORT" serves the console over SSH (address defaults to loopback)
    ssh_record: bool = False  # asciicast v2 per SSH session in <data>/ssh/recordings/
    ssh_idle_timeout: float = 1800.0  # s without input; 0 = never
    ssh_max_session: float = 12 * 3600.0  # s; 0 = unlimited
    ssh_rate_per_minute: float = 10.0  # new SSH connections per client address
    ssh_rate_burst: int = 5
    ssh_max_sessions_per_key: int = 8


def say(line: str) -> None:
    print(f"infrasim serve: {line}", file=sys.stderr, flush=True)


@dataclass
class ApiServer:
    """The API being served for one core: stop it before closing the core."""

    server: grpc.aio.Server
    socket: Path
    tcp: str = ""  # "host:port" when also on TCP

    @property
    def address(self) -> str:
        return f"unix:{self.socket}" + (f" and {self.tcp}" if self.tcp else "")

    async def stop(self) -> None:
        await self.server.stop(grace=2.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


async def start_api(core: Orchestrator, config: Config, opts: ServeOptions,
                    say: Callable[[str], None] = say) -> ApiServer:
    """Serve ``infrasim.v1`` for ``core`` on the data dir's socket (and TCP when asked).

    Used by ``infrasim serve`` and by the console when it embeds the core, so CLIs and
    Terraform keep working while the console owns the data dir.
    """
    data = DataDir(config.daemon.data_dir)
    sock = data.socket
    listen = opts.listen or config.daemon.grpc_listen
    interceptors = []
    if listen:
        token = load_or_create_token(data.root)
        interceptors.append(BearerTokenInterceptor(token))
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ])
    pbg.add_InfraSimServicer_to_server(InfraSimServicer(core), server)
    # We own the lock, so a socket file left here is a dead daemon's: replace it.
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
    try:
        server.add_insecure_port(f"unix:{sock}")
    finally:
        os.umask(old_umask)
    tcp = ""
    if listen:
        host, port = parse_listen(listen)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if opts.tls_cert:
            creds = server_credentials(Path(opts.tls_cert), Path(opts.tls_key))
            bound = server.add_secure_port(target, creds)
        else:
            bound = server.add_insecure_port(target)
        tcp = f"{host}:{bound}"
        say(f"TCP {tcp} ({'TLS' if opts.tls_cert else 'plain text'}), bearer "
            f"token in {data.root / 'api-token'}")
    await server.start()
    os.chmod(sock, 0o600)
    return ApiServer(server, sock, tcp)


async def serve(config: Config, opts: ServeOptions,
                ready: asyncio.Event | None = None) -> int:
    data = DataDir(config.daemon.data_dir)
    core = await Orchestrator.open(config)  # DataDirLocked names the owner's pid
    api: ApiServer | None = None
    ssh: Any = None
    session: Any = None
    try:
        for line in core.report.lines():
            say(line)
        api = await start_api(core, config, opts)
        say(f"serving {data.root} on unix:{api.socket} (pid {os.getpid()})")
        if opts.ssh:
            ssh, session = await _start_ssh(core, data.root, api, opts)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
        say("stopping; VMs keep running")
        return 0
    finally:
        if ssh is not None:
            await ssh.close()
        if session is not None:
            await session.close()
        if api is not None:
            await api.stop()
        await core.close()


async def _start_ssh(core: Orchestrator, root: Path, api: ApiServer,
                     opts: ServeOptions) -> tuple[Any, Any]:
    """The console over SSH, on a Session over this embedded core (imported lazily: a daemon
    without ``--ssh`` never loads asyncssh or Textual)."""
    from ..session import Session
    from ..ssh.server import SSHOptions, parse_ssh_listen, start_ssh

    host, port = parse_ssh_listen(opts.ssh)
    session = Session(core, mode="embedded", data_dir=str(root), address=api.address)
    await session.start()
    try:
        ssh = await start_ssh(session, root, SSHOptions(
            host=host, port=port, record=opts.ssh_record, idle_timeout=opts.ssh_idle_timeout,
            max_session=opts.ssh_max_session, rate_per_minute=opts.ssh_rate_per_minute,
            rate_burst=opts.ssh_rate_burst, max_sessions_per_key=opts.ssh_max_sessions_per_key))
    except BaseException:
        await session.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    say(f"SSH on {shown}:{ssh.port}, host key {ssh.fingerprint}"
        + (", recording sessions" if opts.ssh_record else ""))
    return ssh, session
