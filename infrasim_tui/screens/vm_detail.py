"""One VM: live stats, its serial console, volumes, snapshot tree, NICs and recent events.

The console pane takes every key while focused (Ctrl+] gives the keyboard back), so the
one-letter verbs below act only when focus is elsewhere, as in virsh/tmux.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, RichLog, Static, TabbedContent, TabPane, Tabs

from ..core.errors import InfraSimError, NotFound
from ..core.events import Event
from ..core.model import VM, Volume
from ..core.units import format_size
from ..widgets.core_events import FollowsCore
from ..widgets.fleet_header import FleetHeader
from ..widgets.key_bar import KeyBar
from ..widgets.serial_console import SerialConsole
from ..widgets.snapshot_tree import SnapshotTree
from ..widgets.vm_table import format_uptime, is_live, sparkline, state_counts, state_name
from .confirm import ConfirmScreen

if TYPE_CHECKING:
    from ..app import InfraSimApp

INTEGRITY = {"verified": "verified", "untrusted": "untrusted", "mismatch": "MISMATCH",
             "bad-signature": "BAD SIGNATURE", "": "never checked"}


def stats_text(vm: VM, cpu: float | None, rss: int | None, history: list[float],
               now: float) -> Text:
    """Pure: the VM's live stats line."""
    st = vm.status
    t = Text()
    t.append(f" {vm.meta.name} ", style="bold reverse")
    t.append(f" {state_name(vm)}", style="bold")
    if st.reason and not is_live(vm):
        reason = st.reason if len(st.reason) <= 40 else st.reason[:39] + "…"
        t.append(f" ({reason})")
    t.append(f" │ {vm.spec.machine.value} {vm.spec.arch}")
    t.append(f" │ {vm.spec.cpu_cores} vCPU {format_size(vm.spec.memory_mb << 20)}")
    if is_live(vm):
        t.append(f" │ pid {st.pid} {st.accelerator}")
        if st.started_at:
            t.append(f" │ up {format_uptime(now - st.started_at)}")
        if cpu is not None:
            t.append(f" │ cpu {cpu:5.1f}% {sparkline(history, 16)}")
        if rss:
            t.append(f" │ rss {format_size(rss)}")
    return t


def nic_lines(vm: VM, networks: dict[str, str]) -> list[str]:
    """Pure: NICs, addresses and port forwards as text lines."""
    lines = []
    nets = [networks.get(n, n) for n in vm.spec.network_ids] or ["user (default NAT)"]
    for i, net in enumerate(nets):
        lines.append(f"nic{i}: {net}")
    for name, addrs in sorted(vm.status.addresses.items()):
        lines.append(f"  {name}: {', '.join(addrs)}")
    if vm.spec.port_forwards:
        lines.append("port forwards:")
        for f in vm.spec.port_forwards:
            lines.append(f"  {f.host_addr}:{f.host_port} → guest:{f.guest_port}/{f.protocol}")
    else:
        lines.append("no port forwards")
    return lines


class VMScreen(FollowsCore, Screen[None]):
    BINDINGS = [
        Binding("s", "lifecycle('start')", "Start"),
        Binding("x", "lifecycle('stop')", "Stop"),
        Binding("K", "lifecycle('kill')", "Force stop", show=False),
        Binding("p", "lifecycle('pause')", "Pause"),
        Binding("u", "lifecycle('resume')", "Resume"),
        Binding("R", "lifecycle('restart')", "Restart"),
        Binding("t", "snapshot", "Snapshot"),
        Binding("c", "focus_console", "Console"),
        Binding("d", "delete", "Delete"),
        Binding("1", "tab('volumes')", "Volumes", show=False),
        Binding("2", "tab('snapshots')", "Snapshots", show=False),
        Binding("3", "tab('network')", "Network", show=False),
        Binding("4", "tab('events')", "Events", show=False),
    ]

    def __init__(self, ref: str, *, tab: str = "", focus_console: bool = False) -> None:
        super().__init__()
        self.vm_ref = ref
        self.vm: VM | None = None
        self.tab = tab
        self.focus_console_on_mount = focus_console
        self._stale = False
        self._stats_dirty = False

    def recreate(self) -> VMScreen:
        return VMScreen(self.vm_ref, tab=self.tab)

    @property
    def infra(self) -> InfraSimApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield FleetHeader(id="header")
        yield Static(id="vm-stats")
        with Horizontal(id="vm-body"):
            yield Vertical(id="console-slot")
            with TabbedContent(id="vm-tabs", initial=self.tab or "volumes"):
                with TabPane("Volumes", id="volumes"):
                    yield DataTable(id="vm-volumes", cursor_type="row")
                with TabPane("Snapshots", id="snapshots"):
                    yield Vertical(id="snapshot-slot")
                with TabPane("Network", id="network"):
                    yield Static(id="vm-nics")
                with TabPane("Events", id="events"):
                    yield RichLog(id="vm-events", max_lines=500, wrap=True)
        yield KeyBar()

    async def on_mount(self) -> None:
        table = self.query_one("#vm-volumes", DataTable)
        table.add_columns("NAME", "SIZE", "FORMAT", "BOOT", "INTEGRITY")
        try:
            self.vm = await self.infra.core.get_vm(self.vm_ref)
        except InfraSimError as err:
            self.infra.report(err)
            self.dismiss()
            return
        vm = self.vm
        self.vm_ref = vm.meta.id
        console = SerialConsole(self.infra.session, vm.meta.id, vm_name=vm.meta.name,
                                read_only=not self.infra.can("console_input"),
                                id="console")
        await self.query_one("#console-slot").mount(console)
        await self.query_one("#snapshot-slot").mount(SnapshotTree(vm.meta.id, id="snap-tree"))
        log = self.query_one("#vm-events", RichLog)
        for ev in self.infra.session.recent:
            if ev.resource_id == vm.meta.id:
                log.write(self._event_line(ev))
        self.follow_core(self._on_event)
        self.set_interval(0.5, self._tick)
        await self._load()
        if self.focus_console_on_mount:
            console.focus()
        else:
            self.focus_tabs()


    def _event_line(self, ev: Event) -> Text:
        import time as _time

        when = _time.strftime("%H:%M:%S", _time.localtime(ev.ts))
        return Text.assemble((when, "dim"), " ", (ev.type, "bold"), " ", ev.message)

    def _on_event(self, ev: Event) -> None:
        """Runs in the session's task (maybe another app's context): hand over, touch nothing."""
        if self.vm is None:
            return
        if ev.resource_id == self.vm.meta.id and ev.type not in ("vm.metrics",):
            self.call_later(self._handle_event, ev)
            return
        self._flag_event(ev)

    def _flag_event(self, ev: Event) -> None:
        if self.vm is None or ev.resource_id != self.vm.meta.id:
            if ev.kind == "volume":
                self._stale = True
            return
        if ev.type == "vm.metrics":
            self._stats_dirty = True

    def _handle_event(self, ev: Event) -> None:
        self.query_one("#vm-events", RichLog).write(self._event_line(ev))
        if ev.type == "vm.deleted":
            self.infra.notify(f"{ev.name} was deleted", severity="warning")
            if self.is_current:
                self.dismiss()
            return
        self._stale = True

    async def _tick(self) -> None:
        if self._stale:
            self._stale = False
            await self._load()
        elif self._stats_dirty:
            self._stats_dirty = False
            self._show_stats()

    async def _load(self) -> None:
        core = self.infra.core
        try:
            self.vm = await core.get_vm(self.vm_ref)
        except NotFound:
            return
        vm = self.vm
        self.infra.vm_cache[vm.meta.id] = vm
        self._show_stats()
        vol_ids = [v for v in dict.fromkeys([vm.spec.boot_disk_id, *vm.spec.volume_ids]) if v]
        table = self.query_one("#vm-volumes", DataTable)
        table.clear()
        for vid in vol_ids:
            try:
                vol: Volume = await core.get_volume(vid)
            except InfraSimError:
                table.add_row(vid, "?", "?", "", "missing")
                continue
            table.add_row(vol.meta.name, format_size(vol.status.virtual_size), vol.spec.format,
                          "boot" if vid == vm.spec.boot_disk_id else "",
                          INTEGRITY.get(vol.status.verified, vol.status.verified))
        if not vol_ids:
            table.add_row("(no volumes: kernel/initrd boot)", "", "", "", "")
        nets: dict[str, str] = {}
        if vm.spec.network_ids:
            nets = {n.meta.id: f"{n.meta.name} ({n.spec.mode.value})"
                    for n in await core.list_networks()}
        self.query_one("#vm-nics", Static).update("\n".join(nic_lines(vm, nets)))

    def _show_stats(self) -> None:
        if self.vm is None:
            return
        points = list(self.infra.session.metrics(self.vm.meta.id))
        last = points[-1] if points else None
        self.query_one("#vm-stats", Static).update(stats_text(
            self.vm, last.cpu_percent if last else None, last.rss_bytes if last else None,
            [p.cpu_percent for p in points], self.infra.clock()))
        counts = state_counts(self.infra.vm_cache.values())
        self.query_one(FleetHeader).update_header(f"VMs / {self.vm.meta.name}", counts,
                                                  self.infra.session.mode, 0.0,
                                                  self.infra.role.name.lower())

    # -- actions ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        from .dashboard import ACTIONS

        if action == "lifecycle" and parameters:
            return self.infra.can(ACTIONS[str(parameters[0])][0])
        if action == "snapshot":
            return self.infra.can("create_snapshot")
        if action == "delete":
            return self.infra.can("delete_vm")
        return True

    def action_lifecycle(self, verb: str) -> None:
        from .dashboard import ACTIONS

        if self.vm is None:
            return
        method, confirm = ACTIONS[verb]
        if not self.infra.check_action_allowed(method):
            return
        name, vm_id = self.vm.meta.name, self.vm.meta.id

        def go(ok: bool | None = True) -> None:
            if ok:
                self.infra.lifecycle("stop" if verb == "kill" else verb, vm_id,
                                     force=verb == "kill")

        if confirm:
            label = {"kill": "Force stop"}.get(verb, verb.capitalize())
            self.app.push_screen(ConfirmScreen(f"{label} {name}?", yes=label), go)
        else:
            go()

    def action_delete(self) -> None:
        if self.vm is None or not self.infra.check_action_allowed("delete_vm"):
            return
        name, vm_id = self.vm.meta.name, self.vm.meta.id

        def go(ok: bool | None) -> None:
            if ok:
                self.infra.act(lambda: self.infra.core.delete_vm(vm_id, force=True),
                               done=f"{name} deleted")

        self.app.push_screen(ConfirmScreen(f"Delete {name}? It is stopped first; its volumes "
                                           "are kept.", yes="Delete"), go)

    def action_snapshot(self) -> None:
        self.action_tab("snapshots")
        tree = self.query_one(SnapshotTree)
        tree.focus()
        tree.action_take()

    def action_focus_console(self) -> None:
        self.query_one(SerialConsole).focus()

    def action_tab(self, tab: str) -> None:
        self.tab = tab
        self.query_one("#vm-tabs", TabbedContent).active = tab

    def focus_tabs(self) -> None:
        """Give the keyboard to the side panel (its tab strip), away from the console."""
        self.query_one("#vm-tabs", TabbedContent).query_one(Tabs).focus()

    @on(SerialConsole.Detached)
    def _detached(self, event: SerialConsole.Detached) -> None:
        self.focus_tabs()
