"""Volumes, the image store and integrity, against real qemu-img, real QEMU and the real guest."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from infrasim_tui.core.digest import blake3_file
from infrasim_tui.core.errors import AlreadyExists, IntegrityError, InvalidSpec, WrongState
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.keys import KeyRing, volume_message
from infrasim_tui.core.model import VM, VMState, VolumeKind, VolumeRequest
from infrasim_tui.core.orchestrator import Orchestrator

from .conftest import BANNER, guest_spec, qemu_pids, run_in_guest

MIB = 1 << 20


def raw_image(path: Path, marker: bytes, size: int = 8 * MIB) -> Path:
    """A raw disk image whose first sector starts with ``marker``."""
    with open(path, "wb") as f:
        f.write(marker.ljust(512, b"\0"))
        f.truncate(size)
    return path


async def read_sector(core: Orchestrator, vm_id: str, dev: str = "vda") -> str:
    out = await run_in_guest(core, vm_id, f"dd if=/dev/{dev} bs=512 count=1 2>/dev/null | "
                             "tr -d '\\000' | head -c 64; echo")
    return out.strip()


async def boot(core: Orchestrator, name: str, kit: GuestKit, disks: list[str]) -> VM:
    vm = await core.create_vm(name, guest_spec(kit, volume_ids=disks), start=True)
    await core.console(vm.meta.id).wait_for(BANNER, 90, start=0)
    return vm


async def test_blank_volumes_resize_and_delete(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    q = await orch.create_volume(VolumeRequest("data", size_bytes=64 * MIB))
    r = await orch.create_volume(VolumeRequest("scratch", size_bytes=32 * MIB, format="raw"))
    assert (q.spec.format, q.status.virtual_size) == ("qcow2", 64 * MIB)
    assert r.spec.format == "raw" and os.path.getsize(r.status.path) == 32 * MIB
    assert [v.meta.name for v in await orch.list_volumes()] == ["data", "scratch"]
    with pytest.raises(AlreadyExists):
        await orch.create_volume(VolumeRequest("data", size_bytes=MIB))
    with pytest.raises(InvalidSpec, match=r"^size_bytes"):
        await orch.create_volume(VolumeRequest("nosize"))
    q = await orch.resize_volume("data", 128 * MIB)
    assert q.status.virtual_size == 128 * MIB
    with pytest.raises(InvalidSpec, match="shrinking"):
        await orch.resize_volume("data", MIB)

    vm = await boot(orch, "user", cloud_kit, ["data"])
    # The guest sees the disk at its new size.
    assert (await run_in_guest(orch, vm.meta.id, "cat /sys/block/vda/size")).strip() == \
        str(128 * MIB // 512)
    with pytest.raises(WrongState, match="in use by VM user"):
        await orch.delete_volume("data")
    await orch.delete_vm("user", force=True)
    await orch.delete_volume("data")
    assert not os.path.exists(q.status.path)


async def test_import_is_stored_once_and_gc_frees_only_unreferenced(
        orch: Orchestrator, tmp_path: Path) -> None:
    a = raw_image(tmp_path / "a.img", b"IMAGE-A")
    b = raw_image(tmp_path / "b.img", b"IMAGE-B", 4 * MIB)
    v1 = await orch.create_volume(VolumeRequest("a1", source=str(a)))
    v2 = await orch.create_volume(VolumeRequest("a2", source=str(a)))
    v3 = await orch.create_volume(VolumeRequest("b1", source=str(b), read_only=True))
    assert v1.status.image_digest == v2.status.image_digest == blake3_file(a)
    assert len(orch.images.list()) == 2  # a stored once, b once
    assert v3.status.path == str(orch.images.path_for(blake3_file(b)))  # read-only: the image
    assert v1.status.path != v2.status.path  # writable: an overlay each
    # A pinned digest that does not match is refused and creates nothing.
    with pytest.raises(IntegrityError, match="digest"):
        await orch.create_volume(VolumeRequest("bad", source=str(b), source_digest="0" * 64))
    assert await orch.store.find(type(v1), "bad") is None
    on_disk = orch.images.path_for(blake3_file(b)).stat().st_blocks * 512  # copies are sparse
    await orch.delete_volume("b1")
    removed, freed = await orch.image_gc()
    assert removed == [blake3_file(b)] and freed == on_disk > 0
    assert [i.digest for i in orch.images.list()] == [blake3_file(a)]
    assert await orch.image_gc() == ([], 0)
    # Deleting a base used by an overlay is refused with the overlay's name.
    await orch.create_volume(VolumeRequest("ro-base", source=str(a), read_only=True))
    await orch.create_volume(VolumeRequest("child", base="ro-base"))
    with pytest.raises(WrongState, match="overlay child"):
        await orch.delete_volume("ro-base")


async def test_ten_vms_on_overlays_of_one_base(orch: Orchestrator, cloud_kit: GuestKit,
                                               tmp_path: Path) -> None:
    img = raw_image(tmp_path / "base.img", b"BASE-MARKER")
    base = await orch.create_volume(VolumeRequest("base", source=str(img), read_only=True))
    await orch.sign_volume("base")
    digest = blake3_file(Path(base.status.path))
    for i in range(10):
        await orch.create_volume(VolumeRequest(f"ov-{i}", base="base"))
    vms = []
    for wave in range(0, 10, 5):  # small waves: boot is CPU-bound on 2 cores
        vms += await asyncio.gather(*(boot(orch, f"o-{i}", cloud_kit, [f"ov-{i}"])
                                      for i in range(wave, wave + 5)))
    assert len(qemu_pids(orch.data.root)) == 10
    for i, vm in enumerate(vms):
        assert await read_sector(orch, vm.meta.id) == "BASE-MARKER"
        await run_in_guest(orch, vm.meta.id, f"echo OVERLAY-{i} | dd of=/dev/vda bs=512 "
                           "count=1 conv=sync 2>/dev/null; sync")
    for i, vm in enumerate(vms):
        assert await read_sector(orch, vm.meta.id) == f"OVERLAY-{i}"
    assert blake3_file(Path(base.status.path)) == digest  # the base never changed
    assert (await orch.verify_volume("base")).status.verified == "verified"


async def test_tampered_base_refuses_to_boot(orch: Orchestrator, cloud_kit: GuestKit,
                                             tmp_path: Path) -> None:
    img = raw_image(tmp_path / "base.img", b"GOOD")
    base = await orch.create_volume(VolumeRequest("base", source=str(img), read_only=True))
    await orch.sign_volume("base")
    await orch.create_volume(VolumeRequest("ov", base="base"))
    vm = await boot(orch, "t1", cloud_kit, ["ov"])
    await orch.stop_vm("t1", force=True)
    # Flip one byte of the stored image (it is 0444; root may still write it).
    path = Path(base.status.path)
    with open(path, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=r"volume 'base'.*(modified|does not match)"):
        await orch.start_vm("t1")
    vm = await orch.get_vm("t1")
    assert vm.status.state == VMState.STOPPED and qemu_pids(orch.data.root) == []
    events = [e for e in await orch.store.events(vm.meta.id) if e.type == "vm.start_refused"]
    assert events and "base" in events[-1].message
    assert (await orch.get_volume("base")).status.verified == "mismatch"


async def test_untrusted_signature_refuses_until_the_key_is_trusted(
        orch: Orchestrator, cloud_kit: GuestKit, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "vendor.img", b"VENDOR")
    vendor = KeyRing(tmp_path / "vendor-keys")
    digest = blake3_file(img)
    sig = vendor.sign(volume_message(digest))
    await orch.create_volume(VolumeRequest("vendor", source=str(img), read_only=True,
                                           signature=sig,
                                           public_key=vendor.host_public_key()))
    await orch.create_volume(VolumeRequest("mine", base="vendor"))
    await orch.create_vm("v1", guest_spec(cloud_kit, volume_ids=["mine"]))
    with pytest.raises(IntegrityError, match="untrusted key"):
        await orch.start_vm("v1")
    assert (await orch.get_vm("v1")).status.state == VMState.STOPPED
    assert (await orch.get_volume("vendor")).status.verified == "untrusted"
    orch.add_key("vendor", vendor.host_public_key())
    vm = await orch.start_vm("v1")
    await orch.console(vm.meta.id).wait_for(BANNER, 60, start=0)
    assert await read_sector(orch, vm.meta.id) == "VENDOR"


async def test_weights_volume_is_read_only_and_must_be_signed(
        orch: Orchestrator, cloud_kit: GuestKit, tmp_path: Path) -> None:
    w = raw_image(tmp_path / "weights.bin", b"WEIGHTS-V1", 2 * MIB)
    vol = await orch.create_volume(VolumeRequest("llm", source=str(w),
                                                 kind=VolumeKind.WEIGHTS))
    assert vol.spec.read_only
    await orch.create_volume(VolumeRequest("root", size_bytes=16 * MIB))
    await orch.create_vm("w1", guest_spec(cloud_kit, volume_ids=["root", "llm"]))
    with pytest.raises(IntegrityError, match="holds weights and is not signed"):
        await orch.start_vm("w1")
    await orch.sign_volume("llm")
    vm = await orch.start_vm("w1")
    await orch.console(vm.meta.id).wait_for(BANNER, 60, start=0)
    assert await read_sector(orch, vm.meta.id, "vdb") == "WEIGHTS-V1"
    assert (await run_in_guest(orch, vm.meta.id, "cat /sys/block/vdb/ro")).strip() == "1"
    out = await run_in_guest(orch, vm.meta.id, "echo X | dd of=/dev/vdb 2>&1; echo rc=$?")
    assert "rc=0" not in out
    # Verdicts are cached once the file's timestamps are old enough to trust (racy-git rule):
    # an unchanged image is then not hashed again.
    await asyncio.sleep(2.1)
    await orch.verify_volume("llm")
    assert orch.volumes.verdicts.get(Path(vol.status.path)) == blake3_file(w)


async def test_http_import_pinned_to_a_digest(orch: Orchestrator, tmp_path: Path) -> None:
    import http.server
    import threading

    img = raw_image(tmp_path / "served.img", b"FROM-HTTP")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/served.img"
        v = await orch.create_volume(VolumeRequest("web", source=url,
                                                   source_digest=blake3_file(img)))
        assert v.status.image_digest == blake3_file(img)
        with pytest.raises(IntegrityError):
            await orch.create_volume(VolumeRequest("web2", source=url, source_digest="1" * 64))
        assert list(orch.images.tmp_dir().iterdir()) == []
    finally:
        server.shutdown()


async def test_a_base_is_never_attached_writable(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    await orch.create_volume(VolumeRequest("wbase", size_bytes=16 * MIB))
    await orch.create_volume(VolumeRequest("wchild", base="wbase"))
    with pytest.raises(InvalidSpec, match=r"volume_ids\[0\].*base of wchild"):
        await orch.create_vm("x", guest_spec(cloud_kit, volume_ids=["wbase"]))
    with pytest.raises(InvalidSpec, match=r"volume_ids\[0\].*ghost"):
        await orch.create_vm("y", guest_spec(cloud_kit, volume_ids=["ghost"]))
    assert await orch.list_vms() == []
