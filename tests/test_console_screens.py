"""The console's Volumes, Events and Create-VM screens and the snapshot tree, driven by Pilot
against a real core on a temp data dir (qemu-img does the storage work; no guest boots)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from rich.style import Style
from textual.app import ComposeResult
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, Label

from infrasim_tui.app import InfraSimApp
from infrasim_tui.core.access import Role
from infrasim_tui.core.errors import InvalidSpec, NotFound, PermissionDenied
from infrasim_tui.core.events import Event
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import VMSpec, VolumeRequest
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.snapshot_tree import short_name
from infrasim_tui.screens import create_vm as create_vm_module
from infrasim_tui.screens.confirm import ConfirmScreen
from infrasim_tui.screens.create_vm import CreateVMScreen, FormValues, build_request, field_of
from infrasim_tui.screens.events import EventsScreen
from infrasim_tui.screens.snapshot_prompt import SnapshotPrompt
from infrasim_tui.screens.volume_forms import ImportVolumeForm, NewVolumeForm
from infrasim_tui.screens.volumes import VolumesScreen
from infrasim_tui.session import Session
from infrasim_tui.widgets.snapshot_tree import SnapshotTree, ago

MIB = 1 << 20
SIZE = (140, 45)


def _has_dashboard() -> bool:
    try:
        importlib.import_module("infrasim_tui.screens.dashboard")
    except ImportError:
        return False
    return True


class ConsoleApp(InfraSimApp):
    """The real app, recording notifications (and without a dashboard if there is none yet)."""

    def __init__(self, session: Session, **kw: Any) -> None:
        super().__init__(session, **kw)
        self.notes: list[str] = []
        self.opened: list[str] = []

    def notify(self, message: str, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        self.notes.append(str(message))
        super().notify(message, *args, **kw)

    async def on_mount(self) -> None:
        if _has_dashboard():
            result = super().on_mount()
            if inspect.isawaitable(result):
                await result

    def open_vm(self, ref: str) -> None:  # the VM screen belongs to another module
        self.opened.append(ref)


@pytest.fixture
async def session(orch: Orchestrator) -> AsyncIterator[Session]:
    s = Session(orch, mode="embedded", data_dir=str(orch.data.root))
    await s.start()
    await asyncio.wait_for(s.connected.wait(), 10)
    try:
        yield s
    finally:
        await s.close()


async def until(pilot: Pilot[Any], pred: Callable[[], bool], timeout: float = 20.0,
                what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def open_screen(pilot: Pilot[Any], screen: Screen[Any]) -> None:
    await pilot.pause()
    pilot.app.push_screen(screen)
    await until(pilot, lambda: pilot.app.screen is screen, what="the screen")
    await pilot.pause()


def table_rows(screen: VolumesScreen) -> dict[str, list[str]]:
    table = screen.query_one(DataTable)
    rows = {}
    for i in range(table.row_count):
        cells = [str(c) for c in table.get_row_at(i)]
        rows[cells[0]] = cells
    return rows


def select_row(screen: VolumesScreen, name: str) -> None:
    table = screen.query_one(DataTable)
    vid = next(v.meta.id for v in screen.volumes.values() if v.meta.name == name)
    table.move_cursor(row=table.get_row_index(vid))
    assert screen.selected_id == vid


def fake_kit(tmp_path: Path) -> GuestKit:
    kdir = tmp_path / "kit"
    kdir.mkdir(exist_ok=True)
    (kdir / "vmlinuz").write_bytes(b"kernel")
    (kdir / "initrd.img").write_bytes(b"initrd")
    return GuestKit(flavour="cloud", kernel=kdir / "vmlinuz", initrd=kdir / "initrd.img",
                    dtb=None, kernel_version="test", cache_key="test")


# --- pure helpers ---------------------------------------------------------------------------


def test_field_mapping_and_parsing() -> None:
    assert field_of("spec.memory_mb", False) == "memory_mb"
    assert field_of("port_forwards[1].host_port", False) == "port_forwards"
    assert field_of("labels.tier", False) == "labels"
    assert field_of("volume_ids[0]", True) == "boot"
    assert field_of("volume_ids[0]", False) == "volumes"
    assert field_of("accelerator", False) == ""
    name, spec, labels = build_request(FormValues(
        name="web", memory_mb="512", port_forwards="8080:80, 2222:22/udp", labels="a=1,b=2",
        boot="disk", volumes="data,disk"))
    assert (name, spec.memory_mb, labels) == ("web", 512, {"a": "1", "b": "2"})
    assert [str(p) for p in spec.port_forwards] == ["127.0.0.1:8080->80/tcp",
                                                    "127.0.0.1:2222->22/udp"]
    assert (spec.volume_ids, spec.boot_disk_id) == (["disk", "data"], "disk")
    with pytest.raises(InvalidSpec, match=r"port_forwards\[1\]"):
        build_request(FormValues(name="web", port_forwards="80:80,nope"))
    assert ago(1000, 1000 + 180) == "3m ago" and ago(0, 3) == "just now"


# --- volumes --------------------------------------------------------------------------------


async def test_volumes_create_import_sign_verify_delete(session: Session, orch: Orchestrator,
                                                       tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(4 * MIB))
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        screen = VolumesScreen()
        await open_screen(pilot, screen)

        # n: a blank volume through the form
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewVolumeForm), what="new form")
        await pilot.press(*"blank1", "enter", *"1G", "enter", "enter")
        await until(pilot, lambda: "blank1" in table_rows(screen), what="blank1 row")
        row = table_rows(screen)["blank1"]
        assert row[1:4] == ["disk", "qcow2", "1.0 GiB"] and row[6] == "never checked"
        assert (await orch.get_volume("blank1")).status.virtual_size == 1 << 30

        # a bad size is refused inline, under the size field
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewVolumeForm), what="new form")
        form = app.screen
        await pilot.press(*"blank2", "enter", *"lots", "enter", "enter")
        await pilot.pause()
        assert app.screen is form and "-empty" not in form.query_one("#size-error").classes
        assert "not a size" in str(form.query_one("#size-error", Label).render())
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen, what="form closed")

        # i: import a local file, read-only so it can be signed, with live progress
        seen: list[tuple[int, int]] = []
        show = screen._show_progress

        def spy(label: str, done: int, total: int) -> None:
            seen.append((done, total))
            show(label, done, total)

        screen._show_progress = spy  # type: ignore[method-assign]
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, ImportVolumeForm), what="import form")
        form = app.screen
        form.query_one("#read-only").value = True  # type: ignore[attr-defined]
        await pilot.press(*"img1", "enter")
        form.query_one("#source", Input).value = str(image)
        await pilot.press("enter", "enter")
        await until(pilot, lambda: "img1" in table_rows(screen), what="img1 row")
        assert any(total > 0 and done == total for done, total in seen), seen
        assert (await orch.get_volume("img1")).spec.read_only
        await until(pilot, lambda: "-idle" in screen.query_one("#volumes-progress").classes,
                    what="progress bar hidden")

        # g: sign (then the core verifies) → verified and signed
        select_row(screen, "img1")
        seen.clear()
        await pilot.press("g")
        await until(pilot, lambda: table_rows(screen)["img1"][6] == "verified",
                    what="img1 verified")
        assert table_rows(screen)["img1"][7] == "yes" and seen
        # v: verify again; the verdict is notified
        await pilot.press("v")
        await until(pilot, lambda: any("img1: verified" in n for n in app.notes),
                    what="verify verdict")
        assert (await orch.get_volume("img1")).status.verified == "verified"

        # enter: details
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "VolumeDetails", what="details")
        body = str(app.screen.query_one("#volume-details-body").render())
        assert "img1" in body and (await orch.get_volume("img1")).status.image_digest in body
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen, what="details closed")

        # d + n: cancelled, nothing happens; d + y: deleted
        select_row(screen, "blank1")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("n")
        await until(pilot, lambda: app.screen is screen, what="confirm closed")
        await pilot.pause(0.3)
        assert "blank1" in table_rows(screen)
        assert (await orch.get_volume("blank1")).meta.name == "blank1"
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: "blank1" not in table_rows(screen), what="blank1 gone")
        with pytest.raises(NotFound):
            await orch.get_volume("blank1")


async def test_volumes_refresh_on_events_from_elsewhere(session: Session,
                                                        orch: Orchestrator) -> None:
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        screen = VolumesScreen()
        await open_screen(pilot, screen)
        await orch.create_volume(VolumeRequest("other", size_bytes=8 * MIB))
        await until(pilot, lambda: "other" in table_rows(screen), what="other row")
        assert isinstance(screen.recreate(), VolumesScreen)


# --- create VM ------------------------------------------------------------------------------


async def test_create_vm_inline_validation_and_create(session: Session, orch: Orchestrator,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kit = fake_kit(tmp_path)
    monkeypatch.setattr(create_vm_module, "find_cached_guest",
                        lambda flavour="cloud": kit if flavour == "cloud" else None)
    await orch.create_volume(VolumeRequest("boot1", size_bytes=8 * MIB))
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        screen = CreateVMScreen()
        await open_screen(pilot, screen)
        await until(pilot, lambda: screen.checks >= 1, what="first check")
        # prefilled from the cached kit; the empty name is what the core objects to first
        assert screen.query_one("#kernel", Input).value == str(kit.kernel)
        assert screen.query_one("#initrd", Input).value == str(kit.initrd)
        assert screen.error is not None and screen.error[0] == "name"
        assert screen.query_one("#create", Button).disabled

        await pilot.press(*"web1")
        assert screen.query_one("#cmdline", Input).value == \
            "infrasim.hostname=web1 cryptomgr.notests"

        async def settle(expect_field: str | None) -> None:
            n = screen.checks
            await until(pilot, lambda: screen.checks > n and screen._debounce is None,
                        what="a check")
            got = screen.error[0] if screen.error else None
            assert got == expect_field, screen.error

        for bad in ("0", "99999999"):
            screen.query_one("#memory_mb", Input).value = bad
            await settle("memory_mb")
            label = screen.query_one("#memory_mb-error", Label)
            assert "-empty" not in label.classes and "MiB" in str(label.render())
            assert "-invalid" in screen.query_one("#memory_mb", Input).classes
            assert screen.query_one("#create", Button).disabled
            assert "ctrl+s" not in {k for k, b in app.screen.active_bindings.items()
                                    if b.enabled}
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            with pytest.raises(NotFound):
                await orch.get_vm("web1")

        screen.query_one("#port_forwards", Input).value = "8080:80,bad"
        await settle("port_forwards")
        screen.query_one("#port_forwards", Input).value = "18080:80"
        screen.query_one("#memory_mb", Input).value = "128"
        screen.query_one("#labels", Input).value = "app=web"
        screen.query_one("#boot").value = "boot1"  # type: ignore[attr-defined]
        await settle(None)
        assert "-invalid" not in screen.query_one("#memory_mb", Input).classes
        assert not screen.query_one("#create", Button).disabled

        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.opened == ["web1"], what="navigation to the VM")
        assert app.screen is not screen
        vm = await orch.get_vm("web1")
        assert vm.spec.memory_mb == 128 and vm.meta.labels == {"app": "web"}
        assert vm.spec.kernel == str(kit.kernel)
        assert vm.spec.port_forwards[0].host_port == 18080
        boot = await orch.get_volume("boot1")
        assert vm.spec.boot_disk_id == boot.meta.id and vm.spec.volume_ids == [boot.meta.id]


async def test_create_vm_names_a_taken_name_and_escape_cancels(
        session: Session, orch: Orchestrator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(create_vm_module, "find_cached_guest", lambda flavour="cloud": None)
    kit = fake_kit(tmp_path)
    await orch.create_vm("taken", VMSpec(kernel=str(kit.kernel)))
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        screen = CreateVMScreen()
        await open_screen(pilot, screen)
        await until(pilot, lambda: screen.checks >= 1, what="first check")
        assert screen.query_one("#kernel", Input).value == ""  # nothing cached: left empty
        screen.query_one("#kernel", Input).value = str(kit.kernel)
        screen.query_one("#name", Input).value = "taken"
        n = screen.checks
        await until(pilot, lambda: screen.checks > n and screen._debounce is None,
                    what="a check")
        assert screen.error is not None and screen.error[0] == "name"
        assert "already exists" in screen.error[1]
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is not screen, what="cancelled")


# --- events ---------------------------------------------------------------------------------


async def test_events_show_live_events_and_filter(session: Session, orch: Orchestrator) -> None:
    await orch.create_volume(VolumeRequest("before", size_bytes=MIB))
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any(e.name == "before" for e in session.recent),
                    what="the first event in the session")
        screen = EventsScreen()
        await open_screen(pilot, screen)
        await until(pilot, lambda: any("before" in ln for ln in screen.visible_lines()),
                    what="recent event replayed")
        await orch.create_volume(VolumeRequest("alpha", size_bytes=MIB))
        await orch.create_volume(VolumeRequest("beta", size_bytes=MIB))
        await until(pilot, lambda: any("beta" in ln for ln in screen.visible_lines()),
                    what="live events")
        line = next(ln for ln in screen.visible_lines() if "alpha" in ln)
        assert "volume" in line and "volume.created" in line and "alpha created" in line
        assert line[2] == "-" and line[8] == ":" and line[11] == ":"  # MM-DD HH:MM:SS first

        await pilot.press("slash")
        assert screen.query_one("#events-filter", Input).has_focus
        await pilot.press(*"alpha")
        await until(pilot, lambda: all("alpha" in ln for ln in screen.visible_lines()),
                    what="filtered")
        assert screen.visible_lines() and not any("beta" in ln
                                                  for ln in screen.visible_lines())
        await pilot.press("enter")  # keeps the filter, back to the log
        await orch.create_volume(VolumeRequest("gamma", size_bytes=MIB))
        await orch.create_volume(VolumeRequest("alpha2", size_bytes=MIB))
        await until(pilot, lambda: any("alpha2" in ln for ln in screen.visible_lines()),
                    what="matching live event")
        assert not any("gamma" in ln for ln in screen.visible_lines())

        await pilot.press("f")
        assert not screen.follow
        await pilot.press("c")
        await pilot.pause()
        assert screen.visible_lines() == []
        assert isinstance(screen.recreate(), EventsScreen)


# --- snapshot tree --------------------------------------------------------------------------


class TreeHost(Screen[None]):
    def __init__(self, ref: str) -> None:
        super().__init__()
        self.ref = ref
        self.reloads = 0

    def compose(self) -> ComposeResult:
        yield SnapshotTree(self.ref, id="tree")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(SnapshotTree).focus()

    def on_snapshot_tree_reloaded(self, event: SnapshotTree.Reloaded) -> None:
        self.reloads += 1


async def stopped_vm_with_disk(orch: Orchestrator, tmp_path: Path, name: str = "s") -> None:
    kit = fake_kit(tmp_path)
    await orch.create_volume(VolumeRequest(f"{name}-disk", size_bytes=32 * MIB))
    await orch.create_vm(name, VMSpec(kernel=str(kit.kernel), volume_ids=[f"{name}-disk"]))


def label_of(tree: SnapshotTree, snap_name: str) -> str:
    for node in tree._snapshot_nodes:
        if node.data is not None and short_name(node.data) == snap_name:
            return tree.render_label(node, Style(), Style()).plain
    raise AssertionError(f"no node {snap_name}")


def cursor_to(tree: SnapshotTree, snap_name: str) -> None:
    node = next(n for n in tree._snapshot_nodes
                if n.data is not None and short_name(n.data) == snap_name)
    tree.move_cursor(node)
    assert tree.highlighted is node.data


async def prompt_snapshot(pilot: Pilot[Any], name: str, description: str) -> None:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, SnapshotPrompt), what="prompt")
    app.screen.query_one("#snapshot-name", Input).value = name
    await pilot.press("enter", *description, "enter")


async def test_snapshot_tree_take_restore_branch_delete_verify(
        session: Session, orch: Orchestrator, tmp_path: Path) -> None:
    await stopped_vm_with_disk(orch, tmp_path)
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        host = TreeHost("s")
        await open_screen(pilot, host)
        tree = host.query_one(SnapshotTree)
        await until(pilot, lambda: tree.vm is not None, what="tree loaded")

        await pilot.press("t")
        await prompt_snapshot(pilot, "one", "first")
        await until(pilot, lambda: len(tree.snapshots) == 1, what="snapshot one")
        one = tree.snapshots[0]
        assert tree.vm is not None and tree.vm.status.current_snapshot_id == one.meta.id
        text = label_of(tree, "one")
        assert "disk" in text and "signed" in text and "first" in text
        assert "◀ current" in text and ("ago" in text or "just now" in text)

        await pilot.press("t")
        await prompt_snapshot(pilot, "two", "")
        await until(pilot, lambda: len(tree.snapshots) == 2, what="snapshot two")
        assert "◀ current" in label_of(tree, "two") and "◀ current" not in label_of(tree, "one")

        # r + y: back to one, with a safety snapshot of the state before
        cursor_to(tree, "one")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        assert "safety snapshot" in str(app.screen.query_one("#question", Label).render())
        await pilot.press("y")
        await until(pilot, lambda: tree.vm is not None
                    and tree.vm.status.current_snapshot_id == one.meta.id
                    and len(tree.snapshots) == 3, what="restored")
        assert tree.highlighted_id == one.meta.id  # the cursor stayed on the same snapshot
        assert any(short_name(s).startswith("before-one") for s in tree.snapshots)
        assert (await orch.get_vm("s")).status.current_snapshot_id == one.meta.id

        # b: branch from two → a new snapshot whose parent is two
        cursor_to(tree, "two")
        two_id = tree.highlighted_id
        await pilot.press("b")
        await prompt_snapshot(pilot, "fork", "a branch")
        await until(pilot, lambda: any(short_name(s) == "fork" for s in tree.snapshots),
                    what="fork")
        fork = next(s for s in tree.snapshots if short_name(s) == "fork")
        assert fork.spec.parent_id == two_id
        assert "◀ current" in label_of(tree, "fork")

        # V: the chain verifies
        await pilot.press("V")
        await until(pilot, lambda: any("snapshot chain verified" in n for n in app.notes),
                    what="verified")

        # d + n keeps it; d + y deletes it
        cursor_to(tree, "two")
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("n")
        await pilot.pause(0.3)
        assert any(short_name(s) == "two" for s in await orch.list_snapshots("s"))
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: not any(short_name(s) == "two" for s in tree.snapshots),
                    what="two deleted")
        assert not any(short_name(s) == "two" for s in await orch.list_snapshots("s"))
        assert fork.spec.parent_id != ""  # still in the tree, moved up to its grandparent


async def test_snapshot_tree_reloads_on_core_events(session: Session, orch: Orchestrator,
                                                    tmp_path: Path) -> None:
    await stopped_vm_with_disk(orch, tmp_path)
    app = ConsoleApp(session)
    async with app.run_test(size=SIZE) as pilot:
        host = TreeHost("s")
        await open_screen(pilot, host)
        tree = host.query_one(SnapshotTree)
        await until(pilot, lambda: tree.vm is not None, what="tree loaded")
        for i in range(3):  # a burst: one reload after it
            await orch.create_snapshot("s", f"ext-{i}")
        await until(pilot, lambda: len(tree.snapshots) == 3, what="external snapshots")
        assert "◀ current" in label_of(tree, "ext-2")
        await pilot.pause(0.3)
        before = host.reloads
        vm = await orch.get_vm("s")
        for _ in range(20):  # a synchronous burst is one reload
            session.inject(Event(type="snapshot.created", kind="vm", resource_id=vm.meta.id,
                                 name="s", message="synthetic"))
        session.inject(Event(type="snapshot.created", kind="vm", resource_id="other",
                             name="other", message="another VM's"))
        await pilot.pause(0.6)
        assert host.reloads == before + 1


# --- roles ----------------------------------------------------------------------------------


async def test_viewer_cannot_delete(session: Session, orch: Orchestrator,
                                    tmp_path: Path) -> None:
    await stopped_vm_with_disk(orch, tmp_path)
    await orch.create_snapshot("s", "keep")
    await orch.create_volume(VolumeRequest("safe", size_bytes=MIB))
    app = ConsoleApp(session, role=Role.VIEWER)
    async with app.run_test(size=SIZE) as pilot:
        screen = VolumesScreen()
        await open_screen(pilot, screen)
        await until(pilot, lambda: "safe" in table_rows(screen), what="rows")
        select_row(screen, "safe")
        keys = app.screen.active_bindings
        assert "d" not in keys and "n" not in keys and "g" not in keys
        await pilot.press("d")
        await pilot.pause(0.2)
        assert app.screen is screen  # no confirmation: the key does nothing
        with pytest.raises(PermissionDenied):
            await app.core.delete_volume("safe")
        assert (await orch.get_volume("safe")).meta.name == "safe"

        host = TreeHost("s")
        await open_screen(pilot, host)
        tree = host.query_one(SnapshotTree)
        await until(pilot, lambda: len(tree.snapshots) == 1, what="tree loaded")
        cursor_to(tree, "keep")
        keys = app.screen.active_bindings
        assert "d" not in keys and "t" not in keys and "V" in keys
        await pilot.press("d")
        await pilot.pause(0.2)
        assert app.screen is host
        with pytest.raises(PermissionDenied):
            await app.core.delete_snapshot("s", "keep")
        assert len(await orch.list_snapshots("s")) == 1


async def test_admin_sees_delete_keys(session: Session, orch: Orchestrator) -> None:
    await orch.create_volume(VolumeRequest("x", size_bytes=MIB))
    app = ConsoleApp(session, role=Role.OPERATOR)
    async with app.run_test(size=SIZE) as pilot:
        screen = VolumesScreen()
        await open_screen(pilot, screen)
        await until(pilot, lambda: "x" in table_rows(screen), what="rows")
        keys = app.screen.active_bindings
        assert "n" in keys and "g" in keys and "d" not in keys  # deleting needs admin
    app = ConsoleApp(session, role=Role.ADMIN)
    async with app.run_test(size=SIZE) as pilot:
        screen = VolumesScreen()
        await open_screen(pilot, screen)
        await until(pilot, lambda: "x" in table_rows(screen), what="rows")
        assert "d" in app.screen.active_bindings
