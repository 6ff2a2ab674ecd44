"""Validation of specs before anything is created or started.

Pure functions over the spec plus what they need to know about the world (host limits, which
resources exist), so the same checks serve the CLI, the API and the console's inline form.
Every refusal is an :class:`InvalidSpec` naming the field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .argv import validate_extra_args
from .errors import InvalidSpec
from .model import Accelerator, Machine, VMSpec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,62})$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/@+-]{0,128}$")
ARCHES = ("aarch64", "x86_64")
MIN_MEMORY_MB = 32
MAX_CPUS = 64
RASPI3B_MEMORY_MB = 1024
RASPI3B_CPUS = 4
MAX_CMDLINE = 4096


@dataclass(frozen=True)
class Limits:
    """What the host can give a VM."""

    max_memory_mb: int
    max_cpus: int = MAX_CPUS

    @classmethod
    def of_host(cls) -> Limits:
        try:
            import psutil

            total = psutil.virtual_memory().total // (1024 * 1024)
        except Exception:  # pragma: no cover - psutil is a dependency; be lenient anyway
            total = 1 << 20
        return cls(max_memory_mb=int(total))


@dataclass(frozen=True)
class World:
    """The references a spec may make, looked up by the caller (ids and names of each kind)."""

    volumes: Mapping[str, str] = field(default_factory=dict)  # id -> name
    networks: Mapping[str, str] = field(default_factory=dict)
    qos_profiles: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def has(table: Mapping[str, str], ref: str) -> bool:
        return ref in table or ref in table.values()


def validate_name(name: str, field_name: str = "name") -> None:
    if not NAME_RE.match(name):
        raise InvalidSpec(field_name, f"{name!r} is not a valid name: use 1-63 lowercase "
                          "letters, digits and '-', starting and ending with a letter or digit")


def validate_labels(labels: Mapping[str, str], field_name: str = "labels") -> None:
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidSpec(f"{field_name}.{key}", "label keys are 1-63 characters of letters, "
                              "digits and _./- starting with a letter or digit")
        if not LABEL_VALUE_RE.match(value):
            raise InvalidSpec(f"{field_name}.{key}", f"label value {value!r} has characters "
                              "outside letters, digits and _.:/@+-, or is over 128 long")


def _check_file(field_name: str, path: str) -> None:
    if not os.path.isabs(path):
        raise InvalidSpec(field_name, f"{path!r} must be an absolute path")
    if not os.path.isfile(path):
        raise InvalidSpec(field_name, f"{path} does not exist or is not a regular file")
    if not os.access(path, os.R_OK):
        raise InvalidSpec(field_name, f"{path} is not readable by this user")


def validate_vm_spec(
    spec: VMSpec,
    *,
    limits: Limits,
    world: World = World(),
    host_os: str = "linux",
    check_file: Callable[[str, str], None] = _check_file,
) -> None:
    """Refuse a VM spec that cannot start, naming the first offending field."""
    if spec.arch not in ARCHES:
        raise InvalidSpec("arch", f"{spec.arch!r} is not supported; use one of {', '.join(ARCHES)}")
    if not 1 <= spec.cpu_cores <= min(limits.max_cpus, MAX_CPUS):
        raise InvalidSpec("cpu_cores", f"{spec.cpu_cores} is out of range: "
                          f"1..{min(limits.max_cpus, MAX_CPUS)}")
    if not MIN_MEMORY_MB <= spec.memory_mb <= limits.max_memory_mb:
        raise InvalidSpec("memory_mb", f"{spec.memory_mb} MiB is out of range: "
                          f"{MIN_MEMORY_MB}..{limits.max_memory_mb} (this host's memory)")
    if spec.machine == Machine.RASPI3B:
        _validate_raspi3b(spec)
    elif spec.machine != Machine.VIRT:
        raise InvalidSpec("machine", f"{spec.machine!r} is not supported; use virt or raspi3b")

    if not spec.kernel and not spec.boot_disk_id:
        raise InvalidSpec("kernel", "a VM needs a kernel (direct kernel boot) or a boot disk")
    for name in ("kernel", "initrd", "dtb"):
        value = getattr(spec, name)
        if value:
            check_file(name, value)
    if (spec.initrd or spec.cmdline) and not spec.kernel:
        raise InvalidSpec("initrd" if spec.initrd else "cmdline",
                          "only meaningful with direct kernel boot: set kernel too")
    if len(spec.cmdline) > MAX_CMDLINE:
        raise InvalidSpec("cmdline", f"longer than {MAX_CMDLINE} characters")
    if any(c in spec.cmdline for c in "\n\r\0"):
        raise InvalidSpec("cmdline", "must be a single line without NUL characters")

    validate_extra_args(spec.extra_args)
    _validate_forwards(spec)
    _validate_refs("volume_ids", spec.volume_ids, world.volumes)
    if spec.boot_disk_id and spec.boot_disk_id not in spec.volume_ids:
        names = {world.volumes.get(v, v) for v in spec.volume_ids}
        if spec.boot_disk_id not in names:
            raise InvalidSpec("boot_disk_id", f"{spec.boot_disk_id!r} must be one of the VM's "
                              "volume_ids")
    _validate_refs("network_ids", spec.network_ids, world.networks)
    if spec.qos_profile_id and not World.has(world.qos_profiles, spec.qos_profile_id):
        raise InvalidSpec("qos_profile_id", f"no QoS profile {spec.qos_profile_id!r}")
    attached = {r for ref in spec.network_ids for r in (ref, world.networks.get(ref, ref))}
    for net_ref, prof_ref in spec.nic_qos.items():
        ids = {k for k, v in world.networks.items() if net_ref in (k, v)}
        if net_ref not in attached and not ids & attached:
            raise InvalidSpec(f"nic_qos.{net_ref}", f"the VM has no NIC on network {net_ref!r}: "
                              "list it in network_ids too")
        if not World.has(world.qos_profiles, prof_ref):
            raise InvalidSpec(f"nic_qos.{net_ref}", f"no QoS profile {prof_ref!r}")
    if spec.enable_tpm:
        if spec.machine != Machine.VIRT:
            raise InvalidSpec("enable_tpm", "a vTPM needs the virt machine")
        raise InvalidSpec("enable_tpm", "vTPM support (swtpm) is not available in this release")
    if spec.accelerator == Accelerator.HVF and host_os != "darwin":
        raise InvalidSpec("accelerator", "hvf exists only on macOS")


def _validate_raspi3b(spec: VMSpec) -> None:
    if spec.arch != "aarch64":
        raise InvalidSpec("arch", "raspi3b is an aarch64 board")
    if spec.memory_mb != RASPI3B_MEMORY_MB:
        raise InvalidSpec("memory_mb", f"raspi3b has exactly {RASPI3B_MEMORY_MB} MiB; "
                          f"got {spec.memory_mb}")
    if spec.cpu_cores != RASPI3B_CPUS:
        raise InvalidSpec("cpu_cores", f"raspi3b has exactly {RASPI3B_CPUS} cores; "
                          f"got {spec.cpu_cores}")
    if not spec.dtb:
        raise InvalidSpec("dtb", "raspi3b needs the board's device tree (bcm2837-rpi-3-b.dtb, "
                          "from `infrasim guest build --flavour generic`)")
    if spec.port_forwards or spec.network_ids:
        field_name = "port_forwards" if spec.port_forwards else "network_ids"
        raise InvalidSpec(field_name, "raspi3b has no PCI bus, so no network device in this "
                          "release")
    if spec.accelerator in (Accelerator.KVM, Accelerator.HVF):
        raise InvalidSpec("accelerator", "raspi3b runs only under tcg")
    if spec.volume_ids:
        raise InvalidSpec("volume_ids", "raspi3b disks (SD card) are not supported yet")


def _validate_forwards(spec: VMSpec) -> None:
    seen: set[tuple[str, int, str]] = set()
    for i, fwd in enumerate(spec.port_forwards):
        base = f"port_forwards[{i}]"
        for attr in ("host_port", "guest_port"):
            port = getattr(fwd, attr)
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidSpec(f"{base}.{attr}", f"{port!r} is not a port (1-65535)")
        if fwd.protocol not in ("tcp", "udp"):
            raise InvalidSpec(f"{base}.protocol", f"{fwd.protocol!r}: use tcp or udp")
        try:
            addr = ipaddress.ip_address(fwd.host_addr)
        except ValueError:
            raise InvalidSpec(f"{base}.host_addr", f"{fwd.host_addr!r} is not an IP address") \
                from None
        if addr.version != 4:
            raise InvalidSpec(f"{base}.host_addr", "QEMU user networking forwards IPv4 only")
        key = (fwd.host_addr, fwd.host_port, fwd.protocol)
        if key in seen:
            raise InvalidSpec(f"{base}.host_port", f"{fwd.host_port}/{fwd.protocol} is forwarded "
                              "twice")
        seen.add(key)


def _validate_refs(field_name: str, refs: Iterable[str], table: Mapping[str, str]) -> None:
    seen: set[str] = set()
    for i, ref in enumerate(refs):
        if not World.has(table, ref):
            raise InvalidSpec(f"{field_name}[{i}]", f"no such resource {ref!r}")
        if ref in seen:
            raise InvalidSpec(f"{field_name}[{i}]", f"{ref!r} is listed twice")
        seen.add(ref)
