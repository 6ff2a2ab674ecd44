"""Storage benchmarks (issue 3), each against a baseline measured in the same run.

2. Snapshot create and restore of the test guest, running (QMP jobs, with memory) and stopped
   (qemu-img); baseline: a bare ``qemu-img snapshot -c`` on the same disk.
3. 20 overlay volumes on one base: wall time; baseline: 20 bare ``qemu-img create -b``.
4. Start of a VM whose 2 GiB base volume is signed: first start (hashes) vs cached verdict;
   baseline: the same VM's start with no volume at all.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from infrasim_tui.core.guest import GuestKit, build_guest
from infrasim_tui.core.model import VolumeRequest
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.qemu_img import QemuImg

from .common import BANNER, MIB, scratch_core, spec


async def timed(coro: Any) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def bench_snapshots(core: Orchestrator, kit: GuestKit, rounds: int) -> dict[str, Any]:
    await core.create_volume(VolumeRequest("snapdisk", size_bytes=64 * MIB))
    vm = await core.create_vm("snapvm", spec(kit, disks=["snapdisk"]), start=True)
    console = core.console(vm.meta.id)
    await console.wait_for(BANNER, 60, start=console.live_start)
    await asyncio.sleep(1.0)
    live_c, live_r = [], []
    for i in range(rounds):
        live_c.append(await timed(core.create_snapshot("snapvm", f"live-{i}")))
    for i in range(rounds):
        live_r.append(await timed(core.restore_snapshot("snapvm", f"live-{i}")))
    await core.stop_vm("snapvm", force=True)
    cold_c, cold_r, bare = [], [], []
    path = (await core.get_volume("snapdisk")).status.path
    qi = QemuImg()
    for i in range(rounds):
        cold_c.append(await timed(core.create_snapshot("snapvm", f"cold-{i}")))
        bare.append(await timed(qi.snapshot_create(path, f"bare-{i}")))
    for i in range(rounds):
        cold_r.append(await timed(core.restore_snapshot("snapvm", f"cold-{i}")))
    for i in range(rounds):
        await qi.snapshot_delete(path, f"bare-{i}")
    await core.delete_vm("snapvm")
    med = statistics.median
    return {"live_create_s": med(live_c), "live_restore_s": med(live_r),
            "stopped_create_s": med(cold_c), "stopped_restore_s": med(cold_r),
            "bare_qemu_img_create_s": med(bare),
            "stopped_create_ratio": med(cold_c) / med(bare), "rounds": rounds}


async def bench_overlays(core: Orchestrator, work: Path, count: int) -> dict[str, Any]:
    img = work / "base.raw"
    with open(img, "wb") as f:
        f.truncate(256 * MIB)
    await core.create_volume(VolumeRequest("ovbase", source=str(img), read_only=True))
    base = await core.get_volume("ovbase")
    t0 = time.perf_counter()
    for i in range(count):
        await core.create_volume(VolumeRequest(f"ov-{i:02d}", base="ovbase"))
    ours = time.perf_counter() - t0
    qi = QemuImg()
    t0 = time.perf_counter()
    for i in range(count):
        await qi.create(str(work / f"bare-{i}.qcow2"), size=None, fmt="qcow2",
                        backing=base.status.path, backing_fmt="raw")
    bare = time.perf_counter() - t0
    for i in range(count):
        await core.delete_volume(f"ov-{i:02d}")
    await core.delete_volume("ovbase")
    return {"overlays": count, "wall_s": ours, "per_overlay_ms": ours / count * 1e3,
            "bare_qemu_img_s": bare, "ratio": ours / bare}


async def bench_verified_start(core: Orchestrator, kit: GuestKit, work: Path,
                               size_gib: float) -> dict[str, Any]:
    img = work / "big.raw"
    block = os.urandom(64 * MIB)
    with open(img, "wb") as f:
        for i in range(int(size_gib * 1024 / 64)):
            f.write(i.to_bytes(8, "little") + block[8:])
    await core.create_volume(VolumeRequest("big", source=str(img), read_only=True))
    img.unlink()
    await core.sign_volume("big")
    await core.create_volume(VolumeRequest("bigov", base="big"))
    await core.create_vm("bigvm", spec(kit, disks=["bigov"]))
    await core.create_vm("plainvm", spec(kit))
    await asyncio.sleep(2.2)  # past the verdict cache's racy window
    path = Path((await core.get_volume("big")).status.path)

    async def start(name: str) -> float:
        t = await timed(core.start_vm(name))
        await core.stop_vm(name, force=True)
        return t

    core.volumes.verdicts.forget(path)
    first = await start("bigvm")
    cached = statistics.median([await start("bigvm") for _ in range(5)])
    plain = statistics.median([await start("plainvm") for _ in range(5)])
    for name in ("bigvm", "plainvm"):
        await core.delete_vm(name)
    await core.delete_volume("bigov")
    await core.delete_volume("big")
    await core.image_gc()
    return {"size_gib": size_gib, "first_start_s": first, "cached_start_s": cached,
            "no_volume_start_s": plain, "first_vs_cached": first / cached,
            "cached_vs_no_volume": cached / plain}


async def run(rounds: int = 5, overlays: int = 20, size_gib: float = 2.0) -> dict[str, Any]:
    kit = build_guest("cloud")
    async with scratch_core() as (core, work):
        return {
            "snapshots": await bench_snapshots(core, kit, rounds),
            "overlays": await bench_overlays(core, work, overlays),
            "verified_start": await bench_verified_start(core, kit, work, size_gib),
        }


def report(r: dict[str, Any]) -> str:
    s, o, v = r["snapshots"], r["overlays"], r["verified_start"]
    return "\n".join([
        f"2. snapshots (median of {s['rounds']}): running create {s['live_create_s']:.3f} s, "
        f"restore {s['live_restore_s']:.3f} s; stopped create {s['stopped_create_s']:.3f} s "
        f"(bare qemu-img {s['bare_qemu_img_create_s']:.3f} s: {s['stopped_create_ratio']:.2f}x), "
        f"restore {s['stopped_restore_s']:.3f} s",
        f"3. {o['overlays']} overlays on one base: {o['wall_s']:.2f} s "
        f"({o['per_overlay_ms']:.0f} ms each) vs bare qemu-img {o['bare_qemu_img_s']:.2f} s: "
        f"{o['ratio']:.2f}x",
        f"4. start with a signed {v['size_gib']:g} GiB base: first {v['first_start_s']:.2f} s, "
        f"cached verdict {v['cached_start_s']:.3f} s ({v['first_vs_cached']:.1f}x faster), "
        f"no volume {v['no_volume_start_s']:.3f} s (cached/none {v['cached_vs_no_volume']:.2f}x)",
    ])


if __name__ == "__main__":
    res = asyncio.run(run())
    print(report(res))
