"""A client of the daemon that looks like the core: the same method names, the same model
objects and the same errors, so the CLI (and later the console) can run against either.

gRPC statuses come back as the core's error classes, with the field name for
INVALID_ARGUMENT, so exit codes and messages are the same embedded or remote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from ..core import errors as E
from ..core.events import Event
from ..core.model import (
    VM,
    Console,
    LinkStats,
    Network,
    NetworkSpec,
    QosProfile,
    QosProfileSpec,
    Snapshot,
    TrustedKey,
    VMSpec,
    Volume,
    VolumeKind,
    VolumeRequest,
)
from ..core.snapshot_tree import render_tree
from .convert import from_proto, to_proto
from .gen.infrasim.v1 import infrasim_pb2 as pb
from .gen.infrasim.v1 import infrasim_pb2_grpc as pbg

T = TypeVar("T")


def error_from(err: grpc.aio.AioRpcError) -> E.InfraSimError:
    """The core's error class for a gRPC status (its detail is the core's own message)."""
    code, msg = err.code(), err.details() or ""
    field = ""
    for key, value in err.trailing_metadata() or ():
        if key == "infrasim-field":
            field = str(value)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if field and msg.startswith(f"{field}: "):
            msg = msg[len(field) + 2:]
        return E.InvalidSpec(field or "request", msg)
    if code == grpc.StatusCode.NOT_FOUND:
        m = re.match(r"(\S+) '(.*)' not found", msg)
        return E.NotFound(m.group(1), m.group(2)) if m else E.NotFound("resource", msg)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        m = re.match(r"(\S+) '(.*)' already exists", msg)
        return E.AlreadyExists(m.group(1), m.group(2)) if m else E.AlreadyExists("resource", msg)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return E.WrongState(msg)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return E.PermissionDenied(msg)
    if code == grpc.StatusCode.ABORTED:
        return E.Conflict(msg)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.DEADLINE_EXCEEDED):
        return E.Unavailable(msg or f"the InfraSim daemon is unavailable ({code.name})")
    return E.QemuError(msg) if "QEMU" in msg or "qemu" in msg else E.InfraSimError(msg)


class RemoteReader:
    """The remote twin of ConsoleReader: ``history`` then chunks, None when closed."""

    def __init__(self, call: Any, history: bytes) -> None:
        self._call = call
        self.history = history
        self.lost = 0

    async def read(self) -> bytes | None:
        msg = await self._call.read()
        if msg is grpc.aio.EOF or msg.closed:
            return None
        self.lost = msg.lost
        return bytes(msg.data)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while (chunk := await self.read()) is not None:
            yield chunk

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteConsole:
    """A VM's serial console over ``StreamConsole``: one bidirectional stream per viewer."""

    def __init__(self, stub: pbg.InfraSimStub, vm: str) -> None:
        self._stub = stub
        self.vm = vm
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._call: Any = None
        self._pending: bytes = b""

    async def _requests(self, history: bool) -> AsyncIterator[pb.ConsoleInput]:
        yield pb.ConsoleInput(vm=self.vm, history=history)
        while (data := await self._inbox.get()) is not None:
            yield pb.ConsoleInput(data=data)

    async def open(self, history: bool) -> RemoteReader:
        """Attach; the daemon's first message is the replay (empty without ``history``)."""
        stream: Any = self._requests(history)  # grpc.aio takes async iterators too
        self._call = self._stub.StreamConsole(stream)
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise error_from(err) from None
        if msg is grpc.aio.EOF or msg.closed:
            raise E.WrongState(f"VM {self.vm!r} has no live console")
        return RemoteReader(self._call, bytes(msg.data))

    def subscribe(self) -> RemoteReader:
        raise RuntimeError("use `await console.open(history)` for a remote console")

    async def write(self, data: bytes) -> None:
        await self._inbox.put(data)

    async def close(self) -> None:
        await self._inbox.put(None)


class RemoteCore:
    """The Orchestrator's API over gRPC."""

    def __init__(self, channel: grpc.aio.Channel, data_dir: str = "") -> None:
        self.channel = channel
        self.stub = pbg.InfraSimStub(channel)
        self.data_dir = data_dir

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Callable[..., Any], request: Any,
                    timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise error_from(err) from None

    # -- VMs --------------------------------------------------------------------------------

    async def create_vm(self, name: str, spec: VMSpec, labels: dict[str, str] | None = None,
                        *, start: bool = False) -> VM:
        req = pb.CreateVMRequest(name=name, spec=to_proto(spec, pb.VMSpec),
                                 labels=labels or {}, start=start)
        return from_proto(await self._call(self.stub.CreateVM, req), VM)

    async def validate(self, name: str, spec: VMSpec, labels: dict[str, str] | None = None) -> None:
        """Raise what create would raise, creating nothing."""
        req = pb.CreateVMRequest(name=name, spec=to_proto(spec, pb.VMSpec),
                                 labels=labels or {}, validate_only=True)
        await self._call(self.stub.CreateVM, req)

    async def get_vm(self, ref: str) -> VM:
        return from_proto(await self._call(self.stub.GetVM, pb.GetVMRequest(ref=ref)), VM)

    async def list_vms(self, labels: dict[str, str] | None = None) -> list[VM]:
        resp = await self._call(self.stub.ListVMs, pb.ListVMsRequest(labels=labels or {}))
        return [from_proto(v, VM) for v in resp.vms]

    async def update_vm(self, vm: VM, expected_version: int | None = None) -> VM:
        req = pb.UpdateVMRequest(vm=to_proto(vm, pb.VM),
                                 expected_version=expected_version or vm.meta.version)
        return from_proto(await self._call(self.stub.UpdateVM, req), VM)

    async def start_vm(self, ref: str, *, paused: bool = False) -> VM:
        req = pb.StartVMRequest(ref=ref, paused=paused)
        return from_proto(await self._call(self.stub.StartVM, req), VM)

    async def stop_vm(self, ref: str, *, force: bool = False, timeout: float = 30.0) -> VM:
        req = pb.StopVMRequest(ref=ref, force=force, timeout_s=timeout)
        return from_proto(await self._call(self.stub.StopVM, req), VM)

    async def pause_vm(self, ref: str) -> VM:
        return from_proto(await self._call(self.stub.PauseVM, pb.Ref(ref=ref)), VM)

    async def resume_vm(self, ref: str) -> VM:
        return from_proto(await self._call(self.stub.ResumeVM, pb.Ref(ref=ref)), VM)

    async def restart_vm(self, ref: str, *, force: bool = False, timeout: float = 30.0) -> VM:
        req = pb.RestartVMRequest(ref=ref, force=force, timeout_s=timeout)
        return from_proto(await self._call(self.stub.RestartVM, req), VM)

    async def delete_vm(self, ref: str, *, force: bool = False) -> None:
        await self._call(self.stub.DeleteVM, pb.DeleteVMRequest(ref=ref, force=force))

    def console(self, vm_id: str) -> RemoteConsole:
        return RemoteConsole(self.stub, vm_id)

    async def status(self) -> dict[str, Any]:
        st = await self._call(self.stub.GetDaemonStatus, pb.Empty())
        return {
            "version": st.version, "data_dir": st.data_dir, "uptime_s": st.uptime_s,
            "daemon_pid": st.pid,
            "host": {"os": st.host_os, "arch": st.host_arch, "qemu_version": st.qemu_version,
                     "accelerators": dict(st.accelerators),
                     "accel_reasons": dict(st.accelerator_reasons)},
            "vms": dict(st.vm_counts),
        }

    async def health(self, timeout: float = 2.0) -> str:
        return str((await self._call(self.stub.GetHealth, pb.Empty(), timeout)).status)

    # -- networks ---------------------------------------------------------------------------

    async def create_network(self, name: str, spec: NetworkSpec,
                             labels: dict[str, str] | None = None) -> Network:
        req = pb.CreateNetworkRequest(name=name, spec=to_proto(spec, pb.NetworkSpec),
                                      labels=labels or {})
        return from_proto(await self._call(self.stub.CreateNetwork, req), Network)

    async def get_network(self, ref: str) -> Network:
        return from_proto(await self._call(self.stub.GetNetwork, pb.Ref(ref=ref)), Network)

    async def list_networks(self) -> list[Network]:
        resp = await self._call(self.stub.ListNetworks, pb.Empty())
        return [from_proto(n, Network) for n in resp.networks]

    async def delete_network(self, ref: str) -> None:
        await self._call(self.stub.DeleteNetwork, pb.Ref(ref=ref))

    async def link_stats(self, network: str = "") -> list[LinkStats]:
        """Each link of a SEGMENT network (id or name; "" = every segment), both directions."""
        resp = await self._call(self.stub.GetLinkStats, pb.GetLinkStatsRequest(network=network))
        return [from_proto(s, LinkStats) for s in resp.links]

    # -- QoS profiles -----------------------------------------------------------------------

    async def create_qos_profile(self, name: str, spec: QosProfileSpec,
                                 labels: dict[str, str] | None = None) -> QosProfile:
        req = pb.CreateQosProfileRequest(name=name, spec=to_proto(spec, pb.QosProfileSpec),
                                         labels=labels or {})
        return from_proto(await self._call(self.stub.CreateQosProfile, req), QosProfile)

    async def get_qos_profile(self, ref: str) -> QosProfile:
        return from_proto(await self._call(self.stub.GetQosProfile, pb.Ref(ref=ref)),
                          QosProfile)

    async def list_qos_profiles(self) -> list[QosProfile]:
        resp = await self._call(self.stub.ListQosProfiles, pb.Empty())
        return [from_proto(p, QosProfile) for p in resp.profiles]

    async def update_qos_profile(self, ref: str, spec: QosProfileSpec) -> QosProfile:
        """Replace the whole spec; the daemon re-shapes every attached link live."""
        req = pb.UpdateQosProfileRequest(ref=ref, spec=to_proto(spec, pb.QosProfileSpec))
        return from_proto(await self._call(self.stub.UpdateQosProfile, req), QosProfile)

    async def delete_qos_profile(self, ref: str) -> None:
        await self._call(self.stub.DeleteQosProfile, pb.Ref(ref=ref))

    # -- volumes, images, keys --------------------------------------------------------------

    async def _with_progress(self, name: str, progress: Any, work: Any) -> Any:
        """Run ``work`` while feeding the daemon's ``volume.progress`` events to ``progress``."""
        if progress is None:
            return await work
        subscribed = asyncio.Event()

        async def follow() -> None:
            async for ev in self.watch(kinds=["volume"], resource=name, subscribed=subscribed):
                if ev.type == "volume.progress":
                    progress(int(ev.data["done"]), int(ev.data["total"]))

        task = asyncio.create_task(follow())
        ready = asyncio.ensure_future(subscribed.wait())
        try:  # start the work once subscribed (or once following failed: progress is a nicety)
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            return await work
        finally:
            ready.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, E.InfraSimError):
                await task

    async def create_volume(self, req: VolumeRequest, progress: Any = None) -> Volume:
        kind = pb.VOLUME_KIND_WEIGHTS if req.kind == VolumeKind.WEIGHTS else pb.VOLUME_KIND_DISK
        msg = pb.CreateVolumeRequest(
            name=req.name, size_bytes=req.size_bytes, format=req.format, source=req.source,
            source_digest=req.source_digest, base=req.base, read_only=req.read_only,
            kind=kind, labels=req.labels or {}, signature=req.signature,
            public_key=req.public_key)
        done = await self._with_progress(req.name, progress,
                                         self._call(self.stub.CreateVolume, msg))
        return from_proto(done, Volume)

    async def get_volume(self, ref: str) -> Volume:
        return from_proto(await self._call(self.stub.GetVolume, pb.Ref(ref=ref)), Volume)

    async def list_volumes(self) -> list[Volume]:
        resp = await self._call(self.stub.ListVolumes, pb.Empty())
        return [from_proto(v, Volume) for v in resp.volumes]

    async def resize_volume(self, ref: str, size: int) -> Volume:
        req = pb.ResizeVolumeRequest(ref=ref, size_bytes=size)
        return from_proto(await self._call(self.stub.ResizeVolume, req), Volume)

    async def delete_volume(self, ref: str) -> None:
        await self._call(self.stub.DeleteVolume, pb.Ref(ref=ref))

    async def sign_volume(self, ref: str, progress: Any = None) -> Volume:
        done = await self._with_progress(ref, progress,
                                         self._call(self.stub.SignVolume, pb.Ref(ref=ref)))
        return from_proto(done, Volume)

    async def verify_volume(self, ref: str, progress: Any = None) -> Volume:
        done = await self._with_progress(ref, progress,
                                         self._call(self.stub.VerifyVolume, pb.Ref(ref=ref)))
        return from_proto(done, Volume)

    async def list_images(self) -> list[tuple[str, int, list[str]]]:
        resp = await self._call(self.stub.ListImages, pb.Empty())
        return [(i.digest, i.size, list(i.volumes)) for i in resp.images]

    async def image_gc(self) -> tuple[list[str], int]:
        resp = await self._call(self.stub.GcImages, pb.Empty())
        return list(resp.removed), int(resp.freed_bytes)

    async def trusted_keys(self) -> list[TrustedKey]:
        resp = await self._call(self.stub.ListKeys, pb.Empty())
        return [TrustedKey(name=k.name, public_key=k.public_key, fingerprint=k.fingerprint,
                           added_at=k.added_at, host=k.host) for k in resp.keys]

    async def add_key(self, name: str, public_key: str) -> TrustedKey:
        k = await self._call(self.stub.AddKey, pb.AddKeyRequest(name=name,
                                                                public_key=public_key))
        return TrustedKey(name=k.name, public_key=k.public_key, fingerprint=k.fingerprint,
                          added_at=k.added_at, host=k.host)

    async def remove_key(self, ref: str) -> None:
        await self._call(self.stub.RemoveKey, pb.Ref(ref=ref))

    # -- snapshots and consoles -------------------------------------------------------------

    async def create_snapshot(self, vm_ref: str, name: str, description: str = "") -> Snapshot:
        req = pb.CreateSnapshotRequest(vm=vm_ref, name=name, description=description)
        return from_proto(await self._call(self.stub.CreateSnapshot, req), Snapshot)

    async def restore_snapshot(self, vm_ref: str, snap_ref: str, *,
                               keep_current: bool = False) -> Snapshot:
        req = pb.RestoreSnapshotRequest(vm=vm_ref, name=snap_ref, keep_current=keep_current)
        return from_proto(await self._call(self.stub.RestoreSnapshot, req), Snapshot)

    async def delete_snapshot(self, vm_ref: str, snap_ref: str) -> None:
        await self._call(self.stub.DeleteSnapshot, pb.SnapshotRef(vm=vm_ref, name=snap_ref))

    async def list_snapshots(self, vm_ref: str) -> list[Snapshot]:
        resp = await self._call(self.stub.ListSnapshots, pb.ListSnapshotsRequest(vm=vm_ref))
        return [from_proto(s, Snapshot) for s in resp.snapshots]

    async def get_snapshot(self, vm_ref: str, snap_ref: str) -> Snapshot:
        req = pb.SnapshotRef(vm=vm_ref, name=snap_ref)
        return from_proto(await self._call(self.stub.GetSnapshot, req), Snapshot)

    async def snapshot_tree(self, vm_ref: str) -> str:
        resp = await self._call(self.stub.ListSnapshots, pb.ListSnapshotsRequest(vm=vm_ref))
        vm = await self.get_vm(vm_ref)
        return render_tree(vm.meta.name, [from_proto(s, Snapshot) for s in resp.snapshots],
                           resp.current_snapshot_id)

    async def verify_snapshots(self, vm_ref: str) -> list[str]:
        resp = await self._call(self.stub.VerifySnapshots, pb.ListSnapshotsRequest(vm=vm_ref))
        return list(resp.lines)

    async def create_console(self, vm_ref: str, type_: str = "serial") -> Console:
        req = pb.CreateConsoleRequest(vm=vm_ref, type=type_)
        return from_proto(await self._call(self.stub.CreateConsole, req), Console)

    async def get_console(self, ref: str) -> Console:
        return from_proto(await self._call(self.stub.GetConsole, pb.Ref(ref=ref)), Console)

    async def delete_console(self, ref: str) -> None:
        await self._call(self.stub.DeleteConsole, pb.Ref(ref=ref))

    # -- events -----------------------------------------------------------------------------

    async def watch(self, *, resume_token: str = "", kinds: list[str] | None = None,
                    resource: str = "", metrics: bool = False, tail: int = 0,
                    subscribed: asyncio.Event | None = None) -> AsyncIterator[Event]:
        """Events from the daemon; ``subscribed`` is set once live events will arrive."""
        req = pb.WatchEventsRequest(resume_token=resume_token, kinds=kinds or [],
                                    resource=resource, metrics=metrics, tail=tail)
        call = self.stub.WatchEvents(req)
        try:
            if subscribed is not None:
                await call.initial_metadata()
                subscribed.set()
            async for msg in call:
                yield Event(type=msg.type, kind=msg.kind, resource_id=msg.resource_id,
                            name=msg.name, message=msg.message,
                            data=json.loads(msg.data_json or "{}"), ts=msg.ts,
                            seq=int(msg.resume_token or 0))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise error_from(err) from None
        finally:
            with contextlib.suppress(Exception):
                call.cancel()


__all__ = ["RemoteConsole", "RemoteCore", "RemoteReader", "error_from"]
