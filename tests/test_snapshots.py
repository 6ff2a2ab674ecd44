"""Snapshot trees against the real guest: live with memory, stopped with qemu-img, branches,
signed hash chains, refusals, and a crash in the middle of a snapshot."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infrasim_tui.core.config import Config
from infrasim_tui.core.errors import IntegrityError, InvalidSpec, WrongState
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import VM, Snapshot, VMState, VolumeRequest
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.qemu_img import QemuImg
from infrasim_tui.core.snapshot_tree import short_name
from infrasim_tui.core.snapshots import TAG_PREFIX

from .conftest import BANNER, guest_spec, run_in_guest
from .test_volumes import MIB, read_sector

pytestmark = pytest.mark.qemu


async def vm_with_disk(core: Orchestrator, kit: GuestKit, name: str = "s") -> VM:
    await core.create_volume(VolumeRequest(f"{name}-disk", size_bytes=32 * MIB))
    vm = await core.create_vm(name, guest_spec(kit, volume_ids=[f"{name}-disk"]), start=True)
    await core.console(vm.meta.id).wait_for(BANNER, 60, start=0)
    return vm


async def mark(core: Orchestrator, vm: VM, text: str) -> None:
    """A marker on the disk (first sector) and one in RAM (/tmp is tmpfs)."""
    await run_in_guest(core, vm.meta.id, f"echo {text} | dd of=/dev/vda bs=512 count=1 "
                       f"conv=sync 2>/dev/null; sync; echo {text} > /tmp/m")


async def tags(core: Orchestrator, vm: VM) -> set[str]:
    vol = await core.get_volume(vm.spec.volume_ids[0])
    return {s.tag for s in await QemuImg().snapshot_list(vol.status.path, force_share=True)}


async def test_live_snapshot_restore_brings_the_marker_back(orch: Orchestrator,
                                                            cloud_kit: GuestKit) -> None:
    vm = await vm_with_disk(orch, cloud_kit)
    await mark(orch, vm, "ONE")
    s1 = await orch.create_snapshot("s", "s1", "first marker")
    assert s1.status.with_memory and s1.status.tag in await tags(orch, vm)
    await mark(orch, vm, "TWO")
    assert await read_sector(orch, vm.meta.id) == "TWO"
    await orch.restore_snapshot("s", "s1")
    vm = await orch.get_vm("s")
    assert vm.status.state == VMState.RUNNING and vm.status.current_snapshot_id == s1.meta.id
    assert await orch.query_status("s") == "running"  # the guest keeps running
    assert await read_sector(orch, vm.meta.id) == "ONE"
    assert (await run_in_guest(orch, vm.meta.id, "cat /tmp/m")).strip() == "ONE"  # memory too


async def test_branches_tree_and_signed_chain(orch: Orchestrator, cloud_kit: GuestKit,
                                              data_dir: Path) -> None:
    vm = await vm_with_disk(orch, cloud_kit)
    await mark(orch, vm, "A")
    await orch.create_snapshot("s", "base")
    await mark(orch, vm, "B")
    await orch.create_snapshot("s", "left")
    await orch.restore_snapshot("s", "base")
    await mark(orch, vm, "C")
    right = await orch.create_snapshot("s", "right")
    snaps = {short_name(s): s for s in await orch.list_snapshots("s")}
    assert snaps["left"].spec.parent_id == snaps["base"].meta.id
    assert snaps["right"].spec.parent_id == snaps["base"].meta.id  # a branch
    tree = await orch.snapshot_tree("s")
    lines = tree.splitlines()
    assert lines[0] == "s"
    assert lines[1].startswith("└── base")
    assert lines[2].startswith("    ├── left") and lines[3].startswith("    └── right")
    assert lines[3].endswith("◀ current")
    assert len(await orch.verify_snapshots("s")) == 3
    # Restore with a safety snapshot of the current state: it hangs under "right".
    await orch.restore_snapshot("s", "left", keep_current=True)
    safety = [s for s in await orch.list_snapshots("s") if short_name(s).startswith("before-")]
    assert len(safety) == 1 and safety[0].spec.parent_id == right.meta.id
    assert await read_sector(orch, vm.meta.id) == "B"
    # Deleting the root keeps every other snapshot's data and re-seals the chain.
    await orch.delete_snapshot("s", "base")
    assert {short_name(s) for s in await orch.list_snapshots("s")} == \
        {"left", "right", short_name(safety[0])}
    assert len(await orch.verify_snapshots("s")) == 3
    await orch.restore_snapshot("s", "right")
    assert await read_sector(orch, vm.meta.id) == "C"
    # Tampering with the stored tree is detected.
    db = sqlite3.connect(data_dir / "infrasim.db")
    db.execute("UPDATE resources SET spec = json_set(spec, '$.description', 'forged') "
               "WHERE id = ?", (right.meta.id,))
    db.commit()
    db.close()
    with pytest.raises(IntegrityError, match=r"'right'.*changed after it was taken"):
        await orch.verify_snapshots("s")
    with pytest.raises(IntegrityError):
        await orch.restore_snapshot("s", "right")


async def test_stopped_vm_snapshots_use_qemu_img(orch: Orchestrator,
                                                 cloud_kit: GuestKit) -> None:
    vm = await vm_with_disk(orch, cloud_kit)
    await mark(orch, vm, "BEFORE")
    await orch.stop_vm("s", force=True)
    cold = await orch.create_snapshot("s", "cold")
    assert not cold.status.with_memory and cold.status.tag in await tags(orch, vm)
    vm = await orch.start_vm("s")
    await orch.console(vm.meta.id).wait_for(BANNER, 60)
    await mark(orch, vm, "AFTER")
    with pytest.raises(WrongState, match="no memory state"):
        await orch.restore_snapshot("s", "cold")
    await orch.stop_vm("s", force=True)
    await orch.restore_snapshot("s", "cold")
    vm = await orch.start_vm("s")
    await orch.console(vm.meta.id).wait_for(BANNER, 60)
    assert await read_sector(orch, vm.meta.id) == "BEFORE"


async def test_refusals_name_the_problem_and_change_nothing(
        orch: Orchestrator, cloud_kit: GuestKit) -> None:
    await orch.create_volume(VolumeRequest("rawdisk", size_bytes=8 * MIB, format="raw"))
    vm = await orch.create_vm("r", guest_spec(cloud_kit, volume_ids=["rawdisk"]), start=True)
    with pytest.raises(InvalidSpec, match=r"volume_ids\[0\].*'rawdisk' is a writable raw disk"):
        await orch.create_snapshot("r", "x")
    await orch.create_vm("nodisk", guest_spec(cloud_kit))
    with pytest.raises(WrongState, match="no writable qcow2 disk"):
        await orch.create_snapshot("nodisk", "x")
    assert await orch.list_snapshots("r") == []
    assert (await orch.get_vm("r")).status.current_snapshot_id == ""
    del vm


OWNER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from infrasim_tui.core.config import load_config
    from infrasim_tui.core.orchestrator import Orchestrator

    async def main() -> None:
        core = await Orchestrator.open(load_config(data_dir=Path(sys.argv[1]), env={}))
        print("READY", flush=True)
        i = int(sys.argv[2])
        while True:
            await core.create_snapshot("s", f"snap-{i}")
            i += 1

    asyncio.run(main())
""")


async def test_kill_9_during_snapshot_create_leaves_the_tree_consistent(
        config: Config, data_dir: Path, cloud_kit: GuestKit) -> None:
    core = await Orchestrator.open(config)
    vm = await vm_with_disk(core, cloud_kit)
    await mark(core, vm, "KEEP")
    await core.close()
    rng = random.Random(7)
    for round_ in range(3):
        owner = subprocess.Popen([sys.executable, "-c", OWNER, str(data_dir),
                                  str(round_ * 100)], stdout=subprocess.PIPE, text=True)
        assert owner.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 60)
        assert line.strip() == "READY"
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        owner.kill()
        owner.wait()

    core = await Orchestrator.open(config)
    try:
        vm = await core.get_vm("s")
        assert vm.status.state == VMState.RUNNING
        snaps = await core.list_snapshots("s")
        assert snaps, "some snapshots completed"
        on_disk = await tags(core, vm)
        listed = {s.status.tag for s in snaps}
        assert listed <= on_disk  # every listed snapshot is complete
        assert {t for t in on_disk if t.startswith(TAG_PREFIX)} == listed  # no leftovers
        assert len(await core.verify_snapshots("s")) == len(snaps)
        ids = {s.meta.id for s in snaps}
        assert all(s.spec.parent_id in ids or not s.spec.parent_id for s in snaps)
        assert vm.status.current_snapshot_id in ids
        # And the newest snapshot really restores.
        newest = max(snaps, key=lambda s: s.meta.created_at)
        await core.restore_snapshot("s", newest.meta.id)
        assert await read_sector(core, vm.meta.id) == "KEEP"
    finally:
        await core.stop_vm("s", force=True)
        await core.close()


def test_snapshot_record_names_are_per_vm() -> None:
    from infrasim_tui.core.model import ResourceMeta
    from infrasim_tui.core.snapshot_tree import record_name

    s = Snapshot(meta=ResourceMeta(name=record_name("abc", "nightly")))
    assert short_name(s) == "nightly"
