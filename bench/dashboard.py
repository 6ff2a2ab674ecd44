"""Console benchmarks (issue 5): the dashboard with a fleet, in a process of its own.

1. Dashboard with 50 real paused VMs (a real daemon owns them) plus 200 rows from a synthetic
   event source updating at 2 Hz: CPU of the console process over 20 s (goal ≤ 25 % of one
   core) and time to first frame with all 250 rows (goal ≤ 1 s), against an idle Textual app
   with one Static measured the same way in the same run (the floor of any Textual console).
3. Memory (RSS) of the console process with 50 VMs vs the idle Textual app.

Each console runs headless in a child process (``python -m bench.dashboard child …``) so its
CPU and RSS are its own, not the daemon's or this driver's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

VMS = 50
SYNTHETIC = 200
SECONDS = 20.0


# -- the child: one console process -----------------------------------------------------------


class SyntheticCore:
    """The daemon's API plus 200 fabricated VMs (the synthetic source answers for them)."""

    def __init__(self, core: Any, fake: dict[str, Any]) -> None:
        self._core = core
        self.fake = fake

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    async def list_vms(self, labels: Any = None) -> list[Any]:
        return [*await self._core.list_vms(), *self.fake.values()]

    async def get_vm(self, ref: str) -> Any:
        if ref in self.fake:
            return self.fake[ref]
        return await self._core.get_vm(ref)


async def child(mode: str, sock: str) -> dict[str, float]:
    import psutil
    from textual.app import App, ComposeResult
    from textual.widgets import Static

    me = psutil.Process()
    if mode == "idle":
        class Idle(App[None]):
            def compose(self) -> ComposeResult:
                yield Static("idle")

        app: Any = Idle()
        async with app.run_test(size=(160, 60), headless=True):
            await painted(app)
            ttff = time.time() - me.create_time()
            return await measure(me, ttff, lambda: 0)

    import grpc

    from infrasim_tui.app import InfraSimApp
    from infrasim_tui.core.events import Event
    from infrasim_tui.core.model import VM, ResourceMeta, VMSpec, VMState, VMStatus
    from infrasim_tui.rpc.client import RemoteCore
    from infrasim_tui.screens.dashboard import DashboardScreen
    from infrasim_tui.session import Session
    from infrasim_tui.widgets.vm_table import VMTable

    remote = RemoteCore(grpc.aio.insecure_channel(f"unix://{sock}"))
    now = time.time()
    fake = {f"syn{i:05d}": VM(meta=ResourceMeta(name=f"syn-{i:03d}", id=f"syn{i:05d}"),
                              spec=VMSpec(cpu_cores=1 + i % 4, memory_mb=128 * (1 + i % 8)),
                              status=VMStatus(state=VMState.RUNNING, pid=10**6 + i,
                                              accelerator="tcg", started_at=now - i * 7))
            for i in range(SYNTHETIC)}
    core = SyntheticCore(remote, fake)
    session = Session(core, mode="attached", data_dir="")
    app = InfraSimApp(session)
    rng = random.Random(5)
    frames_before = 0
    async with app.run_test(size=(160, 60), headless=True):
        while True:
            screen = app.screen
            if isinstance(screen, DashboardScreen) and \
                    len(screen.query_one(VMTable).shown_ids) == VMS + SYNTHETIC:
                break
            await asyncio.sleep(0.005)
        await painted(app)
        ttff = time.time() - me.create_time()

        async def source() -> None:  # 200 synthetic VMs sampled at 2 Hz, a state flip now and then
            while True:
                ts = time.time()
                for vm_id, vm in fake.items():
                    session.inject(Event(type="vm.metrics", kind="vm", resource_id=vm_id,
                                         name=vm.meta.name, message="",
                                         data={"cpu_percent": rng.uniform(0, 100),
                                               "rss_bytes": rng.randint(50, 300) << 20},
                                         ts=ts))
                flip = rng.choice(list(fake))
                vm = fake[flip]
                new = VMState.PAUSED if vm.status.state == VMState.RUNNING else VMState.RUNNING
                fake[flip] = replace(vm, status=replace(vm.status, state=new))
                session.inject(Event(type="vm.state", kind="vm", resource_id=flip,
                                     name=vm.meta.name, message="", ts=ts))
                await asyncio.sleep(0.5)

        task = asyncio.create_task(source())
        frames_before = screen.frames
        result = await measure(me, ttff, lambda: screen.frames - frames_before)
        result["cells_per_s"] = screen.cells_written / SECONDS
        task.cancel()
    await session.close()
    await remote.close()
    return result


async def painted(app: Any) -> None:
    """Until the compositor has drawn what is pending (a frame reached the terminal)."""
    done = asyncio.Event()
    app.screen.call_after_refresh(done.set)
    await done.wait()


async def measure(me: Any, ttff: float, frames: Any) -> dict[str, float]:
    await asyncio.sleep(1.0)  # settle
    c0 = me.cpu_times()
    t0 = time.perf_counter()
    f0 = frames()
    await asyncio.sleep(SECONDS)
    c1 = me.cpu_times()
    wall = time.perf_counter() - t0
    cpu = (c1.user - c0.user + c1.system - c0.system) / wall * 100
    return {"ttff_s": ttff, "cpu_pct": cpu, "rss_mib": me.memory_info().rss / 2**20,
            "frames_per_s": (frames() - f0) / wall}


# -- the driver ----------------------------------------------------------------------------


def run_child(mode: str, sock: str) -> dict[str, float]:
    prof = ["-m", "cProfile", "-o", f"/tmp/dash-{mode}.prof"] if os.environ.get(
        "BENCH_PROFILE") else []
    out = subprocess.run([sys.executable, *prof, "-m", "bench.dashboard", "child", mode, sock],
                         capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"console child failed: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def run() -> dict[str, Any]:
    from infrasim_tui.core.guest import build_guest

    from .api import start_daemon
    from .common import spec

    kit = build_guest("cloud")
    data = Path(tempfile.mkdtemp(prefix="infrasim-bench-dash-"))
    daemon = await start_daemon(data)
    sock = str(data / "infrasim.sock")
    try:
        import grpc

        from infrasim_tui.rpc.client import RemoteCore

        core = RemoteCore(grpc.aio.insecure_channel(f"unix://{sock}"))
        t0 = time.perf_counter()
        for i in range(VMS):
            vm = await core.create_vm(f"vm-{i:02d}", spec(kit, memory_mb=64))
            await core.start_vm(vm.meta.id, paused=True)
        started = time.perf_counter() - t0
        idle = run_child("idle", sock)
        dash = run_child("dashboard", sock)
        for vm in await core.list_vms():
            await core.stop_vm(vm.meta.id, force=True)
        await core.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(data, ignore_errors=True)
    return {"vms": VMS, "synthetic": SYNTHETIC, "seconds": SECONDS,
            "start_50_paused_s": started, "idle": idle, "dashboard": dash}


def report(r: dict[str, Any]) -> str:
    d, i = r["dashboard"], r["idle"]
    return "\n".join([
        f"1. dashboard, {r['vms']} real paused VMs + {r['synthetic']} synthetic rows at 2 Hz, "
        f"{r['seconds']:.0f} s:",
        f"   CPU {d['cpu_pct']:.1f}% of one core (goal ≤ 25%); idle Textual app "
        f"{i['cpu_pct']:.1f}% → +{d['cpu_pct'] - i['cpu_pct']:.1f} points",
        f"   first frame with all rows {d['ttff_s'] * 1000:.0f} ms from process start "
        f"(goal ≤ 1000 ms); idle app's first frame {i['ttff_s'] * 1000:.0f} ms "
        f"-> {d['ttff_s'] / i['ttff_s']:.2f}x",
        f"   {d['frames_per_s']:.1f} table redraws/s, {d['cells_per_s']:.0f} cells written/s",
        f"3. RSS of the console {d['rss_mib']:.1f} MiB vs idle Textual app {i['rss_mib']:.1f} "
        f"MiB -> {d['rss_mib'] / i['rss_mib']:.2f}x (+{d['rss_mib'] - i['rss_mib']:.1f} MiB)",
    ])


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "child":
        print(json.dumps(asyncio.run(child(sys.argv[2], sys.argv[3]))))
    else:
        res = asyncio.run(run())
        print(report(res))
