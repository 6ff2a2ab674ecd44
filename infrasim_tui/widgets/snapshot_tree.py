"""One VM's snapshot tree, with the verbs that change it.

The tree is redrawn from the core (never patched locally), so what it shows is what the core
has: a reload keeps the cursor on the same snapshot, and the core's ``snapshot.*`` / ``vm.state``
events for this VM trigger one coalesced reload however many arrive together.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from ..core.errors import InfraSimError
from ..core.events import Event
from ..core.model import VM, Snapshot
from ..core.snapshot_tree import short_name, tree_lines
from ..screens.confirm import ConfirmScreen
from ..screens.snapshot_prompt import SnapshotPrompt, SnapshotRequest
from .core_events import FollowsCore

if TYPE_CHECKING:
    from ..app import InfraSimApp

COALESCE = 0.15  # seconds: a restore emits several events; reload once after the burst
TICK = 30.0  # seconds between repaints of the relative times

#: The role each key needs (the core method it calls).
NEEDS = {"take": "create_snapshot", "restore": "restore_snapshot",
         "branch": "restore_snapshot", "delete": "delete_snapshot"}
ON_SNAPSHOT = ("restore", "branch", "delete")  # keys that act on the highlighted snapshot


def ago(ts: float, now: float) -> str:
    """Pure: ``"just now"``, ``"42s ago"``, ``"3m ago"``, ``"5h ago"``, ``"2d ago"``."""
    s = int(now - ts)
    if s < 5:
        return "just now"
    if s < 120:
        return f"{s}s ago"
    if s < 2 * 3600:
        return f"{s // 60}m ago"
    if s < 2 * 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def default_name(now: float) -> str:
    """A fresh snapshot name suggestion, unique to the second."""
    return "snap-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


class SnapshotTree(FollowsCore, Tree[Snapshot]):
    """The snapshots of ``vm_ref`` (a name or id), depth first, children oldest first."""

    DEFAULT_CSS = """
    SnapshotTree { height: 1fr; }
    SnapshotTree > .snapshot-tree--meta { color: $text-muted; }
    SnapshotTree > .snapshot-tree--current { color: $success; text-style: bold; }
    SnapshotTree > .snapshot-tree--unsigned { color: $warning; }
    SnapshotTree > .snapshot-tree--signed { color: $text-muted; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "snapshot-tree--meta", "snapshot-tree--current", "snapshot-tree--unsigned",
        "snapshot-tree--signed",
    }

    BINDINGS = [
        Binding("t", "take", "Take snapshot"),
        Binding("r", "restore", "Restore"),
        Binding("b", "branch", "Branch"),
        Binding("d", "delete", "Delete"),
        Binding("V", "verify", "Verify chain", key_display="V"),
    ]

    class Reloaded(Message):
        """The tree was redrawn from the core (``current_id`` is the VM's current snapshot)."""

        def __init__(self, tree: SnapshotTree, count: int, current_id: str) -> None:
            super().__init__()
            self.tree = tree
            self.count = count
            self.current_id = current_id

        @property
        def control(self) -> SnapshotTree:
            return self.tree

    def __init__(self, vm_ref: str, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(vm_ref, id=id, classes=classes)
        self.vm_ref = vm_ref
        self.vm: VM | None = None
        self.snapshots: list[Snapshot] = []
        self.guide_depth = 3
        self.auto_expand = False  # enter must not fold a branch away
        self._pending: Timer | None = None
        self._snapshot_nodes: list[TreeNode[Snapshot]] = []

    @property
    def infrasim(self) -> InfraSimApp:
        """The app, typed: screens and widgets reach the core through it."""
        return cast("InfraSimApp", self.app)

    # -- lifecycle --------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.follow_core(self._on_core_event)
        self.set_interval(TICK, self._repaint_times)
        self.schedule_reload(0)


    def _on_core_event(self, ev: Event) -> None:
        """Session listener: runs in the session's task (maybe another app's context), so it
        only filters and hands over to this widget's own message loop."""
        if ev.kind != "vm" or not (ev.type.startswith("snapshot.") or ev.type == "vm.state"):
            return
        ids = {self.vm_ref} | ({self.vm.meta.id, self.vm.meta.name} if self.vm else set())
        if ev.resource_id in ids or ev.name in ids:
            self.call_later(self.schedule_reload)

    def schedule_reload(self, delay: float = COALESCE) -> None:
        """Reload once ``delay`` after the first of a burst of requests."""
        if self._pending is None:
            self._pending = self.set_timer(max(delay, 0.01), self._fire_reload)

    def _fire_reload(self) -> None:
        self._pending = None
        self.run_worker(self.reload(), group="snapshot-tree-reload", exclusive=True,
                        exit_on_error=False)

    # -- data -------------------------------------------------------------------------------

    @property
    def highlighted_id(self) -> str:
        """The id of the snapshot under the cursor ("" on the VM's own line or when empty)."""
        node = self.cursor_node
        return node.data.meta.id if node is not None and node.data is not None else ""

    @property
    def highlighted(self) -> Snapshot | None:
        node = self.cursor_node
        return node.data if node is not None else None

    async def reload(self) -> None:
        """Fetch the VM and its snapshots and redraw, keeping the cursor where it was."""
        core = self.infrasim.core
        keep = self.highlighted_id
        try:
            vm: VM = await core.get_vm(self.vm_ref)
            snaps: list[Snapshot] = await core.list_snapshots(self.vm_ref)
        except InfraSimError as err:
            self.vm, self.snapshots = None, []
            self.clear()
            self.root.set_label(Text(f"{self.vm_ref}: {err.message}"))
            self.refresh_bindings()
            return
        self.vm, self.snapshots = vm, snaps
        current = vm.status.current_snapshot_id
        self.clear()
        state = vm.status.state.value.lower()
        note = "" if snaps else "  (no snapshots: t takes one)"
        if snaps and not current:
            note = "  (current state is not derived from any snapshot)"
        self.root.set_label(Text(f"{vm.meta.name} [{state}]{note}"))
        nodes: dict[str, TreeNode[Snapshot]] = {}
        for line in tree_lines(snaps, current):
            s = line.snapshot
            parent = nodes.get(s.spec.parent_id, self.root)
            nodes[s.meta.id] = parent.add(short_name(s), data=s, expand=True)
        for node in nodes.values():
            node.allow_expand = bool(node.children)
        self._snapshot_nodes = list(nodes.values())
        self.root.expand()
        self._tree_lines  # noqa: B018 - lay the lines out now so the cursor can be placed
        # the same snapshot as before, else the current one, else the first, else the VM
        self.move_cursor(nodes.get(keep) or nodes.get(current) or
                         (self.root.children[0] if self.root.children else self.root))
        self.refresh_bindings()
        self.post_message(self.Reloaded(self, len(snaps), current))

    # -- drawing ----------------------------------------------------------------------------

    def render_label(self, node: TreeNode[Snapshot], base_style: Style, style: Style) -> Text:
        snap = node.data
        if snap is None:
            return super().render_label(node, base_style, style)
        meta = style + self.get_component_rich_style("snapshot-tree--meta", partial=True)
        signed = bool(snap.status.signature)
        sig_style = style + self.get_component_rich_style(
            "snapshot-tree--signed" if signed else "snapshot-tree--unsigned", partial=True)
        now = self.infrasim.clock()
        parts: list[tuple[str, Style] | str] = [(short_name(snap), style)]
        if self.vm is not None and snap.meta.id == self.vm.status.current_snapshot_id:
            parts.append((" ◀ current", style + self.get_component_rich_style(
                "snapshot-tree--current", partial=True)))
        parts += [
            ("  " + ("mem+disk" if snap.status.with_memory else "disk"), meta),
            ("  " + ago(snap.meta.created_at, now), meta),
            ("  " + ("signed" if signed else "unsigned"), sig_style),
        ]
        if snap.spec.description:
            parts.append(("  — " + snap.spec.description, meta))
        return Text.assemble(*parts)

    def _repaint_times(self) -> None:
        for node in self._snapshot_nodes:
            node.refresh()

    # -- keys -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        need = NEEDS.get(action)
        if need is not None and not self.infrasim.can(need):
            return False
        if action in ON_SNAPSHOT and self.highlighted is None:
            return None  # shown, greyed: move to a snapshot first
        if action in (*NEEDS, "verify") and self.vm is None:
            return None
        return True

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[Snapshot]) -> None:
        self.refresh_bindings()

    def _act(self, work: Any, done: str, then: Any = None) -> None:
        def finished(result: Any) -> None:
            self.schedule_reload(0)
            if then is not None:
                then(result)

        self.infrasim.act(work, done=done, then=finished)

    def action_take(self) -> None:
        """Prompt for a name and take a snapshot (loads the VM first if the tree has not)."""
        if self.vm is None:
            async def load_then_take() -> None:
                await self.reload()
                if self.vm is not None:
                    self.action_take()

            self.run_worker(load_then_take(), group="snapshot-tree-take", exit_on_error=False)
            return
        vm = self.vm
        live = vm.status.state.value in ("RUNNING", "PAUSED")
        note = ("The VM is running: memory and disks are saved." if live else
                "The VM is stopped: its disks are saved (no memory).")
        now = self.infrasim.clock()

        def got(req: SnapshotRequest | None) -> None:
            if req is None:
                return
            core = self.infrasim.core
            self._act(lambda: core.create_snapshot(vm.meta.id, req.name, req.description),
                      f"{vm.meta.name}: snapshot {req.name} taken")

        self.app.push_screen(SnapshotPrompt(f"Snapshot {vm.meta.name}", name=default_name(now),
                                            note=note), got)

    def action_restore(self) -> None:
        vm, snap = self.vm, self.highlighted
        if vm is None or snap is None:
            return
        name = short_name(snap)

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            core = self.infrasim.core
            self._act(lambda: core.restore_snapshot(vm.meta.id, snap.meta.id, keep_current=True),
                      f"{vm.meta.name}: restored {name}")

        self.app.push_screen(ConfirmScreen(
            f"Restore {vm.meta.name} to snapshot {name}?\n\nA safety snapshot of the current "
            "state is taken first, so nothing is lost.", yes="Restore", danger=False), answered)

    def action_branch(self) -> None:
        vm, snap = self.vm, self.highlighted
        if vm is None or snap is None:
            return
        name = short_name(snap)
        now = self.infrasim.clock()

        def got(req: SnapshotRequest | None) -> None:
            if req is None:
                return
            core = self.infrasim.core

            async def work() -> Snapshot:
                await core.restore_snapshot(vm.meta.id, snap.meta.id, keep_current=True)
                new: Snapshot = await core.create_snapshot(vm.meta.id, req.name,
                                                           req.description)
                return new

            self._act(work, f"{vm.meta.name}: branch {req.name} started from {name}")

        self.app.push_screen(SnapshotPrompt(
            f"Branch {vm.meta.name} from {name}", name=default_name(now), ok="Branch",
            note=f"Restores {name} (a safety snapshot of the current state is taken first), "
                 "then takes this snapshot there: the first of a new branch."), got)

    def action_delete(self) -> None:
        vm, snap = self.vm, self.highlighted
        if vm is None or snap is None:
            return
        name = short_name(snap)

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            core = self.infrasim.core
            self._act(lambda: core.delete_snapshot(vm.meta.id, snap.meta.id),
                      f"{vm.meta.name}: snapshot {name} deleted")

        self.app.push_screen(ConfirmScreen(
            f"Delete snapshot {name} of {vm.meta.name}?\n\nIts children move up to its parent; "
            "the state it holds is gone.", yes="Delete"), answered)

    def action_verify(self) -> None:
        vm = self.vm
        if vm is None:
            return
        core = self.infrasim.core

        def verdict(lines: list[str]) -> None:
            self.app.notify(f"{vm.meta.name}: snapshot chain verified "
                            f"({len(lines)} snapshot{'s' if len(lines) != 1 else ''})",
                            title="Snapshots", timeout=6)

        self.infrasim.act(lambda: core.verify_snapshots(vm.meta.id), then=verdict)


__all__ = ["SnapshotTree", "ago"]
