"""Shared fixtures: the real test guest, separate data dirs, and a core that cleans up after
itself (no QEMU outlives the test that started it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from infrasim_tui.core.config import Config, load_config
from infrasim_tui.core.guest import READY_BANNER, GuestKit, build_guest
from infrasim_tui.core.model import VMSpec, VMState
from infrasim_tui.core.orchestrator import Orchestrator

REPO = Path(__file__).resolve().parent.parent
INFRASIM = str(Path(sys.executable).with_name("infrasim"))
BANNER = READY_BANNER.encode()


@pytest.fixture(scope="session")
def cloud_kit() -> GuestKit:
    return build_guest("cloud")


@pytest.fixture(scope="session")
def generic_kit() -> GuestKit:
    return build_guest("generic")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def config(data_dir: Path) -> Config:
    return load_config(data_dir=data_dir, env={})


def qemu_pids(data_dir: Path) -> list[int]:
    """Live QEMU processes belonging to this data dir (their argv mentions it)."""
    out = []
    marker = str(data_dir)
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if (cmd and "qemu-system" in os.path.basename(cmd[0])
                and p.info["status"] != psutil.STATUS_ZOMBIE
                and any(marker in a for a in cmd)):
            out.append(p.info["pid"])
    return out


def kill_qemus(data_dir: Path) -> None:
    for pid in qemu_pids(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def orch(config: Config, data_dir: Path) -> AsyncIterator[Orchestrator]:
    core = await Orchestrator.open(config)
    try:
        yield core
    finally:
        for vm in await core.list_vms():
            if vm.status.state in (VMState.RUNNING, VMState.PAUSED, VMState.PENDING):
                with contextlib.suppress(Exception):
                    await core.stop_vm(vm.meta.id, force=True)
        await core.close()
        kill_qemus(data_dir)


def stop_daemon(data_dir: Path) -> None:
    """End a daemon the CLI autostarted for this data dir (SIGTERM, then SIGKILL)."""
    import time

    from infrasim_tui.core.lock import DataDirLock
    from infrasim_tui.core.paths import DataDir

    pid = DataDirLock.owner_pid(DataDir(data_dir))
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and psutil.pid_exists(pid):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_stray_qemu(data_dir: Path) -> Iterator[None]:
    yield
    stop_daemon(data_dir)
    kill_qemus(data_dir)


def guest_spec(kit: GuestKit, **kw: object) -> VMSpec:
    spec = VMSpec(kernel=str(kit.kernel), initrd=str(kit.initrd), memory_mb=256,
                  cmdline="quiet cryptomgr.notests")
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


async def run_in_guest(core: Orchestrator, vm_id: str, command: str,
                       timeout: float = 15.0) -> str:
    """Type ``command`` on the serial console and return what it printed (between markers)."""
    console = core.console(vm_id)
    tag = os.urandom(3).hex()
    start = console.total_bytes
    # The quotes keep the echoed input from matching the markers the shell prints.
    await console.write(f"echo B''{tag}; {command}; echo E''{tag}\n".encode())
    end = await console.wait_for(re.compile(f"E{tag}\r?\n".encode()), timeout, start=start)
    hist = console.history()
    text = hist[len(hist) - (console.total_bytes - start):][: end - start]
    body = text.decode("utf-8", "replace").replace("\r", "")
    body = body.split(f"\nB{tag}\n", 1)[-1]
    return body.rsplit(f"E{tag}", 1)[0].rstrip("\n")


def infrasim(data_dir: Path, *args: str, input: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INFRASIM, "--data-dir", str(data_dir), *args], input=input,
                          capture_output=True, text=True, timeout=timeout)


def wait_sync(pred: object, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


__all__ = ["BANNER", "INFRASIM", "REPO", "asyncio", "guest_spec", "infrasim", "qemu_pids",
           "run_in_guest", "wait_sync"]
