"""The engine against real QEMU and the real guest: boot, console, lifecycle, forwards, raspi3b,
crashes and reattach."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from infrasim_tui.core.argv import LaunchPlan, NicPlan, build_argv, mac_for
from infrasim_tui.core.config import Config
from infrasim_tui.core.errors import HostPortInUse, WrongState
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import VM, Accelerator, Machine, NetworkMode, PortForward, VMState
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.supervisor import QemuProcess

from .conftest import BANNER, guest_spec, qemu_pids, run_in_guest

pytestmark = pytest.mark.qemu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def boot(core: Orchestrator, name: str, kit: GuestKit, **kw: object) -> VM:
    vm = await core.create_vm(name, guest_spec(kit, **kw), start=True)
    assert vm.status.state == VMState.RUNNING
    await core.console(vm.meta.id).wait_for(BANNER, 60, start=0)
    return vm


async def test_boot_to_banner_and_run_a_command(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    vm = await boot(orch, "web-1", cloud_kit)
    assert vm.status.pid in qemu_pids(orch.data.root)
    assert vm.status.accelerator == "tcg"  # aarch64 guest on this x86_64 host
    assert await orch.query_status("web-1") == "running"
    assert (await run_in_guest(orch, vm.meta.id, "echo $((6*7))")).strip() == "42"
    assert "aarch64" in await run_in_guest(orch, vm.meta.id, "uname -m")
    # The serial log has what the console showed, for `infrasim console --log`.
    assert BANNER in await orch.console_log("web-1")
    events = [e.type for e in await orch.store.events(vm.meta.id)]
    assert events[:1] == ["vm.created"] and events.count("vm.state") >= 2


async def test_graceful_stop_powers_the_guest_off(orch: Orchestrator,
                                                  generic_kit: GuestKit) -> None:
    vm = await boot(orch, "gen", generic_kit)
    await asyncio.sleep(0.3)  # acpid starts right after the banner
    t0 = time.monotonic()
    vm = await orch.stop_vm("gen", timeout=20)
    assert vm.status.state == VMState.STOPPED
    assert "forced" not in vm.status.reason, vm.status.reason
    assert "powered off" in vm.status.reason
    assert time.monotonic() - t0 < 15
    assert qemu_pids(orch.data.root) == []
    # ...and starts again from STOPPED.
    vm = await orch.start_vm("gen")
    await orch.console(vm.meta.id).wait_for(BANNER, 60)


async def test_stop_forces_a_guest_that_ignores_the_power_button(
        orch: Orchestrator, cloud_kit: GuestKit) -> None:
    # The cloud kernel booted with a device tree ignores system_powerdown (qemu-facts.md).
    await boot(orch, "deaf", cloud_kit)
    vm = await orch.stop_vm("deaf", timeout=1.5)
    assert vm.status.state == VMState.STOPPED
    assert "forced after 1.5s" in vm.status.reason


async def test_guest_power_off_from_inside_is_a_clean_stop(orch: Orchestrator,
                                                           cloud_kit: GuestKit) -> None:
    vm = await boot(orch, "self-off", cloud_kit)
    await orch.console(vm.meta.id).write(b"poweroff -f\n")
    for _ in range(500):
        vm = await orch.get_vm("self-off")
        if vm.status.state != VMState.RUNNING:
            break
        await asyncio.sleep(0.02)
    assert vm.status.state == VMState.STOPPED
    assert vm.status.reason == "guest powered off"
    assert vm.status.pid == 0 and qemu_pids(orch.data.root) == []


async def test_pause_and_resume(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    vm = await boot(orch, "p1", cloud_kit)
    vm = await orch.pause_vm("p1")
    assert vm.status.state == VMState.PAUSED
    assert await orch.query_status("p1") == "paused"
    console = orch.console(vm.meta.id)
    before = console.total_bytes
    await console.write(b"echo still-here\n")
    await asyncio.sleep(0.5)
    assert b"still-here\r\n" not in console.history()[-(console.total_bytes - before or 1):]
    with pytest.raises(WrongState, match="only a RUNNING VM can be paused"):
        await orch.pause_vm("p1")
    vm = await orch.resume_vm("p1")
    assert vm.status.state == VMState.RUNNING
    await console.wait_for(b"still-here", 10, start=before)
    assert (await run_in_guest(orch, vm.meta.id, "echo ok")).strip() == "ok"


async def test_restart_boots_again(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    vm = await boot(orch, "r1", cloud_kit)
    pid = vm.status.pid
    vm = await orch.restart_vm("r1", force=True)
    assert vm.status.state == VMState.RUNNING and vm.status.pid != pid
    await orch.console(vm.meta.id).wait_for(BANNER, 60)


async def test_raspi3b_boots_and_answers(orch: Orchestrator, generic_kit: GuestKit) -> None:
    assert generic_kit.dtb is not None
    vm = await orch.create_vm("pi", guest_spec(generic_kit, machine=Machine.RASPI3B,
                                               memory_mb=1024, cpu_cores=4,
                                               dtb=str(generic_kit.dtb)), start=True)
    assert "tcg,thread=single" in vm.status.argv
    await orch.console(vm.meta.id).wait_for(BANNER, 90)
    assert "raspberry pi 3" in (await run_in_guest(orch, vm.meta.id,
                                          "cat /proc/device-tree/model")).lower()


async def test_port_forward_reaches_a_server_in_the_guest(orch: Orchestrator,
                                                          cloud_kit: GuestKit) -> None:
    port = free_port()
    vm = await boot(orch, "fw", cloud_kit, port_forwards=[PortForward(port, 8080)])
    await run_in_guest(orch, vm.meta.id, "mkdir -p /tmp/www && echo hello-from-guest > "
                       "/tmp/www/index.html && httpd -p 8080 -h /tmp/www")

    def get() -> str:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    assert "hello-from-guest" in await asyncio.to_thread(get)


async def test_taken_host_port_is_a_clear_error(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        vm = await orch.create_vm("busy", guest_spec(cloud_kit,
                                                     port_forwards=[PortForward(port, 80)]))
        with pytest.raises(HostPortInUse, match=r"port_forwards\[0\].host_port.*in use"):
            await orch.start_vm("busy")
        # Had the port been taken after that check, QEMU's own refusal maps the same way.
        vm = await orch.get_vm("busy")
        files = orch.files(vm)
        orch.data.run_dir(vm.meta.id).mkdir(parents=True, exist_ok=True)
        plan = LaunchPlan(vm_id=vm.meta.id, name="busy", spec=vm.spec, accel=Accelerator.TCG,
                          qemu_binary=orch.facts.qemu_binaries["aarch64"],
                          qmp_socket=files.qmp_socket, serial_socket=files.serial_socket,
                          serial_log=files.serial_log, pidfile=files.pidfile,
                          nics=(NicPlan("net0", NetworkMode.USER, mac_for(vm.meta.id, 0),
                                        (PortForward(port, 80),)),))
        proc = QemuProcess(vm_id=vm.meta.id, qmp_socket=files.qmp_socket,
                           serial_socket=files.serial_socket, serial_log=files.serial_log,
                           stderr_log=files.stderr_log, pidfile=files.pidfile)
        with pytest.raises(HostPortInUse, match=r"port_forwards\[0\].host_port"):
            await proc.spawn(build_argv(plan),
                             forward_fields={port: "port_forwards[0].host_port"})
    vm = await orch.get_vm("busy")
    assert vm.status.state == VMState.STOPPED
    assert qemu_pids(orch.data.root) == []


async def test_kill_9_of_qemu_is_an_error_within_2s(orch: Orchestrator,
                                                    cloud_kit: GuestKit) -> None:
    vm = await boot(orch, "victim", cloud_kit)
    with orch.bus.subscribe(lambda e: e.type == "vm.state") as sub:
        t0 = time.monotonic()
        os.kill(vm.status.pid, signal.SIGKILL)
        while True:
            ev = await asyncio.wait_for(sub.get(), 2.0)
            if ev.data["new"] == "ERROR":
                break
        elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    vm = await orch.get_vm("victim")
    assert vm.status.state == VMState.ERROR
    assert "signal 9" in vm.status.reason and "SIGKILL" in vm.status.reason
    assert any("INFRASIM-GUEST-READY" in ln or "guest:" in ln for ln in
               vm.status.last_serial_lines), vm.status.last_serial_lines
    # ERROR → start is allowed and works.
    vm = await orch.start_vm("victim")
    await orch.console(vm.meta.id).wait_for(BANNER, 60)


OWNER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from infrasim_tui.core.config import load_config
    from infrasim_tui.core.model import VMSpec
    from infrasim_tui.core.orchestrator import Orchestrator

    async def main() -> None:
        cfg = load_config(data_dir=Path(sys.argv[1]), env={})
        core = await Orchestrator.open(cfg)
        for i in range(3):
            spec = VMSpec(kernel=sys.argv[2], initrd=sys.argv[3], memory_mb=192,
                          cmdline="quiet cryptomgr.notests")
            await core.create_vm(f"vm-{i}", spec, start=True)
        print("READY", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_kill_9_of_the_core_owner_then_reattach(config: Config, data_dir: Path,
                                                      cloud_kit: GuestKit) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(data_dir), str(cloud_kit.kernel),
                              str(cloud_kit.initrd)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 60)
        assert line.strip() == "READY"
    finally:
        owner.kill()  # SIGKILL: no cleanup of any kind
        owner.wait()
    pids_before = sorted(qemu_pids(data_dir))
    assert len(pids_before) == 3

    core = await Orchestrator.open(config)
    try:
        assert len(core.report.reattached) == 3, core.report.lines()
        vms = await core.list_vms()
        assert [v.status.state for v in vms] == [VMState.RUNNING] * 3
        assert sorted(v.status.pid for v in vms) == pids_before
        assert sorted(qemu_pids(data_dir)) == pids_before  # nothing duplicated or restarted
        for vm in vms:  # the consoles are live again and the guests answer
            await core.console(vm.meta.id).wait_for(BANNER, 60, start=0)
            assert (await run_in_guest(core, vm.meta.id, "echo $((2+3))")).strip() == "5"
        # Still supervised: a crash after reattach is noticed (QEMU is no longer our child).
        os.kill(vms[0].status.pid, signal.SIGKILL)
        for _ in range(200):
            if (await core.get_vm("vm-0")).status.state == VMState.ERROR:
                break
            await asyncio.sleep(0.01)
        assert (await core.get_vm("vm-0")).status.state == VMState.ERROR
    finally:
        await core.close()

    # Closing the core left the other two running; a third owner sees them too.
    core = await Orchestrator.open(config)
    try:
        states = {v.meta.name: v.status.state for v in await core.list_vms()}
        assert states == {"vm-0": VMState.ERROR, "vm-1": VMState.RUNNING,
                          "vm-2": VMState.RUNNING}
    finally:
        for name in ("vm-1", "vm-2"):
            await core.stop_vm(name, force=True)
        await core.close()


async def test_reconcile_vm_that_died_unwatched_and_orphans(config: Config, data_dir: Path,
                                                            cloud_kit: GuestKit) -> None:
    core = await Orchestrator.open(config)
    a = await core.create_vm("a", guest_spec(cloud_kit), start=True)
    b = await core.create_vm("b", guest_spec(cloud_kit), start=True)
    await core.close()  # both keep running, nobody watches
    os.kill(a.status.pid, signal.SIGKILL)
    # b's record disappears behind the core's back: its QEMU becomes an orphan.
    from infrasim_tui.core.store import Store

    store = await Store.open(data_dir / "infrasim.db")
    await store.delete(VM, b.meta.id)
    await store.close()
    await asyncio.sleep(0.2)

    core = await Orchestrator.open(config)
    try:
        vm = await core.get_vm("a")
        assert vm.status.state == VMState.ERROR
        assert "exited while no InfraSim process watched" in vm.status.reason
        assert any("orphan" in line for line in core.report.orphans_killed)
        await asyncio.sleep(0.2)
        assert qemu_pids(data_dir) == []
        # Stale sockets were cleaned, so the VM starts again.
        vm = await core.start_vm("a")
        assert vm.status.state == VMState.RUNNING
    finally:
        await core.stop_vm("a", force=True)
        await core.close()


async def test_delete(orch: Orchestrator, cloud_kit: GuestKit) -> None:
    vm = await boot(orch, "gone", cloud_kit)
    with pytest.raises(WrongState, match="stop it first"):
        await orch.delete_vm("gone")
    await orch.delete_vm("gone", force=True)
    assert await orch.list_vms() == []
    assert not orch.data.run_dir(vm.meta.id).exists()
    assert qemu_pids(orch.data.root) == []
