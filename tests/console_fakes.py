"""A deterministic in-memory core for rendering tests (SVG snapshots of the console).

:class:`StaticCore` answers the calls the console's screens and widgets make with the real
model dataclasses, built with fixed ids, names, sizes, pids and timestamps, so every frame it
produces is the same on every machine and every run. :func:`static_session` wraps it in a
``mode="static"`` :class:`~infrasim_tui.session.Session` (which never connects anywhere) with
a fixed event history, fixed metric samples and a serial console that replays a fixed boot
log and then waits forever.

Every "ago", uptime and timestamp is relative to :data:`FIXED_NOW`; pass
``clock=lambda: FIXED_NOW`` to the app (see :func:`fixed_clock`). Event lines are printed in
local time, so render with ``TZ=UTC``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from infrasim_tui.core.errors import AlreadyExists, InvalidSpec, NotFound, WrongState
from infrasim_tui.core.events import Event
from infrasim_tui.core.guest import READY_BANNER
from infrasim_tui.core.model import (
    VM,
    Accelerator,
    IntegrityConfig,
    LinkStats,
    LoraLinkStats,
    LoraSpec,
    Machine,
    Network,
    NetworkMode,
    NetworkSpec,
    NetworkStatus,
    PortForward,
    QosProfile,
    QosProfileSpec,
    QosProfileStatus,
    ResourceMeta,
    Snapshot,
    SnapshotSpec,
    SnapshotStatus,
    TrustedKey,
    VMSpec,
    VMState,
    VMStatus,
    Volume,
    VolumeKind,
    VolumeRequest,
    VolumeSpec,
    VolumeStatus,
    to_dict,
)
from infrasim_tui.core.qos import validate_qos_spec
from infrasim_tui.core.snapshot_tree import record_name, short_name
from infrasim_tui.core.validation import (
    Limits,
    World,
    validate_labels,
    validate_name,
    validate_vm_spec,
)
from infrasim_tui.session import Session

FIXED_NOW = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC
MIB = 1 << 20
GIB = 1 << 30
HOUR = 3600.0
DAY = 86400.0
LIMITS = Limits(max_memory_mb=65536, max_cpus=16)  # a fixed "host", whatever runs the tests

# -- fixed ids -------------------------------------------------------------------------------

VM_WEB1 = "7e0b1a5c90d24f01"
VM_WEB2 = "7e0b1a5c90d24f02"
VM_DB1 = "3d2c4b6a8e104a07"
VM_EDGE = "9a41c0ffee5e2b11"
VM_BUILD = "b0d1e5c0a7f3e913"

VOL_BASE = "c0ffee00d15c0001"
VOL_WEB1 = "c0ffee00d15c0002"
VOL_WEIGHTS = "c0ffee00d15c0003"
VOL_DB = "c0ffee00d15c0004"
VOL_SCRATCH = "c0ffee00d15c0005"

NET_LAB = "4e7000000000ab01"
NET_SHOP = "4e7000000000ab02"
NET_LORA = "4e7000000000ab03"

QOS_WAN = "9050000000000001"
QOS_LORA = "9050000000000002"
QOS_LOSSY = "9050000000000003"

SNAP_BASE = "5a0000000000b001"
SNAP_CONFIGURED = "5a0000000000b002"
SNAP_PRE_UPGRADE = "5a0000000000b003"
SNAP_EXPERIMENT = "5a0000000000b004"

HOST_KEY = "3f9a" * 16
PUBLISHER_KEY = "0d1e" * 16
ROGUE_KEY = "ba5e" * 16


def fixed_clock() -> float:
    return FIXED_NOW


def _meta(name: str, id_: str, created: float, **labels: str) -> ResourceMeta:
    return ResourceMeta(name=name, id=id_, labels=dict(labels), created_at=created,
                        updated_at=created, version=1)


# -- the fleet -------------------------------------------------------------------------------


def fleet_vms() -> list[VM]:
    t = FIXED_NOW
    return [
        VM(meta=_meta("web-1", VM_WEB1, t - 3 * DAY, tier="web", app="shop"),
           spec=VMSpec(cpu_cores=2, memory_mb=512, accelerator=Accelerator.TCG,
                       volume_ids=[VOL_WEB1, VOL_WEIGHTS], boot_disk_id=VOL_WEB1,
                       network_ids=[NET_LAB], cmdline="console=ttyAMA0 quiet",
                       port_forwards=[PortForward(8080, 80), PortForward(2222, 22)]),
           status=VMStatus(state=VMState.RUNNING, pid=41207, accelerator="tcg",
                           qemu_version="9.2.0", started_at=t - 3723.0,
                           reason="started by operator",
                           addresses={"lab-net": ["10.0.2.15", "fe80::5054:ff:fe12:3456"]},
                           current_snapshot_id=SNAP_CONFIGURED)),
        VM(meta=_meta("web-2", VM_WEB2, t - 2 * DAY, tier="web", app="shop"),
           spec=VMSpec(cpu_cores=1, memory_mb=256, kernel="/srv/kits/cloud/vmlinuz",
                       initrd="/srv/kits/cloud/initrd.img"),
           status=VMStatus(state=VMState.RUNNING, pid=41388, accelerator="tcg",
                           qemu_version="9.2.0", started_at=t - 45.0)),
        VM(meta=_meta("db-1", VM_DB1, t - 10 * DAY, tier="db"),
           spec=VMSpec(cpu_cores=4, memory_mb=2048, kernel="/srv/kits/cloud/vmlinuz",
                       volume_ids=[VOL_DB]),
           status=VMStatus(state=VMState.PAUSED, pid=39012, accelerator="tcg",
                           qemu_version="9.2.0", started_at=t - 2 * DAY - 2 * HOUR,
                           reason="paused for backup")),
        VM(meta=_meta("edge-pi", VM_EDGE, t - 20 * DAY, tier="edge"),
           spec=VMSpec(machine=Machine.RASPI3B, cpu_cores=4, memory_mb=1024,
                       kernel="/srv/kits/generic/vmlinuz",
                       dtb="/srv/kits/generic/bcm2837-rpi-3-b.dtb"),
           status=VMStatus(state=VMState.STOPPED, stopped_at=t - 600.0,
                           reason="guest powered off")),
        VM(meta=_meta("build", VM_BUILD, t - 1 * DAY),
           spec=VMSpec(cpu_cores=8, memory_mb=4096, volume_ids=[VOL_SCRATCH],
                       boot_disk_id=VOL_SCRATCH),
           status=VMStatus(state=VMState.ERROR, stopped_at=t - 1800.0,
                           reason="refused to start: build-scratch failed its integrity "
                                  "check")),
    ]


def fleet_volumes() -> list[Volume]:
    t = FIXED_NOW
    return [
        Volume(meta=_meta("debian-base", VOL_BASE, t - 30 * DAY, os="debian-12"),
               spec=VolumeSpec(size_bytes=2 * GIB, read_only=True,
                               source="https://images.example.org/debian-12-arm64.qcow2",
                               integrity=IntegrityConfig(public_key=PUBLISHER_KEY,
                                                         signature="a1" * 64)),
               status=VolumeStatus(path="/var/lib/infrasim/images/debian-base.qcow2",
                                   image_digest="e3" * 32, digest="e3" * 32,
                                   virtual_size=2 * GIB, actual_size=612 * MIB,
                                   verified="verified", verified_at=t - 3 * DAY)),
        Volume(meta=_meta("web-1-disk", VOL_WEB1, t - 3 * DAY),
               spec=VolumeSpec(size_bytes=8 * GIB, base_volume_id=VOL_BASE,
                               integrity=IntegrityConfig(public_key=ROGUE_KEY,
                                                         signature="c4" * 64)),
               status=VolumeStatus(path="/var/lib/infrasim/volumes/web-1-disk.qcow2",
                                   image_digest="e3" * 32, digest="77" * 32,
                                   virtual_size=8 * GIB, actual_size=348 * MIB,
                                   verified="untrusted", verified_at=t - 2 * HOUR,
                                   verify_error="signed by a key that is not trusted")),
        Volume(meta=_meta("llm-weights", VOL_WEIGHTS, t - 7 * DAY),
               spec=VolumeSpec(kind=VolumeKind.WEIGHTS, format="raw", size_bytes=1536 * MIB,
                               read_only=True,
                               integrity=IntegrityConfig(public_key=HOST_KEY,
                                                         signature="5e" * 64)),
               status=VolumeStatus(path="/var/lib/infrasim/volumes/llm-weights.raw",
                                   image_digest="9b" * 32, digest="9b" * 32,
                                   virtual_size=1536 * MIB, actual_size=1536 * MIB,
                                   verified="verified", verified_at=t - HOUR)),
        Volume(meta=_meta("db-data", VOL_DB, t - 10 * DAY),
               spec=VolumeSpec(size_bytes=10 * GIB),
               status=VolumeStatus(path="/var/lib/infrasim/volumes/db-data.qcow2",
                                   virtual_size=10 * GIB, actual_size=196 * 1024)),
        Volume(meta=_meta("build-scratch", VOL_SCRATCH, t - DAY),
               spec=VolumeSpec(size_bytes=20 * GIB, source_digest="aa" * 32,
                               integrity=IntegrityConfig(public_key=HOST_KEY,
                                                         signature="0f" * 64)),
               status=VolumeStatus(path="/var/lib/infrasim/volumes/build-scratch.qcow2",
                                   image_digest="aa" * 32, digest="bb" * 32,
                                   virtual_size=20 * GIB, actual_size=3 * GIB + 300 * MIB,
                                   verified="mismatch", verified_at=t - 1800.0,
                                   verify_error="content digest differs from its image")),
    ]


def fleet_networks() -> list[Network]:
    return [Network(meta=_meta("lab-net", NET_LAB, FIXED_NOW - 30 * DAY),
                    spec=NetworkSpec(cidr="10.0.2.0/24", gateway="10.0.2.2", dns="10.0.2.3"),
                    status=NetworkStatus(active=True, attached_vm_ids=[VM_WEB1])),
            Network(meta=_meta("shop-seg", NET_SHOP, FIXED_NOW - 5 * DAY),
                    spec=NetworkSpec(mode=NetworkMode.SEGMENT, cidr="10.10.0.0/24"),
                    status=NetworkStatus(active=True, attached_vm_ids=[VM_WEB1, VM_WEB2])),
            Network(meta=_meta("lora-mesh", NET_LORA, FIXED_NOW - 4 * DAY),
                    spec=NetworkSpec(mode=NetworkMode.SEGMENT, cidr="10.20.0.0/24"),
                    status=NetworkStatus(active=True, attached_vm_ids=[VM_WEB2, VM_DB1]))]


def fleet_qos_profiles() -> list[QosProfile]:
    t = FIXED_NOW
    return [
        QosProfile(meta=_meta("wan-8m", QOS_WAN, t - 5 * DAY),
                   spec=QosProfileSpec(rate_bps=8_000_000, burst_bytes=32 * 1024,
                                       delay_ms=40.0, jitter_ms=5.0, distribution="normal",
                                       loss_pct=0.5, seed=42),
                   status=QosProfileStatus(attached_vm_ids=[VM_WEB1, VM_WEB2], links=4)),
        QosProfile(meta=_meta("lora-sf9", QOS_LORA, t - 4 * DAY),
                   spec=QosProfileSpec(seed=7, lora=LoraSpec(spreading_factor=9,
                                                             distance_m=2000.0,
                                                             duty_cycle_pct=1.0)),
                   status=QosProfileStatus(attached_vm_ids=[VM_WEB2, VM_DB1], links=4)),
        QosProfile(meta=_meta("lossy-ge", QOS_LOSSY, t - DAY),
                   spec=QosProfileSpec(delay_ms=20.0, ge_p_pct=1.0, ge_r_pct=30.0,
                                       duplicate_pct=0.1, reorder_pct=1.0,
                                       direction="egress")),
    ]


LINK_SAMPLES = 120  # 60 s of history at the core's 2 Hz
TRIANGLE = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)


def _tri(k: int, phase: int = 0) -> int:
    """0..10..0 over 40 samples (20 s): a deterministic wave without floating-point maths."""
    return TRIANGLE[((k + phase) // 2) % len(TRIANGLE)]


def _link(net_id: str, net: str, vm_id: str, vm: str, nic: str, direction: str, profile: str,
          k: int, *, base_bps: int, swing_bps: int, phase: int, delay: float,
          drops: dict[str, int], lora: LoraLinkStats | None = None) -> LinkStats:
    bps = base_bps + swing_bps * _tri(k, phase) // 10
    frames = (k + 1) * (bps // 8 // 1000 + 1)
    return LinkStats(network_id=net_id, network=net, vm_id=vm_id, vm=vm, nic=nic,
                     mac=f"52:54:00:{vm_id[-2:]}:{nic[-1]}0:0{len(direction)}",
                     direction=direction, profile=profile, bytes=frames * 1000, frames=frames,
                     throughput_bps=float(bps), queue_bytes=1514 * (_tri(k, phase) // 4),
                     queue_frames=_tri(k, phase) // 4,
                     drops={c: n * (k + 1) // LINK_SAMPLES for c, n in drops.items()},
                     delay_hist=[], delay_p50_ms=delay + _tri(k, phase) / 2,
                     delay_p99_ms=delay + 12 + _tri(k, phase), lora=lora,
                     at=FIXED_NOW - (LINK_SAMPLES - 1 - k) * 0.5)


def link_sample(k: int) -> dict[str, list[LinkStats]]:
    """Sample ``k`` (0..119, the last one at FIXED_NOW) of every segment's links."""
    shop = [
        _link(NET_SHOP, "shop-seg", VM_WEB1, "web-1", "net1", "egress", "wan-8m", k,
              base_bps=300_000, swing_bps=7_500_000, phase=0, delay=40.0,
              drops={"bucket": 310, "loss": 57}),
        _link(NET_SHOP, "shop-seg", VM_WEB1, "web-1", "net1", "ingress", "wan-8m", k,
              base_bps=100_000, swing_bps=900_000, phase=5, delay=40.0, drops={"loss": 4}),
        _link(NET_SHOP, "shop-seg", VM_WEB2, "web-2", "net1", "egress", "wan-8m", k,
              base_bps=50_000, swing_bps=600_000, phase=10, delay=40.0, drops={}),
        _link(NET_SHOP, "shop-seg", VM_WEB2, "web-2", "net1", "ingress", "wan-8m", k,
              base_bps=1_000_000, swing_bps=6_000_000, phase=3, delay=40.0,
              drops={"bucket": 120, "overflow": 9}),
    ]
    sent = k + 1

    def radio(rssi: float, snr: float, lost: int) -> LoraLinkStats:
        return LoraLinkStats(spreading_factor=9, rssi_dbm=rssi, snr_db=snr,
                             airtime_ms=185.344, delivered=sent - sent * lost // 100,
                             lost=sent * lost // 100)

    mesh = [
        _link(NET_LORA, "lora-mesh", VM_WEB2, "web-2", "net2", "egress", "lora-sf9", k,
              base_bps=200, swing_bps=3_000, phase=2, delay=185.0,
              drops={"lora_sensitivity": 6, "collision": 3, "duty_cycle": 11},
              lora=radio(-118.2, -4.5, 8)),
        _link(NET_LORA, "lora-mesh", VM_WEB2, "web-2", "net2", "ingress", "lora-sf9", k,
              base_bps=100, swing_bps=2_000, phase=7, delay=185.0,
              drops={"lora_sensitivity": 2}, lora=radio(-121.7, -7.9, 2)),
        _link(NET_LORA, "lora-mesh", VM_DB1, "db-1", "net1", "egress", "lora-sf9", k,
              base_bps=100, swing_bps=2_000, phase=7, delay=185.0,
              drops={"lora_sensitivity": 2}, lora=radio(-121.7, -7.9, 2)),
        _link(NET_LORA, "lora-mesh", VM_DB1, "db-1", "net1", "ingress", "lora-sf9", k,
              base_bps=200, swing_bps=3_000, phase=2, delay=185.0,
              drops={"collision": 3}, lora=radio(-118.2, -4.5, 8)),
    ]
    return {NET_SHOP: shop, NET_LORA: mesh}


def stats_event(network_id: str, name: str, links: list[LinkStats], ts: float) -> Event:
    """A ``network.stats`` event as the core publishes it (2 Hz per segment with ports)."""
    return Event(type="network.stats", kind="network", resource_id=network_id, name=name,
                 message=f"{name}: {len(links)} links",
                 data={"links": [to_dict(st) for st in links]}, ts=ts)


def fleet_link_stats() -> list[Event]:
    """60 s of ``network.stats`` for both segments, oldest first, the last at FIXED_NOW."""
    names = {NET_SHOP: "shop-seg", NET_LORA: "lora-mesh"}
    events = []
    for k in range(LINK_SAMPLES):
        for net_id, links in link_sample(k).items():
            events.append(stats_event(net_id, names[net_id], links, links[0].at))
    return events


def _snap(id_: str, name: str, parent: str, created: float, *, memory: bool, signed: bool,
          description: str = "") -> Snapshot:
    return Snapshot(
        meta=_meta(record_name(VM_WEB1, name), id_, created),
        spec=SnapshotSpec(vm_id=VM_WEB1, description=description, parent_id=parent,
                          include_memory=memory),
        status=SnapshotStatus(state="ready", size_bytes=(300 if memory else 40) * MIB,
                              vm_state="RUNNING" if memory else "STOPPED",
                              tag=f"infrasim-{id_}", volume_ids=[VOL_WEB1], with_memory=memory,
                              chain_hash=id_ * 4, signature=("d0" * 64) if signed else "",
                              public_key=HOST_KEY if signed else ""))


def fleet_snapshots() -> list[Snapshot]:
    t = FIXED_NOW
    return [
        _snap(SNAP_BASE, "base-install", "", t - 3 * DAY, memory=False, signed=True,
              description="fresh debian 12"),
        _snap(SNAP_CONFIGURED, "configured", SNAP_BASE, t - 26 * HOUR, memory=True,
              signed=True, description="nginx + certs"),
        _snap(SNAP_PRE_UPGRADE, "pre-upgrade", SNAP_CONFIGURED, t - 5 * HOUR, memory=True,
              signed=True),
        _snap(SNAP_EXPERIMENT, "experiment", SNAP_PRE_UPGRADE, t - 2 * HOUR, memory=True,
              signed=False, description="http/3 trial"),
    ]


# -- the core --------------------------------------------------------------------------------


class StaticCore:
    """The subset of the Orchestrator/RemoteCore API the console uses, over fixed data.

    Reads return copies (as the real store does). Mutations change the in-memory state and,
    when :attr:`emit` is set (``static_session`` sets it to ``session.inject``), publish the
    events the real core would, stamped with :attr:`clock`.
    """

    def __init__(self, clock: Callable[[], float] = fixed_clock) -> None:
        self.clock = clock
        self.emit: Callable[[Event], None] | None = None
        self.vms: dict[str, VM] = {v.meta.id: v for v in fleet_vms()}
        self.volumes: dict[str, Volume] = {v.meta.id: v for v in fleet_volumes()}
        self.networks: dict[str, Network] = {n.meta.id: n for n in fleet_networks()}
        self.snapshots: dict[str, Snapshot] = {s.meta.id: s for s in fleet_snapshots()}
        self.qos: dict[str, QosProfile] = {p.meta.id: p for p in fleet_qos_profiles()}
        self.keys = [
            TrustedKey("host", HOST_KEY, "ed25519:" + HOST_KEY[:16], FIXED_NOW - 30 * DAY,
                       True),
            TrustedKey("debian-images", PUBLISHER_KEY, "ed25519:" + PUBLISHER_KEY[:16],
                       FIXED_NOW - 30 * DAY, False),
        ]
        self.calls: list[tuple[str, str]] = []  # (method, ref) of every mutation, for tests

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _find(table: dict[str, Any], kind: str, ref: str) -> Any:
        if ref in table:
            return table[ref]
        for res in table.values():
            if res.meta.name == ref:
                return res
        raise NotFound(kind, ref)

    def _vm(self, ref: str) -> VM:
        vm: VM = self._find(self.vms, "vm", ref)
        return vm

    def _publish(self, vm: VM | Volume, type_: str, message: str, **data: Any) -> None:
        if self.emit is not None:
            kind = "vm" if isinstance(vm, VM) else "volume"
            self.emit(Event(type=type_, kind=kind, resource_id=vm.meta.id, name=vm.meta.name,
                            message=message, data=data, ts=self.clock()))

    def _set_state(self, vm: VM, state: VMState, reason: str = "") -> VM:
        old = vm.status.state
        vm.status.state = state
        vm.status.reason = reason
        now = self.clock()
        if state == VMState.RUNNING and old not in (VMState.RUNNING, VMState.PAUSED):
            vm.status.started_at = now
            vm.status.pid = 50000 + len(self.calls)
            vm.status.accelerator = "tcg"
        if state in (VMState.STOPPED, VMState.ERROR):
            vm.status.stopped_at = now
            vm.status.pid = 0
        vm.meta.version += 1
        self._publish(vm, "vm.state", f"{vm.meta.name}: {old.value} → {state.value}",
                      old=old.value, new=state.value, reason=reason)
        return copy.deepcopy(vm)

    # -- VMs --------------------------------------------------------------------------------

    async def list_vms(self, labels: dict[str, str] | None = None) -> list[VM]:
        vms = [v for v in self.vms.values()
               if all(v.meta.labels.get(k) == val for k, val in (labels or {}).items())]
        return copy.deepcopy(sorted(vms, key=lambda v: v.meta.name))

    async def get_vm(self, ref: str) -> VM:
        return copy.deepcopy(self._vm(ref))

    async def validate(self, name: str, spec: VMSpec,
                       labels: dict[str, str] | None = None) -> None:
        """The core's own pure checks, against this fake's volumes and a fixed host."""
        validate_name(name)
        validate_labels(labels or {})
        world = World(volumes={v.meta.id: v.meta.name for v in self.volumes.values()},
                      networks={n.meta.id: n.meta.name for n in self.networks.values()})
        validate_vm_spec(spec, limits=LIMITS, world=world, host_os="linux",
                         check_file=_check_path)

    async def create_vm(self, name: str, spec: VMSpec, labels: dict[str, str] | None = None,
                        *, start: bool = False) -> VM:
        await self.validate(name, spec, labels)
        if any(v.meta.name == name for v in self.vms.values()):
            raise InvalidSpec("name", f"a VM named {name!r} already exists")
        vid = f"{len(self.vms) + 1:016x}"
        vm = VM(meta=_meta(name, vid, self.clock(), **(labels or {})), spec=spec)
        self.vms[vid] = vm
        self.calls.append(("create_vm", name))
        self._publish(vm, "vm.created", f"{name} created")
        if start:
            return self._set_state(vm, VMState.RUNNING)
        return copy.deepcopy(vm)

    async def delete_vm(self, ref: str, *, force: bool = False) -> None:
        vm = self._vm(ref)
        self.calls.append(("delete_vm", vm.meta.name))
        del self.vms[vm.meta.id]
        self._publish(vm, "vm.deleted", f"{vm.meta.name} deleted")

    async def start_vm(self, ref: str, *, paused: bool = False) -> VM:
        vm = self._vm(ref)
        self.calls.append(("start_vm", vm.meta.name))
        if vm.status.state in (VMState.RUNNING, VMState.PAUSED):
            raise WrongState(f"VM {vm.meta.name!r} is already {vm.status.state.value}")
        return self._set_state(vm, VMState.PAUSED if paused else VMState.RUNNING)

    async def stop_vm(self, ref: str, *, force: bool = False, timeout: float = 30.0) -> VM:
        vm = self._vm(ref)
        self.calls.append(("stop_vm", vm.meta.name))
        return self._set_state(vm, VMState.STOPPED, "killed" if force else "stopped by operator")

    async def pause_vm(self, ref: str) -> VM:
        vm = self._vm(ref)
        self.calls.append(("pause_vm", vm.meta.name))
        if vm.status.state != VMState.RUNNING:
            raise WrongState(f"VM {vm.meta.name!r} is {vm.status.state.value}, not RUNNING")
        return self._set_state(vm, VMState.PAUSED)

    async def resume_vm(self, ref: str) -> VM:
        vm = self._vm(ref)
        self.calls.append(("resume_vm", vm.meta.name))
        if vm.status.state != VMState.PAUSED:
            raise WrongState(f"VM {vm.meta.name!r} is {vm.status.state.value}, not PAUSED")
        return self._set_state(vm, VMState.RUNNING)

    async def restart_vm(self, ref: str, *, force: bool = False,
                         timeout: float = 30.0) -> VM:
        vm = self._vm(ref)
        self.calls.append(("restart_vm", vm.meta.name))
        self._set_state(vm, VMState.STOPPED, "restarting")
        return self._set_state(vm, VMState.RUNNING)

    # -- volumes and networks ---------------------------------------------------------------

    async def list_volumes(self) -> list[Volume]:
        return copy.deepcopy(sorted(self.volumes.values(), key=lambda v: v.meta.name))

    async def get_volume(self, ref: str) -> Volume:
        vol: Volume = self._find(self.volumes, "volume", ref)
        return copy.deepcopy(vol)

    async def create_volume(self, req: VolumeRequest, progress: Any = None) -> Volume:
        validate_name(req.name)
        if any(v.meta.name == req.name for v in self.volumes.values()):
            raise InvalidSpec("name", f"a volume named {req.name!r} already exists")
        vid = f"c0ffee00d15c{len(self.volumes) + 1:04x}"
        vol = Volume(meta=_meta(req.name, vid, self.clock(), **(req.labels or {})),
                     spec=VolumeSpec(kind=req.kind, size_bytes=req.size_bytes,
                                     format=req.format, source=req.source,
                                     read_only=req.read_only),
                     status=VolumeStatus(virtual_size=req.size_bytes, actual_size=196 * 1024))
        self.volumes[vid] = vol
        self.calls.append(("create_volume", req.name))
        self._publish(vol, "volume.created", f"{req.name} created")
        return copy.deepcopy(vol)

    async def delete_volume(self, ref: str) -> None:
        vol: Volume = self._find(self.volumes, "volume", ref)
        self.calls.append(("delete_volume", vol.meta.name))
        del self.volumes[vol.meta.id]
        self._publish(vol, "volume.deleted", f"{vol.meta.name} deleted")

    async def sign_volume(self, ref: str, progress: Any = None) -> Volume:
        vol: Volume = self._find(self.volumes, "volume", ref)
        self.calls.append(("sign_volume", vol.meta.name))
        vol.spec.integrity = IntegrityConfig(public_key=HOST_KEY, signature="5e" * 64)
        vol.status.verified, vol.status.verified_at = "verified", self.clock()
        self._publish(vol, "volume.signed", f"{vol.meta.name} signed with the host key")
        return copy.deepcopy(vol)

    async def verify_volume(self, ref: str, progress: Any = None) -> Volume:
        vol: Volume = self._find(self.volumes, "volume", ref)
        self.calls.append(("verify_volume", vol.meta.name))
        vol.status.verified_at = self.clock()
        return copy.deepcopy(vol)

    async def list_networks(self) -> list[Network]:
        return copy.deepcopy(sorted(self.networks.values(), key=lambda n: n.meta.name))

    async def get_network(self, ref: str) -> Network:
        net: Network = self._find(self.networks, "network", ref)
        return copy.deepcopy(net)

    # -- QoS profiles and link stats --------------------------------------------------------

    def _publish_qos(self, prof: QosProfile, type_: str, message: str) -> None:
        if self.emit is not None:
            self.emit(Event(type=type_, kind="qos_profile", resource_id=prof.meta.id,
                            name=prof.meta.name, message=message, ts=self.clock()))

    async def list_qos_profiles(self) -> list[QosProfile]:
        return copy.deepcopy(sorted(self.qos.values(), key=lambda p: p.meta.name))

    async def get_qos_profile(self, ref: str) -> QosProfile:
        prof: QosProfile = self._find(self.qos, "qos_profile", ref)
        return copy.deepcopy(prof)

    async def create_qos_profile(self, name: str, spec: QosProfileSpec,
                                 labels: dict[str, str] | None = None) -> QosProfile:
        validate_name(name)
        validate_qos_spec(spec)
        if any(p.meta.name == name for p in self.qos.values()):
            raise AlreadyExists("qos_profile", name)
        pid = f"90500000000{len(self.qos) + 1:05x}"
        prof = QosProfile(meta=_meta(name, pid, self.clock(), **(labels or {})),
                          spec=copy.deepcopy(spec))
        self.qos[pid] = prof
        self.calls.append(("create_qos_profile", name))
        self._publish_qos(prof, "qos_profile.created", f"{name} created")
        return copy.deepcopy(prof)

    async def update_qos_profile(self, ref: str, spec: QosProfileSpec) -> QosProfile:
        prof: QosProfile = self._find(self.qos, "qos_profile", ref)
        validate_qos_spec(spec)
        prof.spec = copy.deepcopy(spec)
        prof.meta.version += 1
        self.calls.append(("update_qos_profile", prof.meta.name))
        self._publish_qos(prof, "qos_profile.updated", f"{prof.meta.name} updated (applied live)")
        return copy.deepcopy(prof)

    async def delete_qos_profile(self, ref: str) -> None:
        prof: QosProfile = self._find(self.qos, "qos_profile", ref)
        if prof.status.attached_vm_ids:
            raise WrongState(f"QoS profile {prof.meta.name!r} is used by a VM; detach it first")
        del self.qos[prof.meta.id]
        self.calls.append(("delete_qos_profile", prof.meta.name))
        self._publish_qos(prof, "qos_profile.deleted", f"{prof.meta.name} deleted")

    async def link_stats(self, network: str = "") -> list[LinkStats]:
        sample = link_sample(LINK_SAMPLES - 1)
        if network:
            net: Network = self._find(self.networks, "network", network)
            return copy.deepcopy(sample.get(net.meta.id, []))
        return [st for links in sample.values() for st in links]

    def publish_link_stats(self, network_id: str, links: list[LinkStats]) -> None:
        """Publish one ``network.stats`` sample (tests: a link's traffic changed)."""
        if self.emit is not None:
            net = self.networks[network_id]
            self.emit(stats_event(network_id, net.meta.name,
                                  [dataclasses.replace(st, at=self.clock()) for st in links],
                                  self.clock()))

    def trusted_keys(self) -> list[TrustedKey]:
        return list(self.keys)

    # -- snapshots --------------------------------------------------------------------------

    async def list_snapshots(self, vm_ref: str) -> list[Snapshot]:
        vm = self._vm(vm_ref)
        snaps = [s for s in self.snapshots.values() if s.spec.vm_id == vm.meta.id]
        return copy.deepcopy(sorted(snaps, key=lambda s: s.meta.name))

    async def get_snapshot(self, vm_ref: str, snap_ref: str) -> Snapshot:
        vm = self._vm(vm_ref)
        for s in self.snapshots.values():
            if s.spec.vm_id == vm.meta.id and snap_ref in (s.meta.id, short_name(s)):
                return copy.deepcopy(s)
        raise NotFound("snapshot", f"{vm.meta.name}/{snap_ref}")

    async def create_snapshot(self, vm_ref: str, name: str, description: str = "") -> Snapshot:
        vm = self._vm(vm_ref)
        validate_name(name)
        live = vm.status.state in (VMState.RUNNING, VMState.PAUSED)
        sid = f"5a00000000{len(self.snapshots) + 1:06x}"
        snap = Snapshot(meta=_meta(record_name(vm.meta.id, name), sid, self.clock()),
                        spec=SnapshotSpec(vm_id=vm.meta.id, description=description,
                                          parent_id=vm.status.current_snapshot_id,
                                          include_memory=live),
                        status=SnapshotStatus(state="ready", with_memory=live,
                                              vm_state=vm.status.state.value,
                                              signature="d0" * 64, public_key=HOST_KEY))
        self.snapshots[sid] = snap
        vm.status.current_snapshot_id = sid
        self.calls.append(("create_snapshot", name))
        self._publish(vm, "snapshot.created", f"{vm.meta.name}: snapshot {name} taken",
                      snapshot=name)
        return copy.deepcopy(snap)

    async def restore_snapshot(self, vm_ref: str, snap_ref: str, *,
                               keep_current: bool = False) -> VM:
        vm = self._vm(vm_ref)
        snap = await self.get_snapshot(vm_ref, snap_ref)
        vm.status.current_snapshot_id = snap.meta.id
        self.calls.append(("restore_snapshot", short_name(snap)))
        self._publish(vm, "snapshot.restored",
                      f"{vm.meta.name}: restored snapshot {short_name(snap)}",
                      snapshot=short_name(snap))
        return copy.deepcopy(vm)

    async def delete_snapshot(self, vm_ref: str, snap_ref: str) -> None:
        vm = self._vm(vm_ref)
        snap = await self.get_snapshot(vm_ref, snap_ref)
        for s in self.snapshots.values():
            if s.spec.parent_id == snap.meta.id:
                s.spec.parent_id = snap.spec.parent_id
        del self.snapshots[snap.meta.id]
        self.calls.append(("delete_snapshot", short_name(snap)))
        self._publish(vm, "snapshot.deleted",
                      f"{vm.meta.name}: snapshot {short_name(snap)} deleted")

    async def verify_snapshots(self, vm_ref: str) -> list[str]:
        snaps = await self.list_snapshots(vm_ref)
        return [short_name(s) for s in snaps]


def _check_path(field_name: str, path: str) -> None:
    """validate_vm_spec's file check without touching this machine's disk: paths must be
    absolute, and anything under /srv/kits/ "exists"."""
    if not os.path.isabs(path):
        raise InvalidSpec(field_name, f"{path!r} must be an absolute path")
    if not path.startswith("/srv/kits/"):
        raise InvalidSpec(field_name, f"{path} does not exist or is not a regular file")


# -- the serial console ----------------------------------------------------------------------

GREEN, YELLOW, RED, CYAN, BOLD, DIM, RESET = (
    "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[36m", "\x1b[1m", "\x1b[2m", "\x1b[0m")


def _ok(text: str) -> str:
    return f"[{GREEN}  OK  {RESET}] {text}"


BOOT_LOG_LINES = [
    f"{DIM}[    0.000000]{RESET} Booting Linux on physical CPU 0x0000000000 [0x000f0510]",
    f"{DIM}[    0.000000]{RESET} Linux version 6.1.0-31-cloud-arm64 (gcc-12) #1 SMP Debian",
    f"{DIM}[    0.000000]{RESET} Machine model: linux,dummy-virt",
    f"{DIM}[    0.000000]{RESET} Memory: 478212K/524288K available",
    f"{DIM}[    0.000000]{RESET} rcu: Hierarchical RCU implementation.",
    f"{DIM}[    0.012004]{RESET} Console: colour dummy device 80x25",
    f"{DIM}[    0.031877]{RESET} smp: Brought up 1 node, 2 CPUs",
    f"{DIM}[    0.204113]{RESET} Serial: AMBA PL011 UART driver",
    f"{DIM}[    0.219850]{RESET} 9000000.pl011: ttyAMA0 at MMIO 0x9000000 is a PL011 rev1",
    f"{DIM}[    0.402551]{RESET} virtio_blk virtio1: [vda] 16777216 512-byte logical blocks",
    f"{DIM}[    0.405007]{RESET}  vda: vda1 vda15",
    f"{DIM}[    0.517336]{RESET} {YELLOW}random: crng init done{RESET}",
    f"{DIM}[    0.733190]{RESET} Freeing unused kernel memory: 4224K",
    f"{DIM}[    0.741024]{RESET} Run /init as init process",
    "Loading, please wait...",
    _ok("Mounted /proc, /sys and /dev."),
    _ok("Loaded virtio_net, virtio_blk, virtio_rng."),
    f"[{YELLOW} WARN {RESET}] No hardware clock: time from the host (kvm-clock absent).",
    _ok("Brought up eth0: 10.0.2.15/24 via 10.0.2.2 (udhcpc)."),
    _ok("Started acpid (power key)."),
    f"[{RED}FAILED{RESET}] Mount /mnt/weights: {BOLD}no such device{RESET} (retrying)",
    _ok("Mounted /mnt/weights (read-only)."),
    _ok("Reached target multi-user."),
    "",
    f"{BOLD}{CYAN}{READY_BANNER}{RESET}",
    "kernel=6.1.0-31-cloud-arm64 hostname=web-1",
    "",
    "BusyBox v1.36.1 built-in shell (ash)",
    "",
]
BOOT_LOG = ("\r\n".join(BOOT_LOG_LINES) + "\r\nguest:/# ").encode()


class StaticConsole:
    """A console stream: the fixed boot log as history, then silence forever."""

    def __init__(self, history: bytes) -> None:
        self.history = history
        self.written: list[bytes] = []
        self._closed = asyncio.Event()

    async def read(self) -> bytes | None:
        await self._closed.wait()
        return None

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def close(self) -> None:
        self._closed.set()


# -- the session -----------------------------------------------------------------------------


def fleet_events() -> list[Event]:
    """The fixed history the Events screen and each VM's Events tab show (oldest first)."""
    t = FIXED_NOW
    rows: list[tuple[float, str, str, str, str, str, dict[str, Any]]] = [
        (t - 3 * DAY, "volume.created", "volume", VOL_BASE, "debian-base",
         "debian-base imported (2.0 GiB, blake3 e3e3e3e3…)", {}),
        (t - 3 * DAY + 60, "volume.signed", "volume", VOL_BASE, "debian-base",
         "debian-base signature verified (debian-images)", {}),
        (t - 26 * HOUR, "snapshot.created", "vm", VM_WEB1, "web-1",
         "web-1: snapshot configured taken", {"snapshot": "configured"}),
        (t - 2 * DAY - 2 * HOUR, "vm.state", "vm", VM_DB1, "db-1",
         "db-1: STOPPED → RUNNING", {"old": "STOPPED", "new": "RUNNING"}),
        (t - 5 * HOUR, "snapshot.created", "vm", VM_WEB1, "web-1",
         "web-1: snapshot pre-upgrade taken", {"snapshot": "pre-upgrade"}),
        (t - 2 * HOUR, "snapshot.created", "vm", VM_WEB1, "web-1",
         "web-1: snapshot experiment taken", {"snapshot": "experiment"}),
        (t - 2 * HOUR + 30, "volume.integrity_failed", "volume", VOL_WEB1, "web-1-disk",
         "web-1-disk: signed by a key that is not trusted", {}),
        (t - 3800, "snapshot.restored", "vm", VM_WEB1, "web-1",
         "web-1: restored snapshot configured", {"snapshot": "configured"}),
        (t - 3723, "vm.state", "vm", VM_WEB1, "web-1", "web-1: STOPPED → RUNNING",
         {"old": "STOPPED", "new": "RUNNING"}),
        (t - 1800, "vm.start_refused", "vm", VM_BUILD, "build",
         "build: build-scratch failed its integrity check (content digest differs)", {}),
        (t - 1800 + 1, "vm.state", "vm", VM_BUILD, "build", "build: PENDING → ERROR",
         {"old": "PENDING", "new": "ERROR"}),
        (t - 900, "vm.state", "vm", VM_DB1, "db-1", "db-1: RUNNING → PAUSED (paused for "
         "backup)", {"old": "RUNNING", "new": "PAUSED"}),
        (t - 600, "vm.state", "vm", VM_EDGE, "edge-pi", "edge-pi: RUNNING → STOPPED (guest "
         "powered off)", {"old": "RUNNING", "new": "STOPPED"}),
        (t - 120, "vm.created", "vm", VM_WEB2, "web-2", "web-2 created", {}),
        (t - 45, "vm.state", "vm", VM_WEB2, "web-2", "web-2: STOPPED → RUNNING",
         {"old": "STOPPED", "new": "RUNNING"}),
    ]
    rows.sort(key=lambda r: r[0])
    return [Event(type=type_, kind=kind, resource_id=rid, name=name, message=msg, data=data,
                  ts=ts, seq=i + 1)
            for i, (ts, type_, kind, rid, name, msg, data) in enumerate(rows)]


#: CPU % samples, one a second up to FIXED_NOW, for each live VM (16: the VM screen's width).
CPU_SAMPLES = {
    VM_WEB1: [3.0, 4.5, 6.0, 12.0, 35.0, 62.0, 88.0, 97.5, 71.0, 40.0, 22.0, 18.5, 15.0,
              26.0, 31.5, 23.4],
    VM_WEB2: [100.0, 98.0, 96.5, 91.0, 84.0, 75.5, 60.0, 41.0, 30.0, 22.5, 12.0, 9.0, 7.5,
              6.0, 5.5, 4.8],
    VM_DB1: [0.0] * 16,
}
RSS = {VM_WEB1: 301 * MIB, VM_WEB2: 187 * MIB, VM_DB1: int(1.5 * GIB)}


def fleet_metrics() -> list[Event]:
    events = []
    for vm_id, samples in CPU_SAMPLES.items():
        n = len(samples)
        for i, cpu in enumerate(samples):
            events.append(Event(type="vm.metrics", kind="vm", resource_id=vm_id, name="",
                                message="", data={"cpu_percent": cpu,
                                                  "rss_bytes": RSS[vm_id] + i * MIB},
                                ts=FIXED_NOW - (n - 1 - i)))
    return events


def static_session(core: StaticCore | None = None) -> Session:
    """A ``static`` session over a :class:`StaticCore` with the fixed history, metrics and
    consoles already in place (consoles open only for running or paused VMs)."""
    core = core if core is not None else StaticCore()
    session = Session(core, mode="static", data_dir="")
    core.emit = session.inject
    for ev in fleet_events():
        session.inject(ev)
    for ev in fleet_metrics():
        session.inject(ev)
    for ev in fleet_link_stats():
        session.inject(ev)

    async def open_console(vm_id: str) -> StaticConsole:
        vm = await core.get_vm(vm_id)
        if vm.status.state not in (VMState.RUNNING, VMState.PAUSED):
            raise WrongState("the VM is not running, so its console is not live")
        log = BOOT_LOG if vm.meta.id == VM_WEB1 else BOOT_LOG.replace(b"web-1",
                                                                      vm.meta.name.encode())
        return StaticConsole(log)

    session.shared["open_console"] = open_console
    return session


__all__ = ["BOOT_LOG", "FIXED_NOW", "StaticConsole", "StaticCore", "fixed_clock",
           "fleet_link_stats", "fleet_qos_profiles", "link_sample", "static_session",
           "stats_event"]
