"""Snapshot trees: internal qcow2 snapshots of every writable disk (plus memory when running),
a parent per snapshot, a "current" marker per VM, and a hash chain signed by the host key.

Running VMs use QMP ``snapshot-save``/``-load``/``-delete`` jobs (errors only arrive through the
job); stopped VMs use ``qemu-img snapshot``. The record is written only after QEMU has finished,
in one transaction with the VM's current marker, so a crash leaves a snapshot either complete and
listed or absent; a tag QEMU wrote for a record that never landed is removed on the next open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from .digest import blake3_bytes
from .errors import IntegrityError, InvalidSpec, NotFound, QemuError, WrongState
from .keys import KeyRing, verify_signature
from .model import (
    VM,
    ResourceMeta,
    Snapshot,
    SnapshotSpec,
    SnapshotStatus,
    VMState,
    Volume,
    new_id,
)
from .qemu_img import QemuImg
from .qmp import QmpSession
from .snapshot_tree import record_name, render_tree, short_name, tree_lines
from .store import Store
from .validation import validate_name

TAG_PREFIX = "infrasim-"
CHAIN_DOMAIN = b"infrasim-snapshot-v1\n"
SIG_DOMAIN = b"infrasim-snapshot-sig-v1\n"
LIVE = (VMState.RUNNING, VMState.PAUSED)
Emit = Callable[[VM, str, str], Awaitable[None]]


def node_name(volume_id: str) -> str:
    """The QEMU block node of a volume, stable across starts (QMP snapshot jobs name nodes)."""
    return f"v{volume_id[:15]}"


def chain_metadata(snap: Snapshot) -> dict[str, Any]:
    return {
        "id": snap.meta.id, "name": short_name(snap), "vm_id": snap.spec.vm_id,
        "parent_id": snap.spec.parent_id, "description": snap.spec.description,
        "created_at": snap.meta.created_at, "tag": snap.status.tag,
        "volume_ids": list(snap.status.volume_ids), "with_memory": snap.status.with_memory,
    }


def chain_hash(parent_chain: str, snap: Snapshot) -> str:
    """Pure: the snapshot's place in its tree, bound to everything it claims."""
    body = json.dumps(chain_metadata(snap), sort_keys=True, separators=(",", ":"))
    return blake3_bytes(CHAIN_DOMAIN + parent_chain.encode() + b"\n" + body.encode())


def signature_message(chain: str) -> bytes:
    return SIG_DOMAIN + chain.encode()


class SnapshotService:
    def __init__(self, store: Store, keys: KeyRing, emit: Emit,
                 live: Callable[[str], QmpSession | None], qemu_img: QemuImg | None = None,
                 ) -> None:
        self.store = store
        self.keys = keys
        self._emit = emit
        self._live = live
        self.qemu_img = qemu_img or QemuImg()

    # -- queries ----------------------------------------------------------------------------

    async def of_vm(self, vm: VM) -> list[Snapshot]:
        snaps = [s for s in await self.store.list(Snapshot) if s.spec.vm_id == vm.meta.id]
        return sorted(snaps, key=lambda s: s.meta.created_at)

    async def get(self, vm: VM, ref: str) -> Snapshot:
        for s in await self.of_vm(vm):
            if ref in (s.meta.id, short_name(s)):
                return s
        raise NotFound("snapshot", f"{vm.meta.name}/{ref}")

    async def tree(self, vm: VM) -> str:
        return render_tree(vm.meta.name, await self.of_vm(vm), vm.status.current_snapshot_id)

    # -- disks ------------------------------------------------------------------------------

    async def _writable_disks(self, vm: VM) -> list[Volume]:
        """The disks a snapshot covers; refuses (naming the disk) what cannot be snapshotted."""
        disks = []
        for i, vid in enumerate(vm.spec.volume_ids):
            vol = await self.store.get(Volume, vid)
            if vol.spec.read_only:
                continue  # never changes: nothing to capture
            if vol.spec.format != "qcow2":
                raise InvalidSpec(f"volume_ids[{i}]", f"volume {vol.meta.name!r} is a writable "
                                  f"{vol.spec.format} disk, which cannot hold snapshots; attach "
                                  "it read-only or convert it to qcow2")
            disks.append(vol)
        if not disks:
            raise WrongState(f"VM {vm.meta.name!r} has no writable qcow2 disk to hold a "
                             "snapshot; attach one (`--disk`)")
        return disks

    # -- create -----------------------------------------------------------------------------

    async def create(self, vm: VM, name: str, description: str = "") -> Snapshot:
        validate_name(name)
        if any(short_name(s) == name for s in await self.of_vm(vm)):
            raise InvalidSpec("name", f"VM {vm.meta.name!r} already has a snapshot {name!r}")
        disks = await self._writable_disks(vm)
        snap_id = new_id()
        tag = TAG_PREFIX + snap_id
        live = vm.status.state in LIVE
        t0 = time.monotonic()
        if live:
            qmp = self._qmp(vm)
            nodes = [node_name(d.meta.id) for d in disks]
            await qmp.run_job("snapshot-save", {"job-id": f"save-{snap_id}", "tag": tag,
                                                "vmstate": nodes[0], "devices": nodes})
        else:
            done: list[Volume] = []
            try:
                for d in disks:
                    await self.qemu_img.snapshot_create(d.status.path, tag)
                    done.append(d)
            except BaseException:
                for d in done:
                    with contextlib.suppress(QemuError):
                        await self.qemu_img.snapshot_delete(d.status.path, tag)
                raise
        snap = Snapshot(
            meta=ResourceMeta(name=record_name(vm.meta.id, name), id=snap_id),
            spec=SnapshotSpec(vm_id=vm.meta.id, description=description,
                              parent_id=vm.status.current_snapshot_id, include_memory=live),
            status=SnapshotStatus(state="ready", vm_state=vm.status.state.value, tag=tag,
                                  volume_ids=[d.meta.id for d in disks], with_memory=live),
        )
        await self._seal(snap)
        async with self.store.transaction():
            snap = await self.store.create(snap)
            fresh = await self.store.get(VM, vm.meta.id)
            fresh.status = replace(fresh.status, current_snapshot_id=snap.meta.id)
            await self.store.update_status(fresh)
        took = time.monotonic() - t0
        await self._emit(vm, "snapshot.created",
                         f"{vm.meta.name}: snapshot {name} created in {took:.2f}s")
        return snap

    async def _seal(self, snap: Snapshot) -> None:
        parent_chain = ""
        if snap.spec.parent_id:
            parent = await self.store.find(Snapshot, snap.spec.parent_id)
            parent_chain = parent.status.chain_hash if parent else ""
        chain = chain_hash(parent_chain, snap)
        snap.status.chain_hash = chain
        snap.status.signature = self.keys.sign(signature_message(chain))
        snap.status.public_key = self.keys.host_public_key()

    def _qmp(self, vm: VM) -> QmpSession:
        qmp = self._live(vm.meta.id)
        if qmp is None:
            raise WrongState(f"VM {vm.meta.name!r} is {vm.status.state.value} but has no live "
                             "QEMU; stop it first")
        return qmp

    # -- restore ----------------------------------------------------------------------------

    async def restore(self, vm: VM, ref: str, *, keep_current: bool = False,
                      overlays_of: Callable[[str], Awaitable[list[str]]] | None = None,
                      ) -> Snapshot:
        snap = await self.get(vm, ref)
        disks = await self._writable_disks(vm)
        missing = set(snap.status.volume_ids) - {d.meta.id for d in disks}
        if missing:
            raise WrongState(f"snapshot {short_name(snap)!r} covers volumes this VM no longer "
                             "has attached writable; re-attach them to restore it")
        if overlays_of is not None:
            for vid in snap.status.volume_ids:
                users = await overlays_of(vid)
                if users:
                    raise WrongState(f"restoring would change a volume that is the base of "
                                     f"{', '.join(users)}")
        live = vm.status.state in LIVE
        if live and not snap.status.with_memory:
            raise WrongState(f"snapshot {short_name(snap)!r} holds no memory state (taken while "
                             "the VM was stopped); stop the VM to restore it")
        await self.verify(vm, only=snap)
        if keep_current:
            safety = f"before-{short_name(snap)}-{time.strftime('%H%M%S')}"[:63].rstrip("-")
            await self.create(vm, safety, f"safety snapshot before restoring "
                                          f"{short_name(snap)}")
            vm = await self.store.get(VM, vm.meta.id)
        t0 = time.monotonic()
        if live:
            nodes = [node_name(v) for v in snap.status.volume_ids]
            await self._qmp(vm).run_job("snapshot-load", {
                "job-id": f"load-{snap.meta.id}-{int(time.time())}", "tag": snap.status.tag,
                "vmstate": nodes[0], "devices": nodes})
        else:
            for d in disks:
                if d.meta.id in snap.status.volume_ids:
                    await self.qemu_img.snapshot_apply(d.status.path, snap.status.tag)
        fresh = await self.store.get(VM, vm.meta.id)
        fresh.status = replace(fresh.status, current_snapshot_id=snap.meta.id)
        await self.store.update_status(fresh)
        await self._emit(vm, "snapshot.restored", f"{vm.meta.name}: restored "
                         f"{short_name(snap)} in {time.monotonic() - t0:.2f}s")
        return snap

    # -- delete -----------------------------------------------------------------------------

    async def delete(self, vm: VM, ref: str) -> None:
        """Drop one snapshot. Its data stays wherever another snapshot needs it (qcow2 refcounts
        clusters per snapshot); its children move up to its parent and are re-sealed."""
        snap = await self.get(vm, ref)
        await self._drop_tag(vm, snap.status.tag, snap.status.volume_ids)
        snaps = await self.of_vm(vm)
        async with self.store.transaction():
            for child in snaps:
                if child.spec.parent_id == snap.meta.id:
                    child.spec.parent_id = snap.spec.parent_id
                    await self.store.update(child)
            await self.store.delete(Snapshot, snap.meta.id)
            if vm.status.current_snapshot_id == snap.meta.id:
                fresh = await self.store.get(VM, vm.meta.id)
                fresh.status = replace(fresh.status, current_snapshot_id=snap.spec.parent_id)
                await self.store.update_status(fresh)
            await self._reseal(vm)
        await self._emit(vm, "snapshot.deleted", f"{vm.meta.name}: snapshot "
                         f"{short_name(snap)} deleted")

    async def delete_all(self, vm: VM) -> None:
        for snap in reversed(await self.of_vm(vm)):
            await self.store.delete(Snapshot, snap.meta.id)

    async def _drop_tag(self, vm: VM, tag: str, volume_ids: list[str]) -> None:
        if vm.status.state in LIVE:
            nodes = [node_name(v) for v in volume_ids]
            await self._qmp(vm).run_job("snapshot-delete", {
                "job-id": f"del-{tag[len(TAG_PREFIX):]}-{int(time.time())}", "tag": tag,
                "devices": nodes})
            return
        for vid in volume_ids:
            vol = await self.store.find(Volume, vid)
            if vol is None:
                continue
            tags = {s.tag for s in await self.qemu_img.snapshot_list(vol.status.path)}
            if tag in tags:
                await self.qemu_img.snapshot_delete(vol.status.path, tag)

    async def _reseal(self, vm: VM) -> None:
        """Recompute the chain top-down (after a parent changed) and re-sign."""
        snaps = await self.of_vm(vm)
        for line in tree_lines(snaps, ""):
            snap = await self.store.get(Snapshot, line.snapshot.meta.id)
            old = snap.status.chain_hash
            await self._seal(snap)
            if snap.status.chain_hash != old:
                await self.store.update_status(snap)

    # -- verify and reconcile ---------------------------------------------------------------

    async def verify(self, vm: VM, only: Snapshot | None = None) -> list[str]:
        """Check the tree's hash chain and signatures; raise IntegrityError naming the first
        problem. Returns one line per verified snapshot."""
        snaps = {s.meta.id: s for s in await self.of_vm(vm)}
        ok = []
        targets = [only] if only is not None else list(snaps.values())
        for snap in targets:
            chain = ""
            path = []
            cur: Snapshot | None = snap
            while cur is not None:  # walk to the root, then recompute downwards
                path.append(cur)
                if cur.spec.parent_id and cur.spec.parent_id not in snaps:
                    raise IntegrityError(f"snapshot {short_name(cur)!r} names a parent that "
                                         "does not exist (the tree was edited)")
                cur = snaps.get(cur.spec.parent_id) if cur.spec.parent_id else None
                if len(path) > len(snaps) + 1:
                    raise IntegrityError("the snapshot tree has a cycle (it was edited)")
            for s in reversed(path):
                chain = chain_hash(chain, s)
                if chain != s.status.chain_hash:
                    raise IntegrityError(f"snapshot {short_name(s)!r}: its metadata or its "
                                         "place in the tree was changed after it was taken")
                if not verify_signature(s.status.public_key, signature_message(chain),
                                        s.status.signature):
                    raise IntegrityError(f"snapshot {short_name(s)!r}: signature does not "
                                         "verify")
                if self.keys.is_trusted(s.status.public_key) is None:
                    raise IntegrityError(f"snapshot {short_name(s)!r}: signed by an untrusted "
                                         "key")
            ok.append(f"{short_name(snap)}: chain {snap.status.chain_hash[:16]}… ok")
        current = vm.status.current_snapshot_id
        if only is None and current and current not in snaps:
            raise IntegrityError(f"VM {vm.meta.name!r} marks a current snapshot that does not "
                                 "exist")
        return ok

    async def reconcile(self, vm: VM) -> list[str]:
        """Remove QEMU snapshot tags that have no record (a create interrupted by a crash)."""
        known = {s.status.tag for s in await self.of_vm(vm)}
        said = []
        qmp = self._live(vm.meta.id) if vm.status.state in LIVE else None
        if qmp is not None:
            await _settle_jobs(qmp)
        for vid in vm.spec.volume_ids:
            vol = await self.store.find(Volume, vid)
            if vol is None or vol.spec.read_only or vol.spec.format != "qcow2":
                continue
            try:
                tags = [s.tag for s in await self.qemu_img.snapshot_list(vol.status.path,
                                                                         force_share=True)]
            except QemuError:
                continue
            for tag in tags:
                if tag.startswith(TAG_PREFIX) and tag not in known:
                    if qmp is not None:
                        await qmp.run_job("snapshot-delete", {
                            "job-id": f"gc-{tag[len(TAG_PREFIX):]}", "tag": tag,
                            "devices": [node_name(vid)]})
                    else:
                        await self.qemu_img.snapshot_delete(vol.status.path, tag)
                    said.append(f"{vm.meta.name}: removed unfinished snapshot {tag} from "
                                f"{vol.meta.name}")
        return said


async def _settle_jobs(qmp: QmpSession, timeout: float = 60.0) -> None:
    """Let snapshot jobs an earlier owner started finish, then dismiss them."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = await qmp.execute("query-jobs")
        pending = [j for j in jobs if j.get("status") not in ("concluded", "null")]
        for j in jobs:
            if j.get("status") == "concluded":
                with contextlib.suppress(QemuError):
                    await qmp.execute("job-dismiss", {"id": j["id"]})
        if not pending or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)
