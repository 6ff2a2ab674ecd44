"""``infrasim`` / ``infrasim ui``: open the operator console on a data dir.

When no process owns the data dir, the console embeds the core and serves the API on the
data dir's socket while it runs (so the CLI and Terraform keep working); otherwise it attaches
to the owner (the daemon) over gRPC with the same screens. Quitting leaves every VM running.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .core.access import Role
from .core.errors import DataDirLocked, InfraSimError
from .core.orchestrator import Orchestrator
from .core.paths import DataDir
from .session import Session

Prepare = Callable[[Any], Awaitable[str]]


async def open_session(args: argparse.Namespace) -> tuple[Session, Callable[[], Awaitable[None]]]:
    """Embed the core (serving the API) or attach to its owner; returns (session, close)."""
    from .cli import _config, connect
    from .rpc.daemon import ServeOptions, start_api

    config = _config(args)
    data = DataDir(config.daemon.data_dir)
    orch: Orchestrator | None = None
    if not (args.address or getattr(args, "attach", False)):
        try:
            orch = await Orchestrator.open(config)
        except DataDirLocked:
            orch = None
    if orch is not None:
        core = orch
        try:
            api = await start_api(orch, config, ServeOptions(), say=logging.getLogger(
                "infrasim.api").info)
        except BaseException:
            await orch.close()
            raise
        session = Session(orch, mode="embedded", data_dir=str(data.root), address=api.address)

        async def close() -> None:
            await session.close()
            await api.stop()
            wired = any(True for _ in core.switch.ports())
            await core.close()  # lets go of the VMs: they keep running
            if wired and not getattr(args, "no_autostart", False):
                await hand_over(data, getattr(args, "config", None))
    else:
        remote = await connect(args)
        session = Session(remote, mode="attached", data_dir=str(data.root),
                          address=args.address or f"unix:{data.socket}")

        async def close() -> None:
            await session.close()
            await remote.close()
    await session.start()
    return session, close


async def hand_over(data: DataDir, config: str | None) -> None:
    """VMs on SEGMENT networks talk through the owner's switch: when the console that owned it
    quits, a background daemon takes the data dir (and rebinds the switch) so they keep
    talking."""
    from .rpc.autostart import ensure_daemon
    from .rpc.connect import serve_argv

    def say(line: str) -> None:
        print(f"infrasim: {line} (it keeps the VMs' segment networks up)", file=sys.stderr)

    try:
        await ensure_daemon(data.root, autostart=True, log=say,
                            serve_argv=serve_argv(data.root, Path(config) if config else None))
    except InfraSimError as exc:
        print(f"infrasim: segment networks are down until `infrasim serve` runs: {exc.message}",
              file=sys.stderr)


async def run_console(args: argparse.Namespace, prepare: Prepare | None = None) -> int:
    from .app import InfraSimApp

    if not sys.stdout.isatty() and not getattr(args, "headless", False):
        print("infrasim: the console needs a terminal; use the `infrasim vm …` commands "
              "or `infrasim serve` for headless use", file=sys.stderr)
        return 2
    session, close = await open_session(args)
    data = DataDir(Path(session.data_dir)) if session.data_dir else None
    if data is not None:
        logging.basicConfig(filename=str(data.root / "console.log"), level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        start_vm = await prepare(session.core) if prepare is not None else args.vm or ""
        app = InfraSimApp(session, role=Role.VIEWER if args.read_only else Role.ADMIN,
                          theme_name=args.theme or "",
                          prefs_path=data.root / "console.json" if data else None,
                          start_vm=start_vm)
        await app.run_async()
        return int(app.return_code or 0)
    finally:
        await close()
