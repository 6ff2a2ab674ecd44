"""``infrasim``: the command line, a thin adapter over the ``infrasim.v1`` API.

Every resource command talks to the data dir's daemon (``infrasim serve``), starting one in the
background when none answers (``--no-autostart`` turns that off). Exit codes: 0 ok, 1 other
error, 2 invalid input, 3 not found, 4 wrong state, 5 already exists, 6 conflict,
7 unavailable, 8 QEMU error, 9 integrity failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from . import cli_units as units
from .cli_args import parse_pairs
from .cli_examples import add_examples
from .cli_lora import add_lora_commands
from .core.config import Config, load_config
from .core.errors import InfraSimError, InvalidSpec
from .core.model import (
    VM,
    Accelerator,
    LinkStats,
    LoraSpec,
    Machine,
    Network,
    NetworkMode,
    PortForward,
    QosProfile,
    QosProfileSpec,
    VMSpec,
    VMState,
    from_dict,
    to_dict,
)
from .core.paths import DataDir
from .rpc.client import RemoteCore
from .rpc.connect import connect_core

DETACH_KEY = b"\x1d"  # Ctrl+]


# --- output -------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> None:
    if getattr(args, "output", "table") == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(table())


def _fmt_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _age(ts: float) -> str:
    if not ts:
        return "-"
    s = int(time.time() - ts)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def _vm_row(vm: VM) -> list[str]:
    up = _age(vm.status.started_at) if vm.status.state in (VMState.RUNNING, VMState.PAUSED) \
        else "-"
    fwd = ",".join(f"{f.host_port}->{f.guest_port}" for f in vm.spec.port_forwards) or "-"
    return [vm.meta.name, vm.status.state.value, vm.spec.machine.value,
            vm.status.accelerator or "-", str(vm.spec.cpu_cores), f"{vm.spec.memory_mb}M",
            str(vm.status.pid or "-"), up, fwd]


VM_HEADERS = ["NAME", "STATE", "MACHINE", "ACCEL", "CPUS", "MEMORY", "PID", "UPTIME", "FORWARDS"]


def _vm_networks(vm: VM, nets: dict[str, Network], profiles: dict[str, str]) -> list[str]:
    """One line per NIC: its network and mode, MAC, the guest's address there, and for a
    SEGMENT NIC its QoS profile (its own in nic_qos, else the VM-wide one). NICs the VM had
    when it last ran come from its status; networks it never ran on, from its spec."""
    lines = []
    nics = {n.network_id: n for n in vm.status.nics}
    for builtin in vm.status.nics:
        if not builtin.network_id:  # the built-in user-mode NIC
            lines.append(f"  {builtin.id} user: {builtin.address or '-'}")
    for nid in vm.spec.network_ids:
        net = nets.get(nid)
        name = net.meta.name if net else nid
        mode = net.spec.mode if net else None
        nic = nics.get(nid)
        addrs = [nic.address] if nic and nic.address else vm.status.addresses.get(name, [])
        line = f"  {nic.id + ' ' if nic else ''}{name} ({mode.value.lower() if mode else '?'})"
        line += f" {nic.mac}" if nic and nic.mac else ""
        line += f": {', '.join(addrs) or '-'}"
        if mode == NetworkMode.SEGMENT:
            pid = vm.spec.nic_qos.get(nid) or vm.spec.qos_profile_id
            line += f"  qos {profiles.get(pid, pid) if pid else 'unshaped'}"
        lines.append(line)
    return lines


def _vm_detail(vm: VM, nets: dict[str, Network] | None = None,
               profiles: dict[str, str] | None = None) -> str:
    s, st = vm.spec, vm.status
    vols = ", ".join(v + (" (boot)" if v == s.boot_disk_id else "") for v in s.volume_ids)
    lines = [
        f"Name:         {vm.meta.name}",
        f"ID:           {vm.meta.id}",
        f"State:        {st.state.value}" + (f"  ({st.reason})" if st.reason else ""),
        f"Machine:      {s.machine.value} ({s.arch})",
        f"Accelerator:  {st.accelerator or s.accelerator.value}",
        f"CPUs/memory:  {s.cpu_cores} / {s.memory_mb} MiB",
        f"PID:          {st.pid or '-'}",
        f"Kernel:       {s.kernel or '-'}",
        f"Initrd:       {s.initrd or '-'}",
        f"Cmdline:      {s.cmdline or '-'}",
        f"Forwards:     {', '.join(str(f) for f in s.port_forwards) or '-'}",
        f"Volumes:      {vols or '-'}",
        f"Networks:     {'' if s.network_ids or st.nics else '-'}".rstrip(),
        *_vm_networks(vm, nets or {}, profiles or {}),
        f"Snapshot:     {st.current_snapshot_id or '-'} (current)",
        f"Labels:       {', '.join(f'{k}={v}' for k, v in vm.meta.labels.items()) or '-'}",
        f"Serial log:   {st.serial_log or '-'}",
        f"Version:      {vm.meta.version}",
    ]
    if st.last_serial_lines and st.state in (VMState.ERROR, VMState.STOPPED):
        lines.append("Last console lines:")
        lines += [f"  | {ln}" for ln in st.last_serial_lines]
    return "\n".join(lines)


# --- core access --------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None,
                       Path(args.data_dir) if args.data_dir else None)


async def _with_core(args: argparse.Namespace,
                     fn: Callable[[RemoteCore], Awaitable[int]]) -> int:
    """Run ``fn`` against the data dir's daemon, starting one when none answers."""
    core = await connect(args)
    try:
        return await fn(core)
    finally:
        await core.close()


async def _vm_view(core: RemoteCore, vm: VM) -> str:
    """``vm get``'s text: networks and QoS profiles shown by name, which needs their records."""
    if not vm.spec.network_ids:
        return _vm_detail(vm)  # no names to look up
    nets = {n.meta.id: n for n in await core.list_networks()}
    profiles = {p.meta.id: p.meta.name for p in await core.list_qos_profiles()}
    return _vm_detail(vm, nets, profiles)


async def connect(args: argparse.Namespace) -> RemoteCore:
    return await connect_core(
        address=args.address, token=args.token, tls_ca=args.tls_ca,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        config_path=Path(args.config) if args.config else None,
        autostart=not args.no_autostart,
    )


# --- commands -----------------------------------------------------------------------------


def _spec_from_args(args: argparse.Namespace) -> VMSpec:
    forwards = []
    for i, text in enumerate(args.forward or []):
        try:
            forwards.append(PortForward.parse(text))
        except ValueError as exc:
            raise InvalidSpec(f"port_forwards[{i}]", str(exc)) from None
    extra = parse_pairs(args.extra, "extra_args")
    machine = Machine(args.machine)
    cpus = args.cpus if args.cpus is not None else (4 if machine == Machine.RASPI3B else 1)
    mem = args.memory if args.memory is not None else (1024 if machine == Machine.RASPI3B
                                                       else 256)
    def path(p: str | None) -> str:
        return str(Path(p).expanduser().absolute()) if p else ""

    nets: list[str] = list(args.net or [])
    default_qos, nic_qos = "", {}
    for text in args.qos or []:
        net, sep, prof = text.rpartition("=")
        if not sep:
            if default_qos:
                raise InvalidSpec("--qos", f"{text!r}: give one VM-wide --qos PROFILE (and "
                                  "NETWORK=PROFILE for single NICs)")
            default_qos = text
        elif not net or not prof:
            raise InvalidSpec("--qos", f"{text!r}: expected PROFILE or NETWORK=PROFILE")
        elif net not in nets:
            raise InvalidSpec("--qos", f"{text!r}: {net!r} is not one of this VM's --net "
                              "networks")
        else:
            nic_qos[net] = prof
    volumes: list[str] = []
    boot = ""
    for text in args.disk or []:
        ref, _, flag = text.partition(":")
        if flag not in ("", "boot"):
            raise InvalidSpec("volume_ids", f"{text!r}: expected VOLUME or VOLUME:boot")
        volumes.append(ref)
        if flag:
            boot = ref
    return VMSpec(
        volume_ids=volumes, boot_disk_id=boot, network_ids=nets, qos_profile_id=default_qos,
        nic_qos=nic_qos,
        arch=args.arch, machine=machine, cpu_cores=cpus, memory_mb=mem,
        kernel=path(args.kernel), initrd=path(args.initrd), cmdline=args.cmdline or "",
        dtb=path(args.dtb), port_forwards=forwards, extra_args=extra,
        accelerator=Accelerator(args.accel), compatibility_mode=args.compat,
    )


async def cmd_vm_create(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    labels = parse_pairs(args.label, "labels")

    async def run(orch: RemoteCore) -> int:
        vm = await orch.create_vm(args.name, spec, labels, start=args.start)
        text = "" if args.output == "json" else await _vm_view(orch, vm)
        _emit(args, to_dict(vm), lambda: text)
        return 0

    return await _with_core(args, run)


async def cmd_vm_list(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        vms = await core.list_vms()
        _emit(args, [to_dict(v) for v in vms],
              lambda: _fmt_table(VM_HEADERS, [_vm_row(v) for v in vms]))
        return 0

    return await _with_core(args, run)


async def cmd_vm_get(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        vm = await core.get_vm(args.name)
        text = "" if args.output == "json" else await _vm_view(core, vm)
        _emit(args, to_dict(vm), lambda: text)
        return 0

    return await _with_core(args, run)


def _lifecycle(op: str) -> Callable[[argparse.Namespace], Awaitable[int]]:
    async def cmd(args: argparse.Namespace) -> int:
        async def run(orch: RemoteCore) -> int:
            if op == "start":
                vm = await orch.start_vm(args.name, paused=args.paused)
            elif op == "stop":
                vm = await orch.stop_vm(args.name, force=args.force, timeout=args.timeout)
            elif op == "pause":
                vm = await orch.pause_vm(args.name)
            elif op == "resume":
                vm = await orch.resume_vm(args.name)
            elif op == "restart":
                vm = await orch.restart_vm(args.name, force=args.force, timeout=args.timeout)
            else:
                await orch.delete_vm(args.name, force=args.force)
                _emit(args, {"deleted": args.name}, lambda: f"deleted {args.name}")
                return 0
            _emit(args, to_dict(vm),
                  lambda: f"{vm.meta.name}: {vm.status.state.value}"
                  + (f" ({vm.status.reason})" if vm.status.reason else ""))
            return 0

        return await _with_core(args, run)

    return cmd


async def cmd_console(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        vm = await core.get_vm(args.name)
        if args.log:  # what the console showed so far, running or not (the daemon's host)
            with contextlib.suppress(FileNotFoundError):
                sys.stdout.buffer.write(Path(vm.status.serial_log).read_bytes()
                                        if vm.status.serial_log else b"")
            sys.stdout.flush()
            return 0
        from .terminal import attach_console

        console = core.console(vm.meta.id)
        reader = await console.open(history=not args.no_history)
        print(f"Connected to {vm.meta.name}'s serial console; Ctrl+] to detach "
              "(the VM keeps running).", file=sys.stderr)
        try:
            await attach_console(reader, console.write, detach_key=DETACH_KEY)
        finally:
            await console.close()
            reader.close()
        print(f"\nDetached from {vm.meta.name}.", file=sys.stderr)
        return 0

    return await _with_core(args, run)


async def cmd_status(args: argparse.Namespace) -> int:
    async def run(orch: RemoteCore) -> int:
        st = await orch.status()

        def table() -> str:
            host = st["host"]
            counts = ", ".join(f"{k.lower()} {v}" for k, v in st["vms"].items() if v) or "none"
            accel = ", ".join(f"{a}: {v}" for a, v in host["accelerators"].items())
            return "\n".join([
                f"InfraSim {st['version']}",
                f"Data dir:      {st['data_dir']}",
                f"Daemon:        pid {st.get('daemon_pid', '-')}, up {st['uptime_s']:.0f}s",
                f"Host:          {host['os']}/{host['arch']}",
                f"QEMU:          {host['qemu_version'] or 'not found'}",
                f"Accelerators:  {accel}",
                *[f"  {a}: {why}" for a, why in host.get("accel_reasons", {}).items()],
                f"VMs:           {counts}",
            ])

        _emit(args, st, table)
        return 0

    return await _with_core(args, run)


async def cmd_version(args: argparse.Namespace) -> int:
    _emit(args, {"version": __version__}, lambda: f"infrasim {__version__}")
    return 0


async def cmd_guest_build(args: argparse.Namespace) -> int:
    from .core.guest import GuestKit, build_guest

    flavours = ["cloud", "generic"] if args.flavour == "all" else [args.flavour]
    loop = asyncio.get_running_loop()
    kits = {}
    for flavour in flavours:
        def progress(msg: str) -> None:
            print(f"guest: {msg}", file=sys.stderr)

        def build(f: str = flavour) -> GuestKit:
            return build_guest(f, progress=progress, offline=args.offline)

        kits[flavour] = await loop.run_in_executor(None, build)
    data = {f: k.to_json() for f, k in kits.items()}
    _emit(args, data if len(data) > 1 else next(iter(data.values())),
          lambda: "\n".join(f"{f}: kernel={k.kernel} initrd={k.initrd}"
                            + (f" dtb={k.dtb}" if k.dtb else "") for f, k in kits.items()))
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from .rpc.daemon import ServeOptions, serve

    if bool(args.tls_cert) != bool(args.tls_key):
        raise InvalidSpec("tls_key" if args.tls_cert else "tls_cert",
                          "give both --tls-cert and --tls-key")
    opts = ServeOptions(args.listen, args.tls_cert, args.tls_key)
    ssh = getattr(args, "ssh", None)
    if ssh is not None:
        from dataclasses import replace

        opts = replace(opts, ssh=ssh, ssh_record=args.ssh_record,
                       ssh_idle_timeout=args.ssh_idle_timeout,
                       ssh_max_session=args.ssh_max_session,
                       ssh_rate_per_minute=args.ssh_rate, ssh_rate_burst=args.ssh_burst,
                       ssh_max_sessions_per_key=args.ssh_sessions_per_key)
    return await serve(_config(args), opts)


async def cmd_ssh_key(args: argparse.Namespace) -> int:
    from .core.access import Role
    from .ssh.keys import KeyFile, parse_public_key

    keys = KeyFile.of(DataDir(_config(args).daemon.data_dir).root)
    if args.verb == "add":
        path = Path(args.pubkey_file).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise InvalidSpec("pubkey_file", f"cannot read {path}: {err.strerror}") from None
        key = parse_public_key(text, Role.parse(args.role))
        if args.comment:
            from dataclasses import replace

            key = replace(key, comment=args.comment)
        keys.add(key)
        _emit(args, {"fingerprint": key.fingerprint, "role": args.role, "comment": key.comment},
              lambda: f"added {key.fingerprint} ({key.comment or 'no comment'}) as {args.role}")
    elif args.verb == "list":
        rows = [{"fingerprint": k.fingerprint, "role": k.role.name.lower(),
                 "type": k.key_type, "comment": k.comment} for k in keys.load()]
        _emit(args, rows, lambda: _fmt_table(
            ["ROLE", "FINGERPRINT", "TYPE", "COMMENT"],
            [[r["role"], r["fingerprint"], r["type"], r["comment"]] for r in rows]))
    else:
        gone = keys.remove(args.ref)
        _emit(args, {"removed": gone.fingerprint},
              lambda: f"removed {gone.fingerprint} ({gone.comment or 'no comment'})")
    return 0


async def cmd_vm_watch(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        async for ev in core.watch(resume_token=args.since, resource=args.name,
                                   metrics=args.metrics):
            if args.output == "json":
                print(json.dumps({"token": str(ev.seq or ""), "ts": ev.ts, "type": ev.type,
                                  "kind": ev.kind, "id": ev.resource_id, "name": ev.name,
                                  "message": ev.message, "data": ev.data}), flush=True)
            else:
                when = time.strftime("%H:%M:%S", time.localtime(ev.ts))
                print(f"{when}  {ev.type:<18} {ev.name:<16} {ev.message}", flush=True)
        return 0

    return await _with_core(args, run)


async def cmd_network_create(args: argparse.Namespace) -> int:
    from .core.model import NetworkSpec

    mode = NetworkMode(args.mode.replace("-", "_").upper())
    cidr = args.subnet or ("" if mode == NetworkMode.SEGMENT else NetworkSpec().cidr)
    spec = NetworkSpec(mode=mode, cidr=cidr, gateway=args.gateway,
                       vmnet_interface=args.interface)

    async def run(core: RemoteCore) -> int:
        n = await core.create_network(args.name, spec, parse_pairs(args.label, "labels"))
        _emit(args, to_dict(n), lambda: f"network {n.meta.name} created ({mode.value.lower()}, "
                                        f"{n.spec.cidr})")
        return 0

    return await _with_core(args, run)


async def cmd_network(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        if args.verb == "list":
            nets = await core.list_networks()
            _emit(args, [to_dict(n) for n in nets], lambda: _fmt_table(
                ["NAME", "MODE", "SUBNET", "VMS"],
                [[n.meta.name, n.spec.mode.value.lower(), n.spec.cidr,
                  str(len(n.status.attached_vm_ids))] for n in nets]))
        elif args.verb == "get":
            n = await core.get_network(args.name)
            vms = {vm.meta.id: vm.meta.name for vm in await core.list_vms()} \
                if n.status.attached_vm_ids and args.output != "json" else {}
            _emit(args, to_dict(n), lambda: "\n".join(
                f"{k}: {v}" for k, v in {
                    "name": n.meta.name, "id": n.meta.id, "mode": n.spec.mode.value.lower(),
                    "subnet": n.spec.cidr, "gateway": n.spec.gateway or "-",
                    "vms": ", ".join(vms.get(v, v) for v in n.status.attached_vm_ids) or "-",
                }.items()))
        else:
            await core.delete_network(args.name)
            _emit(args, {"deleted": args.name}, lambda: f"deleted {args.name}")
        return 0

    return await _with_core(args, run)


# --- QoS profiles and link statistics -----------------------------------------------------

# flag dest -> (QosProfileSpec field, parser(text, flag)); every flag defaults to None so that
# `qos update` changes only what was given.
_QOS_FLAGS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "rate": ("rate_bps", units.parse_rate),
    "burst": ("burst_bytes", units.parse_size),
    "queue": ("queue_bytes", units.parse_size),
    "delay": ("delay_ms", units.parse_time_ms),
    "jitter": ("jitter_ms", units.parse_time_ms),
    "duplicate": ("duplicate_pct", units.parse_pct),
    "reorder": ("reorder_pct", units.parse_pct),
    "seed": ("seed", units.parse_int),
}
_LORA_FLAGS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "lora_sf": ("spreading_factor", units.parse_int),
    "lora_bw": ("bandwidth_khz", lambda t, f: units.parse_int_unit(t, f, "kHz")),
    "lora_cr": ("coding_rate", units.parse_coding_rate),
    "lora_preamble": ("preamble", units.parse_int),
    "lora_tx_power": ("tx_power_dbm", lambda t, f: units.parse_number(t, f, "dBm",
                                                                      signed=True)),
    "lora_distance": ("distance_m", units.parse_distance_m),
    "lora_frequency": ("frequency_mhz", lambda t, f: units.parse_number(t, f, "MHz")),
    "lora_d0": ("d0_m", units.parse_distance_m),
    "lora_path_loss_d0": ("path_loss_d0_db", lambda t, f: units.parse_number(t, f, "dB")),
    "lora_path_loss_exponent": ("path_loss_exponent", lambda t, f: units.parse_number(t, f)),
    "lora_shadowing": ("shadowing_sigma_db", lambda t, f: units.parse_number(t, f, "dB")),
    "lora_noise_figure": ("noise_figure_db", lambda t, f: units.parse_number(t, f, "dB")),
    "lora_capture": ("capture_db", lambda t, f: units.parse_number(t, f, "dB")),
    "lora_duty_cycle": ("duty_cycle_pct", units.parse_pct),
}
_LORA_SWITCHES = {"lora_implicit_header": "implicit_header", "lora_crc": "crc"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# spec field (as the core names it in errors) -> the flag that sets it
_FIELD_FLAGS: dict[str, str] = {
    **{field: _flag(dest) for dest, (field, _) in _QOS_FLAGS.items()},
    **{f"lora.{field}": _flag(dest) for dest, (field, _) in _LORA_FLAGS.items()},
    **{f"lora.{field}": _flag(dest) for dest, field in _LORA_SWITCHES.items()},
    **dict.fromkeys(("loss_pct", "ge_p_pct", "ge_r_pct", "ge_bad_loss_pct",
                     "ge_good_loss_pct"), "--loss"),
    "distribution": "--distribution", "direction": "--direction", "lora": "--lora-*",
}


def qos_spec_from_args(args: argparse.Namespace,
                       base: QosProfileSpec | None = None) -> QosProfileSpec:
    """The spec the flags ask for: ``base`` (or the defaults) with every given flag applied.
    Any ``--lora-*`` flag adds the radio section (from defaults if there was none);
    ``--no-lora`` removes it."""
    spec = copy.deepcopy(base) if base is not None else QosProfileSpec()
    for dest, (field, parse) in _QOS_FLAGS.items():
        text = getattr(args, dest, None)
        if text is not None:
            setattr(spec, field, parse(text, _flag(dest)))
    for dest in ("distribution", "direction"):
        if getattr(args, dest, None) is not None:
            setattr(spec, dest, getattr(args, dest))
    if getattr(args, "loss", None) is not None:
        for field, value in units.parse_loss(args.loss).items():
            setattr(spec, field, value)
    lora: dict[str, Any] = {}
    for dest, (field, parse) in _LORA_FLAGS.items():
        text = getattr(args, dest, None)
        if text is not None:
            lora[field] = parse(text, _flag(dest))
    for dest, field in _LORA_SWITCHES.items():
        if getattr(args, dest, None) is not None:
            lora[field] = bool(getattr(args, dest))
    if getattr(args, "no_lora", False):
        if lora:
            raise InvalidSpec("--no-lora", "removes the LoRa section: give no --lora-* flag "
                              "with it")
        spec.lora = None
    elif lora:
        spec.lora = spec.lora or LoraSpec()
        for field, value in lora.items():
            setattr(spec.lora, field, value)
    return spec


def _qos_flags_given(args: argparse.Namespace) -> bool:
    dests = [*_QOS_FLAGS, *_LORA_FLAGS, *_LORA_SWITCHES, "distribution", "direction", "loss"]
    return any(getattr(args, d, None) is not None for d in dests) or bool(
        getattr(args, "no_lora", False))


def _as_flag_error(exc: InvalidSpec) -> InvalidSpec:
    """The core names spec fields (``burst_bytes``); the operator typed flags (``--burst``)."""
    flag = _FIELD_FLAGS.get(exc.field)
    return InvalidSpec(flag, exc.reason) if flag else exc


def _qos_loss(s: QosProfileSpec) -> str:
    if s.ge_p_pct > 0:
        return (f"gemodel p={units.format_pct(s.ge_p_pct)} r={units.format_pct(s.ge_r_pct)} "
                f"1-h={units.format_pct(s.ge_bad_loss_pct)} "
                f"1-k={units.format_pct(s.ge_good_loss_pct)}")
    return units.format_pct(s.loss_pct) if s.loss_pct else "-"


def _qos_delay(s: QosProfileSpec) -> str:
    if not s.delay_ms and not s.jitter_ms:
        return "-"
    text = units.format_ms(s.delay_ms)
    if s.jitter_ms:
        text += f" ± {units.format_ms(s.jitter_ms)} ({s.distribution})"
    return text


def _lora_summary(lo: LoraSpec) -> str:
    return (f"SF{lo.spreading_factor} BW{lo.bandwidth_khz} CR4/{lo.coding_rate}, "
            f"{units.format_distance(lo.distance_m)}")


def _qos_row(p: QosProfile) -> list[str]:
    s = p.spec
    rate = units.format_rate(s.rate_bps) if s.rate_bps else "unlimited"
    return [p.meta.name, rate, _qos_delay(s), _qos_loss(s), s.direction,
            _lora_summary(s.lora) if s.lora else "-", str(len(p.status.attached_vm_ids))]


QOS_HEADERS = ["NAME", "RATE", "DELAY", "LOSS", "DIRECTION", "LORA", "VMS"]


def _qos_detail(p: QosProfile, vm_names: dict[str, str]) -> str:
    s = p.spec
    if s.rate_bps:
        burst = units.format_bytes(s.burst_bytes) if s.burst_bytes else "auto"
        queue = units.format_bytes(s.queue_bytes) if s.queue_bytes else "auto"
        rate = f"{units.format_rate(s.rate_bps)} (burst {burst}, queue {queue})"
    else:
        rate = "unlimited"
    lines = [
        f"Name:         {p.meta.name}",
        f"ID:           {p.meta.id}",
        f"Direction:    {s.direction}",
        f"Rate:         {rate}",
        f"Delay:        {_qos_delay(s)}",
        f"Loss:         {_qos_loss(s)}",
        f"Duplicate:    {units.format_pct(s.duplicate_pct) if s.duplicate_pct else '-'}",
        f"Reorder:      {units.format_pct(s.reorder_pct) if s.reorder_pct else '-'}",
        f"Seed:         {s.seed or 'fresh per link'}",
    ]
    if s.lora is None:
        lines.append("LoRa:         -")
    else:
        lo = s.lora
        duty = units.format_pct(lo.duty_cycle_pct) if lo.duty_cycle_pct else "unlimited"
        lines += [
            f"LoRa:         SF{lo.spreading_factor}, {lo.bandwidth_khz} kHz, CR 4/{lo.coding_rate}"
            f", preamble {lo.preamble}, {'implicit' if lo.implicit_header else 'explicit'} "
            f"header, CRC {'on' if lo.crc else 'off'}",
            f"  radio:      {units.format_num(lo.tx_power_dbm)} dBm at "
            f"{units.format_distance(lo.distance_m)}, {units.format_num(lo.frequency_mhz)} MHz,"
            f" duty cycle {duty}",
            f"  path loss:  {units.format_num(lo.path_loss_d0_db)} dB at "
            f"{units.format_distance(lo.d0_m)}, exponent {units.format_num(lo.path_loss_exponent)}"
            f", shadowing sigma {units.format_num(lo.shadowing_sigma_db)} dB",
            f"  receiver:   noise figure {units.format_num(lo.noise_figure_db)} dB, capture "
            f"{units.format_num(lo.capture_db)} dB",
        ]
    attached = [vm_names.get(v, v) for v in p.status.attached_vm_ids]
    lines += [
        f"Attached VMs: {', '.join(attached) or '-'}",
        f"Live links:   {p.status.links}",
        f"Labels:       {', '.join(f'{k}={v}' for k, v in p.meta.labels.items()) or '-'}",
        f"Version:      {p.meta.version}",
    ]
    return "\n".join(lines)


async def _qos_view(core: RemoteCore, p: QosProfile) -> str:
    names = {vm.meta.id: vm.meta.name for vm in await core.list_vms()} \
        if p.status.attached_vm_ids else {}
    return _qos_detail(p, names)


async def cmd_qos(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        if args.verb == "list":
            profs = await core.list_qos_profiles()
            _emit(args, [to_dict(p) for p in profs],
                  lambda: _fmt_table(QOS_HEADERS, [_qos_row(p) for p in profs]))
            return 0
        if args.verb == "delete":
            await core.delete_qos_profile(args.name)
            _emit(args, {"deleted": args.name}, lambda: f"deleted {args.name}")
            return 0
        if args.verb == "get":
            prof = await core.get_qos_profile(args.name)
        elif args.verb == "create":
            spec = qos_spec_from_args(args)
            try:
                prof = await core.create_qos_profile(args.name, spec,
                                                     parse_pairs(args.label, "labels"))
            except InvalidSpec as exc:
                raise _as_flag_error(exc) from None
        else:
            if not _qos_flags_given(args):
                raise InvalidSpec("flags", "nothing to change: give the flags to change "
                                  "(e.g. --rate 2mbit)")
            current = await core.get_qos_profile(args.name)
            spec = qos_spec_from_args(args, current.spec)
            try:
                prof = await core.update_qos_profile(current.meta.id, spec)
            except InvalidSpec as exc:
                raise _as_flag_error(exc) from None
        text = "" if args.output == "json" else await _qos_view(core, prof)
        _emit(args, to_dict(prof), lambda: text)
        return 0

    return await _with_core(args, run)


STATS_HEADERS = ["NETWORK", "VM", "NIC", "DIR", "PROFILE", "THROUGHPUT", "FRAMES", "BYTES",
                 "QUEUE", "DROPS", "P50", "P99"]
LORA_HEADERS = ["NETWORK", "VM", "NIC", "DIR", "SF", "RSSI", "SNR", "TOA", "DELIVERED", "LOST"]


def _stats_row(s: LinkStats) -> list[str]:
    drops = ", ".join(f"{cause} {n}" for cause, n in sorted(s.drops.items()) if n) or "-"
    queue = f"{units.format_bytes(s.queue_bytes)} ({s.queue_frames})" if s.queue_frames else "-"
    p50, p99 = ((units.format_ms(s.delay_p50_ms), units.format_ms(s.delay_p99_ms))
                if s.frames else ("-", "-"))
    return [s.network, s.vm, s.nic, s.direction, s.profile or "-",
            units.format_rate(s.throughput_bps), str(s.frames), units.format_bytes(s.bytes),
            queue, drops, p50, p99]


def _lora_row(s: LinkStats) -> list[str]:
    lo = s.lora
    assert lo is not None
    aired = bool(lo.delivered or lo.lost)  # RSSI, SNR and ToA are of the last frame sent
    return [s.network, s.vm, s.nic, s.direction, f"SF{lo.spreading_factor}",
            f"{lo.rssi_dbm:.1f} dBm" if aired else "-", f"{lo.snr_db:.1f} dB" if aired else "-",
            units.format_ms(lo.airtime_ms) if aired else "-", str(lo.delivered), str(lo.lost)]


def stats_table(links: Sequence[LinkStats]) -> str:
    """The ``network stats`` table, plus a LoRa table when any link is a radio link."""
    if not links:
        return "no links (a SEGMENT network has links while VMs on it run)"
    order = sorted(links, key=lambda s: (s.network, s.vm, s.nic, s.direction))
    out = _fmt_table(STATS_HEADERS, [_stats_row(s) for s in order])
    radio = [s for s in order if s.lora is not None]
    if radio:
        out += "\n\nLoRa\n" + _fmt_table(LORA_HEADERS, [_lora_row(s) for s in radio])
    return out


async def cmd_network_stats(args: argparse.Namespace) -> int:
    async def run(core: RemoteCore) -> int:
        links = await core.link_stats(args.name)
        if not args.watch:
            _emit(args, [to_dict(s) for s in links], lambda: stats_table(links))
            return 0
        latest: dict[str, list[LinkStats]] = {}  # network id -> its links' latest sample
        for s in links:
            latest.setdefault(s.network_id, []).append(s)
        _show_stats(args, links, args.name, time.time())
        shown = 0
        async for ev in core.watch(kinds=["network"], resource=args.name, metrics=True):
            if ev.type != "network.stats":
                continue
            latest[ev.resource_id] = [from_dict(LinkStats, d) for d in ev.data.get("links", [])]
            _show_stats(args, [s for group in latest.values() for s in group], ev.name, ev.ts)
            shown += 1
            if args.count and shown >= args.count:
                break
        return 0

    return await _with_core(args, run)


def _show_stats(args: argparse.Namespace, links: list[LinkStats], network: str,
                ts: float) -> None:
    """One update of ``network stats --watch``: a JSON line, or the table redrawn."""
    if args.output == "json":
        print(json.dumps({"network": network, "at": ts, "links": [to_dict(s) for s in links]},
                         sort_keys=True), flush=True)
        return
    head = f"{time.strftime('%H:%M:%S', time.localtime(ts))}  link statistics (Ctrl+C to stop)"
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    print(f"{clear}{head}\n{stats_table(links)}\n", flush=True)


async def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import ensure_demo, run_demo

    if sys.stdin.isatty() and sys.stdout.isatty() and not args.no_attach:
        from .tui import run_console

        args.read_only, args.theme, args.vm = False, "", ""
        return await run_console(args, prepare=lambda core: ensure_demo(core, args.name))

    async def run(core: RemoteCore) -> int:
        return await run_demo(args, core)

    return await _with_core(args, run)


async def cmd_terraform_install(args: argparse.Namespace) -> int:
    from . import __version__
    from .terraform.install import install

    root = Path(args.dir) if args.dir else DataDir(_config(args).daemon.data_dir).root / "terraform"
    done = install(root, __version__)
    _emit(args, done.to_json(), lambda: "\n".join([
        f"installed terraform-provider-infrasim {done.version} into {done.mirror}",
        f"CLI configuration: {done.cli_config}",
        "use it with:",
        f"  export TF_CLI_CONFIG_FILE={done.cli_config}",
        "  terraform init   # required_providers { infrasim = { source = \"infrasim/infrasim\" } }",
    ]))
    return 0


async def cmd_ui(args: argparse.Namespace) -> int:
    from .tui import run_console

    for name, default in (("read_only", False), ("theme", ""), ("vm", ""), ("attach", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return await run_console(args)


# --- parser -------------------------------------------------------------------------------


def _add_qos_flags(p: argparse.ArgumentParser, *, update: bool) -> None:
    """The spec flags of ``qos create|update``; all default to None (update: unchanged)."""
    g = p.add_argument_group("shaping (tc tbf)")
    g.add_argument("--rate", metavar="RATE", help="e.g. 8mbit, 500kbit (tc units: bps is "
                   "BYTES/s); 0: unlimited")
    g.add_argument("--burst", metavar="SIZE", help="bucket size, e.g. 32kb; 0: automatic")
    g.add_argument("--queue", metavar="SIZE", help="bytes waiting for tokens, e.g. 64kb; "
                   "0: automatic")
    g = p.add_argument_group("impairments (tc netem)")
    g.add_argument("--delay", metavar="TIME", help="e.g. 40ms")
    g.add_argument("--jitter", metavar="TIME", help="e.g. 5ms")
    g.add_argument("--distribution", choices=["uniform", "normal", "pareto"], default=None,
                   help="of the jitter")
    g.add_argument("--loss", metavar="PCT|gemodel:P,R[,1-H[,1-K]]",
                   help="random loss (1%%) or Gilbert-Elliott (gemodel:1%%,30%%)")
    g.add_argument("--duplicate", metavar="PCT", help="e.g. 0.1%%")
    g.add_argument("--reorder", metavar="PCT", help="e.g. 1%%")
    g.add_argument("--seed", metavar="N", help="reproducible draws; 0: fresh per link")
    g.add_argument("--direction", choices=["egress", "ingress", "both"], default=None,
                   help="egress leaves the VM, ingress enters it (default both)")
    g = p.add_argument_group("LoRa radio link (any --lora-* flag makes the profile one)")
    g.add_argument("--lora-sf", metavar="SF", help="spreading factor 6..12 (default 7)")
    g.add_argument("--lora-bw", metavar="KHZ", help="bandwidth 125, 250 or 500 kHz")
    g.add_argument("--lora-cr", metavar="4/N", help="coding rate 4/5..4/8")
    g.add_argument("--lora-preamble", metavar="N", help="preamble symbols (default 8)")
    g.add_argument("--lora-implicit-header", action=argparse.BooleanOptionalAction,
                   default=None, help="no PHY header (SF6 needs it)")
    g.add_argument("--lora-crc", action=argparse.BooleanOptionalAction, default=None,
                   help="payload CRC (default on)")
    g.add_argument("--lora-tx-power", metavar="DBM", help="e.g. 14")
    g.add_argument("--lora-distance", metavar="DIST", help="e.g. 2km, 500m")
    g.add_argument("--lora-frequency", metavar="MHZ", help="e.g. 868.1")
    g.add_argument("--lora-d0", metavar="DIST", help="path-loss reference distance (40m)")
    g.add_argument("--lora-path-loss-d0", metavar="DB", help="path loss at d0 (127.41)")
    g.add_argument("--lora-path-loss-exponent", metavar="N", help="(2.08)")
    g.add_argument("--lora-shadowing", metavar="DB", help="shadowing sigma (3.57)")
    g.add_argument("--lora-noise-figure", metavar="DB", help="receiver noise figure (6)")
    g.add_argument("--lora-capture", metavar="DB", help="capture margin (6)")
    g.add_argument("--lora-duty-cycle", metavar="PCT", help="regional limit, e.g. 1%%")
    if update:
        g.add_argument("--no-lora", action="store_true", default=False,
                       help="remove the LoRa section")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="keep VMs and state here (default: $INFRASIM_DATA_DIR or the "
                             "platform data dir)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="config.toml to read")
    common.add_argument("--output", "-o", choices=["table", "json"], default=argparse.SUPPRESS)
    common.add_argument("--no-autostart", action="store_true", default=argparse.SUPPRESS,
                        help="fail instead of starting a daemon when none answers")
    common.add_argument("--address", default=argparse.SUPPRESS,
                        help="HOST:PORT of a daemon serving TCP (also $INFRASIM_ADDRESS)")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="that daemon's API token (also $INFRASIM_TOKEN)")
    common.add_argument("--tls-ca", default=argparse.SUPPRESS,
                        help="CA certificate to check that daemon's TLS certificate")
    p = argparse.ArgumentParser(prog="infrasim", parents=[common],
                                description="Run and manage real QEMU VMs.")
    sub = p.add_subparsers(dest="command", required=False, metavar="COMMAND")
    p.set_defaults(func=cmd_ui)
    ui = sub.add_parser("ui", parents=[common],
                        help="the operator console (also what `infrasim` alone opens)")
    ui.add_argument("--read-only", action="store_true",
                    help="view only: actions are hidden and the core refuses them")
    ui.add_argument("--theme", default="", help="dark, light or a .tcss theme of your own")
    ui.add_argument("--vm", default="", metavar="NAME", help="open this VM's view first")
    ui.add_argument("--attach", action="store_true",
                    help="never embed the core: attach to (or start) the daemon")
    ui.set_defaults(func=cmd_ui)

    sv = sub.add_parser("serve", parents=[common],
                        help="run the core headless and serve the infrasim.v1 API")
    sv.add_argument("--listen", default="", metavar="HOST:PORT",
                    help="also serve TCP here (bearer token required; default: unix socket only)")
    sv.add_argument("--tls-cert", default="", help="serve TCP with TLS: certificate (PEM)")
    sv.add_argument("--tls-key", default="", help="…and its private key (PEM)")
    sv.add_argument("--ssh", nargs="?", const="127.0.0.1:2222", default=None,
                    metavar="[ADDR:]PORT",
                    help="also serve the console over SSH (default 127.0.0.1:2222); keys and "
                         "roles: `infrasim ssh-key`")
    sv.add_argument("--ssh-record", action="store_true",
                    help="record each SSH session as asciicast v2 (owner-readable only)")
    sv.add_argument("--ssh-idle-timeout", type=float, default=1800.0, metavar="S",
                    help="disconnect an SSH session idle this long (0: never)")
    sv.add_argument("--ssh-max-session", type=float, default=43200.0, metavar="S",
                    help="longest SSH session (0: unlimited)")
    sv.add_argument("--ssh-rate", type=float, default=10.0, metavar="N",
                    help="new SSH connections per minute per client address")
    sv.add_argument("--ssh-burst", type=int, default=5, metavar="N",
                    help="…allowed at once before the rate applies")
    sv.add_argument("--ssh-sessions-per-key", type=int, default=8, metavar="N",
                    help="concurrent SSH sessions per key")
    sv.set_defaults(func=cmd_serve)

    sk = sub.add_parser("ssh-key", help="who may use the console over SSH, and as what"
                        ).add_subparsers(dest="verb", required=True, metavar="VERB")
    ska = sk.add_parser("add", parents=[common], help="allow a public key with a role")
    ska.add_argument("pubkey_file", help="an OpenSSH public key file (~/.ssh/id_ed25519.pub)")
    ska.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    ska.add_argument("--comment", default="", help="a name for the key (default: the file's)")
    ska.set_defaults(func=cmd_ssh_key)
    skl = sk.add_parser("list", parents=[common], help="list allowed keys and their roles")
    skl.set_defaults(func=cmd_ssh_key)
    skr = sk.add_parser("remove", parents=[common], help="revoke a key")
    skr.add_argument("ref", help="its fingerprint (SHA256:…, or 8+ characters of it) or comment")
    skr.set_defaults(func=cmd_ssh_key)

    vm = sub.add_parser("vm", help="virtual machines").add_subparsers(dest="verb", required=True,
                                                                     metavar="VERB")
    c = vm.add_parser("create", parents=[common], help="create a VM (and start it with --start)")
    c.add_argument("name")
    c.add_argument("--machine", choices=[m.value for m in Machine], default="virt")
    c.add_argument("--arch", default="aarch64")
    c.add_argument("--cpus", type=int)
    c.add_argument("--memory", type=int, metavar="MiB")
    c.add_argument("--kernel")
    c.add_argument("--initrd")
    c.add_argument("--cmdline")
    c.add_argument("--dtb", help="device tree blob (required by raspi3b)")
    c.add_argument("--forward", action="append", metavar="[ADDR:]HOSTPORT:GUESTPORT[/udp]")
    c.add_argument("--disk", action="append", metavar="VOLUME[:boot]",
                   help="attach a volume by name or id (repeatable; mark one :boot)")
    c.add_argument("--label", action="append", metavar="KEY=VALUE")
    c.add_argument("--extra", action="append", metavar="KEY=VALUE",
                   help="allow-listed QEMU tuning (see docs/extra-args.md)")
    c.add_argument("--net", action="append", metavar="NETWORK",
                   help="attach a NIC to this network (name or id; repeatable)")
    c.add_argument("--qos", action="append", metavar="[NETWORK=]PROFILE",
                   help="QoS profile of every SEGMENT NIC, or NETWORK=PROFILE for one NIC "
                        "(repeatable)")
    c.add_argument("--accel", choices=[a.value for a in Accelerator], default="auto")
    c.add_argument("--compat", action="store_true", help="most conservative CPU and devices")
    c.add_argument("--start", action="store_true")
    c.set_defaults(func=cmd_vm_create)
    ls = vm.add_parser("list", parents=[common], help="list VMs")
    ls.set_defaults(func=cmd_vm_list)
    g = vm.add_parser("get", parents=[common], help="show one VM")
    g.add_argument("name")
    g.set_defaults(func=cmd_vm_get)
    for op, helptext in [("start", "start a VM"), ("stop", "power a VM off"),
                         ("pause", "freeze a VM's vCPUs"), ("resume", "unfreeze a VM"),
                         ("restart", "power off, then start"), ("delete", "delete a VM")]:
        s = vm.add_parser(op, parents=[common], help=helptext)
        s.add_argument("name")
        if op in ("stop", "restart", "delete"):
            s.add_argument("--force", action="store_true",
                           help="do not wait for the guest" if op != "delete"
                           else "stop it first if running")
        if op == "start":
            s.add_argument("--paused", action="store_true",
                           help="start QEMU but keep the vCPUs stopped until `vm resume`")
        if op in ("stop", "restart"):
            s.add_argument("--timeout", type=float, default=30.0,
                           help="seconds to wait for a graceful power-off before forcing")
        s.set_defaults(func=_lifecycle(op))

    con = sub.add_parser("console", parents=[common], help="attach to a VM's serial console")
    con.add_argument("name")
    con.add_argument("--log", action="store_true", help="print what the console showed; exit")
    con.add_argument("--no-history", action="store_true", help="do not replay recent output")
    con.set_defaults(func=cmd_console)

    w = vm.add_parser("watch", parents=[common], help="follow events live")
    w.add_argument("name", nargs="?", default="", help="only this VM")
    w.add_argument("--metrics", action="store_true", help="also CPU and memory samples")
    w.add_argument("--since", default="", metavar="TOKEN",
                   help="replay events after this resume token first")
    w.set_defaults(func=cmd_vm_watch)

    net = sub.add_parser("network", help="networks").add_subparsers(dest="verb", required=True,
                                                                   metavar="VERB")
    nc = net.add_parser("create", parents=[common], help="declare a network")
    nc.add_argument("name")
    nc.add_argument("--mode", default="user",
                    choices=["user", "vmnet-shared", "vmnet-bridged", "segment"])
    nc.add_argument("--subnet", default="", metavar="CIDR",
                    help="user: 10.0.2.0/24 (QEMU's); segment: the first free 10.N.0.0/24")
    nc.add_argument("--gateway", default="")
    nc.add_argument("--interface", default="", help="host interface (vmnet-bridged)")
    nc.add_argument("--label", action="append", metavar="KEY=VALUE")
    nc.set_defaults(func=cmd_network_create)
    for verb, helptext in [("list", "list networks"), ("get", "show one network"),
                           ("delete", "delete a network (refused while VMs use it)")]:
        np_ = net.add_parser(verb, parents=[common], help=helptext)
        if verb != "list":
            np_.add_argument("name")
        np_.set_defaults(func=cmd_network, verb=verb)
    nst = net.add_parser("stats", parents=[common],
                         help="traffic, queues, drops and delay of each link of SEGMENT networks")
    nst.add_argument("name", nargs="?", default="", help="one network (default: every segment)")
    nst.add_argument("--watch", action="store_true",
                     help="follow the live samples (twice a second) until Ctrl+C")
    nst.add_argument("--count", type=int, default=0, metavar="N",
                     help="with --watch: stop after N updates")
    nst.set_defaults(func=cmd_network_stats)

    qos = sub.add_parser("qos", help="QoS profiles: shaping and impairments of VM NICs"
                         ).add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, helptext in [("create", "declare a QoS profile"),
                           ("update", "change a profile (only the flags given); applies live")]:
        qp = qos.add_parser(verb, parents=[common], help=helptext)
        qp.add_argument("name")
        _add_qos_flags(qp, update=verb == "update")
        if verb == "create":
            qp.add_argument("--label", action="append", metavar="KEY=VALUE")
        qp.set_defaults(func=cmd_qos)
    for verb, helptext in [("list", "list QoS profiles"), ("get", "show one profile"),
                           ("delete", "delete a profile (refused while VMs use it)")]:
        qp = qos.add_parser(verb, parents=[common], help=helptext)
        if verb != "list":
            qp.add_argument("name")
        qp.set_defaults(func=cmd_qos)

    add_lora_commands(sub, common)  # the time-on-air calculator; needs no daemon

    comp = sub.add_parser("completion", parents=[common], help="print a shell completion script")
    comp.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    comp.set_defaults(func=cmd_completion)

    st = sub.add_parser("status", parents=[common], help="host facts and VM counts")
    st.set_defaults(func=cmd_status)
    ver = sub.add_parser("version", parents=[common], help="print the version")
    ver.set_defaults(func=cmd_version)

    guest = sub.add_parser("guest", help="the tiny test guest").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    gb = guest.add_parser("build", parents=[common],
                          help="build the tiny aarch64 guest from the Debian archive")
    gb.add_argument("--flavour", "--flavor", choices=["cloud", "generic", "all"], default="cloud")
    gb.add_argument("--offline", action="store_true", help="use the cached kit only")
    gb.set_defaults(func=cmd_guest_build)

    from .cli_storage import register

    register(sub, common, _with_core, _emit, _fmt_table)

    tf = sub.add_parser("terraform", help="the Terraform provider").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    tfi = tf.add_parser("install", parents=[common],
                        help="put the provider in a local mirror and write a CLI config")
    tfi.add_argument("--dir", default="", help="where (default: DATA_DIR/terraform)")
    tfi.set_defaults(func=cmd_terraform_install)

    demo = sub.add_parser("demo", parents=[common],
                          help="create and start a demo VM and open the console on it")
    demo.add_argument("--name", default="demo")
    demo.add_argument("--no-attach", action="store_true",
                      help="exit once the shell prompt shows instead of attaching")
    demo.set_defaults(func=cmd_demo)
    add_examples(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("data_dir", None), ("config", None), ("output", "table"),
                          ("no_autostart", False), ("address", ""), ("token", ""),
                          ("tls_ca", "")):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.data_dir is None and os.environ.get("INFRASIM_DATA_DIR"):
        args.data_dir = os.environ["INFRASIM_DATA_DIR"]
    try:
        return int(asyncio.run(args.func(args)))
    except InfraSimError as exc:
        print(f"infrasim: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

