"""What every benchmark suite shares: the guest spec, percentiles, and a scratch core."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from infrasim_tui.core.config import load_config
from infrasim_tui.core.guest import READY_BANNER, GuestKit
from infrasim_tui.core.model import VMSpec
from infrasim_tui.core.orchestrator import Orchestrator

BANNER = READY_BANNER.encode()
FAST = "quiet cryptomgr.notests"  # kernel crypto self-tests cost 0.5-0.9 s of every boot
MIB = 1 << 20


def spec(kit: GuestKit, memory_mb: int = 256, disks: list[str] | None = None) -> VMSpec:
    return VMSpec(kernel=str(kit.kernel), initrd=str(kit.initrd), memory_mb=memory_mb,
                  cmdline=FAST, volume_ids=list(disks or []))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def scratch_core() -> AsyncIterator[tuple[Orchestrator, Path]]:
    """An embedded core on a throw-away data dir, plus a work dir; both removed afterwards."""
    data = Path(tempfile.mkdtemp(prefix="infrasim-bench-"))
    work = Path(tempfile.mkdtemp(prefix="infrasim-bench-work-"))
    core = await Orchestrator.open(load_config(data_dir=data, env={}))
    try:
        yield core, work
    finally:
        await core.close()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
