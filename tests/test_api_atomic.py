"""A client that gives up mid-call never leaves a half-done lifecycle change behind."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc

from infrasim_tui.core.guest import GuestKit
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2_grpc as pbg

from .conftest import infrasim, qemu_pids


async def test_a_start_cancelled_by_its_client_still_completes(data_dir: Path,
                                                               cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "vm", "create", "half", "--kernel", str(cloud_kit.kernel),
                 "--initrd", str(cloud_kit.initrd))
    assert r.returncode == 0, r.stderr  # the daemon now runs
    channel = grpc.aio.insecure_channel(f"unix://{data_dir / 'infrasim.sock'}")
    stub = pbg.InfraSimStub(channel)
    call = stub.StartVM(pb.StartVMRequest(ref="half"))
    await asyncio.sleep(0.02)  # the daemon is spawning QEMU now
    call.cancel()
    await channel.close()
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        vm = json.loads(infrasim(data_dir, "vm", "get", "half", "-o", "json").stdout)
        state = vm["status"]["state"]
        if state == "RUNNING":
            break
        await asyncio.sleep(0.2)
    assert state == "RUNNING", vm
    assert qemu_pids(data_dir) == [vm["status"]["pid"]]  # the QEMU it records, and no other
    assert infrasim(data_dir, "vm", "stop", "half", "--force").returncode == 0
    assert qemu_pids(data_dir) == []
