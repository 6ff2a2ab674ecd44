"""The operator's journey end to end, with a real guest and only keys: create a VM in the
form → it starts → its console pane shows the ready banner → `echo` round trip → snapshot →
change the guest → restore → the change is gone."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.widgets import Input, Tree

from infrasim_tui.app import InfraSimApp
from infrasim_tui.core.guest import READY_BANNER, GuestKit
from infrasim_tui.core.model import VMState, VolumeRequest
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.snapshot_tree import short_name
from infrasim_tui.screens.create_vm import CreateVMScreen
from infrasim_tui.screens.dashboard import DashboardScreen
from infrasim_tui.screens.vm_detail import VMScreen
from infrasim_tui.session import Session
from infrasim_tui.widgets.serial_console import SerialConsole
from infrasim_tui.widgets.snapshot_tree import SnapshotTree


async def until(pilot: object, cond: Callable[[], object], what: str,
                timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.1)  # type: ignore[attr-defined]
    raise AssertionError(f"timed out waiting for {what}")


def console_text(app: InfraSimApp) -> str:
    found = app.screen.query(SerialConsole)
    if not found:
        return ""  # mounted once the VM record has been read
    model = found.first().model
    if model is None:
        return ""
    lines = [model.line_text(i) for i in range(model.first_line, model.line_count)]
    return "\n".join(lines)


async def type_text(pilot: object, text: str) -> None:
    keys = {" ": "space", "$": "dollar_sign", "(": "left_parenthesis",
            ")": "right_parenthesis", "+": "plus", "-": "minus", ">": "greater_than_sign",
            "/": "slash", "|": "vertical_line", "&": "ampersand"}
    await pilot.press(*[keys.get(c, c) for c in text])  # type: ignore[attr-defined]


async def test_create_start_console_snapshot_restore(
        orch: Orchestrator, cloud_kit: GuestKit) -> None:
    await orch.create_volume(VolumeRequest(name="j-disk", size_bytes=64 << 20))
    session = Session(orch, mode="embedded", data_dir=str(orch.data.root))
    await session.start()
    app = InfraSimApp(session)
    try:
        async with app.run_test(size=(170, 50)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen), "dashboard")
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, CreateVMScreen), "the form")
            form = app.screen
            await until(pilot, lambda: form.query_one("#kernel", Input).value, "kernel prefill")
            form.query_one("#name", Input).focus()
            await type_text(pilot, "journey")
            form.query_one("#volumes", Input).focus()
            await type_text(pilot, "j-disk")
            form.query_one("#start").focus()
            await pilot.press("space")  # start after create
            await until(pilot, lambda: form.valid, "the form to validate")  # type: ignore
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, VMScreen), "the VM screen")
            vm = await orch.get_vm("journey")
            assert vm.spec.volume_ids and vm.spec.kernel == str(cloud_kit.kernel)

            await until(pilot, lambda: READY_BANNER in console_text(app), "the ready banner",
                        timeout=60)
            assert (await orch.get_vm("journey")).status.state == VMState.RUNNING
            await pilot.press("c")  # focus the console: keys now go to the guest
            await type_text(pilot, "echo ok-$((40+2))")
            await pilot.press("enter")
            await until(pilot, lambda: "ok-42" in console_text(app), "the echo")

            await pilot.press("ctrl+right_square_bracket")  # leave the console
            await pilot.pause(0.2)
            assert not app.screen.query_one(SerialConsole).has_focus
            await pilot.press("t")  # snapshot: the prompt opens with a default name
            await until(pilot, lambda: app.screen.query("#snapshot-name"), "the prompt")
            name_box = app.screen.query_one("#snapshot-name", Input)
            name_box.value = ""
            name_box.focus()
            await type_text(pilot, "before")
            await pilot.press("enter", "enter")  # name → description → take
            snaps: list[object] = []

            async def refresh() -> None:
                snaps[:] = await orch.list_snapshots("journey")

            deadline = time.monotonic() + 60
            while not snaps and time.monotonic() < deadline:
                await refresh()
                await pilot.pause(0.3)
            assert [short_name(s) for s in snaps] == ["before"]  # type: ignore[arg-type]
            tree = app.screen.query_one(SnapshotTree)
            await until(pilot, lambda: "before" in str(tree.root.children[0].label)
                        if tree.root.children else False, "the tree to show it")

            # change the guest's RAM after the snapshot…
            app.screen.query_one(SerialConsole).focus()
            await type_text(pilot, "echo changed > /tmp/marker && echo mark-$((2+3))")
            await pilot.press("enter")
            await until(pilot, lambda: "mark-5" in console_text(app), "the marker")
            await pilot.press("ctrl+right_square_bracket")

            # …then restore from the tree (confirmation, safety snapshot) and see it gone
            await pilot.press("2")
            tree = app.screen.query_one(SnapshotTree)
            tree.focus()
            node = next(n for n in tree.root.children if n.data is not None
                        and short_name(n.data) == "before")
            tree.move_cursor(node)
            await pilot.press("r")
            await pilot.pause(0.3)
            await pilot.press("y")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the safety snapshot first, then the load
                vm = await orch.get_vm("journey")
                if (len(await orch.list_snapshots("journey")) == 2
                        and vm.status.current_snapshot_id == snaps[0].meta.id):  # type: ignore
                    break
                await pilot.pause(0.3)
            assert vm.status.current_snapshot_id == snaps[0].meta.id  # type: ignore
            names = sorted(short_name(s) for s in await orch.list_snapshots("journey"))
            assert len(names) == 2 and "before" in names  # the safety snapshot was kept
            app.screen.query_one(SerialConsole).focus()
            await type_text(pilot, "cat /tmp/marker || echo gone-$((1+1))")
            await pilot.press("enter")
            await until(pilot, lambda: "gone-2" in console_text(app), "the restored RAM")
            assert isinstance(tree, Tree)
            await pilot.press("ctrl+right_square_bracket")
            await pilot.press("escape")  # back to the dashboard; quitting leaves VMs running
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen), "dashboard")
            await pilot.press("q")
        assert (await orch.get_vm("journey")).status.state == VMState.RUNNING
    finally:
        await session.close()
