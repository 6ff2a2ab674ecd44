"""The infrasim.v1 API against a real daemon (`infrasim serve`) with real VMs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest

from infrasim_tui.core.errors import (
    AlreadyExists,
    Conflict,
    NotFound,
    Unavailable,
    WrongState,
)
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.keys import KeyRing
from infrasim_tui.core.model import NetworkSpec, VMState, VolumeRequest
from infrasim_tui.rpc.auth import bearer_client_interceptors
from infrasim_tui.rpc.client import RemoteCore
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2_grpc as pbg

from .conftest import BANNER, guest_spec, qemu_pids

pytestmark = pytest.mark.qemu
MIB = 1 << 20


class Daemon:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infrasim_tui", "--data-dir", str(data_dir), "serve",
             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env)
        self.sock = data_dir / "infrasim.sock"

    async def ready(self) -> None:
        for _ in range(300):
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise RuntimeError(f"daemon exited: {self.proc.stderr.read().decode()}")
            if self.sock.exists():
                try:
                    _, w = await asyncio.open_unix_connection(str(self.sock))
                    w.close()
                    return
                except OSError:
                    pass
            await asyncio.sleep(0.05)
        raise TimeoutError("daemon did not come up")

    def client(self) -> RemoteCore:
        return RemoteCore(grpc.aio.insecure_channel(f"unix://{self.sock}"), str(self.data_dir))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


@pytest.fixture
async def daemon(data_dir: Path) -> AsyncIterator[Daemon]:
    d = Daemon(data_dir)
    try:
        await d.ready()
        yield d
    finally:
        d.stop(signal.SIGKILL)


@pytest.fixture
async def api(daemon: Daemon) -> AsyncIterator[RemoteCore]:
    core = daemon.client()
    try:
        yield core
    finally:
        await core.close()


async def read_until(reader: object, needle: bytes, timeout: float = 30) -> bytes:
    seen = b""

    async def go() -> bytes:
        nonlocal seen
        async for chunk in reader:  # type: ignore[attr-defined]
            seen += chunk
            if needle in seen:
                return seen
        raise ConnectionError(f"console closed before {needle!r}: {seen[-300:]!r}")

    return await asyncio.wait_for(go(), timeout)


async def test_every_rpc_against_a_real_daemon(api: RemoteCore, daemon: Daemon,
                                               cloud_kit: GuestKit, tmp_path: Path) -> None:
    assert await api.health() == "SERVING"
    st = await api.status()
    assert st["data_dir"] == str(daemon.data_dir) and st["daemon_pid"] == daemon.proc.pid
    assert st["host"]["accelerators"]["aarch64"] == "tcg" and st["host"]["qemu_version"]

    # Networks.
    net = await api.create_network("lan", NetworkSpec(cidr="10.0.5.0/24"))
    assert (await api.get_network("lan")).meta.id == net.meta.id
    assert [n.meta.name for n in await api.list_networks()] == ["lan"]

    # Volumes, images, keys.
    img = tmp_path / "base.img"
    img.write_bytes(b"API-BASE".ljust(512, b"\0") + b"\0" * (2 * MIB))
    base = await api.create_volume(VolumeRequest("base", source=str(img), read_only=True))
    assert (await api.sign_volume("base")).status.verified == "verified"
    assert (await api.verify_volume("base")).status.verified == "verified"
    disk = await api.create_volume(VolumeRequest("disk", base="base", size_bytes=16 * MIB))
    assert (await api.resize_volume("disk", 32 * MIB)).status.virtual_size == 32 * MIB
    assert {v.meta.name for v in await api.list_volumes()} == {"base", "disk"}
    assert (await api.get_volume(base.meta.id)).meta.name == "base"
    images = await api.list_images()
    assert [(d, sorted(u)) for d, _, u in images] == [(base.status.image_digest,
                                                      ["base", "disk"])]
    assert await api.image_gc() == ([], 0)
    other = KeyRing(tmp_path / "other-keys")
    k = await api.add_key("other", other.host_public_key())
    assert {x.name for x in await api.trusted_keys()} >= {"other"}
    await api.remove_key(k.name)

    # VMs: the whole lifecycle.
    spec = guest_spec(cloud_kit, volume_ids=["disk"], network_ids=["lan"])
    vm = await api.create_vm("web-1", spec, {"team": "qa"}, start=True)
    assert vm.status.state == VMState.RUNNING and vm.spec.volume_ids == [disk.meta.id]
    assert vm.spec.network_ids == [net.meta.id]
    assert [v.meta.name for v in await api.list_vms({"team": "qa"})] == ["web-1"]
    assert await api.list_vms({"team": "ops"}) == []

    # Consoles: a resource, and a live bidirectional stream.
    con = await api.create_console("web-1")
    assert (await api.get_console(con.meta.id)).spec.vm_id == vm.meta.id
    rc = api.console(vm.meta.id)
    reader = await rc.open(history=True)
    await read_until(reader, b"guest:", 60)
    await rc.write(b"echo $((6*7))-api\n")
    assert b"42-api" in await read_until(reader, b"42-api")
    await rc.close()
    reader.close()
    await api.delete_console(con.meta.id)

    for op, state in [(api.pause_vm, VMState.PAUSED), (api.resume_vm, VMState.RUNNING)]:
        assert (await op("web-1")).status.state == state

    # Snapshots.
    await api.create_snapshot("web-1", "s1", "first")
    await api.create_snapshot("web-1", "s2")
    assert [s.spec.description for s in await api.list_snapshots("web-1")] == ["first", ""]
    assert (await api.get_snapshot("web-1", "s1")).spec.description == "first"
    await api.restore_snapshot("web-1", "s1")
    assert len(await api.verify_snapshots("web-1")) == 2
    assert "◀ current" in await api.snapshot_tree("web-1")
    await api.delete_snapshot("web-1", "s2")

    vm = await api.restart_vm("web-1", force=True)
    assert vm.status.state == VMState.RUNNING
    vm = await api.stop_vm("web-1", force=True)
    assert vm.status.state == VMState.STOPPED
    # UpdateVM with the version read.
    vm.spec.memory_mb = 320
    vm = await api.update_vm(vm)
    assert vm.spec.memory_mb == 320
    vm = await api.start_vm("web-1", paused=True)
    assert vm.status.state == VMState.PAUSED
    await api.delete_vm("web-1", force=True)
    assert await api.list_vms() == []
    await api.delete_network("lan")
    await api.delete_volume("disk")
    await api.delete_volume("base")
    assert (await api.image_gc())[0] == [base.status.image_digest]


async def test_errors_are_precise_grpc_statuses(api: RemoteCore, daemon: Daemon,
                                                cloud_kit: GuestKit) -> None:
    stub = pbg.InfraSimStub(api.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateVM(pb.CreateVMRequest(name="x", spec=pb.VMSpec(
            kernel=str(cloud_kit.kernel), memory_mb=1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("infrasim-field", "memory_mb") in tuple(err.value.trailing_metadata() or ())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateVM(pb.CreateVMRequest(name="x", spec=pb.VMSpec(
            kernel=str(cloud_kit.kernel), machine="pdp11")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("infrasim-field", "machine") in tuple(err.value.trailing_metadata() or ())
    assert "pdp11" in (err.value.details() or "")
    with pytest.raises(NotFound, match="vm 'nope' not found"):
        await api.get_vm("nope")
    await api.create_vm("dup", guest_spec(cloud_kit))
    with pytest.raises(AlreadyExists, match="'dup' already exists"):
        await api.create_vm("dup", guest_spec(cloud_kit))
    with pytest.raises(WrongState, match="it is STOPPED"):
        await api.stop_vm("dup")
    # Two clients read the same version; the first update wins, the second is ABORTED.
    other = daemon.client()
    try:
        a, b = await api.get_vm("dup"), await other.get_vm("dup")
        a.spec.memory_mb, b.spec.memory_mb = 300, 400
        await api.update_vm(a)
        with pytest.raises(Conflict, match="changed since it was read"):
            await other.update_vm(b)
        assert (await api.get_vm("dup")).spec.memory_mb == 300
    finally:
        await other.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateVM(pb.UpdateVMRequest(vm=pb.VM(meta=pb.ResourceMeta(name="dup"))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unavailable_when_qemu_is_missing(data_dir: Path, cloud_kit: GuestKit,
                                                tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    d = Daemon(data_dir, env={**os.environ, "PATH": str(empty)})
    try:
        await d.ready()
        core = d.client()
        await core.create_vm("q", guest_spec(cloud_kit))
        with pytest.raises(Unavailable, match="qemu-system-aarch64"):
            await core.start_vm("q")
        await core.close()
    finally:
        d.stop(signal.SIGKILL)


async def test_watch_events_in_order_and_resume_without_gaps(api: RemoteCore, daemon: Daemon,
                                                             cloud_kit: GuestKit) -> None:
    got: list[tuple[str, str]] = []
    tokens: list[int] = []

    async def watch(since: str, stop_after: int) -> None:
        async for ev in api.watch(resume_token=since, kinds=["vm"], resource="w"):
            got.append((ev.type, ev.data.get("new", "")))
            tokens.append(ev.seq)
            if len(got) >= stop_after:
                return

    first = asyncio.create_task(watch("0", 4))
    await asyncio.sleep(0.3)
    await api.create_vm("w", guest_spec(cloud_kit), start=True)  # created, PENDING, RUNNING
    await api.stop_vm("w", force=True)  # STOPPED
    await asyncio.wait_for(first, 20)
    assert got == [("vm.created", ""), ("vm.state", "PENDING"), ("vm.state", "RUNNING"),
                   ("vm.state", "STOPPED")]
    # While nobody watches, more happens; a reconnect with the last token misses nothing.
    await api.start_vm("w")
    await api.pause_vm("w")
    await api.stop_vm("w", force=True)
    got.clear()
    last = tokens[-1]
    tokens.clear()
    await asyncio.wait_for(watch(str(last), 4), 20)
    assert got == [("vm.state", "PENDING"), ("vm.state", "RUNNING"), ("vm.state", "PAUSED"),
                   ("vm.state", "STOPPED")]
    assert tokens == sorted(tokens) and tokens[0] > last
    # Metrics samples come live for running VMs.
    await api.start_vm("w")
    async for ev in api.watch(metrics=True, resource="w"):
        if ev.type == "vm.metrics":
            assert ev.data["rss_bytes"] > 0 and ev.seq == 0
            break


async def test_tcp_needs_the_token(data_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(data_dir, "--listen", f"127.0.0.1:{port}")
    try:
        await d.ready()
        token_file = data_dir / "api-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(d.sock.stat().st_mode) == 0o600
        plain = RemoteCore(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(Unavailable, match="API token"):
            await plain.health()
        await plain.close()
        wrong = RemoteCore(grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=bearer_client_interceptors("nope")))
        with pytest.raises(Unavailable):
            await wrong.health()
        await wrong.close()
        good = RemoteCore(grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=bearer_client_interceptors(
                token_file.read_text().strip())))
        assert await good.health() == "SERVING"
        await good.close()
    finally:
        d.stop(signal.SIGKILL)


async def test_sigterm_leaves_vms_running_and_the_next_daemon_reattaches(
        data_dir: Path, cloud_kit: GuestKit) -> None:
    d = Daemon(data_dir)
    await d.ready()
    core = d.client()
    vm = await core.create_vm("keep", guest_spec(cloud_kit), start=True)
    await core.close()
    assert d.stop(signal.SIGTERM) == 0
    assert not d.sock.exists()
    assert qemu_pids(data_dir) == [vm.status.pid]
    d2 = Daemon(data_dir)
    try:
        await d2.ready()
        core = d2.client()
        again = await core.get_vm("keep")
        assert again.status.state == VMState.RUNNING and again.status.pid == vm.status.pid
        rc = core.console(again.meta.id)
        reader = await rc.open(history=True)
        await read_until(reader, BANNER, 30)
        await rc.close()
        reader.close()
        await core.stop_vm("keep", force=True)
        await core.close()
    finally:
        d2.stop(signal.SIGKILL)


@pytest.mark.parametrize("op", ["create", "start", "snapshot"])
async def test_kill_9_of_the_daemon_mid_operation(data_dir: Path, cloud_kit: GuestKit,
                                                  op: str) -> None:
    rng = random.Random(op)
    d = Daemon(data_dir)
    await d.ready()
    core = d.client()
    if op != "create":
        await core.create_volume(VolumeRequest("d", size_bytes=16 * MIB))
        await core.create_vm("k", guest_spec(cloud_kit, volume_ids=["d"]),
                             start=op == "snapshot")
    for i in range(3):
        if op == "create":
            call = core.create_vm(f"k{i}", guest_spec(cloud_kit), start=True)
        elif op == "start":
            call = core.start_vm("k")
        else:
            call = core.create_snapshot("k", f"s{i}")
        task = asyncio.ensure_future(call)
        await asyncio.sleep(rng.uniform(0.0, 0.25))
        d.proc.kill()
        d.proc.wait()
        with contextlib.suppress(Exception):  # finished before the kill, or cut off by it
            await asyncio.wait_for(task, 10)
        await core.close()
        d = Daemon(data_dir)
        await d.ready()
        core = d.client()
        vms = await core.list_vms()
        live = set(qemu_pids(data_dir))
        for vm in vms:
            assert vm.status.state in (VMState.RUNNING, VMState.STOPPED, VMState.PAUSED), vm
            if vm.status.state == VMState.RUNNING:
                assert vm.status.pid in live
        assert live <= {vm.status.pid for vm in vms}  # no orphaned QEMU
        if op == "snapshot":
            assert len(await core.verify_snapshots("k")) == len(await core.list_snapshots("k"))
        if op == "start":
            vm = await core.get_vm("k")
            if vm.status.state == VMState.RUNNING:
                await core.stop_vm("k", force=True)
    await core.close()
    d.stop(signal.SIGKILL)


def test_daemon_process_does_not_linger_in_tests() -> None:
    # A guard for the fixtures above: no `infrasim serve` from this test run is left behind
    # once its data dir's test ended (the autouse fixture stops them).
    me = os.getpid()
    children = [p for p in psutil.Process(me).children(recursive=True)
                if "serve" in " ".join(p.cmdline())]
    assert children == [], children


def test_help_has_examples_everywhere() -> None:
    from infrasim_tui.cli import build_parser
    from infrasim_tui.cli_examples import walk

    missing = [path or "infrasim" for path, p in walk(build_parser())
               if not (p.epilog or "").startswith("examples:")]
    assert missing == []
    out = subprocess.run([sys.executable, "-m", "infrasim_tui", "vm", "create", "--help"],
                         capture_output=True, text=True).stdout
    assert "examples:" in out and "infrasim vm create web-1" in out
    comp = subprocess.run([sys.executable, "-m", "infrasim_tui", "completion", "bash"],
                          capture_output=True, text=True)
    assert comp.returncode == 0 and "complete" in comp.stdout and "snapshot" in comp.stdout
    assert json.loads(subprocess.run([sys.executable, "-m", "infrasim_tui", "version", "-o",
                                      "json"], capture_output=True, text=True).stdout)


async def test_tls_daemon_and_the_cli_over_tcp(data_dir: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(data_dir, "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
               "--tls-key", str(key))
    try:
        await d.ready()
        token = (data_dir / "api-token").read_text().strip()
        base = [sys.executable, "-m", "infrasim_tui", "--address", f"127.0.0.1:{port}"]
        ok = await asyncio.to_thread(subprocess.run, [*base, "--token", token, "--tls-ca",
                                                      str(cert), "status", "-o", "json"],
                                     capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["data_dir"] == str(data_dir)
        no_token = await asyncio.to_thread(subprocess.run, [*base, "--tls-ca", str(cert),
                                                            "vm", "list"],
                                           capture_output=True, text=True, timeout=60)
        assert no_token.returncode == 2 and "token" in no_token.stderr
        plain = await asyncio.to_thread(subprocess.run, [*base, "--token", token, "vm", "list"],
                                        capture_output=True, text=True, timeout=60)
        assert plain.returncode == 7, plain.stderr  # a plain-text client cannot talk to TLS
    finally:
        d.stop(signal.SIGKILL)


async def test_volume_progress_reaches_the_client(api: RemoteCore, tmp_path: Path) -> None:
    img = tmp_path / "big.img"
    img.write_bytes(os.urandom(48 * MIB))
    seen: list[tuple[int, int]] = []
    vol = await api.create_volume(VolumeRequest("big", source=str(img), read_only=True),
                                  lambda done, total: seen.append((done, total)))
    assert vol.status.virtual_size == 48 * MIB
    assert seen and seen[-1][0] == seen[-1][1] > 0  # the last report says "all done"
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen.clear()
    await api.sign_volume("big", lambda done, total: seen.append((done, total)))
    assert seen == [] or seen[-1][0] == seen[-1][1]  # hashing may be a cache hit
