"""The fleet: every VM, live, with filter, sort, marks and bulk lifecycle actions.

Refresh is pushed: the session's events mark VMs dirty, and a 2 Hz tick re-reads only those
records (metrics samples need no read at all) and rewrites only the cells that changed.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input

from ..core.errors import NotFound
from ..core.events import Event
from ..core.model import VM
from ..widgets.core_events import FollowsCore
from ..widgets.fleet_header import FleetHeader
from ..widgets.key_bar import KeyBar
from ..widgets.vm_table import (
    SORT_KEYS,
    Live,
    VMTable,
    parse_filter,
    row_cells,
    sort_value,
    state_counts,
)
from .confirm import ConfirmScreen

if TYPE_CHECKING:
    from ..app import InfraSimApp

TICK = 0.5  # seconds: the table is redrawn at most at 2 Hz
HISTORY_POINTS = 12

ACTIONS: dict[str, tuple[str, bool]] = {  # action -> (core method, needs confirmation)
    "start": ("start_vm", False), "stop": ("stop_vm", True), "kill": ("stop_vm", True),
    "pause": ("pause_vm", False), "resume": ("resume_vm", False),
    "restart": ("restart_vm", True), "delete": ("delete_vm", True),
}


class DashboardScreen(FollowsCore, Screen[None]):
    BINDINGS = [
        Binding("enter", "open", "Open"),
        Binding("space", "mark", "Mark"),
        Binding("s", "lifecycle('start')", "Start"),
        Binding("x", "lifecycle('stop')", "Stop"),
        Binding("K", "lifecycle('kill')", "Force stop", show=False),
        Binding("p", "lifecycle('pause')", "Pause"),
        Binding("u", "lifecycle('resume')", "Resume"),
        Binding("R", "lifecycle('restart')", "Restart", show=False),
        Binding("d", "lifecycle('delete')", "Delete"),
        Binding("n", "app.create_vm", "New"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("o", "sort", "Sort", show=False),
        Binding("O", "sort_reverse", "Reverse", show=False),
        Binding("c", "console", "Console", show=False),
        Binding("v", "app.open_named('volumes')", "Volumes"),
        Binding("e", "app.open_named('events')", "Events"),
        Binding("ctrl+a", "mark_all", "Mark all", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.vms: dict[str, VM] = {}
        self.marked: set[str] = set()
        self.filter_text = ""
        self.sort_key = "name"
        self.sort_reverse = False
        self._dirty: set[str] = set()
        self._reload_all = True
        self._redraw = True
        self._events_seen: deque[float] = deque(maxlen=4096)
        self.frames = 0
        self.cells_written = 0

    @property
    def infra(self) -> InfraSimApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield FleetHeader(id="header")
        yield Input(placeholder="filter: text, regex, !inverse, label=value — Enter keeps, "
                    "Esc clears", id="filter")
        yield VMTable(id="vms")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.follow_core(self._on_event)
        self.set_interval(TICK, self._tick)
        self.query_one(VMTable).focus()
        self.run_worker(self._refresh(), exclusive=True, group="refresh")


    def on_screen_resume(self) -> None:
        self._redraw = True

    # -- data -------------------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        self._events_seen.append(ev.ts)
        if ev.kind != "vm":
            return
        if ev.type == "vm.metrics":
            self._redraw = True
        elif ev.type == "vm.deleted":
            self.vms.pop(ev.resource_id, None)
            self.marked.discard(ev.resource_id)
            self.infra.vm_cache.pop(ev.resource_id, None)
            self._redraw = True
        else:
            self._dirty.add(ev.resource_id)

    async def _tick(self) -> None:
        if self._reload_all or self._dirty:
            await self._refresh()
        elif self._redraw:
            self.redraw()

    async def _refresh(self) -> None:
        dirty, self._dirty = self._dirty, set()
        core = self.infra.core
        if self._reload_all or len(dirty) > 20:
            self._reload_all = False
            vms = await core.list_vms()
            self.vms = {vm.meta.id: vm for vm in vms}
        else:
            for vm_id in dirty:
                try:
                    vm = await core.get_vm(vm_id)
                except NotFound:
                    self.vms.pop(vm_id, None)
                    continue
                self.vms[vm_id] = vm
        self.infra.vm_cache.clear()
        self.infra.vm_cache.update(self.vms)
        self.redraw()

    def live(self, vm: VM) -> Live:
        points = self.infra.session.metrics(vm.meta.id)
        if not points:
            return Live()
        last = points[-1]
        hist = tuple(p.cpu_percent for p in list(points)[-HISTORY_POINTS:])
        return Live(last.cpu_percent, last.rss_bytes, hist)

    def visible_vms(self, lives: dict[str, Live] | None = None) -> list[VM]:
        keep = parse_filter(self.filter_text)
        now = self.infra.clock()
        vms = [vm for vm in self.vms.values() if keep(vm)]
        if lives is None:
            lives = {vm.meta.id: self.live(vm) for vm in vms}
        vms.sort(key=lambda vm: sort_value(vm, lives[vm.meta.id], self.sort_key, now),
                 reverse=self.sort_reverse)
        return vms

    def redraw(self) -> None:
        self._redraw = False
        now = self.infra.clock()
        lives = {vm_id: self.live(vm) for vm_id, vm in self.vms.items()}  # once per frame
        rows = [(vm.meta.id, row_cells(vm, lives[vm.meta.id], now, vm.meta.id in self.marked),
                 vm.status.state.value) for vm in self.visible_vms(lives)]
        self.cells_written += self.query_one(VMTable).show(rows)
        counts = state_counts(self.vms.values())
        recent = [t for t in self._events_seen if t >= now - 5.0]
        crumbs = "VMs" + (f" /{self.filter_text}" if self.filter_text else "")
        crumbs += f" ↕{self.sort_key}{'↓' if self.sort_reverse else ''}"
        self.query_one(FleetHeader).update_header(crumbs, counts, self.infra.mode_label,
                                                  len(recent) / 5.0, self.infra.role.name.lower())
        self.frames += 1

    # -- selection --------------------------------------------------------------------------

    def targets(self) -> list[VM]:
        """Marked VMs (that are still shown), else the one under the cursor."""
        table = self.query_one(VMTable)
        marked = [self.vms[i] for i in table.shown_ids if i in self.marked and i in self.vms]
        if marked:
            return marked
        current = table.current_id()
        return [self.vms[current]] if current in self.vms else []

    def action_mark(self) -> None:
        table = self.query_one(VMTable)
        current = table.current_id()
        if current is None:
            return
        self.marked ^= {current}
        self.redraw()
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    def action_mark_all(self) -> None:
        shown = set(self.query_one(VMTable).shown_ids)
        self.marked = set() if shown <= self.marked else shown
        self.redraw()

    def action_open(self) -> None:
        vms = self.targets()
        if vms:
            self.infra.open_vm(vms[0].meta.id)

    def action_console(self) -> None:
        from .vm_detail import VMScreen

        vms = self.targets()
        if vms:
            ref = vms[0].meta.id
            self.infra.go(lambda: VMScreen(ref, focus_console=True))

    @on(VMTable.RowSelected)
    def _selected(self, event: VMTable.RowSelected) -> None:
        self.action_open()

    @on(VMTable.HeaderSelected)
    def _header(self, event: VMTable.HeaderSelected) -> None:
        key = event.column
        if key in SORT_KEYS:
            self.sort_reverse = not self.sort_reverse if key == self.sort_key else False
            self.sort_key = key
            self.redraw()

    # -- actions ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "lifecycle" and parameters:
            return self.infra.can(ACTIONS[str(parameters[0])][0])
        if action == "create_vm":
            return self.infra.can("create_vm")
        return True

    def action_lifecycle(self, verb: str) -> None:
        method, confirm = ACTIONS[verb]
        if not self.infra.check_action_allowed(method):
            return
        vms = self.targets()
        if not vms:
            return
        names = ", ".join(vm.meta.name for vm in vms[:5]) + (" …" if len(vms) > 5 else "")
        label = {"kill": "Force stop"}.get(verb, verb.capitalize())

        def go(ok: bool | None = True) -> None:
            if not ok:
                return
            for vm in vms:
                self._run(verb, method, vm)
            self.marked -= {vm.meta.id for vm in vms}

        if confirm:
            extra = {"delete": " Its disks' volumes are kept.",
                     "kill": " The guest gets no chance to shut down."}.get(verb, "")
            self.app.push_screen(ConfirmScreen(f"{label} {len(vms)} VM(s): {names}?{extra}",
                                               yes=label), go)
        else:
            go()

    def _run(self, verb: str, method: str, vm: VM) -> None:
        call = getattr(self.infra.core, method)
        name = vm.meta.name

        async def work() -> Any:
            if verb == "kill":
                return await call(vm.meta.id, force=True)
            if verb == "delete":
                return await call(vm.meta.id, force=True)
            return await call(vm.meta.id)

        self.infra.act(work, done=f"{name}: {verb} done")

    # -- filter and sort --------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = self.filter_text
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.redraw()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        box = self.query_one("#filter", Input)
        box.display = bool(self.filter_text)
        self.query_one(VMTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus or self.filter_text:
            self.filter_text = ""
            box.value = ""
            box.display = False
            self.query_one(VMTable).focus()
            self.redraw()

    def action_sort(self) -> None:
        i = SORT_KEYS.index(self.sort_key) if self.sort_key in SORT_KEYS else -1
        self.sort_key = SORT_KEYS[(i + 1) % len(SORT_KEYS)]
        self.redraw()

    def action_sort_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.redraw()
