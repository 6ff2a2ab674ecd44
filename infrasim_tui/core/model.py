"""Domain model: every resource is ``meta`` + ``spec`` (what the operator wants) + ``status``
(what the core observed).

The store keeps spec and status as JSON produced by :func:`to_dict`; the API layers map these
same dataclasses field by field, so a field added here is added everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints


class VMState(enum.StrEnum):
    PENDING = "PENDING"  # being created or started: QEMU may or may not exist yet
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    PAUSED = "PAUSED"
    ERROR = "ERROR"


class NetworkMode(enum.StrEnum):
    USER = "USER"  # per-VM NAT (QEMU user-mode) with port forwards
    VMNET_SHARED = "VMNET_SHARED"  # macOS only
    VMNET_BRIDGED = "VMNET_BRIDGED"  # macOS only
    SEGMENT = "SEGMENT"  # VM-to-VM L2 segment through InfraSim's switch (a later issue)


class VolumeKind(enum.StrEnum):
    DISK = "DISK"
    WEIGHTS = "WEIGHTS"  # read-only data volume whose integrity check is mandatory


class Machine(enum.StrEnum):
    VIRT = "virt"
    RASPI3B = "raspi3b"


class Accelerator(enum.StrEnum):
    AUTO = "auto"  # resolved by host facts: hvf, a probed kvm, else tcg
    HVF = "hvf"
    KVM = "kvm"
    TCG = "tcg"


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def now() -> float:
    return time.time()


@dataclass
class ResourceMeta:
    name: str
    id: str = field(default_factory=new_id)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
    version: int = 0  # bumped by the store on every write; updates must name the version read


# --- VM -------------------------------------------------------------------------------------


@dataclass
class PortForward:
    host_port: int
    guest_port: int
    protocol: str = "tcp"  # tcp | udp
    host_addr: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str) -> PortForward:
        """``[ADDR:]HOSTPORT:GUESTPORT[/udp]`` as typed on the command line."""
        proto = "tcp"
        if "/" in text:
            text, proto = text.rsplit("/", 1)
        parts = text.split(":")
        addr = "127.0.0.1"
        if len(parts) == 3:
            addr = parts.pop(0)
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"expected [ADDR:]HOSTPORT:GUESTPORT[/tcp|udp], got {text!r}")
        return cls(int(parts[0]), int(parts[1]), proto, addr)

    def __str__(self) -> str:
        return f"{self.host_addr}:{self.host_port}->{self.guest_port}/{self.protocol}"


@dataclass
class VMSpec:
    arch: str = "aarch64"
    machine: Machine = Machine.VIRT
    cpu_cores: int = 1
    memory_mb: int = 256
    volume_ids: list[str] = field(default_factory=list)
    network_ids: list[str] = field(default_factory=list)
    qos_profile_id: str = ""  # shapes every SEGMENT NIC that nic_qos does not name
    nic_qos: dict[str, str] = field(default_factory=dict)  # network id -> QoS profile id
    enable_tpm: bool = False
    boot_disk_id: str = ""
    extra_args: dict[str, str] = field(default_factory=dict)  # allow-listed keys only
    compatibility_mode: bool = False
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    dtb: str = ""  # device tree; required by raspi3b
    port_forwards: list[PortForward] = field(default_factory=list)
    accelerator: Accelerator = Accelerator.AUTO


@dataclass
class NicStatus:
    """One NIC of a running (or last run) VM: what it is plugged into and its address."""

    id: str = ""  # QEMU netdev id: net0 (user), net1...
    network_id: str = ""
    network: str = ""
    mode: NetworkMode = NetworkMode.USER
    mac: str = ""
    address: str = ""  # "10.10.0.2/24"; kept across restarts
    qos_profile_id: str = ""


@dataclass
class VMStatus:
    state: VMState = VMState.STOPPED
    pid: int = 0
    accelerator: str = ""  # the one actually used by the running QEMU
    qemu_version: str = ""
    run_dir: str = ""
    qmp_socket: str = ""
    serial_socket: str = ""
    serial_log: str = ""
    started_at: float = 0.0
    stopped_at: float = 0.0
    reason: str = ""  # why the VM is in its state (e.g. "guest powered off", "killed by signal 9")
    last_serial_lines: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)  # the exact QEMU command line last used
    addresses: dict[str, list[str]] = field(default_factory=dict)  # network name -> addresses
    current_snapshot_id: str = ""  # the snapshot the VM's disks descend from ("" = none)
    nics: list[NicStatus] = field(default_factory=list)


@dataclass
class VM:
    meta: ResourceMeta
    spec: VMSpec = field(default_factory=VMSpec)
    status: VMStatus = field(default_factory=VMStatus)

    kind = "vm"


# --- Network --------------------------------------------------------------------------------


@dataclass
class NetworkSpec:
    mode: NetworkMode = NetworkMode.USER
    cidr: str = "10.0.2.0/24"
    gateway: str = ""
    dns: str = ""
    dhcp: bool = True
    vmnet_interface: str = ""  # VMNET_BRIDGED only


@dataclass
class NetworkStatus:
    active: bool = False
    attached_vm_ids: list[str] = field(default_factory=list)


@dataclass
class Network:
    meta: ResourceMeta
    spec: NetworkSpec = field(default_factory=NetworkSpec)
    status: NetworkStatus = field(default_factory=NetworkStatus)

    kind = "network"


# --- Volume ---------------------------------------------------------------------------------


@dataclass
class IntegrityConfig:
    scheme: str = "ed25519-blake3"
    public_key: str = ""
    signature: str = ""
    expected_digest: str = ""


@dataclass
class VolumeSpec:
    kind: VolumeKind = VolumeKind.DISK
    size_bytes: int = 0
    format: str = "qcow2"  # qcow2 | raw
    source: str = ""  # path or URL it was imported from
    source_digest: str = ""  # BLAKE3 pin for the source; an import that differs is refused
    base_volume_id: str = ""  # copy-on-write overlay over this volume
    read_only: bool = False
    integrity: IntegrityConfig | None = None


@dataclass
class VolumeStatus:
    path: str = ""  # the file a VM opens
    image_digest: str = ""  # BLAKE3 of the content-addressed image this volume is (or sits on)
    digest: str = ""  # BLAKE3 of the file at `path` when last hashed
    virtual_size: int = 0
    actual_size: int = 0
    verified: str = ""  # "", "verified", "untrusted", "mismatch", "bad-signature"
    verified_at: float = 0.0
    verify_error: str = ""


@dataclass
class Volume:
    meta: ResourceMeta
    spec: VolumeSpec = field(default_factory=VolumeSpec)
    status: VolumeStatus = field(default_factory=VolumeStatus)

    kind = "volume"


@dataclass(frozen=True)
class VolumeRequest:
    """What an operator asks for; turned into a VolumeSpec once sources are resolved."""

    name: str
    size_bytes: int = 0
    format: str = "qcow2"
    source: str = ""  # local path or http(s) URL
    source_digest: str = ""
    base: str = ""  # volume name or id
    read_only: bool = False
    kind: VolumeKind = VolumeKind.DISK
    labels: dict[str, str] | None = None
    signature: str = ""  # a publisher's signature over the source's digest…
    public_key: str = ""  # …and their key (must be trusted to boot)


@dataclass(frozen=True)
class TrustedKey:
    name: str
    public_key: str  # 64 lowercase hex
    fingerprint: str  # "ed25519:" + 16 hex
    added_at: float  # unix time
    host: bool  # this host's own key


# --- Snapshot -------------------------------------------------------------------------------


@dataclass
class SnapshotSpec:
    vm_id: str = ""
    description: str = ""
    parent_id: str = ""
    include_memory: bool = True


@dataclass
class SnapshotStatus:
    state: str = ""  # "", "creating", "ready", "failed"
    size_bytes: int = 0
    vm_state: str = ""  # the VM's state when the snapshot was taken
    error: str = ""
    tag: str = ""  # the qcow2 internal snapshot tag on every disk
    volume_ids: list[str] = field(default_factory=list)  # the disks it covers
    with_memory: bool = False
    chain_hash: str = ""  # BLAKE3 over the parent's chain hash and this snapshot's metadata
    signature: str = ""  # Ed25519 over the chain hash, by the host key
    public_key: str = ""


@dataclass
class Snapshot:
    meta: ResourceMeta
    spec: SnapshotSpec = field(default_factory=SnapshotSpec)
    status: SnapshotStatus = field(default_factory=SnapshotStatus)

    kind = "snapshot"


# --- Console --------------------------------------------------------------------------------


@dataclass
class ConsoleSpec:
    vm_id: str = ""
    type: str = "serial"  # serial now; room for vnc later


@dataclass
class ConsoleStatus:
    path: str = ""  # unix socket of the serial chardev
    log_path: str = ""
    readers: int = 0


@dataclass
class Console:
    meta: ResourceMeta
    spec: ConsoleSpec = field(default_factory=ConsoleSpec)
    status: ConsoleStatus = field(default_factory=ConsoleStatus)

    kind = "console"


# --- QoS profile ----------------------------------------------------------------------------


@dataclass
class LoraSpec:
    """A LoRa radio link: every frame crossing the NIC is sent over the air with these
    parameters (time on air per Semtech AN1200.13; link budget by log-distance path loss)."""

    spreading_factor: int = 7  # 6..12 (6 needs implicit_header)
    bandwidth_khz: int = 125  # 125 | 250 | 500
    coding_rate: int = 5  # N of 4/N: 5..8
    preamble: int = 8
    implicit_header: bool = False
    crc: bool = True
    tx_power_dbm: float = 14.0
    distance_m: float = 100.0  # the FLoRa fit reaches ~137 m at SF7, ~550 m at SF12
    frequency_mhz: float = 868.1  # frames collide only on the same frequency and SF
    d0_m: float = 40.0  # log-distance model: PL(d) = PL(d0) + 10*gamma*log10(d/d0) + X_sigma
    path_loss_d0_db: float = 127.41
    path_loss_exponent: float = 2.08
    shadowing_sigma_db: float = 3.57
    noise_figure_db: float = 6.0
    capture_db: float = 6.0  # a frame this much stronger survives an overlap
    duty_cycle_pct: float = 0.0  # 0: unlimited; 1.0 for most EU868 sub-bands


@dataclass
class QosProfileSpec:
    """Shaping of one NIC direction, applied in order: LoRa air → loss → duplication → token
    bucket → delay/jitter (→ reordering). Semantics follow tc tbf/netem unless noted."""

    rate_bps: int = 0  # 0: unlimited
    burst_bytes: int = 0  # bucket size; 0: the larger of 10 ms at rate and 2 full frames
    queue_bytes: int = 0  # bytes waiting for tokens; 0: the larger of 64 KiB and 250 ms at rate
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    distribution: str = "uniform"  # uniform | normal | pareto
    loss_pct: float = 0.0  # random loss (ignored when ge_p_pct > 0)
    ge_p_pct: float = 0.0  # Gilbert-Elliott: P(good -> bad); > 0 switches the model on
    ge_r_pct: float = 100.0  # P(bad -> good)
    ge_bad_loss_pct: float = 100.0  # 1-h: loss while bad
    ge_good_loss_pct: float = 0.0  # 1-k: loss while good
    duplicate_pct: float = 0.0
    reorder_pct: float = 0.0  # sent ahead of frames still in the delay stage
    seed: int = 0  # 0: a fresh seed per attachment; else reproducible draws
    direction: str = "both"  # egress (leaving the VM) | ingress (into the VM) | both
    lora: LoraSpec | None = None


@dataclass
class QosProfileStatus:
    attached_vm_ids: list[str] = field(default_factory=list)
    links: int = 0  # live switch ports shaped by this profile


# --- Link statistics (not stored: the switch keeps them in memory) -------------------------

DELAY_BUCKETS_MS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
DROP_CAUSES = ("bucket", "loss", "lora_sensitivity", "collision", "duty_cycle", "overflow")


@dataclass
class LoraLinkStats:
    spreading_factor: int = 0
    rssi_dbm: float = 0.0  # of the last frame sent over the air
    snr_db: float = 0.0
    airtime_ms: float = 0.0  # of the last frame
    delivered: int = 0
    lost: int = 0


@dataclass
class LinkStats:
    """One switch port in one direction: egress = frames leaving the VM, ingress = into it."""

    network_id: str = ""
    network: str = ""
    vm_id: str = ""
    vm: str = ""
    nic: str = ""  # the QEMU netdev id (net1, ...)
    mac: str = ""
    direction: str = ""  # egress | ingress
    profile: str = ""  # QoS profile name, "" when unshaped
    bytes: int = 0  # delivered (after shaping)
    frames: int = 0
    throughput_bps: float = 0.0  # delivered bits/s over the last stats interval
    queue_bytes: int = 0
    queue_frames: int = 0
    drops: dict[str, int] = field(default_factory=dict)  # cause (DROP_CAUSES) -> frames
    delay_hist: list[int] = field(default_factory=list)  # counts per DELAY_BUCKETS_MS (+ over)
    delay_p50_ms: float = 0.0
    delay_p99_ms: float = 0.0
    lora: LoraLinkStats | None = None
    at: float = 0.0  # unix time of the sample


@dataclass
class QosProfile:
    meta: ResourceMeta
    spec: QosProfileSpec = field(default_factory=QosProfileSpec)
    status: QosProfileStatus = field(default_factory=QosProfileStatus)

    kind = "qos_profile"


# --- Benchmark run --------------------------------------------------------------------------


@dataclass
class BenchmarkRunSpec:
    vm_id: str = ""
    benchmark: str = ""
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class BenchmarkRunStatus:
    state: str = ""  # "", "running", "succeeded", "failed"
    started_at: float = 0.0
    finished_at: float = 0.0
    results: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class BenchmarkRun:
    meta: ResourceMeta
    spec: BenchmarkRunSpec = field(default_factory=BenchmarkRunSpec)
    status: BenchmarkRunStatus = field(default_factory=BenchmarkRunStatus)

    kind = "benchmark_run"


Resource = VM | Network | Volume | Snapshot | Console | QosProfile | BenchmarkRun
RESOURCE_TYPES: dict[str, type[Any]] = {
    t.kind: t for t in (VM, Network, Volume, Snapshot, Console, QosProfile, BenchmarkRun)
}


# --- (de)serialisation ----------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Dataclass → plain JSON-able data (enums by value)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


T = TypeVar("T")


def from_dict(cls: type[T], data: Any) -> T:
    """Plain data → dataclass ``cls``; unknown keys are ignored so old rows load after upgrades."""
    return typing.cast(T, _converter(typing.cast(Any, cls))(data))


Converter = Callable[[Any], Any]


def _identity(data: Any) -> Any:
    return data


@functools.cache
def _converter(tp: Any) -> Converter:
    """A function that turns plain data into ``tp``, built once per type: every row the store
    reads goes through it, and inspecting types per value costs more than the data."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = _converter(next(a for a in get_args(tp) if a is not type(None)))
        return lambda data: None if data is None else inner(data)
    if origin is list:
        item = _converter(get_args(tp)[0])
        if item is _identity:
            return list
        return lambda data: [item(v) for v in data]
    if origin is dict:
        val = _converter(get_args(tp)[1])
        if val is _identity:
            return dict
        return lambda data: {k: val(v) for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = get_type_hints(tp)
        fields = tuple((f.name, _converter(hints[f.name]))
                       for f in dataclasses.fields(tp) if f.init)
        cls = tp

        def build(data: Any) -> Any:
            return cls(**{name: conv(data[name]) for name, conv in fields if name in data})

        return build
    if tp is float:
        return lambda data: float(data) if isinstance(data, int) else data
    return _identity
