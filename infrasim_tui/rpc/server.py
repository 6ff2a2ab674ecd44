"""The ``infrasim.v1`` servicer: a thin adapter from gRPC to the core's Orchestrator.

Every core error becomes a gRPC status an operator can act on (INVALID_ARGUMENT names the field,
also in the ``infrasim-field`` trailer); anything unexpected is INTERNAL with its message,
never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..core.errors import InfraSimError, InvalidSpec
from ..core.events import Event
from ..core.model import (
    LoraSpec,
    NetworkSpec,
    QosProfileSpec,
    VMSpec,
    Volume,
    VolumeKind,
    VolumeRequest,
)
from ..core.orchestrator import Orchestrator
from .convert import from_proto, to_proto
from .gen.infrasim.v1 import infrasim_pb2 as pb
from .gen.infrasim.v1 import infrasim_pb2_grpc as pbg

CODES: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "aborted": grpc.StatusCode.ABORTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "internal": grpc.StatusCode.INTERNAL,
}
# Periodic live-only samples: streamed only to watchers that ask for them (``metrics``).
LIVE_SAMPLES = frozenset({"vm.metrics", "network.stats"})
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """Pure: (code, message, field) for an exception raised while serving a call."""
    if isinstance(exc, InfraSimError):
        field = exc.field if isinstance(exc, InvalidSpec) else ""
        return CODES.get(exc.code, grpc.StatusCode.INTERNAL), exc.message, field
    if isinstance(exc, (ValueError, TypeError, KeyError)):  # a message we could not convert
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}", ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", ""


def rpc(fn: F) -> F:
    """Map exceptions of a unary handler to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any,
                      context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except BaseException as exc:
            await _abort(context, exc)

    return wrapper  # type: ignore[return-value]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    code, message, field = status_for(exc)
    if field:  # metadata values must be printable ASCII; field names may carry user text
        safe = field.encode("unicode_escape").decode("ascii")
        context.set_trailing_metadata((("infrasim-field", safe),))
    await context.abort(code, message)


_BACKGROUND: set[asyncio.Task[Any]] = set()


async def atomic(aw: Awaitable[T]) -> T:
    """Finish a state-changing core call even if the client goes away mid-call.

    A cancelled StartVM used to be cut between spawning QEMU and recording it (a paused QEMU
    owned by nothing, the VM stuck PENDING). Lifecycle and snapshot calls are short, so they
    run to completion in the background and the record stays true; long transfers (imports)
    stay cancellable.
    """
    task = asyncio.ensure_future(aw)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, never warn
    return await asyncio.shield(task)


def _field(name: str, fn: Callable[[], Any]) -> Any:
    """Convert a message; a value the model cannot hold is INVALID_ARGUMENT naming its field."""
    try:
        return fn()
    except (ValueError, TypeError, KeyError) as exc:
        text = str(exc).strip("'\"") or "malformed"
        m = re.match(r"^\w+\.(\w+)\b.*?: (.*)$", text)  # "VMSpec.machine ↔ …: why"
        if m:
            raise InvalidSpec(m.group(1), m.group(2)) from None
        raise InvalidSpec(name, text) from None


def vm_spec_from(msg: pb.VMSpec) -> VMSpec:
    """proto3 cannot tell 0 or "" from "not set": those mean the field's default."""
    spec: VMSpec = _field("spec", lambda: from_proto(msg, VMSpec))
    defaults = VMSpec()
    for name in ("arch", "cpu_cores", "memory_mb"):
        if not getattr(spec, name):
            setattr(spec, name, getattr(defaults, name))
    return spec


# proto3 reads an unset field as 0: where 0 is never a valid (or, for path_loss_d0_db, physical)
# value it means the model's default, so a client that leaves a field out gets what the
# dataclass would give it. Zeros that mean something (tx power, shadowing, loss) are kept.
_QOS_ZERO_DEFAULTS = ("ge_r_pct",)
_QOS_EMPTY_DEFAULTS = ("distribution", "direction")
_LORA_ZERO_DEFAULTS = ("spreading_factor", "bandwidth_khz", "coding_rate", "preamble",
                       "frequency_mhz", "d0_m", "path_loss_d0_db", "path_loss_exponent")


def qos_spec_from(msg: pb.QosProfileSpec) -> QosProfileSpec:
    """A QoS spec from the API: unset (zero) fields that cannot be zero take their defaults."""
    spec: QosProfileSpec = _field("spec", lambda: from_proto(msg, QosProfileSpec))
    defaults = QosProfileSpec()
    for name in (*_QOS_ZERO_DEFAULTS, *_QOS_EMPTY_DEFAULTS):
        if not getattr(spec, name):
            setattr(spec, name, getattr(defaults, name))
    if spec.lora is not None:
        lora_defaults = LoraSpec()
        for name in _LORA_ZERO_DEFAULTS:
            if not getattr(spec.lora, name):
                setattr(spec.lora, name, getattr(lora_defaults, name))
    return spec


class InfraSimServicer(pbg.InfraSimServicer):
    def __init__(self, core: Orchestrator) -> None:
        self.core = core

    # -- VMs --------------------------------------------------------------------------------

    @rpc
    async def CreateVM(self, req: pb.CreateVMRequest, ctx: Any) -> pb.VM:
        if req.validate_only:
            await self.core.validate(req.name, vm_spec_from(req.spec), dict(req.labels))
            return pb.VM()
        vm = await self.core.create_vm(req.name, vm_spec_from(req.spec), dict(req.labels),
                                       start=req.start)
        return to_proto(vm, pb.VM)

    @rpc
    async def GetVM(self, req: pb.GetVMRequest, ctx: Any) -> pb.VM:
        return to_proto(await self.core.get_vm(req.ref), pb.VM)

    @rpc
    async def UpdateVM(self, req: pb.UpdateVMRequest, ctx: Any) -> pb.VM:
        ref = req.vm.meta.id or req.vm.meta.name
        if not ref:
            raise InvalidSpec("vm.meta.id", "name the VM to update (id or name)")
        expected = req.expected_version or req.vm.meta.version
        if not expected:
            raise InvalidSpec("expected_version", "name the version you read (optimistic "
                              "concurrency: the update is refused if the VM changed since)")
        current = await self.core.get_vm(ref)
        current.spec = vm_spec_from(req.vm.spec)
        current.meta.labels = dict(req.vm.meta.labels)
        return to_proto(await self.core.update_vm(current, int(expected)), pb.VM)

    @rpc
    async def DeleteVM(self, req: pb.DeleteVMRequest, ctx: Any) -> pb.Empty:
        await atomic(self.core.delete_vm(req.ref, force=req.force))
        return pb.Empty()

    @rpc
    async def ListVMs(self, req: pb.ListVMsRequest, ctx: Any) -> pb.ListVMsResponse:
        vms = await self.core.list_vms(dict(req.labels) or None)
        return pb.ListVMsResponse(vms=[to_proto(v, pb.VM) for v in vms])

    @rpc
    async def StartVM(self, req: pb.StartVMRequest, ctx: Any) -> pb.VM:
        return to_proto(await atomic(self.core.start_vm(req.ref, paused=req.paused)), pb.VM)

    @rpc
    async def StopVM(self, req: pb.StopVMRequest, ctx: Any) -> pb.VM:
        vm = await atomic(self.core.stop_vm(req.ref, force=req.force,
                                            timeout=_timeout(req.timeout_s)))
        return to_proto(vm, pb.VM)

    @rpc
    async def PauseVM(self, req: pb.Ref, ctx: Any) -> pb.VM:
        return to_proto(await atomic(self.core.pause_vm(req.ref)), pb.VM)

    @rpc
    async def ResumeVM(self, req: pb.Ref, ctx: Any) -> pb.VM:
        return to_proto(await atomic(self.core.resume_vm(req.ref)), pb.VM)

    @rpc
    async def RestartVM(self, req: pb.RestartVMRequest, ctx: Any) -> pb.VM:
        vm = await atomic(self.core.restart_vm(req.ref, force=req.force,
                                        timeout=_timeout(req.timeout_s)))
        return to_proto(vm, pb.VM)

    # -- networks ---------------------------------------------------------------------------

    @rpc
    async def CreateNetwork(self, req: pb.CreateNetworkRequest, ctx: Any) -> pb.Network:
        spec = _field("spec", lambda: from_proto(req.spec, NetworkSpec))
        return to_proto(await self.core.create_network(req.name, spec, dict(req.labels)),
                        pb.Network)

    @rpc
    async def GetNetwork(self, req: pb.Ref, ctx: Any) -> pb.Network:
        return to_proto(await self.core.get_network(req.ref), pb.Network)

    @rpc
    async def DeleteNetwork(self, req: pb.Ref, ctx: Any) -> pb.Empty:
        await self.core.delete_network(req.ref)
        return pb.Empty()

    @rpc
    async def ListNetworks(self, req: pb.Empty, ctx: Any) -> pb.ListNetworksResponse:
        nets = await self.core.list_networks()
        return pb.ListNetworksResponse(networks=[to_proto(n, pb.Network) for n in nets])

    @rpc
    async def GetLinkStats(self, req: pb.GetLinkStatsRequest,
                           ctx: Any) -> pb.GetLinkStatsResponse:
        links = await self.core.link_stats(req.network)
        return pb.GetLinkStatsResponse(links=[to_proto(s, pb.LinkStats) for s in links])

    # -- QoS profiles -----------------------------------------------------------------------
    # Mutations run to completion (atomic): an update half-applied (stored, but the switch
    # still shaping with the old spec) would make the record lie.

    @rpc
    async def CreateQosProfile(self, req: pb.CreateQosProfileRequest,
                               ctx: Any) -> pb.QosProfile:
        spec = qos_spec_from(req.spec)
        prof = await atomic(self.core.create_qos_profile(req.name, spec, dict(req.labels)))
        return to_proto(prof, pb.QosProfile)

    @rpc
    async def GetQosProfile(self, req: pb.Ref, ctx: Any) -> pb.QosProfile:
        return to_proto(await self.core.get_qos_profile(req.ref), pb.QosProfile)

    @rpc
    async def UpdateQosProfile(self, req: pb.UpdateQosProfileRequest,
                               ctx: Any) -> pb.QosProfile:
        spec = qos_spec_from(req.spec)
        prof = await atomic(self.core.update_qos_profile(req.ref, spec))
        return to_proto(prof, pb.QosProfile)

    @rpc
    async def DeleteQosProfile(self, req: pb.Ref, ctx: Any) -> pb.Empty:
        await atomic(self.core.delete_qos_profile(req.ref))
        return pb.Empty()

    @rpc
    async def ListQosProfiles(self, req: pb.Empty, ctx: Any) -> pb.ListQosProfilesResponse:
        profs = await self.core.list_qos_profiles()
        return pb.ListQosProfilesResponse(profiles=[to_proto(p, pb.QosProfile) for p in profs])

    # -- volumes, images, keys --------------------------------------------------------------

    @rpc
    async def CreateVolume(self, req: pb.CreateVolumeRequest, ctx: Any) -> pb.Volume:
        kind = VolumeKind.WEIGHTS if req.kind == pb.VOLUME_KIND_WEIGHTS else VolumeKind.DISK
        vreq = VolumeRequest(name=req.name, size_bytes=req.size_bytes,
                             format=req.format or "qcow2", source=req.source,
                             source_digest=req.source_digest, base=req.base,
                             read_only=req.read_only, kind=kind, labels=dict(req.labels),
                             signature=req.signature, public_key=req.public_key)
        return to_proto(await self.core.create_volume(vreq), pb.Volume)

    @rpc
    async def GetVolume(self, req: pb.Ref, ctx: Any) -> pb.Volume:
        return to_proto(await self.core.get_volume(req.ref), pb.Volume)

    @rpc
    async def DeleteVolume(self, req: pb.Ref, ctx: Any) -> pb.Empty:
        await self.core.delete_volume(req.ref)
        return pb.Empty()

    @rpc
    async def ListVolumes(self, req: pb.Empty, ctx: Any) -> pb.ListVolumesResponse:
        vols = await self.core.list_volumes()
        return pb.ListVolumesResponse(volumes=[to_proto(v, pb.Volume) for v in vols])

    @rpc
    async def ResizeVolume(self, req: pb.ResizeVolumeRequest, ctx: Any) -> pb.Volume:
        return to_proto(await self.core.resize_volume(req.ref, req.size_bytes), pb.Volume)

    @rpc
    async def SignVolume(self, req: pb.Ref, ctx: Any) -> pb.Volume:
        return to_proto(await self.core.sign_volume(req.ref), pb.Volume)

    @rpc
    async def VerifyVolume(self, req: pb.Ref, ctx: Any) -> pb.Volume:
        return to_proto(await self.core.verify_volume(req.ref), pb.Volume)

    @rpc
    async def ListImages(self, req: pb.Empty, ctx: Any) -> pb.ListImagesResponse:
        images = await self.core.list_images()
        return pb.ListImagesResponse(images=[
            pb.StoredImage(digest=d, size=size, volumes=users) for d, size, users in images])

    @rpc
    async def GcImages(self, req: pb.Empty, ctx: Any) -> pb.GcImagesResponse:
        removed, freed = await self.core.image_gc()
        return pb.GcImagesResponse(removed=removed, freed_bytes=freed)

    @rpc
    async def ListKeys(self, req: pb.Empty, ctx: Any) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[pb.TrustedKey(**k.__dict__)
                                         for k in self.core.trusted_keys()])

    @rpc
    async def AddKey(self, req: pb.AddKeyRequest, ctx: Any) -> pb.TrustedKey:
        return pb.TrustedKey(**self.core.add_key(req.name, req.public_key).__dict__)

    @rpc
    async def RemoveKey(self, req: pb.Ref, ctx: Any) -> pb.Empty:
        self.core.remove_key(req.ref)
        return pb.Empty()

    # -- snapshots --------------------------------------------------------------------------

    @rpc
    async def CreateSnapshot(self, req: pb.CreateSnapshotRequest, ctx: Any) -> pb.Snapshot:
        snap = await atomic(self.core.create_snapshot(req.vm, req.name, req.description))
        return to_proto(snap, pb.Snapshot)

    @rpc
    async def GetSnapshot(self, req: pb.SnapshotRef, ctx: Any) -> pb.Snapshot:
        return to_proto(await self.core.get_snapshot(req.vm, req.name), pb.Snapshot)

    @rpc
    async def DeleteSnapshot(self, req: pb.SnapshotRef, ctx: Any) -> pb.Empty:
        await atomic(self.core.delete_snapshot(req.vm, req.name))
        return pb.Empty()

    @rpc
    async def ListSnapshots(self, req: pb.ListSnapshotsRequest,
                            ctx: Any) -> pb.ListSnapshotsResponse:
        vm = await self.core.get_vm(req.vm)
        snaps = await self.core.list_snapshots(vm.meta.id)
        return pb.ListSnapshotsResponse(snapshots=[to_proto(s, pb.Snapshot) for s in snaps],
                                        current_snapshot_id=vm.status.current_snapshot_id)

    @rpc
    async def RestoreSnapshot(self, req: pb.RestoreSnapshotRequest, ctx: Any) -> pb.Snapshot:
        snap = await atomic(self.core.restore_snapshot(req.vm, req.name,
                                                keep_current=req.keep_current))
        return to_proto(snap, pb.Snapshot)

    @rpc
    async def VerifySnapshots(self, req: pb.ListSnapshotsRequest,
                              ctx: Any) -> pb.VerifySnapshotsResponse:
        return pb.VerifySnapshotsResponse(lines=await self.core.verify_snapshots(req.vm))

    # -- consoles ---------------------------------------------------------------------------

    @rpc
    async def CreateConsole(self, req: pb.CreateConsoleRequest, ctx: Any) -> pb.Console:
        return to_proto(await self.core.create_console(req.vm, req.type or "serial"),
                        pb.Console)

    @rpc
    async def GetConsole(self, req: pb.Ref, ctx: Any) -> pb.Console:
        return to_proto(await self.core.get_console(req.ref), pb.Console)

    @rpc
    async def DeleteConsole(self, req: pb.Ref, ctx: Any) -> pb.Empty:
        await self.core.delete_console(req.ref)
        return pb.Empty()

    async def StreamConsole(self, requests: AsyncIterator[pb.ConsoleInput],
                            ctx: grpc.aio.ServicerContext[Any, Any],
                            ) -> AsyncIterator[pb.ConsoleOutput]:
        """First message: which VM (and whether to replay); then keystrokes. Output is shared
        with every other viewer of the same VM (one serial connection, fanned out)."""
        try:
            first = await anext(aiter(requests), None)
            if first is None or not first.vm:
                raise InvalidSpec("vm", "the first message must name the VM")
            vm = await self.core.get_vm(first.vm)
            console = self.core.console(vm.meta.id)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            await _abort(ctx, exc)
            return
        reader = console.subscribe()

        async def pump_input() -> None:
            if first.data:
                await console.write(first.data)
            async for msg in requests:
                if msg.data:
                    await console.write(msg.data)

        feeder = asyncio.create_task(pump_input())
        try:
            # Always one first message (the replay, maybe empty): the client's "attached".
            yield pb.ConsoleOutput(data=reader.history if first.history else b"")
            out = asyncio.ensure_future(reader.read())
            while True:
                done, _ = await asyncio.wait({out, feeder}, return_when=asyncio.FIRST_COMPLETED)
                if out in done:
                    chunk = out.result()
                    if chunk is None:
                        yield pb.ConsoleOutput(closed=True, lost=reader.lost)
                        return
                    yield pb.ConsoleOutput(data=chunk, lost=reader.lost)
                    out = asyncio.ensure_future(reader.read())
                if feeder in done:  # the client detached (or its input failed)
                    out.cancel()
                    return
        finally:
            reader.close()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder

    # -- events and status ------------------------------------------------------------------

    async def WatchEvents(self, req: pb.WatchEventsRequest,
                          ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.Event]:
        """Replay persisted events after the resume token, then stream live ones in order."""
        try:
            since = int(req.resume_token or 0)
        except ValueError:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "resume_token: not a token this daemon issued")
            return
        kinds = set(req.kinds)

        def wanted(ev: Event) -> bool:
            if ev.type in LIVE_SAMPLES and not req.metrics:
                return False
            if kinds and ev.kind not in kinds:
                return False
            return not req.resource or req.resource in (ev.resource_id, ev.name)

        with self.core.bus.subscribe(wanted, maxsize=8192) as sub:  # before replay: no gap
            # Tells the client it is subscribed: live events from now on will reach it.
            await ctx.send_initial_metadata(())
            if not req.resume_token and req.tail:
                since = max(0, await self.core.store.last_event_seq() - req.tail)
            last = since
            if req.resume_token or req.tail:
                while True:
                    batch = await self.core.store.events(since_seq=last, limit=500)
                    for rec in batch:
                        last = rec.seq
                        ev = Event(type=rec.type, kind=rec.kind, resource_id=rec.resource_id,
                                   name=rec.name, message=rec.message, data=dict(rec.data),
                                   ts=rec.ts, seq=rec.seq)
                        if wanted(ev):
                            yield event_to_proto(ev)
                    if len(batch) < 500:
                        break
            if req.metrics:
                self.core.metrics.acquire()
            try:
                async for ev in sub:
                    if not ev.seq or ev.seq > last:  # replayed ones are not sent twice
                        last = max(last, ev.seq)
                        yield event_to_proto(ev)
            finally:
                if req.metrics:
                    self.core.metrics.release()

    @rpc
    async def GetHealth(self, req: pb.Empty, ctx: Any) -> pb.HealthResponse:
        return pb.HealthResponse(status="SERVING")

    @rpc
    async def GetDaemonStatus(self, req: pb.Empty, ctx: Any) -> pb.DaemonStatus:
        st = await self.core.status()
        host = st["host"]
        return pb.DaemonStatus(
            version=st["version"], uptime_s=st["uptime_s"], data_dir=st["data_dir"],
            accelerators=host.get("accelerators", {}),
            accelerator_reasons=host.get("accel_reasons", {}),
            qemu_version=host.get("qemu_version", ""), vm_counts=st["vms"], pid=os.getpid(),
            host_os=host.get("os", ""), host_arch=host.get("arch", ""))


def event_to_proto(ev: Event) -> pb.Event:
    return pb.Event(resume_token=str(ev.seq) if ev.seq else "", ts=ev.ts, type=ev.type,
                    kind=ev.kind, resource_id=ev.resource_id, name=ev.name, message=ev.message,
                    data_json=json.dumps(ev.data, sort_keys=True, default=str))


def _timeout(value: float) -> float:
    if not 0 <= value <= 3600:
        raise InvalidSpec("timeout_s", f"{value:g} s: give 0 (the default, 30 s) up to 3600")
    return value or 30.0


__all__ = ["InfraSimServicer", "Volume", "event_to_proto", "status_for", "time"]
