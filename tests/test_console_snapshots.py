"""SVG snapshots of every console screen over a fixed, in-memory fleet (tests/console_fakes.py).

Baselines live in ``snapshots/test_console_snapshots/`` at the repository root. After a
deliberate UI change, regenerate them and look at every changed image before committing:

    pytest tests/test_console_snapshots.py --snapshot-update -p no:cacheprovider

The frames are deterministic: fixed data and clock (``FIXED_NOW``), ``TZ=UTC`` for event
times, no user themes, no cached guest kit, and input cursors that do not blink. Each test
drives the app in ``run_before`` and waits for the screen's data to be on it (workers and
timers finish at their own pace), so a snapshot never catches a half-loaded screen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_textual_snapshot import SVGImageExtension  # type: ignore[import-untyped]
from textual.command import CommandList, CommandPalette
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, RichLog

from infrasim_tui.app import InfraSimApp
from infrasim_tui.core.access import Role
from infrasim_tui.core.guest import READY_BANNER
from infrasim_tui.screens import create_vm as create_vm_module
from infrasim_tui.screens.command_line import CommandLine
from infrasim_tui.screens.confirm import ConfirmScreen
from infrasim_tui.screens.create_vm import CreateVMScreen
from infrasim_tui.screens.dashboard import DashboardScreen
from infrasim_tui.screens.events import EventsScreen
from infrasim_tui.screens.help import HelpScreen
from infrasim_tui.screens.networks import NetworksScreen
from infrasim_tui.screens.qos_form import QosForm
from infrasim_tui.screens.vm_detail import VMScreen
from infrasim_tui.screens.volumes import VolumesScreen
from infrasim_tui.widgets.link_graph import LinkGraph
from infrasim_tui.widgets.link_table import LinkTable
from infrasim_tui.widgets.serial_console import SerialConsole
from infrasim_tui.widgets.snapshot_tree import SnapshotTree
from infrasim_tui.widgets.vm_table import VMTable

from .console_fakes import fixed_clock, fleet_events, static_session

REPO = Path(__file__).resolve().parent.parent
SNAPSHOTS = REPO / "snapshots"
SIZE = (130, 38)
TIMEOUT = 10.0


# -- baselines in <repo>/snapshots/ ----------------------------------------------------------
# pytest-textual-snapshot stores next to the test (tests/__snapshots__/); conftest.py is not
# ours to change, so this module redirects its own snapshots (and only its own).

if not getattr(SVGImageExtension, "_infrasim_dirname", False):
    _default_dirname = SVGImageExtension.dirname.__func__

    def _dirname(cls: type[SVGImageExtension], *, test_location: Any) -> str:
        if Path(test_location.filepath).name == Path(__file__).name:
            return str(SNAPSHOTS / test_location.basename)
        return str(_default_dirname(cls, test_location=test_location))

    SVGImageExtension.dirname = classmethod(_dirname)
    SVGImageExtension._infrasim_dirname = True


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Make the frames independent of the machine, the wall clock and timing."""
    monkeypatch.setenv("TZ", "UTC")  # event lines print local time
    time.tzset()
    monkeypatch.delenv("INFRASIM_THEMES", raising=False)  # only the project's themes
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # The create form prefills kernel/initrd from a guest kit cached on this machine.
    monkeypatch.setattr(create_vm_module, "find_cached_guest", lambda flavour: None)
    # A blinking cursor is visible or not depending on when the frame is taken.
    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)
    yield
    monkeypatch.undo()
    time.tzset()


def make_app(**kw: Any) -> InfraSimApp:
    return InfraSimApp(static_session(), clock=fixed_clock, **kw)


# -- waiting ---------------------------------------------------------------------------------


async def until(pilot: Pilot[Any], pred: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)
    await pilot.pause()


async def dashboard_ready(pilot: Pilot[Any], rows: int = 5) -> DashboardScreen:
    app = pilot.app

    def loaded() -> bool:
        screen = app.screen
        return (isinstance(screen, DashboardScreen) and len(screen.vms) == 5
                and screen.query_one(VMTable).row_count == rows and screen.frames > 0)

    await until(pilot, loaded, "the dashboard's rows")
    screen = app.screen
    assert isinstance(screen, DashboardScreen)
    return screen


async def open_vm(pilot: Pilot[Any], row: int) -> VMScreen:
    """From the dashboard (sorted by name), open the VM on ``row`` with Enter."""
    await dashboard_ready(pilot)
    await pilot.press(*["down"] * row, "enter")

    def loaded() -> bool:
        screen = pilot.app.screen
        if not isinstance(screen, VMScreen) or screen.vm is None:
            return False
        consoles = screen.query(SerialConsole)
        if not consoles:
            return False
        model = consoles.first().model
        return (model is not None and model.pending_bytes == 0
                and READY_BANNER in model.screen_text()
                and screen.query_one("#vm-volumes", DataTable).row_count > 0
                and "web-1" in str(screen.query_one("#vm-stats").render()))

    await until(pilot, loaded, "the VM screen and its console")
    screen = pilot.app.screen
    assert isinstance(screen, VMScreen)
    return screen


def Before(steps: Callable[[Pilot[Any]], Awaitable[None]]) -> Callable[[Pilot[Any]], Any]:
    """run_before for snap_compare: the steps, then settle (timers due now have fired)."""

    async def run(pilot: Pilot[Any]) -> None:
        await steps(pilot)
        await pilot.pause(0.05)
        await pilot.wait_for_scheduled_animations()

    return run


# -- the dashboard ---------------------------------------------------------------------------


def test_dashboard(snap_compare: Any) -> None:
    """The fleet in the dark theme: five VMs in every state, live CPU/RSS and sparklines for
    the running ones, uptime from the fixed clock, the crashed VM in red."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_dashboard_filter_and_marks(snap_compare: Any) -> None:
    """`/` filter `web|db` kept with Enter (3 rows, the filter box and the header crumbs
    show it), then two rows marked with space (✓), the cursor on the third."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("slash", *"web|db", "enter")
        await dashboard_ready(pilot, rows=3)
        await pilot.press("space", "space")
        await until(pilot, lambda: len(pilot.app.screen.marked) == 2,  # type: ignore[attr-defined]
                    "two marks")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_dashboard_light_theme(snap_compare: Any) -> None:
    """The same fleet in the light theme."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)

    assert snap_compare(make_app(theme_name="light"), terminal_size=SIZE,
                        run_before=Before(steps))


def test_dashboard_read_only(snap_compare: Any) -> None:
    """A viewer: `viewer` in the header and no lifecycle keys (or New) in the footer."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)

    assert snap_compare(make_app(role=Role.VIEWER), terminal_size=SIZE,
                        run_before=Before(steps))


def test_help(snap_compare: Any) -> None:
    """`?` over the dashboard: every key of the view, then the global ones."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen), "the help")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_confirm_delete(snap_compare: Any) -> None:
    """Two VMs marked, then `d`: the confirmation names both, Cancel focused."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("space", "space", "d")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), "the dialog")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_command_line(snap_compare: Any) -> None:
    """`:` then `vm web`: the command line at the bottom, suggesting `vm web-1`."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("colon")
        await until(pilot, lambda: isinstance(pilot.app.screen, CommandLine), "the prompt")
        await pilot.press(*"vm web")
        box = pilot.app.screen.query_one("#command-input", Input)
        await until(pilot, lambda: box._suggestion == "vm web-1", "the suggestion")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_command_palette(snap_compare: Any) -> None:
    """Ctrl+P: the palette's commands (screens, themes, each VM and its verbs)."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(pilot.app.screen, CommandPalette), "the palette")
        commands = pilot.app.screen.query_one(CommandList)
        await until(pilot, lambda: commands.option_count > 10, "the commands")
        count = -1
        while commands.option_count != count:  # providers may still be adding hits
            count = commands.option_count
            await pilot.pause(0.2)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


# -- one VM ----------------------------------------------------------------------------------


def test_vm_screen(snap_compare: Any) -> None:
    """web-1: stats line (pid, uptime, CPU sparkline, RSS), its serial console with the boot
    log, the ready banner and the prompt, and the Volumes tab (boot overlay + weights)."""

    async def steps(pilot: Pilot[Any]) -> None:
        await open_vm(pilot, row=3)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_vm_snapshots_tab(snap_compare: Any) -> None:
    """web-1's Snapshots tab (`2`): a 4-snapshot tree, ages from the fixed clock, one
    unsigned, the current one marked."""

    async def steps(pilot: Pilot[Any]) -> None:
        await open_vm(pilot, row=3)
        await pilot.press("2")

        def shown() -> bool:
            tree = pilot.app.screen.query_one(SnapshotTree)
            return len(tree.snapshots) == 4 and tree.cursor_node is not None \
                and tree.cursor_node.data is not None

        await until(pilot, shown, "the snapshot tree")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


# -- volumes, events, create -----------------------------------------------------------------


def test_volumes(snap_compare: Any) -> None:
    """`v` from the fleet: every volume with
    its integrity (verified, untrusted, never checked, mismatch), signature, base and users."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("v")

        def loaded() -> bool:
            screen = pilot.app.screen
            return isinstance(screen, VolumesScreen) and \
                screen.query_one(DataTable).row_count == 5

        await until(pilot, loaded, "the volumes")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_events(snap_compare: Any) -> None:
    """`e` from the fleet: the fixed history,
    oldest first, coloured by severity, times in UTC."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("e")

        def loaded() -> bool:
            screen = pilot.app.screen
            return isinstance(screen, EventsScreen) and \
                len(screen.query_one(RichLog).lines) == len(fleet_events())

        await until(pilot, loaded, "the events")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_create_vm_error(snap_compare: Any) -> None:
    """`n`, a name, then memory 0: the core's objection under Memory, Create disabled."""

    async def steps(pilot: Pilot[Any]) -> None:
        await dashboard_ready(pilot)
        await pilot.press("n")
        await until(pilot, lambda: isinstance(pilot.app.screen, CreateVMScreen), "the form")
        screen = pilot.app.screen
        assert isinstance(screen, CreateVMScreen)
        await until(pilot, lambda: screen.checks >= 1, "the first check")
        await pilot.press(*"web-3")
        memory = screen.query_one("#memory_mb", Input)
        memory.focus()
        await pilot.pause()
        memory.value = ""
        await pilot.press("0")
        await until(pilot, lambda: memory.value == "0" and screen.error is not None
                    and screen.error[0] == "memory_mb" and screen._debounce is None,
                    "the memory error")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


# -- networks --------------------------------------------------------------------------------


async def networks_ready(pilot: Pilot[Any]) -> NetworksScreen:
    """`N` from the fleet; wait for every table and for the first link's graph."""
    await dashboard_ready(pilot)
    await pilot.press("N")

    def loaded() -> bool:
        screen = pilot.app.screen
        return (isinstance(screen, NetworksScreen) and screen.loaded
                and screen.query_one("#links", LinkTable).row_count == 11
                and screen.query_one("#lora", LinkTable).row_count == 4)

    await until(pilot, loaded, "the networks")
    screen = pilot.app.screen
    assert isinstance(screen, NetworksScreen)
    await graph_drawn(pilot, screen, "db-1 net1 egress")
    return screen


async def graph_drawn(pilot: Pilot[Any], screen: NetworksScreen, link: str) -> None:
    """Wait until the graph shows ``link`` (in its title), drawn at the pane's size."""
    graph = screen.query_one(LinkGraph)

    def drawn() -> bool:
        size = (graph.content_size.width, graph.content_size.height)
        return (graph.draws > 0 and not graph._dirty and graph._drawn_size == size
                and link in str(graph.border_title))

    await until(pilot, drawn, "the link graph")


def test_networks(snap_compare: Any) -> None:
    """`N` from the fleet: lab-net (user NAT) and two segments with their 8 link directions
    (rate, a 60 s sparkline, drops by cause, delay p50/p99, queue), the 3 QoS profiles, the
    cursor on web-1's egress with its graph (throughput above, delay p50/p99 below) and the
    LoRa radios (SF, RSSI, SNR, time on air, delivered/lost)."""

    async def steps(pilot: Pilot[Any]) -> None:
        screen = await networks_ready(pilot)
        await pilot.press(*["down"] * 5)
        await graph_drawn(pilot, screen, "web-1 net1 egress")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


def test_qos_form(snap_compare: Any) -> None:
    """`e` on a LoRa link edits its profile (lora-sf9, radio fields on); SF 13 then Enter:
    the core's rule is shown under SF and nothing is saved."""

    async def steps(pilot: Pilot[Any]) -> None:
        await networks_ready(pilot)
        await pilot.press("e")
        await until(pilot, lambda: isinstance(pilot.app.screen, QosForm), "the form")
        form = pilot.app.screen
        assert isinstance(form, QosForm)
        sf = form.query_one("#lora-spreading_factor", Input)
        sf.focus()
        sf.value = "13"
        await pilot.press("enter")
        await until(pilot, lambda: form.error is not None, "the SF error")

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=Before(steps))


@pytest.mark.parametrize(("key", "screen"), [("v", VolumesScreen), ("e", EventsScreen)])
async def test_dashboard_keys_open_volumes_and_events(key: str, screen: type[Any]) -> None:
    """Not a snapshot: the fleet's one-letter keys open the other screens."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await dashboard_ready(pilot)
        await pilot.press(key)
        await pilot.pause(0.2)
        assert isinstance(app.screen, screen)
