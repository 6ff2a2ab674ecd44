"""The pure spec -> QEMU command line builder.

Everything a VM's QEMU process is started with is decided here, from a :class:`LaunchPlan`
(the spec plus the paths and the accelerator the supervisor resolved), so the exact argv can be
golden-tested and shown to the operator.  Nothing here touches the host.

Safety: values that end up inside a QEMU option string (``key=value,key=value``) are either
validated to a small alphabet or, for paths and names, have their commas doubled (QEMU's
escape), so no spec value can add an option.  Values passed as their own argv element
(``-kernel``, ``-append`` ...) are taken verbatim by QEMU and need no escaping.

Choices (measured on QEMU 7.2, see the shared qemu-facts notes):

* ``virt``: TCG uses ``-cpu cortex-a76`` (``max`` boots 4x slower: pointer-auth emulation);
  KVM and HVF use ``-cpu host``.  GICv2 addresses at most 8 vCPUs, so ``gic-version=3`` above 8;
  HVF always gets GICv3; KVM gets ``gic-version=max`` (the host's GIC: GICv3-only hosts cannot
  emulate the default GICv2).
* ``raspi3b``: the board fixes 1 GiB and 4 vCPUs and ignores ``-cpu``; it boots fast only under
  single-threaded TCG; its usable console is the second UART (mini-UART, ``ttyS1``); it has no
  PCI, so no NICs, disks or TPM.
* ``x86_64``: the spec's ``virt`` machine means the generic PC, ``q35``.
* ``compatibility_mode``: the most conservative virtual hardware for old or picky guests.
  aarch64 under TCG: ``-cpu cortex-a57`` (the oldest ARMv8-A core QEMU models with the full
  feature set Linux expects) and GICv2 (max 8 vCPUs); KVM/HVF can only run ``-cpu host``, so
  there it changes nothing.  x86_64: ``-M pc`` (i440FX) and ``-cpu qemu64`` also under KVM.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.model import Accelerator, Machine, NetworkMode, PortForward, VMSpec


@dataclass(frozen=True)
class DiskPlan:
    node_name: str  # QMP snapshot jobs address disks by node name
    path: str
    format: str  # "qcow2" | "raw"
    read_only: bool
    boot: bool


@dataclass(frozen=True)
class NicPlan:
    id: str
    mode: NetworkMode
    mac: str
    forwards: tuple[PortForward, ...] = ()
    local_path: str = ""  # SEGMENT: QEMU's datagram socket…
    remote_path: str = ""  # …and the switch port's
    ifname: str = ""  # VMNET_BRIDGED: the host interface (en0)


@dataclass(frozen=True)
class LaunchPlan:
    vm_id: str
    name: str
    spec: VMSpec
    accel: Accelerator  # resolved, never AUTO
    qemu_binary: str
    qmp_socket: str
    serial_socket: str
    serial_log: str
    pidfile: str
    disks: tuple[DiskPlan, ...] = ()
    nics: tuple[NicPlan, ...] = ()
    tpm_socket: str = ""


# --- extra_args allow-list -----------------------------------------------------------------

_SAFE_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

AARCH64_CPU_MODELS = ("cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1",
                      "max", "host")
X86_64_CPU_MODELS = ("qemu64", "kvm64", "Nehalem", "Haswell", "Skylake-Client", "EPYC",
                     "max", "host")


@dataclass(frozen=True)
class ExtraArgRule:
    """One allowed ``extra_args`` key: its value must be one of ``choices`` or an int in
    ``int_range``; either way it stays inside ``[A-Za-z0-9._-]``."""

    description: str
    choices: tuple[str, ...] = ()
    int_range: tuple[int, int] | None = None

    def problem(self, value: str) -> str:
        """Why ``value`` is refused, or "" if it is fine."""
        if not isinstance(value, str) or not _SAFE_VALUE.fullmatch(value):
            return (f"{value!r} is not a plain value (a letter or digit, then letters, digits, "
                    "'.', '_' or '-'; no ',', '=', spaces or quotes)")
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of {', '.join(self.choices)}"
        if self.int_range is not None:
            lo, hi = self.int_range
            if not value.isdigit() or not lo <= int(value) <= hi:
                return f"{value!r} is not an integer in {lo}..{hi}"
        return ""


EXTRA_ARGS: Mapping[str, ExtraArgRule] = {
    "cpu.model": ExtraArgRule(
        "CPU model instead of the default (-cpu). aarch64 TCG: a Cortex/Neoverse model or max "
        "(max gets pauth-impdef=on, else it boots 4x slower); aarch64 KVM/HVF: host or max; "
        "x86_64: a named model, max, or host (KVM/HVF only). Not on raspi3b.",
        choices=tuple(dict.fromkeys(AARCH64_CPU_MODELS + X86_64_CPU_MODELS)),
    ),
    "tcg.tb_size": ExtraArgRule(
        "TCG translation cache size in MiB (-accel tcg,tb-size=N); 16 saves ~30 MiB RSS per "
        "idle guest. TCG only.",
        int_range=(1, 2048),
    ),
    "tcg.thread": ExtraArgRule(
        "TCG threading (-accel tcg,thread=...): multi = one host thread per vCPU (default on "
        "virt), single = one for all (default on raspi3b, which boots 5-27 s with multi). "
        "TCG only.",
        choices=("single", "multi"),
    ),
    "machine.gic_version": ExtraArgRule(
        "Interrupt controller of the virt machine (-M virt,gic-version=...); GICv2 addresses at "
        "most 8 vCPUs; host needs KVM. virt only.",
        choices=("2", "3", "max", "host"),
    ),
    "rtc.base": ExtraArgRule(
        "Guest real-time clock base (-rtc base=...): utc, or localtime for guests that expect it.",
        choices=("utc", "localtime"),
    ),
    "nic.model": ExtraArgRule(
        "Network card model for every NIC (default virtio-net-pci); e1000/e1000e for guests "
        "without virtio drivers.",
        choices=("virtio-net-pci", "e1000", "e1000e"),
    ),
}


def validate_extra_args(extra: Mapping[str, str]) -> None:
    """Refuse any key outside :data:`EXTRA_ARGS` and any value its rule does not accept."""
    for key, value in extra.items():
        rule = EXTRA_ARGS.get(key)
        if rule is None:
            raise InvalidSpec(f"extra_args.{key}", f"unknown key {key!r}; allowed keys: "
                              f"{', '.join(sorted(EXTRA_ARGS))}")
        problem = rule.problem(value)
        if problem:
            raise InvalidSpec(f"extra_args.{key}", problem)


# --- small pure helpers --------------------------------------------------------------------


def qemu_escape(value: str) -> str:
    """Escape a value embedded in a QEMU option string: QEMU reads ``,,`` as a literal comma."""
    return value.replace(",", ",,")


def mac_for(vm_id: str, index: int) -> str:
    """A stable MAC in QEMU's locally administered 52:54:00 range, so a guest's DHCP lease and
    interface name survive restarts."""
    digest = hashlib.sha256(f"{vm_id}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def console_device(spec: VMSpec) -> str:
    """The guest console the serial chardev is wired to."""
    if spec.arch == "x86_64":
        return "ttyS0"
    if spec.machine is Machine.RASPI3B:
        return "ttyS1"  # the mini-UART on the second -serial; ttyAMA0 takes no input
    return "ttyAMA0"


def kernel_cmdline(spec: VMSpec) -> str:
    """The user's cmdline with the machine's console prepended unless it names one already, so
    the serial console works without the user knowing the board's UART name."""
    user = spec.cmdline.strip()
    if any(tok.startswith("console=") for tok in user.split()):
        return user
    return f"console={console_device(spec)} {user}".strip()


_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,30}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _check_id(field: str, value: str) -> None:
    # QEMU ids and node names: a letter, then letters, digits, '.', '_', '-'; < 32 chars.
    if not _QEMU_ID.fullmatch(value):
        raise InvalidSpec(field, f"{value!r} is not a valid QEMU id (a letter, then letters, "
                          "digits, '.', '_' or '-'; at most 31 characters)")


def _check_path(field: str, value: str) -> None:
    if not value:
        raise InvalidSpec(field, "a path is required")
    if "\0" in value or "\n" in value:
        raise InvalidSpec(field, "path contains a NUL or newline")


def _hostfwd(field: str, fwd: PortForward) -> str:
    if fwd.protocol not in ("tcp", "udp"):
        raise InvalidSpec(f"{field}.protocol", f"{fwd.protocol!r} is not tcp or udp")
    try:
        addr = ipaddress.IPv4Address(fwd.host_addr)
    except (ipaddress.AddressValueError, ValueError):
        raise InvalidSpec(f"{field}.host_addr",
                          f"{fwd.host_addr!r} is not an IPv4 address") from None
    for name, port in (("host_port", fwd.host_port), ("guest_port", fwd.guest_port)):
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise InvalidSpec(f"{field}.{name}", f"{port!r} is not a port in 1..65535")
    return f"hostfwd={fwd.protocol}:{addr}:{fwd.host_port}-:{fwd.guest_port}"


# --- the builder ---------------------------------------------------------------------------


def _machine_option(plan: LaunchPlan, extra: Mapping[str, str]) -> str:
    spec = plan.spec
    if spec.arch == "x86_64":
        return "pc" if spec.compatibility_mode else "q35"
    if spec.machine is Machine.RASPI3B:
        return "raspi3b"
    gic = extra.get("machine.gic_version")
    if gic is None:
        if plan.accel is Accelerator.KVM:
            gic = "max"
        elif plan.accel is Accelerator.HVF:
            gic = "3"
        elif spec.compatibility_mode:
            gic = "2"
        elif spec.cpu_cores > 8:
            gic = "3"
    if gic == "2" and spec.cpu_cores > 8:
        raise InvalidSpec("cpu_cores", f"{spec.cpu_cores} vCPUs need GICv3 (GICv2, used in "
                          "compatibility mode or by machine.gic_version=2, addresses at most 8)")
    if gic == "host" and plan.accel is not Accelerator.KVM:
        raise InvalidSpec("extra_args.machine.gic_version", "host needs the kvm accelerator")
    return f"virt,gic-version={gic}" if gic else "virt"


def _accel_option(plan: LaunchPlan, extra: Mapping[str, str]) -> str:
    tcg_keys = [k for k in ("tcg.tb_size", "tcg.thread") if k in extra]
    if plan.accel is not Accelerator.TCG:
        if tcg_keys:
            raise InvalidSpec(f"extra_args.{tcg_keys[0]}",
                              f"only applies to tcg; this VM uses {plan.accel.value}")
        return str(plan.accel.value)
    opts = ["tcg"]
    thread = extra.get("tcg.thread")
    if thread is None and plan.spec.machine is Machine.RASPI3B:
        thread = "single"
    if thread:
        opts.append(f"thread={thread}")
    if "tcg.tb_size" in extra:
        opts.append(f"tb-size={extra['tcg.tb_size']}")
    return ",".join(opts)


def _cpu_option(plan: LaunchPlan, extra: Mapping[str, str]) -> str:
    """The -cpu value, "" for boards that ignore it."""
    spec, accel = plan.spec, plan.accel
    model = extra.get("cpu.model")
    if spec.machine is Machine.RASPI3B and spec.arch == "aarch64":
        if model is not None:
            raise InvalidSpec("extra_args.cpu.model", "raspi3b has a fixed CPU (Cortex-A53)")
        return ""
    accelerated = accel in (Accelerator.KVM, Accelerator.HVF)
    if model is not None:
        allowed = AARCH64_CPU_MODELS if spec.arch == "aarch64" else X86_64_CPU_MODELS
        if model not in allowed:
            raise InvalidSpec("extra_args.cpu.model", f"{model!r} is not a {spec.arch} CPU; "
                              f"use one of {', '.join(allowed)}")
        if model == "host" and not accelerated:
            raise InvalidSpec("extra_args.cpu.model", "host needs kvm or hvf; this VM uses tcg")
        if spec.arch == "aarch64" and accelerated and model not in ("host", "max"):
            raise InvalidSpec("extra_args.cpu.model",
                              f"{accel.value} runs only host or max on aarch64")
        if spec.arch == "aarch64" and model == "max" and not accelerated:
            return "max,pauth-impdef=on"
        return model
    if spec.arch == "x86_64":
        if spec.compatibility_mode and accel is not Accelerator.HVF:
            return "qemu64"
        return "host" if accelerated else "qemu64"
    if accelerated:
        return "host"
    return "cortex-a57" if spec.compatibility_mode else "cortex-a76"


def _check_plan(plan: LaunchPlan) -> None:
    spec = plan.spec
    if plan.accel is Accelerator.AUTO:
        raise InvalidSpec("accelerator", "must be resolved (resolve_accelerator) before launch")
    if spec.arch not in ("aarch64", "x86_64"):
        raise InvalidSpec("arch", f"unsupported guest arch {spec.arch!r}; use aarch64 or x86_64")
    if spec.arch == "x86_64" and spec.machine is not Machine.VIRT:
        raise InvalidSpec("machine", f"{spec.machine.value} is an aarch64 board")
    if not isinstance(spec.cpu_cores, int) or spec.cpu_cores < 1:
        raise InvalidSpec("cpu_cores", f"{spec.cpu_cores!r} is not a positive integer")
    if not isinstance(spec.memory_mb, int) or spec.memory_mb < 16:
        raise InvalidSpec("memory_mb", f"{spec.memory_mb!r} is not an integer >= 16")
    for fld in ("initrd", "cmdline", "dtb"):
        if getattr(spec, fld) and not spec.kernel:
            raise InvalidSpec(fld, "needs a kernel (QEMU takes it only with -kernel)")
    for fld in ("kernel", "initrd", "dtb"):
        if getattr(spec, fld):
            _check_path(fld, getattr(spec, fld))
    for fld in ("qemu_binary", "qmp_socket", "serial_socket", "serial_log", "pidfile"):
        _check_path(fld, getattr(plan, fld))
    if spec.machine is Machine.RASPI3B:
        if not spec.kernel:
            raise InvalidSpec("kernel", "raspi3b has no firmware here: give a kernel")
        if not spec.dtb:
            raise InvalidSpec("dtb", "raspi3b needs its device tree (bcm2837-rpi-3-b.dtb from "
                              "the generic arm64 kernel package)")
        if plan.nics:
            raise InvalidSpec("network_ids", "raspi3b has no PCI: networking is not supported")
        if plan.disks:
            raise InvalidSpec("volume_ids", "raspi3b has no PCI: disks are not supported")
        if plan.tpm_socket:
            raise InvalidSpec("enable_tpm", "raspi3b cannot carry a TPM device")
    validate_extra_args(spec.extra_args)
    if "machine.gic_version" in spec.extra_args and (
        spec.arch != "aarch64" or spec.machine is not Machine.VIRT
    ):
        raise InvalidSpec("extra_args.machine.gic_version", "applies to the aarch64 virt machine")


def build_argv(plan: LaunchPlan) -> list[str]:
    """The full QEMU command line; QEMU starts paused (``-S``) so the supervisor can connect
    QMP and the serial console before the guest prints anything, then sends ``cont``."""
    _check_plan(plan)
    spec = plan.spec
    extra = spec.extra_args
    raspi = spec.machine is Machine.RASPI3B
    esc = qemu_escape

    argv = [plan.qemu_binary, "-S", "-nodefaults", "-no-user-config", "-display", "none",
            # explicit "guest=": with the implied key a name like "a=b" would set option "a"
            "-name", f"guest={esc(plan.name)}",
            "-pidfile", plan.pidfile,
            "-qmp", f"unix:{esc(plan.qmp_socket)},server=on,wait=off",
            "-M", _machine_option(plan, extra),
            "-accel", _accel_option(plan, extra)]
    cpu = _cpu_option(plan, extra)
    if cpu:
        argv += ["-cpu", cpu]
    memory, cpus = (1024, 4) if raspi else (spec.memory_mb, spec.cpu_cores)
    argv += ["-m", str(memory), "-smp", str(cpus)]
    if "rtc.base" in extra:
        argv += ["-rtc", f"base={extra['rtc.base']}"]

    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.dtb:
            argv += ["-dtb", spec.dtb]
        argv += ["-append", kernel_cmdline(spec)]

    argv += ["-chardev", f"socket,id=ser0,path={esc(plan.serial_socket)},server=on,wait=off,"
             f"logfile={esc(plan.serial_log)},logappend=on"]
    if raspi:
        argv += ["-serial", "null"]  # the PL011: the console is the second UART
    argv += ["-serial", "chardev:ser0"]

    for i, disk in enumerate(plan.disks):
        fld = f"disks[{i}]"
        _check_id(f"{fld}.node_name", disk.node_name)
        if len(disk.node_name) > 26:  # "-file" is appended for the protocol node
            raise InvalidSpec(f"{fld}.node_name", "at most 26 characters")
        _check_path(f"{fld}.path", disk.path)
        if disk.format not in ("qcow2", "raw"):
            raise InvalidSpec(f"{fld}.format", f"{disk.format!r} is not qcow2 or raw")
        ro = "on" if disk.read_only else "off"
        argv += ["-blockdev", f"driver=file,filename={esc(disk.path)},"
                 f"node-name={disk.node_name}-file,read-only={ro}",
                 "-blockdev", f"driver={disk.format},file={disk.node_name}-file,"
                 f"node-name={disk.node_name},read-only={ro}",
                 "-device", f"virtio-blk-pci,drive={disk.node_name}"
                 + (",bootindex=0" if disk.boot else "")]

    nic_model = extra.get("nic.model", "virtio-net-pci")
    for i, nic in enumerate(plan.nics):
        fld = f"nics[{i}]"
        _check_id(f"{fld}.id", nic.id)
        if not _MAC.fullmatch(nic.mac):
            raise InvalidSpec(f"{fld}.mac", f"{nic.mac!r} is not a lower-case MAC address")
        if nic.mode is NetworkMode.USER:
            opts = [f"user,id={nic.id}"]
            opts += [_hostfwd(f"port_forwards[{j}]", f) for j, f in enumerate(nic.forwards)]
            netdev = ",".join(opts)
        elif nic.mode is NetworkMode.VMNET_SHARED:
            if nic.forwards:
                raise InvalidSpec("port_forwards", "port forwards need a USER network")
            netdev = f"vmnet-shared,id={nic.id}"
        elif nic.mode is NetworkMode.VMNET_BRIDGED:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", nic.ifname):
                raise InvalidSpec(f"{fld}.ifname", "name the host interface to bridge (e.g. en0)")
            netdev = f"vmnet-bridged,id={nic.id},ifname={nic.ifname}"
        elif nic.mode is NetworkMode.SEGMENT:
            _check_path(f"{fld}.local_path", nic.local_path)
            _check_path(f"{fld}.remote_path", nic.remote_path)
            netdev = (f"dgram,id={nic.id},local.type=unix,local.path={esc(nic.local_path)},"
                      f"remote.type=unix,remote.path={esc(nic.remote_path)}")
        else:
            raise InvalidSpec(f"{fld}.mode", f"{nic.mode.value} networks are not supported by "
                              "the launcher yet; use USER or VMNET_SHARED")
        argv += ["-netdev", netdev, "-device", f"{nic_model},netdev={nic.id},mac={nic.mac}"]

    if plan.tpm_socket:
        _check_path("tpm_socket", plan.tpm_socket)
        tis = "tpm-tis" if spec.arch == "x86_64" else "tpm-tis-device"
        argv += ["-chardev", f"socket,id=chrtpm,path={esc(plan.tpm_socket)}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", f"{tis},tpmdev=tpm0"]
    return argv
