"""API benchmarks (issue 4), against a real `infrasim serve` on its unix socket.

1. GetVM and ListVMs with 100 VMs in the store: p50/p99 latency and throughput with 1, 10 and
   50 concurrent clients (each its own channel).
2. `infrasim vm list` wall time vs `python -c "import grpc"` (the floor of a Python CLI).
3. Events: delay from a VM state change (the event's own timestamp, taken in the daemon when
   QEMU's state was recorded) to a WatchEvents client receiving it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from infrasim_tui.core.guest import build_guest
from infrasim_tui.core.model import VMSpec
from infrasim_tui.rpc.client import RemoteCore
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2_grpc as pbg

from .common import FAST, pct

INFRASIM = str(Path(sys.executable).with_name("infrasim"))


async def start_daemon(data: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "infrasim_tui", "--data-dir", str(data),
                             "serve"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sock = data / "infrasim.sock"
    for _ in range(400):
        if sock.exists():
            core = RemoteCore(grpc.aio.insecure_channel(f"unix://{sock}"))
            try:
                await core.health()
                return proc
            except Exception:
                pass
            finally:
                await core.close()
        await asyncio.sleep(0.05)
    raise TimeoutError("daemon did not start")


async def load(sock: Path, clients: int, seconds: float, method: str) -> dict[str, float]:
    lat: list[float] = []

    async def one() -> None:
        channel = grpc.aio.insecure_channel(f"unix://{sock}")
        stub = pbg.InfraSimStub(channel)
        req: Any = pb.GetVMRequest(ref="vm-050") if method == "GetVM" else pb.ListVMsRequest()
        call = stub.GetVM if method == "GetVM" else stub.ListVMs
        await call(req)  # connect outside the measurement
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            await call(req)
            lat.append(time.perf_counter() - t0)
        await channel.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "rps": len(lat) / wall, "calls": len(lat)}


def cli_vs_import(data: Path, rounds: int = 10) -> dict[str, float]:
    env = {**os.environ, "INFRASIM_DATA_DIR": str(data)}
    ours, floor = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([INFRASIM, "vm", "list"], env=env, check=True, capture_output=True)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import grpc"], check=True)
        floor.append(time.perf_counter() - t0)
    o, f = statistics.median(ours), statistics.median(floor)
    return {"vm_list_s": o, "import_grpc_s": f, "ratio": o / f, "goal": 2.0}


async def event_delay(core: RemoteCore, cycles: int) -> dict[str, float]:
    kit = build_guest("cloud")
    await core.create_vm("ev", VMSpec(kernel=str(kit.kernel), initrd=str(kit.initrd),
                                      cmdline=FAST), start=True)
    delays: list[float] = []
    want = cycles * 2

    async def watch() -> None:
        async for ev in core.watch(resource="ev", kinds=["vm"]):
            if ev.type == "vm.state":
                delays.append(time.time() - ev.ts)
                if len(delays) >= want:
                    return

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    for _ in range(cycles):
        await core.pause_vm("ev")
        await core.resume_vm("ev")
    await asyncio.wait_for(task, 30)
    await core.stop_vm("ev", force=True)
    return {"events": len(delays), "p50_ms": pct(delays, 50) * 1e3,
            "p99_ms": pct(delays, 99) * 1e3}


async def run() -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="infrasim-bench-api-"))
    proc = await start_daemon(data)
    core = RemoteCore(grpc.aio.insecure_channel(f"unix://{data / 'infrasim.sock'}"))
    try:
        kit = build_guest("cloud")
        await asyncio.gather(*(core.create_vm(f"vm-{i:03d}", VMSpec(
            kernel=str(kit.kernel), initrd=str(kit.initrd))) for i in range(100)))
        sock = data / "infrasim.sock"
        results: dict[str, Any] = {"get": [], "list": []}
        for n in (1, 10, 50):
            results["get"].append(await load(sock, n, 2.0, "GetVM"))
            results["list"].append(await load(sock, n, 2.0, "ListVMs"))
        results["cli"] = await asyncio.to_thread(cli_vs_import, data)
        results["events"] = await event_delay(core, 20)
        return results
    finally:
        await core.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        shutil.rmtree(data, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    lines = []
    for key, label in (("get", "GetVM"), ("list", "ListVMs (100 VMs)")):
        for row in r[key]:
            lines.append(f"1. {label:<18} {row['clients']:>2} clients: p50 {row['p50_ms']:.2f} ms"
                         f", p99 {row['p99_ms']:.2f} ms, {row['rps']:.0f} calls/s")
    c, e = r["cli"], r["events"]
    lines.append(f"2. `infrasim vm list` {c['vm_list_s'] * 1e3:.0f} ms vs `python -c 'import "
                 f"grpc'` {c['import_grpc_s'] * 1e3:.0f} ms: {c['ratio']:.2f}x (goal ≤ 2x) "
                 f"{'ok' if c['ratio'] <= c['goal'] else 'MISSED'}")
    lines.append(f"3. state change → WatchEvents client: p50 {e['p50_ms']:.2f} ms, "
                 f"p99 {e['p99_ms']:.2f} ms ({e['events']} events)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(asyncio.run(run())))
