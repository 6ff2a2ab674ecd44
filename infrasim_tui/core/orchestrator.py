"""The core's one facade. Every frontend (CLI, console, API, provider) calls these methods.

An :class:`Orchestrator` owns one data dir (it holds the lock), the store, the event bus and a
:class:`QemuProcess` per live VM. Opening it reattaches to every VM that outlived an earlier
owner and reconciles the store with what it finds, so a crash of our process loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .argv import DiskPlan, LaunchPlan, NicPlan, build_argv, mac_for
from .config import Config
from .console import SerialConsole, last_lines, read_log_tail
from .digest import VerdictCache
from .errors import HostPortInUse, InfraSimError, IntegrityError, InvalidSpec, NotFound, WrongState
from .events import Event, EventBus
from .host import HostFacts, detect_host, qemu_binary_for, resolve_accelerator
from .images import ImageStore
from .keys import KeyRing
from .lifecycle import check_transition
from .lock import DataDirLock
from .metrics import Metrics
from .model import (
    VM,
    Console,
    ConsoleSpec,
    ConsoleStatus,
    LinkStats,
    Machine,
    Network,
    NetworkMode,
    NetworkSpec,
    NicStatus,
    QosProfile,
    QosProfileSpec,
    ResourceMeta,
    Snapshot,
    TrustedKey,
    VMSpec,
    VMState,
    Volume,
    VolumeRequest,
    now,
)
from .networks import NetworkService, allocate_address
from .paths import DataDir
from .qmp import QmpSession
from .qos import QosService
from .snapshots import SnapshotService, node_name
from .store import Store
from .supervisor import ExitInfo, QemuProcess, is_our_qemu, pid_alive, read_pidfile
from .switch import PortConfig, SegmentConfig, Switch, server_address
from .validation import Limits, World, validate_labels, validate_name, validate_vm_spec
from .volumes import Progress, VolumeService

POWERED_OFF_MARKERS = ("reboot: Power down", "reboot: System halted")
DEFAULT_STOP_TIMEOUT = 30.0


@dataclass
class ReattachReport:
    """What opening the core did to reconcile the store with reality."""

    reattached: list[str] = field(default_factory=list)
    reconciled: list[str] = field(default_factory=list)
    orphans_killed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [*self.reattached, *self.reconciled, *self.orphans_killed]


@dataclass(frozen=True)
class VMFiles:
    run_dir: str
    pidfile: str
    qmp_socket: str
    serial_socket: str
    serial_log: str
    stderr_log: str


class Orchestrator:
    """Owns one data dir's VMs. Use :meth:`open` (or ``async with Orchestrator.open(...)``)."""

    def __init__(self, config: Config, store: Store, lock: DataDirLock | None,
                 facts: HostFacts) -> None:
        self.config = config
        self.data = DataDir(config.daemon.data_dir)
        self.store = store
        self._lock = lock
        self.facts = facts
        self.bus = EventBus()
        self.limits = Limits.of_host()
        self.report = ReattachReport()
        self._procs: dict[str, QemuProcess] = {}
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self._state_locks: dict[str, asyncio.Lock] = {}
        self.started_at = time.time()
        self.keys = KeyRing(self.data.keys_dir)
        self.images = ImageStore(config.storage.images_dir)
        self.volumes = VolumeService(store, config.storage.volumes_dir, self.images, self.keys,
                                     VerdictCache(self.data.root / "verdicts.json"),
                                     self._emit_resource)
        self.snapshots = SnapshotService(store, self.keys, self._emit, self._live_qmp)
        self.networks = NetworkService(store, facts.os, self._emit_resource)
        self.metrics = Metrics(self.bus, self._live_pids)
        self.switch = Switch(self.bus.publish)
        self.qos = QosService(store, self._emit_resource, self._qos_applied,
                              self.switch.profile_links)
        self._nic_lock = asyncio.Lock()

    def _live_pids(self) -> list[tuple[str, str, int]]:
        return [(vid, p.name, p.pid) for vid, p in self._procs.items() if p.pid]

    # -- opening and closing ----------------------------------------------------------------

    @classmethod
    async def open(cls, config: Config, *, lock_wait: float = 0.0,
                   reattach: bool = True) -> Orchestrator:
        data = DataDir(config.daemon.data_dir)
        data.ensure()
        lock = DataDirLock(data)
        lock.acquire(wait=lock_wait)
        try:
            store = await Store.open(data.db)
            facts = await detect_host(config.daemon.qemu_path, data.host_facts)
            orch = cls(config, store, lock, facts)
            if reattach:
                await orch._reattach()
            return orch
        except BaseException:
            lock.release()
            raise

    async def close(self) -> None:
        """Let go of every VM (they keep running) and of the data dir."""
        await self.metrics.close()
        await self.switch.close()  # guests keep their sockets; the next owner rebinds ours
        for proc in list(self._procs.values()):
            await proc.detach()
        self._procs.clear()
        await self.store.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def __aenter__(self) -> Orchestrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- events -----------------------------------------------------------------------------

    async def _emit(self, vm: VM, type_: str, message: str, **data: Any) -> None:
        seq = await self.store.append_event("vm", vm.meta.id, vm.meta.name, type_, message, data)
        self.bus.publish(Event(type=type_, kind="vm", resource_id=vm.meta.id,
                               name=vm.meta.name, message=message, data=data, seq=seq))

    async def _emit_resource(self, res: Volume | Network | Console | QosProfile, type_: str,
                             message: str) -> None:
        kind = str(res.kind)
        seq = await self.store.append_event(kind, res.meta.id, res.meta.name, type_, message)
        self.bus.publish(Event(type=type_, kind=kind, resource_id=res.meta.id,
                               name=res.meta.name, message=message, seq=seq))

    def _live_qmp(self, vm_id: str) -> QmpSession | None:
        proc = self._procs.get(vm_id)
        return proc.qmp if proc is not None else None

    async def _set_state(self, vm: VM, state: VMState, reason: str, **status: Any) -> VM:
        """Record a state (and status fields) and announce the transition exactly once.

        Works on the stored record under a per-VM lock, not on the caller's copy: a QMP event
        handler may be recording the same transition concurrently, and a stale copy must not
        overwrite fields (e.g. the current snapshot) that changed since it was read.
        """
        lock = self._state_locks.setdefault(vm.meta.id, asyncio.Lock())
        async with lock:
            return await self._set_state_locked(vm, state, reason, **status)

    async def _set_state_locked(self, vm: VM, state: VMState, reason: str,
                                **status: Any) -> VM:
        stored = await self.store.find(VM, vm.meta.id)
        base = stored if stored is not None else vm
        old = base.status.state
        vm.status = replace(base.status, state=state, reason=reason, **status)
        await self.store.update_status(vm)
        if old != state:
            await self._emit(vm, "vm.state", f"{vm.meta.name}: {old.value} → {state.value}"
                             + (f" ({reason})" if reason else ""),
                             old=old.value, new=state.value, reason=reason)
        return vm

    # -- queries ----------------------------------------------------------------------------

    async def get_vm(self, ref: str) -> VM:
        return await self.store.get(VM, ref)

    async def list_vms(self, labels: dict[str, str] | None = None) -> list[VM]:
        return await self.store.list(VM, labels)

    def console(self, vm_id: str) -> SerialConsole:
        proc = self._procs.get(vm_id)
        if proc is None:
            raise WrongState("the VM is not running, so its console is not live; "
                             "use --log to read what it printed")
        return proc.console

    def qmp_of(self, vm_id: str) -> Any:
        proc = self._procs.get(vm_id)
        if proc is None:
            raise WrongState("the VM is not running")
        return proc.qmp

    async def query_status(self, ref: str) -> str:
        """QMP ``query-status`` through the core (the VM's live run state).

        Live VMs are found in memory by id or name, so this hot path never touches SQLite.
        """
        proc = self._live(ref)
        if proc is None:
            vm = await self.store.get(VM, ref)
            proc = self._procs.get(vm.meta.id)
            if proc is None:
                raise WrongState(f"VM {vm.meta.name!r} is not running")
        result = await proc.qmp.execute("query-status")
        return str(result["status"])

    def _live(self, ref: str) -> QemuProcess | None:
        proc = self._procs.get(ref)
        if proc is None:
            proc = next((p for p in self._procs.values() if p.name == ref), None)
        return proc

    async def console_log(self, ref: str) -> bytes:
        vm = await self.store.get(VM, ref)
        path = self.files(vm).serial_log
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return b""

    async def status(self) -> dict[str, Any]:
        counts = {s.value: 0 for s in VMState}
        for vm in await self.list_vms():
            counts[vm.status.state.value] += 1
        from .. import __version__

        return {
            "version": __version__,
            "data_dir": str(self.data.root),
            "uptime_s": round(time.time() - self.started_at, 3),
            "host": self.facts.to_json(),
            "vms": counts,
        }

    def files(self, vm: VM) -> VMFiles:
        run = self.data.run_dir(vm.meta.id)
        sock = self.data.socket_dir(vm.meta.id)
        return VMFiles(
            run_dir=str(run), pidfile=str(run / "qemu.pid"),
            qmp_socket=str(sock / "qmp.sock"), serial_socket=str(sock / "serial.sock"),
            serial_log=str(run / "serial.log"), stderr_log=str(run / "qemu.log"),
        )

    # -- create / update / delete -----------------------------------------------------------

    async def _world(self) -> World:
        vols = {v.meta.id: v.meta.name for v in await self.store.list(Volume)}
        nets = {n.meta.id: n.meta.name for n in await self.store.list(Network)}
        qos = {q.meta.id: q.meta.name for q in await self.store.list(QosProfile)}
        return World(volumes=vols, networks=nets, qos_profiles=qos)

    async def validate(self, name: str, spec: VMSpec, labels: dict[str, str] | None = None) -> None:
        validate_name(name)
        validate_labels(labels or {})
        validate_vm_spec(spec, limits=self.limits, world=await self._world(),
                         host_os=self.facts.os)
        accel, _ = resolve_accelerator(spec.accelerator, spec.arch, self.facts)
        # The argv builder is pure: a dry run catches plan-level conflicts (e.g. cpu.model=host
        # under tcg) at create time instead of at the first start.
        dry = "/nonexistent/infrasim-dry-run"
        build_argv(LaunchPlan(vm_id="0" * 16, name=name, spec=spec, accel=accel,
                              qemu_binary=self.facts.qemu_binaries.get(spec.arch, "qemu"),
                              qmp_socket=dry, serial_socket=dry, serial_log=dry, pidfile=dry))

    async def create_vm(self, name: str, spec: VMSpec, labels: dict[str, str] | None = None,
                        *, start: bool = False) -> VM:
        await self.validate(name, spec, labels)
        # Volumes are attached by name or id and kept by id, so renames never break a VM.
        spec.volume_ids = await self.volumes.resolve_refs(spec.volume_ids)
        if spec.boot_disk_id:
            (spec.boot_disk_id,) = await self.volumes.resolve_refs([spec.boot_disk_id],
                                                                    "boot_disk_id")
        await self.volumes.check_attachable(name, spec.volume_ids, spec.boot_disk_id)
        await self._resolve_net_refs(spec)
        vm = VM(meta=ResourceMeta(name=name, labels=dict(labels or {})), spec=spec)
        vm = await self.store.create(vm)
        await self._emit(vm, "vm.created", f"{name} created")
        if start:
            vm = await self.start_vm(vm.meta.id)
        return vm

    async def _resolve_net_refs(self, spec: VMSpec) -> None:
        """Networks and QoS profiles are named by name or id and kept by id."""
        spec.network_ids = [(await self.networks.get(ref)).meta.id for ref in spec.network_ids]
        if spec.qos_profile_id:
            spec.qos_profile_id = await self.qos.resolve(spec.qos_profile_id, "qos_profile_id")
        nic_qos = {}
        for net_ref, prof_ref in spec.nic_qos.items():
            net = await self.networks.get(net_ref)
            nic_qos[net.meta.id] = await self.qos.resolve(prof_ref, f"nic_qos.{net_ref}")
        spec.nic_qos = nic_qos

    async def update_vm(self, vm: VM, expected_version: int | None = None) -> VM:
        """Change a VM's spec/labels; applies at its next start, except QoS, which the switch
        applies to the running VM's links at once."""
        await self.validate(vm.meta.name, vm.spec, vm.meta.labels)
        await self._resolve_net_refs(vm.spec)
        async with self._locked(vm.meta.id):
            current = await self.store.get(VM, vm.meta.id)
            vm.status = current.status
            updated = await self.store.update(vm, expected_version)
            await self._emit(updated, "vm.updated", f"{vm.meta.name} updated")
            if vm.meta.id in self._procs:
                updated = await self._reshape(updated)
            return updated

    async def _reshape(self, vm: VM) -> VM:
        """Point a live VM's switch ports at the profiles its spec names now."""
        nics = []
        for nic in vm.status.nics:
            if nic.mode == NetworkMode.SEGMENT:
                pid = vm.spec.nic_qos.get(nic.network_id, vm.spec.qos_profile_id)
                prof = await self.store.find(QosProfile, pid) if pid else None
                for port in self.switch.ports(vm.meta.id):
                    if port.cfg.nic == nic.id:
                        port.set_profile(prof.meta.id if prof else "",
                                         prof.meta.name if prof else "",
                                         prof.spec if prof else None)
                nic = replace(nic, qos_profile_id=prof.meta.id if prof else "")
            nics.append(nic)
        if nics != vm.status.nics:
            vm.status = replace(vm.status, nics=nics)
            vm = await self.store.update_status(vm)
        return vm

    async def delete_vm(self, ref: str, *, force: bool = False) -> None:
        vm = await self.store.get(VM, ref)
        if force and vm.status.state in (VMState.RUNNING, VMState.PAUSED, VMState.PENDING):
            await self.stop_vm(vm.meta.id, force=True)
            vm = await self.store.get(VM, ref)
        async with self._operate(vm.meta.id, "delete") as vm:
            files = self.files(vm)
            for snap in await self.snapshots.of_vm(vm):  # tags live inside the volumes
                with contextlib.suppress(InfraSimError):
                    await self.snapshots.delete(vm, snap.meta.id)
            for con in await self.store.list(Console):
                if con.spec.vm_id == vm.meta.id:
                    await self.store.delete(Console, con.meta.id)
            shutil.rmtree(files.run_dir, ignore_errors=True)
            shutil.rmtree(os.path.dirname(files.qmp_socket), ignore_errors=True)
            await self.store.delete(VM, vm.meta.id)
            await self._emit(vm, "vm.deleted", f"{vm.meta.name} deleted")

    # -- lifecycle --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, vm_id: str) -> AsyncIterator[None]:
        lock = self._vm_locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            yield

    @contextlib.asynccontextmanager
    async def _operate(self, ref: str, op: str) -> AsyncIterator[VM]:
        """Serialise operations on one VM and hand over its fresh record once ``op`` is allowed.

        The record is re-read under the lock: another operation may have just changed it.
        """
        vm = await self.store.get(VM, ref)
        async with self._locked(vm.meta.id):
            vm = await self.store.get(VM, vm.meta.id)
            check_transition(op, vm)
            yield vm

    async def start_vm(self, ref: str, *, paused: bool = False) -> VM:
        """Start QEMU; with ``paused`` the vCPUs never run until :meth:`resume_vm`."""
        async with self._operate(ref, "start") as vm:
            await self.validate(vm.meta.name, vm.spec, vm.meta.labels)
            return await self._start_locked(vm, paused=paused)

    async def _start_locked(self, vm: VM, *, paused: bool = False) -> VM:
        spec = vm.spec
        accel, accel_why = resolve_accelerator(spec.accelerator, spec.arch, self.facts)
        binary = qemu_binary_for(spec.arch, self.facts)
        fields = check_forwards_free(spec)
        await self.volumes.check_attachable(vm.meta.name, spec.volume_ids, spec.boot_disk_id)
        try:
            disks = await self.volumes.disks_for(vm)
        except IntegrityError as exc:
            await self._emit(vm, "vm.start_refused", exc.message)
            raise
        disk_plans = tuple(DiskPlan(node_name=node_name(d.volume.meta.id), path=d.path,
                                    format=d.format, read_only=d.read_only, boot=d.boot)
                           for d in disks)
        files = self.files(vm)
        Path(files.run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(files.qmp_socket).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        async with self._nic_lock:  # two VMs starting at once must not get one address
            nics, nic_status = await self._plan_nics(vm, files)
            plan = LaunchPlan(
                vm_id=vm.meta.id, name=vm.meta.name, spec=spec, accel=accel, qemu_binary=binary,
                qmp_socket=files.qmp_socket, serial_socket=files.serial_socket,
                serial_log=files.serial_log, pidfile=files.pidfile, nics=nics, disks=disk_plans,
            )
            argv = build_argv(plan)
            vm = await self._set_state(
                vm, VMState.PENDING, "starting", pid=0, accelerator=accel.value, argv=argv,
                run_dir=files.run_dir, qmp_socket=files.qmp_socket,
                serial_socket=files.serial_socket, serial_log=files.serial_log,
                last_serial_lines=[], nics=nic_status,
                addresses={n.network: [n.address] for n in nic_status if n.address},
            )
        proc = QemuProcess(vm_id=vm.meta.id, qmp_socket=files.qmp_socket,
                           serial_socket=files.serial_socket, serial_log=files.serial_log,
                           stderr_log=files.stderr_log, pidfile=files.pidfile,
                           name=vm.meta.name)
        try:
            await self._plug(vm, nic_status)
            await proc.spawn(argv, forward_fields=fields)
            if not paused:
                await proc.qmp.execute("cont")
        except InfraSimError as exc:
            self.switch.detach_vm(vm.meta.id)
            if proc.pid and pid_alive(proc.pid):
                proc.kill()
            await self._set_state(vm, VMState.STOPPED, f"start failed: {exc.message}")
            raise
        self._procs[vm.meta.id] = proc
        vm = await self._set_state(vm, VMState.PAUSED if paused else VMState.RUNNING,
                                   f"started{' paused' if paused else ''} ({accel.value}: "
                                   f"{accel_why})",
                                   pid=proc.pid, started_at=now(), stopped_at=0.0,
                                   qemu_version=proc.qmp.version)
        self._watch(vm.meta.id, proc)
        return vm

    def _watch(self, vm_id: str, proc: QemuProcess) -> None:
        async def on_exit(p: QemuProcess, info: ExitInfo) -> None:
            self._procs.pop(vm_id, None)
            self.switch.detach_vm(vm_id)
            vm = await self.store.find(VM, vm_id)
            if vm is None:
                return
            state = VMState.STOPPED if info.clean else VMState.ERROR
            await self._set_state(vm, state, info.reason, pid=0, stopped_at=now(),
                                  last_serial_lines=list(info.last_lines))

        async def on_state(_event: str) -> None:
            await self._sync_run_state(vm_id)

        proc.watch(on_exit, on_state)

    async def _sync_run_state(self, vm_id: str) -> None:
        """Take RUNNING/PAUSED from QEMU itself, not from the order events were handled in:
        a snapshot job stops and resumes the VM in quick succession."""
        proc = self._procs.get(vm_id)
        vm = await self.store.find(VM, vm_id)
        if proc is None or vm is None or vm.status.state not in (VMState.RUNNING,
                                                                 VMState.PAUSED):
            return
        try:
            run = str((await proc.qmp.execute("query-status", timeout=5.0))["status"])
        except InfraSimError:
            return  # QEMU is going away; the exit handler will say why
        state = VMState.RUNNING if run == "running" else VMState.PAUSED
        if state != vm.status.state:
            await self._set_state(vm, state, "paused" if state == VMState.PAUSED else "running")

    async def stop_vm(self, ref: str, *, force: bool = False,
                      timeout: float = DEFAULT_STOP_TIMEOUT) -> VM:
        """Graceful power-off (power button), forced after ``timeout`` seconds."""
        async with self._operate(ref, "stop") as vm:
            await self._stop_locked(vm, force=force, timeout=timeout)
            return await self.store.get(VM, vm.meta.id)

    async def _stop_locked(self, vm: VM, *, force: bool, timeout: float) -> None:
        proc = self._procs.get(vm.meta.id)
        if proc is None:  # nothing live: the record was stale
            await self._set_state(vm, VMState.STOPPED, "stopped (no QEMU process was running)",
                                  pid=0)
            return
        if force:
            await proc.quit("stopped by operator (forced)")
            return
        if vm.status.state == VMState.PAUSED:
            await proc.qmp.execute("cont")  # a paused guest cannot see its power button
        if not await proc.powerdown(timeout):
            await proc.quit(f"stopped by operator (forced after {timeout:g}s: the guest did not "
                            "power off)")

    async def pause_vm(self, ref: str) -> VM:
        return await self._qmp_transition(ref, "pause", "stop", VMState.PAUSED, "paused")

    async def resume_vm(self, ref: str) -> VM:
        return await self._qmp_transition(ref, "resume", "cont", VMState.RUNNING, "resumed")

    async def _qmp_transition(self, ref: str, op: str, cmd: str, state: VMState,
                              reason: str) -> VM:
        async with self._operate(ref, op) as vm:
            await self.qmp_of(vm.meta.id).execute(cmd)
            return await self._set_state(vm, state, reason)

    async def restart_vm(self, ref: str, *, force: bool = False,
                         timeout: float = DEFAULT_STOP_TIMEOUT) -> VM:
        """Power off (gracefully unless ``force``) and start again, so spec changes apply."""
        async with self._operate(ref, "restart") as vm:
            await self._stop_locked(vm, force=force, timeout=timeout)
            vm = await self.store.get(VM, vm.meta.id)
            await self.validate(vm.meta.name, vm.spec, vm.meta.labels)
            return await self._start_locked(vm)

    # -- volumes, images and keys -----------------------------------------------------------

    async def create_volume(self, req: VolumeRequest, progress: Progress | None = None) -> Volume:
        return await self.volumes.create(req, progress or self._progress_events(req.name))

    async def get_volume(self, ref: str) -> Volume:
        return await self.volumes.get(ref)

    async def list_volumes(self) -> list[Volume]:
        return await self.volumes.all()

    async def resize_volume(self, ref: str, size: int) -> Volume:
        return await self.volumes.resize(ref, size)

    async def delete_volume(self, ref: str) -> None:
        await self.volumes.delete(ref)

    async def sign_volume(self, ref: str, progress: Progress | None = None) -> Volume:
        return await self.volumes.sign(ref, progress or self._progress_events(ref))

    async def verify_volume(self, ref: str, progress: Progress | None = None) -> Volume:
        return await self.volumes.verify(ref, progress or self._progress_events(ref))

    def _progress_events(self, name: str) -> Progress:
        """Long volume work (import, download, hashing) reported as live ``volume.progress``
        events, so a client of the API can draw its progress bar. Safe from worker threads;
        at most ten a second, plus the last one."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(done: int, total: int) -> None:
            t = time.monotonic()
            if t - last[0] < 0.1 and done < total:
                return
            last[0] = t
            ev = Event(type="volume.progress", kind="volume", resource_id="", name=name,
                       message=f"{name}: {done}/{total} bytes",
                       data={"done": done, "total": total})
            loop.call_soon_threadsafe(self.bus.publish, ev)

        return report

    async def image_gc(self) -> tuple[list[str], int]:
        return await self.volumes.gc()

    async def image_refs(self) -> dict[str, list[str]]:
        return await self.volumes.image_refs()

    async def list_images(self) -> list[tuple[str, int, list[str]]]:
        """(digest, bytes on disk, names of the volumes using it) per stored image."""
        refs = await self.volumes.image_refs()
        sizes = {i.digest: i.size for i in self.images.list()}
        return [(d, sizes.get(d, 0), users) for d, users in sorted(refs.items())]

    def trusted_keys(self) -> list[TrustedKey]:
        self.keys.ensure_host_key()
        return self.keys.trusted()

    def add_key(self, name: str, public_key: str) -> TrustedKey:
        return self.keys.add(name, public_key)

    def remove_key(self, ref: str) -> None:
        self.keys.remove(ref)

    # -- NICs and the switch ----------------------------------------------------------------

    async def _plan_nics(self, vm: VM, files: VMFiles) -> tuple[tuple[NicPlan, ...],
                                                               list[NicStatus]]:
        """net0 is the USER NIC (port forwards); net1... one per SEGMENT network, in order,
        each with an address on its subnet kept from the previous start when still free."""
        spec = vm.spec
        if spec.machine != Machine.VIRT:
            return (), []
        plans = [NicPlan(id="net0", mode=NetworkMode.USER, mac=mac_for(vm.meta.id, 0),
                         forwards=tuple(spec.port_forwards))]
        status = [NicStatus(id="net0", mode=NetworkMode.USER, mac=plans[0].mac,
                            network="user", address="10.0.2.15/24")]
        previous = {n.network_id: n.address for n in vm.status.nics}
        sock_dir = os.path.dirname(files.qmp_socket)
        others = [v for v in await self.store.list(VM) if v.meta.id != vm.meta.id]
        for nid in spec.network_ids:
            net = await self.networks.get(nid)
            if net.spec.mode == NetworkMode.USER:
                continue
            idx = len(plans)
            nic_id, mac = f"net{idx}", mac_for(vm.meta.id, idx)
            if net.spec.mode != NetworkMode.SEGMENT:
                plans.append(NicPlan(id=nic_id, mode=net.spec.mode, mac=mac,
                                     ifname=net.spec.vmnet_interface))
                status.append(NicStatus(id=nic_id, network_id=net.meta.id,
                                        network=net.meta.name, mode=net.spec.mode, mac=mac))
                continue
            taken = [n.address for v in others for n in v.status.nics
                     if n.network_id == net.meta.id]
            address = allocate_address(net.spec.cidr, taken, previous=previous.get(nid, ""),
                                       reserved=[server_address(net.spec.cidr),
                                                 net.spec.gateway, net.spec.dns])
            plans.append(NicPlan(id=nic_id, mode=NetworkMode.SEGMENT, mac=mac,
                                 local_path=os.path.join(sock_dir, f"{nic_id}.vm"),
                                 remote_path=os.path.join(sock_dir, f"{nic_id}.sw")))
            status.append(NicStatus(id=nic_id, network_id=net.meta.id, network=net.meta.name,
                                    mode=NetworkMode.SEGMENT, mac=mac, address=address,
                                    qos_profile_id=spec.nic_qos.get(nid, spec.qos_profile_id)))
        for plan in plans:
            if plan.local_path:  # a killed QEMU leaves its socket behind; bind would fail
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(plan.local_path)
        return tuple(plans), status

    async def _plug(self, vm: VM, nics: list[NicStatus]) -> None:
        """Give every SEGMENT NIC its switch port (at start, and when reattaching)."""
        sock_dir = os.path.dirname(self.files(vm).qmp_socket)
        for nic in nics:
            if nic.mode != NetworkMode.SEGMENT:
                continue
            net = await self.store.find(Network, nic.network_id)
            if net is None:
                continue
            prof = (await self.store.find(QosProfile, nic.qos_profile_id)
                    if nic.qos_profile_id else None)
            self.switch.attach(
                SegmentConfig(network_id=net.meta.id, network=net.meta.name,
                              cidr=net.spec.cidr, gateway=net.spec.gateway, dns=net.spec.dns,
                              dhcp=net.spec.dhcp),
                PortConfig(network_id=net.meta.id, network=net.meta.name, vm_id=vm.meta.id,
                           vm=vm.meta.name, nic=nic.id, mac=nic.mac,
                           switch_path=os.path.join(sock_dir, f"{nic.id}.sw"),
                           qemu_path=os.path.join(sock_dir, f"{nic.id}.vm"),
                           address=nic.address,
                           profile_id=prof.meta.id if prof else "",
                           profile=prof.meta.name if prof else "",
                           spec=prof.spec if prof else None))

    async def _qos_applied(self, prof: QosProfile) -> None:
        n = self.switch.reprofile(prof.meta.id, prof.meta.name, prof.spec)
        if n:
            self.bus.publish(Event(type="qos_profile.applied", kind="qos_profile",
                                   resource_id=prof.meta.id, name=prof.meta.name,
                                   message=f"{prof.meta.name} applied live to {n} links",
                                   data={"links": n}))

    # -- QoS profiles and link stats --------------------------------------------------------

    async def create_qos_profile(self, name: str, spec: QosProfileSpec,
                                 labels: dict[str, str] | None = None) -> QosProfile:
        return await self.qos.create(name, spec, labels)

    async def get_qos_profile(self, ref: str) -> QosProfile:
        return await self.qos.get(ref)

    async def list_qos_profiles(self) -> list[QosProfile]:
        return await self.qos.all()

    async def update_qos_profile(self, ref: str, spec: QosProfileSpec) -> QosProfile:
        return await self.qos.update(ref, spec)

    async def delete_qos_profile(self, ref: str) -> None:
        await self.qos.delete(ref)

    async def link_stats(self, network: str = "") -> list[LinkStats]:
        """Live per-link, per-direction counters of SEGMENT networks ("" = all)."""
        nid = (await self.networks.get(network)).meta.id if network else ""
        return self.switch.stats(nid)

    # -- networks and consoles --------------------------------------------------------------

    async def create_network(self, name: str, spec: NetworkSpec,
                             labels: dict[str, str] | None = None) -> Network:
        return await self.networks.create(name, spec, labels)

    async def get_network(self, ref: str) -> Network:
        return await self.networks.get(ref)

    async def list_networks(self) -> list[Network]:
        return await self.networks.all()

    async def delete_network(self, ref: str) -> None:
        await self.networks.delete(ref)

    async def create_console(self, vm_ref: str, type_: str = "serial") -> Console:
        """An attachable endpoint for a VM's console (serial now; room for VNC later)."""
        if type_ != "serial":
            raise InvalidSpec("type", f"{type_!r}: only serial consoles exist in this release")
        vm = await self.store.get(VM, vm_ref)
        files = self.files(vm)
        con = Console(meta=ResourceMeta(name=f"{vm.meta.name}-{type_}"),
                      spec=ConsoleSpec(vm_id=vm.meta.id, type=type_),
                      status=ConsoleStatus(path=files.serial_socket, log_path=files.serial_log))
        con = await self.store.create(con)
        await self._emit_resource(con, "console.created", f"{con.meta.name} created")
        return self._console_status(con)

    async def get_console(self, ref: str) -> Console:
        return self._console_status(await self.store.get(Console, ref))

    async def delete_console(self, ref: str) -> None:
        con = await self.store.get(Console, ref)
        await self.store.delete(Console, con.meta.id)
        await self._emit_resource(con, "console.deleted", f"{con.meta.name} deleted")

    def _console_status(self, con: Console) -> Console:
        proc = self._procs.get(con.spec.vm_id)
        con.status.readers = proc.console.reader_count if proc is not None else 0
        return con

    # -- snapshots --------------------------------------------------------------------------

    async def create_snapshot(self, vm_ref: str, name: str, description: str = "") -> Snapshot:
        async with self._operate(vm_ref, "snapshot") as vm:
            snap = await self.snapshots.create(vm, name, description)
            await self._sync_run_state(vm.meta.id)
            return snap

    async def restore_snapshot(self, vm_ref: str, snap_ref: str, *,
                               keep_current: bool = False) -> Snapshot:
        async def overlays_of(vid: str) -> list[str]:
            vol = await self.store.get(Volume, vid)
            return (await self.volumes.users(vol))[1]

        async with self._operate(vm_ref, "snapshot") as vm:
            snap = await self.snapshots.restore(vm, snap_ref, keep_current=keep_current,
                                                overlays_of=overlays_of)
            await self._sync_run_state(vm.meta.id)
            return snap

    async def delete_snapshot(self, vm_ref: str, snap_ref: str) -> None:
        async with self._operate(vm_ref, "snapshot") as vm:
            await self.snapshots.delete(vm, snap_ref)

    async def list_snapshots(self, vm_ref: str) -> list[Snapshot]:
        return await self.snapshots.of_vm(await self.store.get(VM, vm_ref))

    async def get_snapshot(self, vm_ref: str, snap_ref: str) -> Snapshot:
        return await self.snapshots.get(await self.store.get(VM, vm_ref), snap_ref)

    async def snapshot_tree(self, vm_ref: str) -> str:
        return await self.snapshots.tree(await self.store.get(VM, vm_ref))

    async def verify_snapshots(self, vm_ref: str) -> list[str]:
        return await self.snapshots.verify(await self.store.get(VM, vm_ref))

    # -- reattach ---------------------------------------------------------------------------

    async def _reattach(self) -> None:
        """Find every VM that outlived an earlier owner; reconcile the store with reality."""
        vms = await self.store.list(VM)
        known = {vm.meta.id for vm in vms}
        await asyncio.gather(*(self._reattach_one(vm) for vm in vms))
        await self._kill_orphans(known)
        for vm in await self.store.list(VM):
            if vm.spec.volume_ids and vm.status.state != VMState.PENDING:
                with contextlib.suppress(InfraSimError):
                    self.report.reconciled += await self.snapshots.reconcile(vm)

    async def _reattach_one(self, vm: VM) -> None:
        files = self.files(vm)
        pid = read_pidfile(files.pidfile) or vm.status.pid
        if pid and is_our_qemu(pid, files.qmp_socket):
            proc = QemuProcess(vm_id=vm.meta.id, qmp_socket=files.qmp_socket,
                               serial_socket=files.serial_socket, serial_log=files.serial_log,
                               stderr_log=files.stderr_log, pidfile=files.pidfile,
                               name=vm.meta.name)
            try:
                await proc.adopt(pid)
                run = str((await proc.qmp.execute("query-status"))["status"])
                if run == "prelaunch" and vm.status.state == VMState.PENDING:
                    # the earlier owner died between spawn and cont: finish the start
                    await proc.qmp.execute("cont")
                    run = "running"
            except InfraSimError as exc:
                await proc.detach()
                self.report.reconciled.append(f"{vm.meta.name}: QEMU pid {pid} is alive but "
                                              f"does not answer QMP ({exc.message})")
                await self._set_state(vm, VMState.ERROR, f"QEMU pid {pid} does not answer QMP: "
                                      f"{exc.message}", pid=pid)
                return
            state = (VMState.PAUSED if run in ("paused", "suspended", "prelaunch")
                     else VMState.RUNNING)
            was = vm.status.state
            self._procs[vm.meta.id] = proc
            with contextlib.suppress(InfraSimError, OSError):
                await self._plug(vm, vm.status.nics)  # the guests' traffic resumes
            if was != state or vm.status.pid != pid:  # a routine reattach writes nothing
                await self._set_state(vm, state, f"reattached (record said {was.value})",
                                      pid=pid, qemu_version=proc.qmp.version)
            self._watch(vm.meta.id, proc)
            line = f"reattached {vm.meta.name} (pid {pid}, {state.value})"
            self.report.reattached.append(line)
            # Announced on the bus, not persisted: with the in-process CLI every command
            # reattaches, and the event log would fill with routine lines.
            self.bus.publish(Event(type="vm.reattached", kind="vm", resource_id=vm.meta.id,
                                   name=vm.meta.name, message=line, data={"pid": pid}))
            return
        # Not running: make sure the store says so, with the best reason we can give.
        stale = [files.qmp_socket, files.serial_socket, files.pidfile]
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if vm.status.state in (VMState.RUNNING, VMState.PAUSED, VMState.PENDING):
            tail = read_log_tail(files.serial_log)
            lines = last_lines(tail, 10)
            text = tail.decode("utf-8", "replace")
            if vm.status.state == VMState.PENDING and not pid:
                state, why = VMState.STOPPED, "start was interrupted before QEMU ran"
            elif any(m in text for m in POWERED_OFF_MARKERS):
                state, why = VMState.STOPPED, "guest powered off while no InfraSim process watched"
            else:
                state, why = VMState.ERROR, (f"QEMU (pid {pid}) exited while no InfraSim process "
                                             "watched it")
            await self._set_state(vm, state, why, pid=0, stopped_at=now(),
                                  last_serial_lines=lines)
            self.report.reconciled.append(f"{vm.meta.name}: {why} → {state.value}")
            await self._emit(vm, "vm.reconciled", why, pid=pid)

    async def _kill_orphans(self, known: set[str]) -> None:
        """A run dir without a VM record whose QEMU lives: nobody can manage it, so end it."""
        root = self.data.run_root
        if not root.is_dir():
            return
        for entry in root.iterdir():
            if entry.name in known or not entry.is_dir():
                continue
            pid = read_pidfile(entry / "qemu.pid")
            sock = str(self.data.socket_dir(entry.name) / "qmp.sock")
            if pid and is_our_qemu(pid, sock):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                line = f"killed orphan QEMU pid {pid} (no VM record for {entry.name})"
                self.report.orphans_killed.append(line)
                seq = await self.store.append_event("vm", entry.name, "", "vm.orphan_killed",
                                                    line, {"pid": pid})
                self.bus.publish(Event(type="vm.orphan_killed", kind="vm",
                                       resource_id=entry.name, name="", message=line,
                                       data={"pid": pid}, seq=seq))
            shutil.rmtree(entry, ignore_errors=True)
            shutil.rmtree(self.data.socket_dir(entry.name), ignore_errors=True)


def check_forwards_free(spec: VMSpec) -> dict[int, str]:
    """Refuse a start whose forwarded host ports are taken, before QEMU trips over them."""
    fields: dict[int, str] = {}
    for i, fwd in enumerate(spec.port_forwards):
        fld = f"port_forwards[{i}].host_port"
        fields[fwd.host_port] = fld
        kind = socket.SOCK_STREAM if fwd.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((fwd.host_addr, fwd.host_port))
            except OSError:
                raise HostPortInUse(fld, fwd.host_port) from None
    return fields


__all__ = ["InvalidSpec", "NotFound", "Orchestrator", "ReattachReport", "check_forwards_free"]
