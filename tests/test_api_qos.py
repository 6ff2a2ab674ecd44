"""QoS profiles, link statistics and SEGMENT networks through the infrasim.v1 API, against a
real daemon (`infrasim serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from infrasim_tui.core.access import GuardedCore, Role, allowed
from infrasim_tui.core.errors import InvalidSpec, NotFound, PermissionDenied, WrongState
from infrasim_tui.core.events import Event
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import (
    LinkStats,
    LoraLinkStats,
    LoraSpec,
    NetworkMode,
    NetworkSpec,
    QosProfile,
    QosProfileSpec,
    VMState,
    from_dict,
    to_dict,
)
from infrasim_tui.rpc.client import RemoteCore
from infrasim_tui.rpc.convert import from_proto, to_proto
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2_grpc as pbg
from infrasim_tui.rpc.server import event_to_proto, qos_spec_from

from .conftest import guest_spec
from .test_api import Daemon

pytestmark = pytest.mark.qemu


@pytest.fixture
async def daemon(data_dir: Path) -> AsyncIterator[Daemon]:
    d = Daemon(data_dir)
    try:
        await d.ready()
        yield d
    finally:
        d.stop()


@pytest.fixture
async def api(daemon: Daemon) -> AsyncIterator[RemoteCore]:
    core = daemon.client()
    try:
        yield core
    finally:
        await core.close()


@pytest.fixture
async def stub(daemon: Daemon) -> AsyncIterator[Any]:
    """The raw stub on an aio channel (its calls are awaitable, which the stubs' types miss)."""
    channel = grpc.aio.insecure_channel(f"unix://{daemon.sock}")
    try:
        yield pbg.InfraSimStub(channel)
    finally:
        await channel.close()


RADIO = QosProfileSpec(rate_bps=250_000, burst_bytes=4096, queue_bytes=32768, delay_ms=40.0,
                       jitter_ms=5.0, distribution="normal", ge_p_pct=1.0, ge_r_pct=30.0,
                       ge_bad_loss_pct=90.0, ge_good_loss_pct=0.5, duplicate_pct=0.1,
                       reorder_pct=1.0, seed=42, direction="egress",
                       lora=LoraSpec(spreading_factor=9, bandwidth_khz=250, coding_rate=7,
                                     preamble=12, implicit_header=False, crc=False,
                                     tx_power_dbm=-3.0, distance_m=350.0, frequency_mhz=868.3,
                                     d0_m=1.0, path_loss_d0_db=7.7, path_loss_exponent=3.76,
                                     shadowing_sigma_db=0.0, noise_figure_db=5.0,
                                     capture_db=3.0, duty_cycle_pct=1.0))


async def test_profile_crud_round_trip_with_lora(api: RemoteCore) -> None:
    created = await api.create_qos_profile("radio", RADIO, {"site": "field"})
    assert created.spec == RADIO  # every field, the radio section included, survives the wire
    assert created.meta.labels == {"site": "field"} and created.meta.version >= 1
    assert (await api.get_qos_profile("radio")).meta.id == created.meta.id
    assert (await api.get_qos_profile(created.meta.id)).spec == RADIO
    await api.create_qos_profile("plain", QosProfileSpec(rate_bps=8_000_000))
    listed = {p.meta.name: p for p in await api.list_qos_profiles()}
    assert set(listed) == {"radio", "plain"}
    assert listed["plain"].spec.lora is None and listed["plain"].spec.ge_r_pct == 100.0
    assert listed["radio"].status.attached_vm_ids == [] and listed["radio"].status.links == 0

    # An update replaces the spec: the radio section goes, a LoRa-free shaper stays.
    new = dataclasses.replace(RADIO, rate_bps=1_000_000, lora=None, direction="both")
    updated = await api.update_qos_profile("radio", new)
    assert updated.spec == new and updated.meta.version > created.meta.version
    assert (await api.get_qos_profile("radio")).spec.lora is None
    back = dataclasses.replace(new, lora=LoraSpec(spreading_factor=12))
    assert (await api.update_qos_profile(created.meta.id, back)).spec.lora == \
        LoraSpec(spreading_factor=12)

    with pytest.raises(NotFound):
        await api.update_qos_profile("nope", new)
    await api.delete_qos_profile("radio")
    with pytest.raises(NotFound):
        await api.get_qos_profile("radio")
    with pytest.raises(NotFound):
        await api.delete_qos_profile("radio")
    assert [p.meta.name for p in await api.list_qos_profiles()] == ["plain"]

    # The changes were published (and persisted: a late watcher replays them).
    seen = []
    async for ev in api.watch(kinds=["qos_profile"], tail=50):
        seen.append((ev.type, ev.name))
        if ev.type == "qos_profile.deleted":
            break
    assert ("qos_profile.created", "radio") in seen and ("qos_profile.updated", "radio") in seen


async def test_delete_is_refused_while_a_vm_names_the_profile(api: RemoteCore,
                                                              cloud_kit: GuestKit) -> None:
    seg = await api.create_network("seg", NetworkSpec(mode=NetworkMode.SEGMENT,
                                                      cidr="10.10.0.0/24"))
    wan = await api.create_qos_profile("wan", QosProfileSpec(rate_bps=8_000_000))
    edge = await api.create_qos_profile("edge", QosProfileSpec(delay_ms=20.0))
    # Names on input, ids in the record.
    vm = await api.create_vm("a", guest_spec(cloud_kit, network_ids=["seg"], qos_profile_id="wan",
                                             nic_qos={"seg": "edge"}))
    assert vm.spec.network_ids == [seg.meta.id]
    assert vm.spec.qos_profile_id == wan.meta.id and vm.spec.nic_qos == {seg.meta.id:
                                                                         edge.meta.id}
    assert (await api.get_qos_profile("edge")).status.attached_vm_ids == [vm.meta.id]
    for name in ("wan", "edge"):
        with pytest.raises(WrongState, match="used by VM a"):
            await api.delete_qos_profile(name)
    assert {p.meta.name for p in await api.list_qos_profiles()} == {"wan", "edge"}
    with pytest.raises(InvalidSpec) as bad:
        await api.create_vm("b", guest_spec(cloud_kit, network_ids=["seg"],
                                            qos_profile_id="missing"))
    assert bad.value.field == "qos_profile_id"
    await api.delete_vm("a")
    await api.delete_qos_profile("wan")
    await api.delete_qos_profile(edge.meta.id)
    assert await api.list_qos_profiles() == []


async def test_an_invalid_spec_is_invalid_argument_naming_the_field(
        api: RemoteCore, stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateQosProfile(pb.CreateQosProfileRequest(
            name="bad", spec=pb.QosProfileSpec(rate_bps=-1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata() or ())["infrasim-field"] == "rate_bps"
    cases = {
        "loss_pct": QosProfileSpec(loss_pct=101.0),
        "distribution": QosProfileSpec(distribution="cauchy"),
        "direction": QosProfileSpec(direction="sideways"),
        "lora.spreading_factor": QosProfileSpec(lora=LoraSpec(spreading_factor=13)),
    }
    for field, spec in cases.items():
        with pytest.raises(InvalidSpec) as exc:
            await api.create_qos_profile("bad", spec)
        assert exc.value.field == field, exc.value
    with pytest.raises(NotFound):  # nothing was created by the refused calls
        await api.get_qos_profile("bad")
    await api.create_qos_profile("ok", QosProfileSpec())
    with pytest.raises(InvalidSpec) as exc:
        await api.update_qos_profile("ok", QosProfileSpec(jitter_ms=-1.0))
    assert exc.value.field == "jitter_ms"
    assert (await api.get_qos_profile("ok")).spec == QosProfileSpec()  # unchanged
    with pytest.raises(InvalidSpec) as exc:
        await api.create_qos_profile("../x", QosProfileSpec())
    assert exc.value.field == "name"


async def test_unset_fields_of_a_raw_request_read_as_the_defaults(
        stub: Any) -> None:
    """proto3 sends no zeros: a client naming only what it cares about gets the defaults for
    the rest where zero is never valid (but keeps zeros that mean something)."""
    prof = await stub.CreateQosProfile(pb.CreateQosProfileRequest(
        name="r", spec=pb.QosProfileSpec(ge_p_pct=2.0, lora=pb.LoraSpec(distance_m=80.0))))
    spec = from_proto(prof, QosProfile).spec
    assert spec == QosProfileSpec(
        ge_p_pct=2.0, ge_r_pct=100.0, ge_bad_loss_pct=0.0,
        lora=LoraSpec(distance_m=80.0, crc=False, tx_power_dbm=0.0, shadowing_sigma_db=0.0,
                      noise_figure_db=0.0, capture_db=0.0))


def test_qos_spec_from_fills_only_fields_that_cannot_be_zero() -> None:
    msg = pb.QosProfileSpec(rate_bps=5, lora=pb.LoraSpec())
    spec = qos_spec_from(msg)
    assert spec.rate_bps == 5 and spec.distribution == "uniform" and spec.direction == "both"
    assert spec.ge_r_pct == 100.0 and spec.ge_bad_loss_pct == 0.0 and spec.loss_pct == 0.0
    assert spec.lora is not None
    assert (spec.lora.spreading_factor, spec.lora.bandwidth_khz, spec.lora.coding_rate,
            spec.lora.preamble, spec.lora.frequency_mhz, spec.lora.d0_m) == \
        (7, 125, 5, 8, 868.1, 40.0)
    assert spec.lora.distance_m == 0.0 and spec.lora.tx_power_dbm == 0.0  # zeros kept
    assert qos_spec_from(pb.QosProfileSpec()).lora is None
    full = to_proto(RADIO, pb.QosProfileSpec)
    assert qos_spec_from(full) == RADIO  # a full spec passes untouched


async def test_link_stats_of_networks(api: RemoteCore, stub: Any) -> None:
    assert await api.link_stats() == []
    await api.create_network("seg", NetworkSpec(mode=NetworkMode.SEGMENT, cidr="10.20.0.0/24"))
    assert await api.link_stats("seg") == []
    resp = await stub.GetLinkStats(pb.GetLinkStatsRequest())
    assert list(resp.links) == []
    with pytest.raises(NotFound):
        await api.link_stats("nope")


def test_link_stats_survive_the_wire_and_the_event_json() -> None:
    stats = LinkStats(network_id="n1", network="seg", vm_id="v1", vm="a", nic="net1",
                      mac="52:54:00:00:00:01", direction="egress", profile="radio",
                      bytes=12345, frames=10, throughput_bps=98765.5, queue_bytes=1514,
                      queue_frames=1, drops={"loss": 3, "collision": 1},
                      delay_hist=[0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
                      delay_p50_ms=40.25, delay_p99_ms=51.5,
                      lora=LoraLinkStats(spreading_factor=9, rssi_dbm=-118.25, snr_db=-4.5,
                                         airtime_ms=164.864, delivered=9, lost=3),
                      at=1700000000.5)
    assert from_proto(to_proto(stats, pb.LinkStats), LinkStats) == stats
    assert from_proto(to_proto(LinkStats(), pb.LinkStats), LinkStats) == LinkStats()
    # network.stats events carry plain dicts; WatchEvents sends them as JSON.
    ev = Event(type="network.stats", kind="network", resource_id="n1", name="seg",
               message="1 link", data={"links": [to_dict(stats)]})
    data = json.loads(event_to_proto(ev).data_json)
    assert [from_dict(LinkStats, d) for d in data["links"]] == [stats]


async def test_network_stats_events_stream_to_watchers_that_ask(
        api: RemoteCore, cloud_kit: GuestKit) -> None:
    await api.create_network("seg", NetworkSpec(mode=NetworkMode.SEGMENT, cidr="10.30.0.0/24"))
    await api.create_qos_profile("wan", QosProfileSpec(rate_bps=2_000_000, delay_ms=10.0))
    vm = await api.create_vm("a", guest_spec(cloud_kit, network_ids=["seg"],
                                             qos_profile_id="wan"), start=True)
    try:
        assert vm.status.state == VMState.RUNNING
        plain: list[Event] = []
        subscribed = asyncio.Event()

        async def without_samples() -> None:
            async for ev in api.watch(kinds=["network"], subscribed=subscribed):
                plain.append(ev)

        quiet = asyncio.create_task(without_samples())
        await subscribed.wait()
        got: list[Event] = []

        async def samples() -> None:
            async for ev in api.watch(kinds=["network"], resource="seg", metrics=True):
                if ev.type == "network.stats":
                    got.append(ev)
                    if len(got) == 3:
                        return

        await asyncio.wait_for(samples(), 15)
        quiet.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await quiet
        assert not [e for e in plain if e.type == "network.stats"]  # not asked for: not sent
        assert got[-1].ts - got[0].ts < 3.0  # twice a second
        links = [from_dict(LinkStats, d) for d in got[-1].data["links"]]
        assert {(s.vm, s.direction, s.profile) for s in links} == {
            ("a", "egress", "wan"), ("a", "ingress", "wan")}
        assert all(s.network == "seg" and s.vm_id == vm.meta.id for s in links)
        now = await api.link_stats("seg")
        assert {(s.vm, s.direction) for s in now} == {("a", "egress"), ("a", "ingress")}
        assert (await api.get_qos_profile("wan")).status.links >= 1
    finally:
        await api.stop_vm("a", force=True)


async def test_the_role_table_guards_qos(api: RemoteCore) -> None:
    for action in ("create_qos_profile", "update_qos_profile", "delete_qos_profile"):
        assert not allowed(Role.VIEWER, action) and allowed(Role.OPERATOR, action)
    for action in ("get_qos_profile", "list_qos_profiles", "link_stats"):
        assert allowed(Role.VIEWER, action)
    viewer = GuardedCore(api, Role.VIEWER)
    with pytest.raises(PermissionDenied, match="operator"):
        await viewer.create_qos_profile("v", QosProfileSpec())
    with pytest.raises(NotFound):
        await api.get_qos_profile("v")  # refused before reaching the daemon
    operator = GuardedCore(api, Role.OPERATOR)
    await operator.create_qos_profile("v", QosProfileSpec(rate_bps=1_000_000))
    assert [p.meta.name for p in await viewer.list_qos_profiles()] == ["v"]
    assert await viewer.link_stats() == []
    with pytest.raises(PermissionDenied):
        await viewer.update_qos_profile("v", QosProfileSpec())
    with pytest.raises(PermissionDenied):
        await viewer.delete_qos_profile("v")
    await operator.update_qos_profile("v", QosProfileSpec(rate_bps=2_000_000))
    await operator.delete_qos_profile("v")
