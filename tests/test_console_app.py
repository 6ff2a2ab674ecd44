"""The console app against a real core: dashboard, filter, sort, marks and bulk actions,
read-only, `:` commands, palette, themes. Pure helpers are tested first, without a terminal."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infrasim_tui.app import InfraSimApp, error_text
from infrasim_tui.core.access import GuardedCore, Role, allowed
from infrasim_tui.core.errors import InvalidSpec, NotFound, PermissionDenied
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import VM, ResourceMeta, VMSpec, VMState, VMStatus
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.screens.command_line import parse_command
from infrasim_tui.screens.dashboard import DashboardScreen
from infrasim_tui.session import Session
from infrasim_tui.widgets.fleet_header import header_text
from infrasim_tui.widgets.vm_table import (
    Live,
    VMTable,
    compact_size,
    format_uptime,
    parse_filter,
    row_cells,
    sparkline,
)

from .conftest import guest_spec

# -- pure helpers ----------------------------------------------------------------------------


def vm(name: str, state: VMState = VMState.STOPPED, **labels: str) -> VM:
    return VM(meta=ResourceMeta(name=name, labels=labels), spec=VMSpec(),
              status=VMStatus(state=state))


def test_filter_substring_regex_inverse_and_label() -> None:
    fleet = [vm("web-1", tier="web"), vm("web-2", VMState.RUNNING, tier="web"),
             vm("db-1", tier="db"), vm("edge")]
    names = lambda f: [v.meta.name for v in fleet if parse_filter(f)(v)]  # noqa: E731
    assert names("") == ["web-1", "web-2", "db-1", "edge"]
    assert names("web") == ["web-1", "web-2"]
    assert names("^(db|edge)") == ["db-1", "edge"]
    assert names("!web") == ["db-1", "edge"]
    assert names("tier=db") == ["db-1"]
    assert names("tier=") == ["web-1", "web-2", "db-1"]
    assert names("!tier=web") == ["db-1", "edge"]
    assert names("running") == ["web-2"]
    assert names("web-[") == []  # an invalid regex is a plain substring, not an error


def test_sparkline_and_sizes() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 50, 100]) == "▁▅█"
    assert len(sparkline(list(range(40)), width=12)) == 12
    assert compact_size(128 << 20) == "128M"
    assert compact_size(1536 << 20) == "1.5G"
    assert format_uptime(59) == "59s"
    assert format_uptime(3723) == "1h02m"
    assert format_uptime(2 * 86400 + 7200) == "2d02h"


def test_row_cells_show_live_values_only_for_live_vms() -> None:
    running = vm("a", VMState.RUNNING)
    running.status.started_at = 1000.0
    running.status.accelerator = "tcg"
    cells = row_cells(running, Live(12.5, 200 << 20, (0.0, 100.0)), 1090.0, marked=True)
    assert cells[0] == "✓" and cells[2] == "● running" and cells[4] == "tcg"
    assert cells[7].strip() == "12.5" and cells[8] == "200M" and cells[9] == "1m30s"
    assert cells[10] == "▁█"
    stopped = row_cells(vm("b"), Live(12.5, 1, (1.0,)), 1090.0, marked=False)
    assert stopped[7:] == ("-", "-", "-", "")


def test_commands_parse_with_aliases_and_refuse_unknown() -> None:
    assert parse_command(":vm web-1") == ("vm", "web-1")
    assert parse_command("q") == ("quit", "")
    assert parse_command("vols") == ("volumes", "")
    with pytest.raises(ValueError, match="unknown command"):
        parse_command("frobnicate")
    with pytest.raises(ValueError, match="needs an argument"):
        parse_command("vm")


def test_header_counts_errors_as_crashed() -> None:
    text = header_text("VMs", {"running": 2, "crashed": 1, "error": 1}, "embedded", 1.5,
                       "viewer").plain
    assert "● 2 running" in text and "✗ 2 crashed" in text and "viewer" in text
    assert "1.5 ev/s" in text


def test_error_text_names_the_field() -> None:
    assert error_text(InvalidSpec("spec.memory_mb", "must be at least 16")) == (
        "Invalid spec.memory_mb", "spec.memory_mb: must be at least 16")
    assert error_text(NotFound("VM", "x"))[0] == "NotFound"


async def test_guard_refuses_by_role() -> None:
    class Core:
        async def stop_vm(self, ref: str) -> str:
            return f"stopped {ref}"

        async def list_vms(self) -> list[str]:
            return ["a"]

    viewer = GuardedCore(Core(), Role.VIEWER)
    assert await viewer.list_vms() == ["a"]
    with pytest.raises(PermissionDenied, match="operator role"):
        await viewer.stop_vm("a")
    assert await GuardedCore(Core(), Role.OPERATOR).stop_vm("a") == "stopped a"
    assert allowed(Role.OPERATOR, "start_vm") and not allowed(Role.OPERATOR, "delete_vm")
    assert allowed(Role.ADMIN, "delete_vm") and not allowed(Role.VIEWER, "create_vm")


# -- the app against a real core ----------------------------------------------------------


@pytest.fixture
async def session(orch: Orchestrator) -> AsyncIterator[Session]:
    s = Session(orch, mode="embedded", data_dir=str(orch.data.root))
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def settle(pilot: object, app: InfraSimApp, cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        await pilot.pause(0.1)  # type: ignore[attr-defined]
    raise AssertionError("condition not reached in time")


def table_names(app: InfraSimApp) -> list[str]:
    screen = app.screen
    assert isinstance(screen, DashboardScreen)
    return [screen.vms[i].meta.name for i in screen.query_one(VMTable).shown_ids]


async def test_dashboard_filter_sort_marks_and_bulk_start_stop(
        orch: Orchestrator, session: Session, cloud_kit: GuestKit, data_dir: Path) -> None:
    for name, mem, tier in [("web-b", 128, "web"), ("web-a", 192, "web"), ("db", 256, "db")]:
        await orch.create_vm(name, guest_spec(cloud_kit, memory_mb=mem), {"tier": tier})
    app = InfraSimApp(session, prefs_path=data_dir / "console.json")
    async with app.run_test(size=(140, 30)) as pilot:
        await settle(pilot, app, lambda: len(table_names(app)) == 3)
        assert table_names(app) == ["db", "web-a", "web-b"]
        await pilot.press("o", "o", "o", "o", "o")  # name → state → machine → accel → cpus → memory
        await pilot.pause(0.2)
        assert app.screen.sort_key == "memory"  # type: ignore[attr-defined]
        assert table_names(app) == ["web-b", "web-a", "db"]
        await pilot.press("O")
        await pilot.pause(0.2)
        assert table_names(app) == ["db", "web-a", "web-b"]
        await pilot.press("slash", *"tier=web", "enter")
        await pilot.pause(0.2)
        assert table_names(app) == ["web-a", "web-b"]
        # mark both web VMs and start them in one go (real QEMU processes)
        await pilot.press("space", "space", "s")
        await settle(pilot, app, lambda: all(
            v.status.state == VMState.RUNNING for v in app.screen.vms.values()  # type: ignore
            if v.meta.name.startswith("web")), timeout=30)
        header = str(app.screen.query_one("#header").render())
        assert "2 running" in header
        running = {v.meta.name for v in await orch.list_vms()
                   if v.status.state == VMState.RUNNING}
        assert running == {"web-a", "web-b"}
        # bulk force-stop asks first; "n" keeps them running
        await pilot.press("space", "up", "space")
        await pilot.pause(0.1)
        await pilot.press("K")
        await pilot.pause(0.3)
        await pilot.press("n")
        await pilot.pause(0.5)
        assert all(v.status.state == VMState.RUNNING for v in await orch.list_vms()
                   if v.meta.name != "db")
        await pilot.press("K")
        await pilot.pause(0.3)
        await pilot.press("y")
        await settle(pilot, app, lambda: "0 running" in str(
            app.screen.query_one("#header").render()), timeout=30)
        assert all(v.status.state == VMState.STOPPED for v in await orch.list_vms())
        await pilot.press("escape")  # clears the filter
        await pilot.pause(0.2)
        assert len(table_names(app)) == 3


async def test_read_only_hides_actions_and_the_core_refuses(
        orch: Orchestrator, session: Session, cloud_kit: GuestKit) -> None:
    await orch.create_vm("ro", guest_spec(cloud_kit))
    app = InfraSimApp(session, role=Role.VIEWER)
    async with app.run_test(size=(140, 30)) as pilot:
        await settle(pilot, app, lambda: table_names(app) == ["ro"])
        shown = {b.binding.description for b in app.screen.active_bindings.values()
                 if b.enabled}
        assert "Console" in shown and "Filter" in shown
        assert not shown & {"Start", "Stop", "Force stop", "Delete", "New"}
        assert app.screen.check_action("lifecycle", ("start",)) is False
        assert app.screen.check_action("lifecycle", ("delete",)) is False
        await pilot.press("s")  # the key does nothing for a viewer
        await pilot.pause(0.5)
        assert (await orch.get_vm("ro")).status.state == VMState.STOPPED
        with pytest.raises(PermissionDenied):
            await app.core.start_vm("ro")  # a forced call is refused by the guard


async def test_command_line_palette_and_theme_remembered(
        orch: Orchestrator, session: Session, cloud_kit: GuestKit, data_dir: Path) -> None:
    await orch.create_vm("cmd-vm", guest_spec(cloud_kit))
    prefs = data_dir / "console.json"
    app = InfraSimApp(session, prefs_path=prefs)
    async with app.run_test(size=(140, 36)) as pilot:
        await settle(pilot, app, lambda: table_names(app) == ["cmd-vm"])
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for wanted in ("Open cmd-vm", "Start cmd-vm", "Theme: light", "Volumes", "Events",
                       "Create VM"):
            assert wanted in titles
        await pilot.press("colon", *"theme light", "enter")
        await pilot.pause(0.3)
        assert app.theme_name == "light" and app.theme == "textual-light"
        assert json.loads(prefs.read_text())["theme"] == "light"
        await pilot.press("colon", *"nonsense", "enter")
        await pilot.pause(0.2)
        assert any("unknown command" in n.message for n in app._notifications)
    again = InfraSimApp(session, prefs_path=prefs)
    assert again.theme_name == "light"
