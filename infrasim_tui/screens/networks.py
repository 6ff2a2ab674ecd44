"""Networks: every network, each segment's links live, the LoRa radios, and the QoS profiles.

Link traffic is pushed, never polled: the session keeps each link's recent ``network.stats``
samples, and a 2 Hz tick redraws only the rows whose text changed (a sparkline per link is a
20-character string in the line table, not a widget). Resources (networks, VMs, profiles) are
re-read only when a core event says they changed. The plotext graph of the focused link is
the one costly drawing: it redraws at most twice a second and only while this screen is shown.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, cast

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Static

from ..core.errors import InfraSimError
from ..core.events import Event
from ..core.model import VM, LinkStats, Network, NetworkMode, QosProfile, QosProfileSpec
from ..session import link_key
from ..widgets.core_events import FollowsCore
from ..widgets.key_bar import KeyBar
from ..widgets.link_graph import LinkGraph
from ..widgets.link_table import (
    LINK_COLUMNS,
    LORA_COLUMNS,
    PROFILE_COLUMNS,
    LinkTable,
    Row,
    link_cells,
    lora_cells,
    profile_cells,
)
from .confirm import ConfirmScreen
from .qos_form import QosForm

if TYPE_CHECKING:
    from ..app import InfraSimApp

TICK = 0.5  # seconds: rows follow the core's 2 Hz samples
RELOAD_ON = ("vm.created", "vm.deleted", "vm.updated")
DIRECTION_ORDER = {"egress": 0, "ingress": 1}
NEEDS = {"edit": "update_qos_profile", "new_profile": "create_qos_profile",
         "delete_profile": "delete_qos_profile"}


def row_key(st: LinkStats) -> str:
    """A link direction's row key (the same in the links and the LoRa tables)."""
    return "link/" + "/".join(link_key(st))


def network_line(net: Network, vm_names: list[str], links: int) -> str:
    """Pure: a network's summary row: name, mode, subnet, attached VMs, live links."""
    mode = net.spec.mode.value.lower().replace("_", "-")
    vms = ", ".join(vm_names) if vm_names else "no VMs"
    line = f"{net.meta.name:<16} {mode:<14} {net.spec.cidr:<18} {vms}"
    if net.spec.mode == NetworkMode.SEGMENT:
        line += f"  · {links} link{'s' if links != 1 else ''}" if links else "  · no live ports"
    return line


def sorted_links(links: list[LinkStats]) -> list[LinkStats]:
    return sorted(links, key=lambda st: (st.vm or st.vm_id, st.nic,
                                         DIRECTION_ORDER.get(st.direction, 9), st.direction))


class NetworksScreen(FollowsCore, Screen[None]):
    """Links of every segment with a sparkline each; the focused link's graph below."""

    TITLE = "Networks"
    DEFAULT_CSS = """
    NetworksScreen #net-title {
        dock: top; height: 1; background: $panel; color: $text; text-style: bold;
        padding: 0 1;
    }
    NetworksScreen LinkTable, NetworksScreen LinkGraph {
        border: round $panel-lighten-2; border-title-color: $text-muted;
    }
    NetworksScreen LinkTable:focus { border: round $accent; border-title-color: $accent; }
    NetworksScreen #links { height: 1fr; min-height: 6; }
    NetworksScreen #profiles { height: 6; }
    NetworksScreen #net-bottom { height: 15; }
    NetworksScreen #graph { width: 1fr; height: 1fr; }
    NetworksScreen #lora { width: 69; height: 1fr; }
    """
    BINDINGS = [
        Binding("e", "edit", "Edit profile"),
        Binding("a", "new_profile", "New profile"),
        Binding("d", "delete_profile", "Delete profile"),
        Binding("p", "focus_profiles", "Profiles", show=False),
        Binding("l", "focus_links", "Links", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.networks: dict[str, Network] = {}
        self.vm_names: dict[str, str] = {}
        self.profiles: dict[str, QosProfile] = {}
        self.links: dict[str, LinkStats] = {}  # row key -> latest sample
        self.loaded = False
        self.frames = 0
        self._reload = True
        self._redraw = True
        self._seen_samples = -1

    @property
    def infra(self) -> InfraSimApp:
        return cast("InfraSimApp", self.app)

    def recreate(self) -> NetworksScreen:
        return NetworksScreen()

    def compose(self) -> ComposeResult:
        # not Textual's Header: popped right after mounting, its title task raised NoMatches
        yield Static("Networks", id="net-title", markup=False)
        links = LinkTable(LINK_COLUMNS, id="links", empty="no networks yet")
        profiles = LinkTable(PROFILE_COLUMNS, id="profiles",
                             empty="no QoS profiles" + ("" if self.infra.read_only else
                                                        " — a creates one"))
        graph = LinkGraph(id="graph")
        lora = LinkTable(LORA_COLUMNS, id="lora", empty="no LoRa links")
        links.border_title = "Networks and links"
        profiles.border_title = "QoS profiles"
        graph.border_title = "Link"
        lora.border_title = "LoRa radio"
        yield links
        yield profiles
        with Horizontal(id="net-bottom"):
            yield graph
            yield lora
        yield KeyBar()

    def on_mount(self) -> None:
        self.follow_core(self._on_event)
        self.set_interval(TICK, self._tick)
        self._reload = False
        self.run_worker(self.reload(), group="networks-reload", exclusive=True,
                        exit_on_error=False)
        with contextlib.suppress(NoMatches):  # popped before it was mounted
            self.query_one("#links", LinkTable).focus()

    def on_screen_resume(self) -> None:
        self._redraw = True

    # -- data -------------------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        """Session listener (the session's task): only flags, the tick does the work."""
        if ev.type == "network.stats":
            self._redraw = True
        elif ev.kind in ("network", "qos_profile") or ev.type in RELOAD_ON:
            self._reload = True

    async def _tick(self) -> None:
        if not self.is_current:
            return  # hidden: the flags wait for the screen to be shown again
        if self._reload:
            self._reload = False
            self.run_worker(self.reload(), group="networks-reload", exclusive=True,
                            exit_on_error=False)
        elif self._redraw or self.infra.session.link_samples != self._seen_samples:
            self.redraw()

    async def reload(self) -> None:
        """Re-read networks, VM names and profiles (after a core event), then redraw."""
        self._reload = False
        core = self.infra.core
        try:
            nets: list[Network] = await core.list_networks()
            vms: list[VM] = await core.list_vms()
            profs: list[QosProfile] = await core.list_qos_profiles()
        except InfraSimError as err:
            self.infra.report(err)
            return
        self.networks = {n.meta.id: n for n in sorted(nets, key=lambda n: n.meta.name)}
        self.vm_names = {vm.meta.id: vm.meta.name for vm in vms}
        self.profiles = {p.meta.id: p for p in sorted(profs, key=lambda p: p.meta.name)}
        first_time = not self.loaded
        self.loaded = True
        self.redraw()
        if first_time and self.links:  # start on a link, so its graph is there at once
            with contextlib.suppress(NoMatches):
                self.query_one("#links", LinkTable).move_to(next(iter(self.links)))
        self.refresh_bindings()

    def redraw(self) -> None:
        try:
            self._draw()
        except NoMatches:  # popped while a tick or a reload was under way
            return

    def _draw(self) -> None:
        self._redraw = False
        session = self.infra.session
        self._seen_samples = session.link_samples
        link_rows: list[Row] = []
        lora_rows: list[Row] = []
        self.links = {}
        for net in self.networks.values():
            live = sorted_links(session.link_stats(net.meta.id)) \
                if net.spec.mode == NetworkMode.SEGMENT else []
            names = [self.vm_names.get(v, v) for v in net.status.attached_vm_ids]
            link_rows.append(Row(f"net/{net.meta.id}", (network_line(net, names, len(live)),),
                                 group=True))
            for i, st in enumerate(live):
                key = row_key(st)
                self.links[key] = st
                rates = [p.throughput_bps for p in session.link_history(link_key(st))]
                warn = frozenset({"drops"} if any(st.drops.values()) else ())
                indent = "└ " if i == len(live) - 1 else "├ "
                link_rows.append(Row(key, link_cells(st, rates, indent), warn=warn))
                if st.lora is not None:
                    lost = frozenset({"lost"} if st.lora.lost else ())
                    lora_rows.append(Row(key, lora_cells(st), warn=lost))
        self.query_one("#links", LinkTable).show(link_rows)
        segments = sum(1 for n in self.networks.values() if n.spec.mode == NetworkMode.SEGMENT)
        self.query_one("#net-title", Static).update(
            f"Networks — {len(self.networks)} networks, {segments} segments, "
            f"{len(self.links)} live link directions · {len(self.profiles)} QoS profiles")
        profiles = self.query_one("#profiles", LinkTable)
        profiles.show(Row(f"prof/{p.meta.id}", profile_cells(p)) for p in self.profiles.values())
        profiles.styles.height = min(max(len(self.profiles), 1), 6) + 3
        lora = self.query_one("#lora", LinkTable)
        lora.show(lora_rows)
        lora.display = bool(lora_rows)
        self._show_graph()
        self.frames += 1

    # -- the focused link -------------------------------------------------------------------

    def focused_link(self) -> LinkStats | None:
        """The link under the links table's cursor (on a network row: its first link), or
        the LoRa table's when that one has focus."""
        if self.focused is self.query_one("#lora", LinkTable):
            return self.links.get(self.query_one("#lora", LinkTable).current_key())
        table = self.query_one("#links", LinkTable)
        key = table.current_key()
        if key in self.links:
            return self.links[key]
        if key.startswith("net/"):
            net_id = key.removeprefix("net/")
            for k, st in self.links.items():
                if st.network_id == net_id:
                    return self.links[k]
        return None

    def _show_graph(self) -> None:
        try:
            graph = self.query_one("#graph", LinkGraph)
            st = self.focused_link()
        except NoMatches:  # the screen is being taken down
            return
        if st is None:
            graph.border_title = "Link"
            graph.show("", [], placeholder="no live links: start VMs on a segment network"
                       if not self.links else "move the cursor to a link to see its graph")
            return
        shaped = f" · {st.profile}" if st.profile else " · unshaped"
        graph.border_title = f"{st.vm} {st.nic} {st.direction}{shaped} — throughput and delay"
        graph.show(f"{st.network}: {st.vm} {st.nic} {st.direction}",
                   self.infra.session.link_history(link_key(st)))

    @on(LinkTable.Highlighted)
    def _moved(self, event: LinkTable.Highlighted) -> None:
        self._show_graph()
        self.refresh_bindings()

    def on_descendant_focus(self) -> None:
        self._show_graph()
        self.refresh_bindings()

    @on(LinkTable.Selected, "#profiles")
    def _profile_selected(self, event: LinkTable.Selected) -> None:
        if self.check_action("edit", ()):
            self.action_edit()

    def action_focus_profiles(self) -> None:
        self.query_one("#profiles", LinkTable).focus()

    def action_focus_links(self) -> None:
        self.query_one("#links", LinkTable).focus()

    # -- profiles ---------------------------------------------------------------------------

    def may(self, method: str) -> bool:
        """Viewers change nothing, whatever the role table lists for a newer method."""
        return not self.infra.read_only and self.infra.can(method)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        need = NEEDS.get(action)
        if need is not None and not self.may(need):
            return False
        if action == "delete_profile":
            return True if self.selected_profile() is not None else None
        return True

    def selected_profile(self) -> QosProfile | None:
        """The profile under the cursor when the profiles table has focus."""
        table = self.query_one("#profiles", LinkTable)
        if self.focused is not table:
            return None
        return self.profiles.get(table.current_key().removeprefix("prof/"))

    def profile_to_edit(self) -> QosProfile | str:
        """The profile ``e`` edits, or why there is none."""
        prof = self.selected_profile()
        if prof is not None:
            return prof
        if self.focused is self.query_one("#profiles", LinkTable):
            return "no profile under the cursor"
        st = self.focused_link()
        if st is None:
            return "move the cursor to a link (or to a profile: p)"
        if not st.profile:
            return (f"{st.vm} {st.nic} is not shaped: give the VM's NIC a QoS profile "
                    "(infrasim vm update … --qos PROFILE)")
        for p in self.profiles.values():
            if st.profile in (p.meta.name, p.meta.id):
                return p
        return f"profile {st.profile!r} is not known yet; try again"

    def action_edit(self) -> None:
        if not self.infra.check_action_allowed("update_qos_profile"):
            return
        target = self.profile_to_edit()
        if isinstance(target, str):
            self.app.notify(target, title="Edit profile", severity="warning")
            return
        core = self.infra.core
        ref = target.meta.id

        async def save(name: str, spec: QosProfileSpec) -> QosProfile:
            prof: QosProfile = await core.update_qos_profile(ref, spec)
            return prof

        def saved(prof: QosProfile | None) -> None:
            if prof is not None:
                self.app.notify(f"{prof.meta.name} saved: applies live to its links",
                                timeout=4)
                self._reload = True

        self.app.push_screen(QosForm(target, save), saved)

    def action_new_profile(self) -> None:
        if not self.infra.check_action_allowed("create_qos_profile"):
            return
        core = self.infra.core

        async def save(name: str, spec: QosProfileSpec) -> QosProfile:
            prof: QosProfile = await core.create_qos_profile(name, spec)
            return prof

        def saved(prof: QosProfile | None) -> None:
            if prof is not None:
                self.app.notify(f"QoS profile {prof.meta.name} created; attach it to a VM's "
                                "NIC to shape it", timeout=6)
                self._reload = True

        self.app.push_screen(QosForm(None, save), saved)

    def action_delete_profile(self) -> None:
        if not self.infra.check_action_allowed("delete_qos_profile"):
            return
        prof = self.selected_profile()
        if prof is None:
            return
        name = prof.meta.name
        users = [self.vm_names.get(v, v) for v in prof.status.attached_vm_ids]
        extra = f"\n\nVMs use it ({', '.join(users)}): the core will refuse." if users else ""

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            core = self.infra.core

            async def work() -> Any:
                return await core.delete_qos_profile(name)

            self.infra.act(work, done=f"QoS profile {name} deleted",
                           then=lambda _r: setattr(self, "_reload", True))

        self.app.push_screen(ConfirmScreen(f"Delete QoS profile {name}?{extra}", yes="Delete"),
                             answered)


__all__ = ["NetworksScreen", "network_line", "row_key", "sorted_links"]
