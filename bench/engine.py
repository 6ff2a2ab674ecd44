"""Engine benchmarks: InfraSim against bare QEMU with the same argv, measured in the same run.

1. ``vm start`` to QMP running vs a bare spawn to QMP ready          goal <= 1.3x
2. boot to the guest's banner, InfraSim vs bare QEMU                  goal <= 1.05x
3. QMP ``query-status`` round trip through the core vs raw qemu.qmp   goal p99 <= 1 ms
4. 20 VMs created and started paused: wall time, core memory per VM
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient

from infrasim_tui.core.guest import GuestKit, build_guest
from infrasim_tui.core.orchestrator import Orchestrator

from .common import BANNER, pct, scratch_core, spec


class Bare:
    """The same argv as InfraSim's, socket paths moved to a private dir: QEMU with no core."""

    def __init__(self, argv: list[str], workdir: Path, run_dir: str) -> None:
        self.workdir = workdir
        self.argv = [a.replace(run_dir, str(workdir)) for a in argv]
        self.qmp_path = str(workdir / "qmp.sock")
        self.serial_path = str(workdir / "serial.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient("bare")

    async def spawn_to_qmp_ready(self) -> None:
        for p in (self.qmp_path, self.serial_path):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        while True:
            if os.path.exists(self.qmp_path):
                try:
                    await self.qmp.connect(self.qmp_path)
                    return
                except Exception:
                    pass
            await asyncio.sleep(0.002)

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait)
        self.qmp = QMPClient("bare")


def same_dir_argv(argv: list[str]) -> str:
    pidfile = argv[argv.index("-pidfile") + 1]
    return os.path.dirname(pidfile)


async def bench_start(core: Orchestrator, kit: GuestKit, rounds: int, work: Path) -> dict[str, Any]:
    vm = await core.create_vm("bstart", spec(kit))
    ours: list[float] = []
    bare_t: list[float] = []
    argv: list[str] = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        vm = await core.start_vm("bstart")
        t = time.perf_counter() - t0
        argv = vm.status.argv
        await core.stop_vm("bstart", force=True)
        bare = Bare(argv, work, same_dir_argv(argv))
        t0 = time.perf_counter()
        await bare.spawn_to_qmp_ready()
        tb = time.perf_counter() - t0
        await bare.quit()
        if i:  # the first round warms page caches for both
            ours.append(t)
            bare_t.append(tb)
    await core.delete_vm("bstart")
    o, b = statistics.median(ours), statistics.median(bare_t)
    return {"infrasim_ms": o * 1e3, "bare_ms": b * 1e3, "ratio": o / b, "goal": 1.3,
            "rounds": rounds}


async def bench_boot(core: Orchestrator, kit: GuestKit, rounds: int, work: Path) -> dict[str, Any]:
    await core.create_vm("bboot", spec(kit))
    ours: list[float] = []
    bare_t: list[float] = []
    argv: list[str] = []

    async def infrasim_boot() -> None:
        nonlocal argv
        t0 = time.perf_counter()
        vm = await core.start_vm("bboot")
        console = core.console(vm.meta.id)
        await console.wait_for(BANNER, 60, start=console.live_start)
        ours.append(time.perf_counter() - t0)
        argv = vm.status.argv
        await core.stop_vm("bboot", force=True)

    async def bare_boot() -> None:
        bare = Bare(argv, work, same_dir_argv(argv))
        t0 = time.perf_counter()
        await bare.spawn_to_qmp_ready()
        reader, writer = await asyncio.open_unix_connection(bare.serial_path)
        await bare.qmp.execute("cont")
        buf = b""
        while BANNER not in buf:
            chunk = await asyncio.wait_for(reader.read(65536), 60)
            if not chunk:
                raise RuntimeError("bare QEMU closed its serial port before the banner")
            buf += chunk
        bare_t.append(time.perf_counter() - t0)
        writer.close()
        await bare.quit()

    await infrasim_boot()  # learns the argv; also warms the page cache for both sides
    ours.clear()
    for i in range(rounds):  # alternate who goes first so drift hits both sides alike
        first, second = (infrasim_boot, bare_boot) if i % 2 else (bare_boot, infrasim_boot)
        await first()
        await second()
    await core.delete_vm("bboot")
    o, b = statistics.median(ours), statistics.median(bare_t)
    return {"infrasim_s": o, "bare_s": b, "ratio": o / b, "goal": 1.05, "rounds": rounds}


async def bench_qmp(core: Orchestrator, kit: GuestKit, calls: int, work: Path) -> dict[str, Any]:
    vm = await core.create_vm("bqmp", spec(kit),
                              start=True)
    bare = Bare(vm.status.argv, work, same_dir_argv(vm.status.argv))
    await bare.spawn_to_qmp_ready()
    await bare.qmp.execute("cont")
    # Both guests must finish booting (CPU-bound under TCG) before timing, or the figures
    # measure the host's contention rather than the QMP path.
    console = core.console(vm.meta.id)
    await console.wait_for(BANNER, 60, start=console.live_start)
    await asyncio.sleep(3.0)
    ours: list[float] = []
    raw: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await core.query_status("bqmp")
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await bare.qmp.execute("query-status")
        raw.append(time.perf_counter() - t0)
    await bare.quit()
    await core.stop_vm("bqmp", force=True)
    await core.delete_vm("bqmp")
    return {
        "infrasim_p50_ms": pct(ours, 50) * 1e3, "infrasim_p99_ms": pct(ours, 99) * 1e3,
        "raw_p50_ms": pct(raw, 50) * 1e3, "raw_p99_ms": pct(raw, 99) * 1e3,
        "ratio_p99": pct(ours, 99) / pct(raw, 99), "goal_p99_ms": 1.0, "calls": calls,
    }


async def bench_fleet(core: Orchestrator, kit: GuestKit, count: int) -> dict[str, Any]:
    me = psutil.Process()
    gc.collect()
    rss0 = me.memory_info().rss
    t0 = time.perf_counter()
    vms = [await core.create_vm(f"fleet-{i:02d}", spec(kit, memory_mb=128))
           for i in range(count)]
    await asyncio.gather(*(core.start_vm(v.meta.id, paused=True) for v in vms))
    wall = time.perf_counter() - t0
    gc.collect()
    rss1 = me.memory_info().rss
    qemu_pss = 0
    for v in await core.list_vms():
        with contextlib.suppress(psutil.Error, AttributeError):
            qemu_pss += psutil.Process(v.status.pid).memory_full_info().pss
    for v in vms:
        await core.stop_vm(v.meta.id, force=True)
        await core.delete_vm(v.meta.id)
    return {"vms": count, "wall_s": wall, "per_vm_ms": wall / count * 1e3,
            "core_rss_per_vm_kib": (rss1 - rss0) / count / 1024,
            "qemu_pss_per_vm_mib": qemu_pss / count / 2**20}


async def run(rounds: int = 10, fleet: int = 20) -> dict[str, Any]:
    kit = build_guest("cloud")
    async with scratch_core() as (core, work):
        return {
            "start": await bench_start(core, kit, rounds, work),
            "boot": await bench_boot(core, kit, rounds, work),
            "qmp": await bench_qmp(core, kit, 1000, work),
            "fleet": await bench_fleet(core, kit, fleet),
            "host": {"qemu": core.facts.qemu_version, "cpus": os.cpu_count(),
                     "accel": core.facts.accelerators.get("aarch64")},
        }


def report(r: dict[str, Any]) -> str:
    s, b, q, f = r["start"], r["boot"], r["qmp"], r["fleet"]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    return "\n".join([
        f"host: QEMU {r['host']['qemu']}, {r['host']['cpus']} cpus, accel {r['host']['accel']}",
        f"1. vm start → QMP running   infrasim {s['infrasim_ms']:.1f} ms vs bare spawn → QMP "
        f"ready {s['bare_ms']:.1f} ms: {s['ratio']:.2f}x (goal ≤ {s['goal']}x) "
        f"{verdict(s['ratio'] <= s['goal'])}",
        f"2. boot to banner          infrasim {b['infrasim_s']:.3f} s vs bare "
        f"{b['bare_s']:.3f} s: {b['ratio']:.3f}x (goal ≤ {b['goal']}x) "
        f"{verdict(b['ratio'] <= b['goal'])}",
        f"3. query-status            core p50 {q['infrasim_p50_ms']:.3f} ms p99 "
        f"{q['infrasim_p99_ms']:.3f} ms vs raw p50 {q['raw_p50_ms']:.3f} ms p99 "
        f"{q['raw_p99_ms']:.3f} ms: p99 {q['ratio_p99']:.2f}x (goal p99 ≤ 1 ms) "
        f"{verdict(q['infrasim_p99_ms'] <= 1.0)}; the core adds "
        f"{q['infrasim_p50_ms'] - q['raw_p50_ms']:+.3f} ms at p50",
        f"4. {f['vms']} VMs created + started paused: {f['wall_s']:.2f} s "
        f"({f['per_vm_ms']:.0f} ms/VM); core memory {f['core_rss_per_vm_kib']:.0f} KiB/VM; "
        f"QEMU PSS {f['qemu_pss_per_vm_mib']:.0f} MiB/VM",
    ])
