"""Volumes: every disk and data volume, its integrity, and who uses it.

The table is redrawn from the core after every action and on the core's ``volume.*`` events
(coalesced), so two consoles (or the CLI) see the same thing. Long work (import, sign, verify)
shows a progress bar fed by the core's progress callback, which may run on a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Header, Label, ProgressBar

from ..core.errors import InfraSimError
from ..core.events import Event
from ..core.model import VM, Volume, VolumeRequest
from ..core.units import format_size
from ..widgets.core_events import FollowsCore
from ..widgets.key_bar import KeyBar
from .confirm import ConfirmScreen
from .volume_forms import (
    ImportVolumeForm,
    NewVolumeForm,
    VolumeDetails,
    integrity_state,
    volume_details,
)

if TYPE_CHECKING:
    from ..app import InfraSimApp

COALESCE = 0.15  # seconds
PROGRESS_EVERY = 0.05  # seconds between progress repaints from a callback
COLUMNS = ("Name", "Kind", "Format", "Size", "On disk", "Base", "Integrity", "Signed", "Used by")
#: Integrity word -> component class that colours it (the theme decides the colour).
INTEGRITY_CLASS = {"verified": "volumes--good", "untrusted": "volumes--bad",
                   "mismatch": "volumes--bad", "bad signature": "volumes--bad",
                   "unsigned": "volumes--warn", "never checked": "volumes--muted"}
NEEDS = {"new": "create_volume", "import_volume": "create_volume", "sign": "sign_volume",
         "verify": "verify_volume", "delete": "delete_volume"}
ON_ROW = ("sign", "verify", "delete", "details")


def users_of(vms: list[VM]) -> dict[str, list[str]]:
    """Pure: volume id -> names of the VMs that reference it (disks or boot disk)."""
    out: dict[str, list[str]] = {}
    for vm in sorted(vms, key=lambda v: v.meta.name):
        for vid in dict.fromkeys([*vm.spec.volume_ids, vm.spec.boot_disk_id]):
            if vid:
                out.setdefault(vid, []).append(vm.meta.name)
    return out


class VolumesScreen(FollowsCore, Screen[None]):
    """The volume table; keys act on the row under the cursor."""

    DEFAULT_CSS = """
    VolumesScreen #volumes-table { height: 1fr; }
    VolumesScreen #volumes-progress { height: 1; padding: 0 1; }
    VolumesScreen #volumes-progress.-idle { display: none; }
    VolumesScreen #volumes-progress-label { width: auto; margin-right: 2; }
    VolumesScreen > .volumes--good { color: $success; }
    VolumesScreen > .volumes--bad { color: $error; text-style: bold; }
    VolumesScreen > .volumes--warn { color: $warning; }
    VolumesScreen > .volumes--muted { color: $text-muted; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"volumes--good", "volumes--bad", "volumes--warn",
                                             "volumes--muted"}

    BINDINGS = [
        Binding("n", "new", "New"),
        Binding("i", "import_volume", "Import"),
        Binding("g", "sign", "Sign"),
        Binding("v", "verify", "Verify"),
        Binding("d", "delete", "Delete"),
        Binding("enter", "details", "Details"),
    ]

    TITLE = "Volumes"

    def __init__(self) -> None:
        super().__init__()
        self.volumes: dict[str, Volume] = {}
        self.users: dict[str, list[str]] = {}
        self._pending: Timer | None = None
        self._jobs = 0  # local long-running actions showing progress

    @property
    def infrasim(self) -> InfraSimApp:
        return cast("InfraSimApp", self.app)

    def recreate(self) -> VolumesScreen:
        return VolumesScreen()

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable[str | Text] = DataTable(id="volumes-table", cursor_type="row",
                                                 zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        with Horizontal(id="volumes-progress", classes="-idle"):
            yield Label("", id="volumes-progress-label", markup=False)
            yield ProgressBar(id="volumes-progress-bar", show_eta=False)
        yield KeyBar()

    def on_mount(self) -> None:
        self.follow_core(self._on_core_event)
        self.query_one(DataTable).focus()
        self.schedule_reload(0)


    # -- data -------------------------------------------------------------------------------

    def _on_core_event(self, ev: Event) -> None:
        """Session listener: runs in the session's task (maybe another app's context), so it
        only hands the event over to this screen's own message loop."""
        if ev.kind == "volume" or ev.type in ("vm.created", "vm.deleted", "vm.updated"):
            self.call_later(self._handle_event, ev)

    def _handle_event(self, ev: Event) -> None:
        if ev.type == "volume.progress":
            if not self._jobs:  # someone else's import or hash: show it too
                done, total = int(ev.data.get("done", 0)), int(ev.data.get("total", 0))
                self._show_progress(f"{ev.name}", done, total)
                if total and done >= total:
                    self.set_timer(1.0, self._hide_progress_if_idle)
            return
        self.schedule_reload()

    def schedule_reload(self, delay: float = COALESCE) -> None:
        if self._pending is None:
            self._pending = self.set_timer(max(delay, 0.01), self._fire_reload)

    def _fire_reload(self) -> None:
        self._pending = None
        self.run_worker(self.reload(), group="volumes-reload", exclusive=True,
                        exit_on_error=False)

    async def reload(self) -> None:
        """Fetch volumes and VMs and redraw, keeping the cursor on the same volume."""
        core = self.infrasim.core
        try:
            vols: list[Volume] = await core.list_volumes()
            vms: list[VM] = await core.list_vms()
        except InfraSimError as err:
            self.infrasim.report(err)
            return
        self.volumes = {v.meta.id: v for v in sorted(vols, key=lambda v: v.meta.name)}
        self.users = users_of(vms)
        names = {v.meta.id: v.meta.name for v in vols}
        table = self.query_one(DataTable)
        keep = self.selected_id
        table.clear()
        for vid, v in self.volumes.items():
            table.add_row(*self._row(v, names), key=vid)
        if keep in self.volumes:
            table.move_cursor(row=table.get_row_index(keep))
        self.refresh_bindings()

    def _row(self, v: Volume, names: dict[str, str]) -> list[str | Text]:
        state = integrity_state(v)
        style = self.get_component_rich_style(INTEGRITY_CLASS.get(state, "volumes--muted"),
                                              partial=True)
        base = v.spec.base_volume_id
        return [v.meta.name, v.spec.kind.value.lower(), v.spec.format,
                format_size(v.status.virtual_size), format_size(v.status.actual_size),
                names.get(base, base) if base else "-", Text(state, style=style),
                "yes" if v.spec.integrity else "no",
                ", ".join(self.users.get(v.meta.id, [])) or "-"]

    @property
    def selected_id(self) -> str:
        """The id of the volume under the cursor ("" when the table is empty)."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return ""
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:  # the cursor is outside the rows (mid-redraw)
            return ""
        return str(key.value or "")

    @property
    def selected(self) -> Volume | None:
        return self.volumes.get(self.selected_id)

    # -- progress ---------------------------------------------------------------------------

    def _show_progress(self, label: str, done: int, total: int) -> None:
        self.query_one("#volumes-progress").remove_class("-idle")
        text = f"{label} {format_size(done)}" + (f" / {format_size(total)}" if total else "")
        self.query_one("#volumes-progress-label", Label).update(text)
        self.query_one("#volumes-progress-bar", ProgressBar).update(
            total=total or None, progress=done)

    def _hide_progress_if_idle(self) -> None:
        if not self._jobs:
            self.query_one("#volumes-progress").add_class("-idle")

    def progress_callback(self, label: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback safe from any thread (the core hashes and copies on
        worker threads): it posts to this screen, at most 20 times a second plus the last."""
        last = [0.0]

        def report(done: int, total: int) -> None:
            t = time.monotonic()
            if t - last[0] < PROGRESS_EVERY and done < total:
                return
            last[0] = t
            self.call_later(self._show_progress, label, done, total)

        return report

    def _long(self, label: str, work: Callable[[Callable[[int, int], None]], Awaitable[Any]],
              done: str, then: Callable[[Any], None] | None = None) -> None:
        """Run ``work(progress)`` through ``app.act`` with the progress bar shown meanwhile."""
        self._jobs += 1
        self._show_progress(label, 0, 0)

        async def run() -> Any:
            try:
                return await work(self.progress_callback(label))
            finally:
                self._jobs -= 1
                self._hide_progress_if_idle()
                self.schedule_reload(0)

        self.infrasim.act(run, done=done, then=then)

    # -- keys -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        need = NEEDS.get(action)
        if need is not None and not self.infrasim.can(need):
            return False
        if action in ON_ROW and self.selected is None:
            return None
        return True

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.refresh_bindings()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_details()

    def action_new(self) -> None:
        names = [v.meta.name for v in self.volumes.values()]

        def got(req: VolumeRequest | None) -> None:
            if req is None:
                return
            core = self.infrasim.core
            self.infrasim.act(lambda: core.create_volume(req), done=f"volume {req.name} created",
                              then=lambda _v: self.schedule_reload(0))

        self.app.push_screen(NewVolumeForm(names), got)

    def action_import_volume(self) -> None:
        def got(req: VolumeRequest | None) -> None:
            if req is None:
                return
            core = self.infrasim.core
            self._long(f"importing {req.name}:",
                       lambda progress: core.create_volume(req, progress=progress),
                       done=f"volume {req.name} imported")

        self.app.push_screen(ImportVolumeForm(), got)

    def action_sign(self) -> None:
        vol = self.selected
        if vol is None:
            return
        core = self.infrasim.core
        name = vol.meta.name
        self._long(f"signing {name}:", lambda progress: core.sign_volume(name, progress=progress),
                   done=f"{name} signed with the host key and verified")

    def action_verify(self) -> None:
        vol = self.selected
        if vol is None:
            return
        core = self.infrasim.core
        name = vol.meta.name

        def verdict(v: Volume) -> None:
            state = integrity_state(v)
            msg = {"verified": f"{name}: verified — signature and content match",
                   "unsigned": f"{name}: content matches its image, but it is not signed"}
            self.app.notify(msg.get(state, f"{name}: {state}"), title="Integrity", timeout=6)

        self._long(f"verifying {name}:",
                   lambda progress: core.verify_volume(name, progress=progress), done="",
                   then=verdict)

    def action_delete(self) -> None:
        vol = self.selected
        if vol is None:
            return
        name = vol.meta.name
        users = self.users.get(vol.meta.id, [])
        extra = f"\n\nIt is attached to {', '.join(users)}: the core will refuse." if users else ""

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            core = self.infrasim.core
            self.infrasim.act(lambda: core.delete_volume(name), done=f"volume {name} deleted",
                              then=lambda _r: self.schedule_reload(0))

        self.app.push_screen(ConfirmScreen(
            f"Delete volume {name}?\n\nIts file is removed; this cannot be undone.{extra}",
            yes="Delete"), answered)

    def action_details(self) -> None:
        vol = self.selected
        if vol is None:
            return
        names = {v.meta.id: v.meta.name for v in self.volumes.values()}
        self.app.push_screen(VolumeDetails(volume_details(vol, names,
                                                          self.users.get(vol.meta.id, []))))


__all__ = ["VolumesScreen", "users_of"]
