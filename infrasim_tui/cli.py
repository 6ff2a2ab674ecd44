"""``infrasim``: the command line, a thin adapter over the core's Orchestrator.

Until the API daemon exists, each command runs the core in-process for its own duration; VMs
are detached, so they outlive the command. Exit codes: 0 ok, 1 other error, 2 invalid input,
3 not found, 4 wrong state, 5 already exists, 6 conflict, 7 unavailable, 8 QEMU error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .core.config import Config, load_config
from .core.errors import DataDirLocked, InfraSimError, InvalidSpec
from .core.model import VM, Accelerator, Machine, PortForward, VMSpec, VMState, to_dict
from .core.orchestrator import Orchestrator
from .core.paths import DataDir
from .core.store import Store
from .terminal import attach_console

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


def _vm_detail(vm: VM) -> str:
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


class _ReadView:
    """Read-only access while another process owns the data dir (SQLite WAL allows it)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get_vm(self, ref: str) -> VM:
        return await self.store.get(VM, ref)

    async def list_vms(self) -> list[VM]:
        return await self.store.list(VM)


async def _with_core(args: argparse.Namespace,
                     fn: Callable[[Orchestrator], Awaitable[int]]) -> int:
    orch = await Orchestrator.open(_config(args), lock_wait=args.lock_wait)
    try:
        # Routine reattaches are silent here; what changed behind our back is not.
        for line in [*orch.report.reconciled, *orch.report.orphans_killed]:
            print(f"infrasim: {line}", file=sys.stderr)
        return await fn(orch)
    finally:
        await orch.close()


async def _with_reader(args: argparse.Namespace,
                       fn: Callable[[Orchestrator | _ReadView], Awaitable[int]]) -> int:
    """Reads reconcile when they can own the core, and fall back to the store when not."""
    cfg = _config(args)
    try:
        return await _with_core(args, fn)
    except DataDirLocked:
        store = await Store.open(DataDir(cfg.daemon.data_dir).db)
        try:
            return await fn(_ReadView(store))
        finally:
            await store.close()


# --- commands -----------------------------------------------------------------------------


def _spec_from_args(args: argparse.Namespace) -> VMSpec:
    forwards = []
    for i, text in enumerate(args.forward or []):
        try:
            forwards.append(PortForward.parse(text))
        except ValueError as exc:
            raise InvalidSpec(f"port_forwards[{i}]", str(exc)) from None
    extra: dict[str, str] = {}
    for text in args.extra or []:
        key, sep, value = text.partition("=")
        if not sep:
            raise InvalidSpec("extra_args", f"{text!r}: expected KEY=VALUE")
        extra[key] = value
    machine = Machine(args.machine)
    cpus = args.cpus if args.cpus is not None else (4 if machine == Machine.RASPI3B else 1)
    mem = args.memory if args.memory is not None else (1024 if machine == Machine.RASPI3B
                                                       else 256)
    def path(p: str | None) -> str:
        return str(Path(p).expanduser().absolute()) if p else ""

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
        volume_ids=volumes, boot_disk_id=boot,
        arch=args.arch, machine=machine, cpu_cores=cpus, memory_mb=mem,
        kernel=path(args.kernel), initrd=path(args.initrd), cmdline=args.cmdline or "",
        dtb=path(args.dtb), port_forwards=forwards, extra_args=extra,
        accelerator=Accelerator(args.accel), compatibility_mode=args.compat,
    )


def _labels(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in items or []:
        key, sep, value = text.partition("=")
        if not sep:
            raise InvalidSpec("labels", f"{text!r}: expected KEY=VALUE")
        out[key] = value
    return out


async def cmd_vm_create(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    labels = _labels(args.label)

    async def run(orch: Orchestrator) -> int:
        vm = await orch.create_vm(args.name, spec, labels, start=args.start)
        _emit(args, to_dict(vm), lambda: _vm_detail(vm))
        return 0

    return await _with_core(args, run)


async def cmd_vm_list(args: argparse.Namespace) -> int:
    async def run(core: Orchestrator | _ReadView) -> int:
        vms = await core.list_vms()
        _emit(args, [to_dict(v) for v in vms],
              lambda: _fmt_table(VM_HEADERS, [_vm_row(v) for v in vms]))
        return 0

    return await _with_reader(args, run)


async def cmd_vm_get(args: argparse.Namespace) -> int:
    async def run(core: Orchestrator | _ReadView) -> int:
        vm = await core.get_vm(args.name)
        _emit(args, to_dict(vm), lambda: _vm_detail(vm))
        return 0

    return await _with_reader(args, run)


def _lifecycle(op: str) -> Callable[[argparse.Namespace], Awaitable[int]]:
    async def cmd(args: argparse.Namespace) -> int:
        async def run(orch: Orchestrator) -> int:
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
    if args.log:
        async def show(core: Orchestrator | _ReadView) -> int:
            vm = await core.get_vm(args.name)
            path = vm.status.serial_log or str(
                DataDir(_config(args).daemon.data_dir).run_dir(vm.meta.id) / "serial.log")
            with contextlib.suppress(FileNotFoundError):
                sys.stdout.buffer.write(Path(path).read_bytes())
            sys.stdout.flush()
            return 0

        return await _with_reader(args, show)

    async def run(orch: Orchestrator) -> int:
        vm = await orch.get_vm(args.name)
        console = orch.console(vm.meta.id)
        print(f"Connected to {vm.meta.name}'s serial console; Ctrl+] to detach "
              "(the VM keeps running).", file=sys.stderr)
        await attach_console(console, detach_key=DETACH_KEY, history=not args.no_history)
        print(f"\nDetached from {vm.meta.name}.", file=sys.stderr)
        return 0

    return await _with_core(args, run)


async def cmd_status(args: argparse.Namespace) -> int:
    async def run(orch: Orchestrator) -> int:
        st = await orch.status()

        def table() -> str:
            host = st["host"]
            counts = ", ".join(f"{k.lower()} {v}" for k, v in st["vms"].items() if v) or "none"
            accel = ", ".join(f"{a}: {v}" for a, v in host["accelerators"].items())
            return "\n".join([
                f"InfraSim {st['version']}",
                f"Data dir:      {st['data_dir']}",
                f"Host:          {host['os']}/{host['arch']}",
                f"QEMU:          {host['qemu_version'] or 'not found'}",
                f"Accelerators:  {accel}",
                *[f"  {a}: {why}" for a, why in host.get("accel_reasons", {}).items()],
                f"VMs:           {counts}",
            ])

        _emit(args, st, table)
        return 0

    try:
        return await _with_core(args, run)
    except DataDirLocked as exc:
        msg = exc.message
        _emit(args, {"version": __version__, "owner_pid": exc.pid},
              lambda: f"InfraSim {__version__}\n{msg}")
        return 0


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


async def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(args, _config(args))


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="keep VMs and state here (default: $INFRASIM_DATA_DIR or the "
                             "platform data dir)")
    common.add_argument("--config", default=argparse.SUPPRESS, help="config.toml to read")
    common.add_argument("--output", "-o", choices=["table", "json"], default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="infrasim", parents=[common],
                                description="Run and manage real QEMU VMs.")
    p.add_argument("--lock-wait", type=float, default=0.0,
                   help="seconds to wait for another process that owns the data dir")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    demo = sub.add_parser("demo", parents=[common],
                          help="create and start a demo VM and follow its console")
    demo.add_argument("--name", default="demo")
    demo.add_argument("--no-attach", action="store_true",
                      help="exit once the shell prompt shows instead of attaching")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("data_dir", None), ("config", None), ("output", "table")):
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

