"""The README's first command: a demo VM booting to a shell, on a fresh machine.

Builds (or reuses) the tiny guest, creates the ``demo`` VM once, starts it when it is not
running, shows its serial console until the shell prompt, then attaches the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

from .core.config import Config
from .core.errors import NotFound
from .core.model import VMSpec, VMState
from .core.orchestrator import Orchestrator
from .terminal import attach_console

BANNER = b"INFRASIM-GUEST-READY"
PROMPT = re.compile(rb"guest:[^\n]*# ")


async def run_demo(args: argparse.Namespace, config: Config) -> int:
    from .core.guest import build_guest

    loop = asyncio.get_running_loop()
    kit = await loop.run_in_executor(
        None, lambda: build_guest("cloud", progress=lambda m: print(f"guest: {m}",
                                                                    file=sys.stderr)))
    orch = await Orchestrator.open(config, lock_wait=args.lock_wait)
    try:
        for line in orch.report.lines():
            print(f"infrasim: {line}", file=sys.stderr)
        try:
            vm = await orch.get_vm(args.name)
        except NotFound:
            spec = VMSpec(kernel=str(kit.kernel), initrd=str(kit.initrd), memory_mb=256,
                          cmdline=f"infrasim.hostname={args.name} cryptomgr.notests")
            vm = await orch.create_vm(args.name, spec, {"app": "demo"})
            print(f"infrasim: created VM {args.name!r}", file=sys.stderr)
        if vm.status.state == VMState.PAUSED:
            vm = await orch.resume_vm(vm.meta.id)
        fresh = vm.status.state != VMState.RUNNING
        if fresh:
            vm = await orch.start_vm(vm.meta.id)
            console = orch.console(vm.meta.id)
            console_start = console.live_start
            print(f"infrasim: started {vm.meta.name} (pid {vm.status.pid}, "
                  f"{vm.status.accelerator}); following its serial console…", file=sys.stderr)
        else:
            console = orch.console(vm.meta.id)
            console_start = console.total_bytes
            print(f"infrasim: {vm.meta.name} is already running (pid {vm.status.pid})",
                  file=sys.stderr)
        attach = sys.stdin.isatty() and not args.no_attach
        if not attach:
            with console.subscribe() as reader:
                live = reader.history[len(reader.history) - (console.total_bytes - console_start):]
                sys.stdout.buffer.write(live if console_start < console.total_bytes else b"")
                sys.stdout.flush()
                if not fresh:
                    await console.write(b"\n")  # already booted: ask for a fresh prompt
                follow = asyncio.create_task(_follow(reader))
                try:
                    await console.wait_for(PROMPT, timeout=120, start=console_start)
                finally:
                    await asyncio.sleep(0.05)
                    follow.cancel()
            print(f"\ninfrasim: {vm.meta.name} is at its shell prompt. Attach with "
                  f"`infrasim console {vm.meta.name}`; stop with `infrasim vm stop "
                  f"{vm.meta.name}`.", file=sys.stderr)
            return 0
        print("infrasim: attaching; Ctrl+] detaches (the VM keeps running).", file=sys.stderr)
        await attach_console(console, history=True)
        print(f"\ninfrasim: detached; {vm.meta.name} keeps running "
              f"(`infrasim vm stop {vm.meta.name}`).", file=sys.stderr)
        return 0
    finally:
        await orch.close()


async def _follow(reader: object) -> None:
    from .core.console import ConsoleReader

    assert isinstance(reader, ConsoleReader)
    async for chunk in reader:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
