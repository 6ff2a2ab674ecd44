"""The README's first command: a demo VM booting to a shell, on a fresh machine.

Builds (or reuses) the tiny guest, asks the data dir's daemon (started if needed) to create the
``demo`` VM once and start it when it is not running, shows its serial console until the shell
prompt, then attaches the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from typing import Any

from .core.errors import NotFound
from .core.model import VMSpec, VMState
from .rpc.client import RemoteCore, RemoteReader
from .terminal import attach_console

PROMPT = re.compile(rb"guest:[^\n]*# ")


async def ensure_demo(core: Any, name: str) -> str:
    """Create the demo VM once and have it running; returns its name (for the console)."""
    from .core.guest import build_guest

    loop = asyncio.get_running_loop()
    kit = await loop.run_in_executor(
        None, lambda: build_guest("cloud", progress=lambda m: print(f"guest: {m}",
                                                                    file=sys.stderr)))
    try:
        vm = await core.get_vm(name)
    except NotFound:
        spec = VMSpec(kernel=str(kit.kernel), initrd=str(kit.initrd), memory_mb=256,
                      cmdline=f"infrasim.hostname={name} cryptomgr.notests")
        vm = await core.create_vm(name, spec, {"app": "demo"})
    if vm.status.state == VMState.PAUSED:
        vm = await core.resume_vm(vm.meta.id)
    elif vm.status.state != VMState.RUNNING:
        vm = await core.start_vm(vm.meta.id)
    return name


async def run_demo(args: argparse.Namespace, core: RemoteCore) -> int:
    from .core.guest import build_guest

    loop = asyncio.get_running_loop()
    kit = await loop.run_in_executor(
        None, lambda: build_guest("cloud", progress=lambda m: print(f"guest: {m}",
                                                                    file=sys.stderr)))
    try:
        vm = await core.get_vm(args.name)
    except NotFound:
        spec = VMSpec(kernel=str(kit.kernel), initrd=str(kit.initrd), memory_mb=256,
                      cmdline=f"infrasim.hostname={args.name} cryptomgr.notests")
        vm = await core.create_vm(args.name, spec, {"app": "demo"})
        print(f"infrasim: created VM {args.name!r}", file=sys.stderr)
    if vm.status.state == VMState.PAUSED:
        vm = await core.resume_vm(vm.meta.id)
    fresh = vm.status.state != VMState.RUNNING
    console = core.console(vm.meta.id)
    if fresh:
        vm = await core.start_vm(vm.meta.id, paused=True)  # attach before the first byte
        reader = await console.open(history=False)
        await core.resume_vm(vm.meta.id)
        print(f"infrasim: started {vm.meta.name} (pid {vm.status.pid}, "
              f"{vm.status.accelerator}); following its serial console…", file=sys.stderr)
    else:
        reader = await console.open(history=False)
        print(f"infrasim: {vm.meta.name} is already running (pid {vm.status.pid})",
              file=sys.stderr)
        await console.write(b"\n")  # already booted: ask for a fresh prompt
    try:
        if sys.stdin.isatty() and not args.no_attach:
            print("infrasim: attaching; Ctrl+] detaches (the VM keeps running).",
                  file=sys.stderr)
            await attach_console(reader, console.write)
            print(f"\ninfrasim: detached; {vm.meta.name} keeps running "
                  f"(`infrasim vm stop {vm.meta.name}`).", file=sys.stderr)
            return 0
        await asyncio.wait_for(follow_to_prompt(reader), 120)
        print(f"\ninfrasim: {vm.meta.name} is at its shell prompt. Attach with "
              f"`infrasim console {vm.meta.name}`; stop with `infrasim vm stop "
              f"{vm.meta.name}`.", file=sys.stderr)
        return 0
    finally:
        await console.close()
        reader.close()


async def follow_to_prompt(reader: RemoteReader) -> None:
    seen = b""
    async for chunk in reader:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        seen = (seen + chunk)[-4096:]
        if PROMPT.search(seen):
            return
    raise ConnectionError("the VM's console closed before its shell prompt")
