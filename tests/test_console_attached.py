"""The console attached to a running daemon (another process owns the data dir): the same
screens over gRPC — fleet, the VM's live console through StreamConsole, lifecycle keys in the
VM view (pause, resume, restart, force stop), errors as notifications, back and forward."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from infrasim_tui.app import InfraSimApp
from infrasim_tui.core.guest import READY_BANNER, GuestKit
from infrasim_tui.rpc.client import RemoteCore
from infrasim_tui.screens.dashboard import DashboardScreen
from infrasim_tui.screens.vm_detail import VMScreen
from infrasim_tui.tui import open_session
from infrasim_tui.widgets.serial_console import SerialConsole

from .conftest import infrasim


async def until(pilot: object, cond: Callable[[], object], what: str,
                timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.1)  # type: ignore[attr-defined]
    raise AssertionError(f"timed out waiting for {what}")


def args_for(data_dir: Path) -> argparse.Namespace:
    return argparse.Namespace(data_dir=str(data_dir), config=None, address="", token="",
                              tls_ca="", no_autostart=True, attach=False, read_only=False,
                              theme="", vm="")


def console_text(app: InfraSimApp) -> str:
    found = app.screen.query(SerialConsole)
    model = found.first().model if found else None
    if model is None:
        return ""
    return "\n".join(model.line_text(i) for i in range(model.first_line, model.line_count))


async def test_attached_console_drives_a_daemon_owned_vm(data_dir: Path,
                                                         cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "vm", "create", "remote-1", "--kernel", str(cloud_kit.kernel),
                 "--initrd", str(cloud_kit.initrd), "--cmdline", "cryptomgr.notests", "--start")
    assert r.returncode == 0, r.stderr  # autostarted the daemon, which owns the data dir
    session, close = await open_session(args_for(data_dir))
    assert session.mode == "attached" and isinstance(session.core, RemoteCore)
    app = InfraSimApp(session)
    core = session.core
    try:
        async with app.run_test(size=(170, 45)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen)
                        and "remote-1" in [v.meta.name for v in app.screen.vms.values()],
                        "the fleet")
            await until(pilot, lambda: "attached" in str(app.screen.query_one("#header")
                                                         .render()), "the header")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, VMScreen), "the VM view")
            await until(pilot, lambda: READY_BANNER in console_text(app), "the banner", 60)

            async def state() -> str:
                return str((await core.get_vm("remote-1")).status.state)

            async def wait_state(want: str) -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and await state() != want:
                    await pilot.pause(0.2)
                assert await state() == want

            await pilot.press("p")
            await wait_state("PAUSED")
            await until(pilot, lambda: "paused" in str(app.screen.query_one("#vm-stats")
                                                       .render()), "paused in the stats")
            await pilot.press("u")
            await wait_state("RUNNING")
            pid = (await core.get_vm("remote-1")).status.pid
            await pilot.press("R")
            await pilot.pause(0.3)
            await pilot.press("y")  # restart asks first
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                vm = await core.get_vm("remote-1")
                if str(vm.status.state) == "RUNNING" and vm.status.pid != pid:
                    break
                await pilot.pause(0.3)
            assert vm.status.pid != pid, "restart gives a new QEMU"
            # the console pane follows the new QEMU's serial port on its own
            await until(pilot, lambda: console_text(app).count(READY_BANNER) >= 1
                        and app.screen.query_one(SerialConsole).model is not None
                        and app.screen.query_one(SerialConsole).model.state == "live",  # type: ignore
                        "the console to reattach", 60)
            await pilot.press("K")
            await pilot.pause(0.3)
            await pilot.press("y")
            await wait_state("STOPPED")

            # an error from the core is a notification that says what is wrong
            await pilot.press("colon", *"start nosuch", "enter")
            await until(pilot, lambda: any("'nosuch' not found" in n.message
                                           for n in app._notifications), "the error")
            # back to the fleet, then forward to the VM again
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen), "back")
            await pilot.press("alt+right")
            await until(pilot, lambda: isinstance(app.screen, VMScreen), "forward")
            await pilot.press("escape", "q")
    finally:
        await close()
    r = infrasim(data_dir, "vm", "get", "remote-1", "-o", "json")
    assert r.returncode == 0  # the daemon still serves after the console left
