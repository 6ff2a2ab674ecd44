"""Property-based fuzzing of every unary request message against a real daemon: never a crash,
never UNKNOWN, and a create that fails leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infrasim_tui.core.guest import GuestKit
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2_grpc as pbg

from .conftest import kill_qemus

pytestmark = pytest.mark.qemu
SERVICE = pb.DESCRIPTOR.services_by_name["InfraSim"]
# Deleting the seeded world would leave the other RPCs nothing real to reach; the deletes have
# their own tests (test_api, test_volumes, test_cli).
NOT_FUZZED = {"DeleteVM", "DeleteVolume", "DeleteNetwork"}
UNARY = [m for m in SERVICE.methods
         if not m.client_streaming and not m.server_streaming and m.name not in NOT_FUZZED]
# Names that exist in the seeded world, so fuzzed calls also reach real resources.
KNOWN = ["fz", "fv", "lan", "s0", ""]


def text(kit: GuestKit) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*KNOWN, str(kit.kernel), str(kit.initrd), "virt", "raspi3b", "tcg",
                         "qcow2", "raw", "10.0.9.0/24", "../../etc/passwd", "-drive",
                         "a,b=c", "x" * 300, "tcp", "127.0.0.1"]),
        st.text(max_size=20),
    )


def message(desc: Descriptor, kit: GuestKit, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = getattr(pb, desc.name)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        fields[f.name] = st.one_of(st.none(), value(f, kit, depth))

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for name, strat in fields.items():
            v = draw(strat)
            if v is None:
                continue
            f = desc.fields_by_name[name]
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                getattr(msg, name).update(v) if not isinstance(v, list) else None
            elif (f.is_repeated and f.message_type is not None) or f.is_repeated:
                getattr(msg, name).extend(v)
            elif f.message_type is not None:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    return build()


def value(f: FieldDescriptor, kit: GuestKit, depth: int) -> st.SearchStrategy[Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        vf = f.message_type.fields_by_name["value"]
        if vf.message_type is not None:
            return st.just({})
        return st.dictionaries(text(kit), scalar(vf, kit), max_size=2)
    one = scalar(f, kit) if f.message_type is None else (
        message(f.message_type, kit, depth + 1) if depth < 3 else st.just(
            getattr(pb, f.message_type.name)()))
    return st.lists(one, max_size=3) if f.is_repeated else one


def scalar(f: FieldDescriptor, kit: GuestKit) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return text(kit)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(-5, 5, allow_nan=False)  # timeouts: keep each example short
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values] + [99])
    if t == FieldDescriptor.TYPE_INT32:
        return st.integers(-(2**31), 2**31 - 1)
    return st.integers(-(2**40), 2**34)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, cloud_kit: GuestKit) -> Iterator[Any]:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "infrasim_tui", "--data-dir", str(data),
                             "serve"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    sock = data / "infrasim.sock"
    channel = grpc.insecure_channel(f"unix://{sock}")
    stub = pbg.InfraSimStub(channel)
    for _ in range(300):
        try:
            stub.GetHealth(pb.Empty(), timeout=1)
            break
        except grpc.RpcError:
            time.sleep(0.05)
    stub.CreateVolume(pb.CreateVolumeRequest(name="fv", size_bytes=8 << 20))
    stub.CreateNetwork(pb.CreateNetworkRequest(name="lan", spec=pb.NetworkSpec(
        cidr="10.0.9.0/24")))
    stub.CreateVM(pb.CreateVMRequest(name="fz", spec=pb.VMSpec(
        kernel=str(cloud_kit.kernel), initrd=str(cloud_kit.initrd), volume_ids=["fv"])))
    try:
        yield proc, stub
    finally:
        channel.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_qemus(data)


CREATES = {"CreateVM": ("GetVM", pb.GetVMRequest), "CreateVolume": ("GetVolume", pb.Ref),
           "CreateNetwork": ("GetNetwork", pb.Ref)}


@pytest.mark.parametrize("method", [m.name for m in UNARY])
def test_fuzz_every_unary_rpc(world: Any, cloud_kit: GuestKit, method: str) -> None:
    proc, stub = world
    desc = SERVICE.methods_by_name[method]
    created: set[str] = set(KNOWN)
    examples = 12 if method.startswith(("Create", "Update", "Start", "Restart")) else 6

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=message(desc.input_type, cloud_kit))
    def check(req: Message) -> None:
        call = getattr(stub, method)
        try:
            call(req, timeout=30)
            ok = True
        except grpc.RpcError as err:
            ok = False
            assert err.code() not in (grpc.StatusCode.UNKNOWN,), (method, req, err.details())
            assert err.code() != grpc.StatusCode.INTERNAL, (method, req, err.details())
        assert proc.poll() is None, "the daemon died"
        name = getattr(req, "name", "")
        if method in CREATES and ok:
            created.add(name)
        elif method in CREATES and name not in created:
            getter, cls = CREATES[method]
            with pytest.raises(grpc.RpcError) as miss:  # a failed create leaves nothing
                getattr(stub, getter)(cls(ref=name), timeout=10)
            assert miss.value.code() == grpc.StatusCode.NOT_FOUND

    check()


@pytest.mark.parametrize("method", sorted(NOT_FUZZED))
def test_fuzz_deletes_last(world: Any, cloud_kit: GuestKit, method: str) -> None:
    """The deletes, after everything else (they may remove the seeded world)."""
    proc, stub = world
    desc = SERVICE.methods_by_name[method]

    @settings(max_examples=10, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=message(desc.input_type, cloud_kit))
    def check(req: Message) -> None:
        try:
            getattr(stub, method)(req, timeout=30)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), \
                (method, req, err.details())
        assert proc.poll() is None, "the daemon died"

    check()


def test_fuzz_left_a_consistent_world(world: Any) -> None:
    proc, stub = world
    assert proc.poll() is None
    vms = stub.ListVMs(pb.ListVMsRequest(), timeout=10).vms
    for vm in vms:  # no VM stuck half-way
        assert vm.status.state in (pb.VM_STATE_STOPPED, pb.VM_STATE_RUNNING,
                                   pb.VM_STATE_PAUSED, pb.VM_STATE_ERROR), vm
