"""The provider's resources, called directly (no terraform): pure mapping and planning, then
every resource against a real daemon (`infrasim serve`) with real QEMU guests.

Terraform itself drives the provider in the integration tests; here the resource methods are
called the way the servicer calls them (validate → plan → apply → read/import), with the
framework's own default plan, and every apply is checked the way terraform checks it: each
value planned known must come back unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from infrasim_tui.core.errors import NotFound
from infrasim_tui.core.guest import GuestKit
from infrasim_tui.core.model import VM, PortForward, ResourceMeta, VMSpec, VMState, VMStatus
from infrasim_tui.rpc.autostart import ensure_daemon
from infrasim_tui.rpc.client import RemoteCore
from infrasim_tui.terraform.framework import (
    UNKNOWN,
    ApplyResult,
    Context,
    Diagnostics,
    Resource,
    is_unknown,
    null_object,
)
from infrasim_tui.terraform.provider import default_plan
from infrasim_tui.terraform.resources import (
    DATA_SOURCES,
    RESOURCES,
    common,
    network,
    snapshot,
    vm,
    volume,
)
from infrasim_tui.terraform.resources.volume_data import VolumeDataSource
from infrasim_tui.terraform.values import equal, schema_type

from .conftest import qemu_pids

MIB = 1 << 20
VM_RES = vm.VMResource()
VOL_RES = volume.VolumeResource()
NET_RES = network.NetworkResource()
SNAP_RES = snapshot.SnapshotResource()


# -- helpers --------------------------------------------------------------------------------


def cfg(res: Resource, **values: Any) -> dict[str, Any]:
    return {**null_object(res.schema), **values}


def proposed_of(res: Resource, prior: dict[str, Any] | None,
                config: dict[str, Any]) -> dict[str, Any]:
    """Terraform's proposed new state: the config, with the prior's computed values where the
    config is null."""
    out = dict(config)
    for a in res.schema.attrs:
        if a.computed and config.get(a.name) is None:
            out[a.name] = prior.get(a.name) if prior else None
    return out


def no_core_ctx() -> Context:
    async def nope() -> Any:
        raise ConnectionError("no daemon in this test")

    return Context(nope, asyncio.Event())


async def plan(ctx: Context, res: Resource, prior: dict[str, Any] | None,
               config: dict[str, Any]) -> Any:
    proposed = proposed_of(res, prior, config)
    return await res.plan(ctx, prior, proposed, config,
                          default_plan(res.schema, prior, proposed, config))


def same_obj(res: Resource, a: Any, b: Any) -> bool:
    """Equal as terraform compares objects of this schema (sets without order)."""
    return equal(a, b, schema_type(res.schema))


def paths(diags: Diagnostics, severity: str = "error") -> list[tuple[str | int, ...]]:
    return [d.path for d in diags.items if d.severity == severity]


def st(value: dict[str, Any] | None) -> dict[str, Any]:
    """A state that must exist."""
    assert value is not None
    return value


def assert_consistent(planned: dict[str, Any], state: dict[str, Any]) -> None:
    """What terraform checks after apply: every value planned known comes back the same
    (sets without order)."""
    for key, want in planned.items():
        if is_unknown(want) or (want is None and key == "timeouts"):
            continue
        got = state.get(key)
        if isinstance(want, list) and isinstance(got, list):
            assert common.same(want, got, as_set=True), (key, want, got)
        else:
            assert got == want, (key, want, got)
    assert not any(is_unknown(v) for v in state.values())


# -- pure: helpers --------------------------------------------------------------------------


def test_parse_duration() -> None:
    assert common.parse_duration("30s") == 30
    assert common.parse_duration("5m") == 300
    assert common.parse_duration("1h30m") == 5400
    assert common.parse_duration("1.5h") == 5400
    assert common.parse_duration("250ms") == 0.25
    for bad in ("", "5", "5 minutes", "-1s", "0s", "m", "1d"):
        with pytest.raises(ValueError):
            common.parse_duration(bad)


def test_grace_leaves_room_for_the_forced_stop() -> None:
    assert common.grace_seconds(60) == 45
    assert common.grace_seconds(300) == 285
    assert common.grace_seconds(4) == 3
    assert common.grace_seconds(10_000) == common.MAX_GRACE_S


def test_paths_of_core_fields() -> None:
    r = vm.RENAMES
    assert common.path_of("memory_mb", r) == ("memory_mb",)
    assert common.path_of("port_forwards[1].host_port", r) == ("port_forward", 1, "host_port")
    assert common.path_of("volume_ids[2]", r) == ("volumes",)
    assert common.path_of("boot_disk_id", r) == ("boot_disk",)
    assert common.path_of("labels.team", r) == ("labels", "team")
    assert common.path_of("extra_args.cpu.model", r) == ("extra_args", "cpu.model")
    assert common.path_of("", r) == ()


def test_empty_reads_back_in_the_configs_form() -> None:
    assert common.keep_empty(None, "") is None
    assert common.keep_empty("", "") == ""
    assert common.keep_empty([], []) == []
    assert common.keep_empty(None, {}) is None
    assert common.keep_empty({}, {"a": "b"}) == {"a": "b"}
    assert common.keep_empty(UNKNOWN, "") is None


# -- pure: VM -------------------------------------------------------------------------------


def vm_cfg(**values: Any) -> dict[str, Any]:
    base = {"name": "web", "kernel": "/k/Image", "initrd": "/k/initrd"}
    return cfg(VM_RES, **{**base, **values})


def test_vm_validate_points_at_attributes() -> None:
    assert not VM_RES.validate(vm_cfg()).items
    assert paths(VM_RES.validate(vm_cfg(memory_mb=0))) == [("memory_mb",)]
    raspi = vm_cfg(machine="raspi3b", memory_mb=2048, dtb="/k/pi.dtb")
    assert paths(VM_RES.validate(raspi)) == [("memory_mb",)]
    assert "1024" in VM_RES.validate(raspi).items[0].detail
    assert paths(VM_RES.validate(vm_cfg(machine="raspi3b", dtb="/k/pi.dtb", cpu_cores=2))) \
        == [("cpu_cores",)]
    # Unknown values are not judged, nor is what depends on them.
    assert not VM_RES.validate(vm_cfg(memory_mb=UNKNOWN)).items
    assert not VM_RES.validate(vm_cfg(kernel=None, initrd=None, boot_disk=UNKNOWN,
                                      volumes=["disk"])).items
    assert not VM_RES.validate(vm_cfg(volumes=UNKNOWN, boot_disk="disk")).items
    assert not VM_RES.validate(vm_cfg(machine=UNKNOWN, memory_mb=2048)).items
    bad_timeout = VM_RES.validate(vm_cfg(timeouts={"create": "soon", "update": None,
                                                   "delete": UNKNOWN}))
    assert paths(bad_timeout) == [("timeouts", "create")]
    assert paths(VM_RES.validate(vm_cfg(shutdown_timeout="30"))) == [("shutdown_timeout",)]
    assert paths(VM_RES.validate(vm_cfg(labels={vm.SHUTDOWN_LABEL: "1s"}))) \
        == [("labels", vm.SHUTDOWN_LABEL)]
    assert vm.shutdown_of({"shutdown_timeout": "2m"}) == 120
    assert vm.shutdown_of({"shutdown_timeout": None}) == vm.DEFAULT_SHUTDOWN_S
    assert paths(VM_RES.validate(vm_cfg(kernel="relative/Image"))) == [("kernel",)]
    assert paths(VM_RES.validate(vm_cfg(volumes=["a"], boot_disk="b"))) == [("boot_disk",)]
    assert paths(VM_RES.validate(vm_cfg(name="Web_1"))) == [("name",)]
    assert paths(VM_RES.validate(vm_cfg(labels={"bad key": "x"}))) == [("labels", "bad key")]
    assert paths(VM_RES.validate(vm_cfg(extra_args={"nope": "1"}))) == [("extra_args", "nope")]
    fwd: list[dict[str, Any]] = [
        {"host_port": 2222, "guest_port": 22, "protocol": None, "host_addr": None},
           {"host_port": 2222, "guest_port": 23, "protocol": None, "host_addr": None}]
    assert paths(VM_RES.validate(vm_cfg(port_forward=fwd))) == [("port_forward", 1, "host_port")]
    fwd[0]["host_port"] = UNKNOWN  # the first is unknown: the second is fine on its own
    assert not VM_RES.validate(vm_cfg(port_forward=fwd)).items
    # Every problem at once, not one per `terraform plan`.
    many = VM_RES.validate(vm_cfg(memory_mb=1, cpu_cores=0, accelerator="warp"))
    assert sorted(map(str, paths(many))) == sorted(map(str, [("accelerator",), ("cpu_cores",),
                                                             ("memory_mb",)]))


def test_vm_spec_and_state_map_both_ways() -> None:
    attrs = vm_cfg(memory_mb=512, volumes=["b", "a"], boot_disk="a", networks=["lan"],
                   port_forward=[{"host_port": 8080, "guest_port": 80, "protocol": None,
                                  "host_addr": None}], labels={"team": "x"},
                   extra_args={"tcg.tb_size": "16"})
    spec = vm.spec_from_attrs(attrs)
    assert spec.memory_mb == 512 and spec.cpu_cores == 1 and spec.arch == "aarch64"
    assert spec.port_forwards == [PortForward(8080, 80, "tcp", "127.0.0.1")]
    spec.volume_ids, spec.boot_disk_id, spec.network_ids = ["id-a", "id-b"], "id-a", ["id-n"]
    model = VM(meta=ResourceMeta(name="web", id="v1", labels={"team": "x"}), spec=spec,
               status=VMStatus(state=VMState.RUNNING, pid=42, accelerator="tcg",
                               serial_socket="/run/s.sock"))
    state = vm.state_from_vm(model, {"id-a": "a", "id-b": "b"}, {"id-n": "lan"}, attrs)
    assert state["volumes"] == ["a", "b"] and state["boot_disk"] == "a"
    assert state["networks"] == ["lan"] and state["running"] is True
    assert state["pid"] == 42 and state["console_path"] == "/run/s.sock"
    assert state["cmdline"] is None and state["port_forward"][0]["protocol"] == "tcp"
    assert set(state) == {a.name for a in vm.SCHEMA.attrs} | {"port_forward", "timeouts"}
    # A config that named a volume by id reads back by id (no diff either way).
    by_id = vm.state_from_vm(model, {"id-a": "a", "id-b": "b"}, {}, {"volumes": ["id-a", "b"]})
    assert by_id["volumes"] == ["b", "id-a"]
    assert vm.machine_defaults("raspi3b") == (4, 1024)


async def test_vm_plan_fills_defaults_and_warns_about_restarts() -> None:
    ctx = no_core_ctx()
    p = await plan(ctx, VM_RES, None, vm_cfg())
    planned = p.planned
    assert planned["machine"] == "virt" and planned["memory_mb"] == 256
    assert planned["cpu_cores"] == 1 and planned["running"] is True
    assert planned["accelerator"] == "auto" and planned["compatibility_mode"] is False
    assert all(is_unknown(planned[k]) for k in ("id", *vm.RUNTIME))
    pi = (await plan(ctx, VM_RES, None, vm_cfg(machine="raspi3b"))).planned
    assert (pi["cpu_cores"], pi["memory_mb"]) == (4, 1024)

    prior = {**planned, "id": "v1", "state": "RUNNING", "pid": 7, "accelerator_used": "tcg",
             "console_path": "/s", "serial_log": "/l", "qemu_version": "7.2.0"}
    same = await plan(ctx, VM_RES, prior, vm_cfg())
    assert same.planned == prior and not same.diags.items and not same.requires_replace
    # Sets: another order is no change.
    with_vols = {**prior, "volumes": ["a", "b"]}
    assert same_obj(VM_RES, (await plan(ctx, VM_RES, with_vols, vm_cfg(volumes=["b", "a"])))
                    .planned, with_vols)

    more = await plan(ctx, VM_RES, prior, vm_cfg(memory_mb=512))
    assert paths(more.diags, "warning") == [("memory_mb",)]
    assert "restarted" in more.diags.items[0].summary
    assert is_unknown(more.planned["pid"]) and more.planned["id"] == "v1"
    assert not more.requires_replace
    stopped = await plan(ctx, VM_RES, prior, vm_cfg(memory_mb=512, running=False))
    assert "next start" in stopped.diags.items[0].summary
    labels = await plan(ctx, VM_RES, prior, vm_cfg(labels={"a": "b"}))
    assert not labels.diags.items and labels.planned["pid"] == 7  # QEMU is not touched
    drift = await plan(ctx, VM_RES, {**prior, "running": False, "state": "STOPPED"}, vm_cfg())
    assert drift.planned["running"] is True and is_unknown(drift.planned["state"])
    renamed = await plan(ctx, VM_RES, prior, vm_cfg(name="web2", arch="x86_64"))
    assert sorted(renamed.requires_replace) == [("arch",), ("name",)]
    assert vm.restart_changes(prior, {**prior, "volumes": UNKNOWN}) == ["volumes"]


def test_missing_references_unless_planned_here() -> None:
    spec = vm.spec_from_attrs(vm_cfg(volumes=["a", "x-planned"], boot_disk="a",
                                     networks=["n"]))
    assert paths(vm.missing_refs(spec, {"a": "id-a"}, {})) == [("volumes",), ("networks",)]
    common.note_planned("volume", "x-planned")
    common.note_planned("network", "n")
    assert not vm.missing_refs(spec, {"a": "id-a"}, {}).items
    spec.boot_disk_id = "elsewhere"
    assert paths(vm.missing_refs(spec, {"a": "id-a"}, {})) == [("boot_disk",)]


def test_vm_replacement_lists_are_documented_and_disjoint() -> None:
    assert set(vm.FORCES_REPLACEMENT) == {a.name for a in vm.SCHEMA.attrs if a.force_new}
    assert not set(vm.FORCES_REPLACEMENT) & set(vm.UPDATES_IN_PLACE)
    assert set(vm.RESTART_REQUIRED) <= set(vm.UPDATES_IN_PLACE)
    for mod in (volume, network, snapshot):
        assert set(mod.FORCES_REPLACEMENT) == {a.name for a in mod.SCHEMA.attrs if a.force_new}
    assert {r.type_name for r in RESOURCES} == {"infrasim_vm", "infrasim_volume",
                                                 "infrasim_network", "infrasim_snapshot",
                                                 "infrasim_qos_profile"}
    assert "infrasim_volume" in {d.type_name for d in DATA_SOURCES}


# -- pure: volume, network, snapshot, data source -------------------------------------------


async def test_volume_validate_plan_and_sizes() -> None:
    v = VOL_RES
    assert not v.validate(cfg(v, name="d", size="10G")).items
    assert paths(v.validate(cfg(v, name="d"))) == [("size",)]
    assert paths(v.validate(cfg(v, name="d", size="ten"))) == [("size",)]
    assert paths(v.validate(cfg(v, name="d", source="/a", base="b"))) == [("base",)]
    assert paths(v.validate(cfg(v, name="d", source="img.qcow2"))) == [("source",)]
    assert paths(v.validate(cfg(v, name="d", source="/a", source_digest="abc"))) \
        == [("source_digest",)]
    assert paths(v.validate(cfg(v, name="d", source="/a", format="raw"))) == [("format",)]
    assert paths(v.validate(cfg(v, name="d", kind="weights", source="/w", read_only=False))) \
        == [("read_only",)]
    assert paths(v.validate(cfg(v, name="d", source="/a", signature="s"))) == [("public_key",)]
    assert not v.validate(cfg(v, name="d", size=UNKNOWN, source=UNKNOWN)).items

    assert volume.size_text(10 << 30) == "10G" and volume.size_text(1536 * MIB) == "1536M"
    assert volume.size_text(1000) == "1000"
    assert volume.size_form("1024M", 1 << 30) == "1024M"  # the config's spelling is kept
    assert volume.size_form("1G", 2 << 30) == "2G"  # drift shows the new size

    ctx = no_core_ctx()
    blank = (await plan(ctx, v, None, cfg(v, name="d", size="1G"))).planned
    assert blank["format"] == "qcow2" and blank["kind"] == "disk" and blank["read_only"] is False
    assert is_unknown(blank["path"]) and blank["signature"] is None
    ro = (await plan(ctx, v, None, cfg(v, name="w", kind="weights", source="/w"))).planned
    assert ro["read_only"] is True and is_unknown(ro["format"]) and is_unknown(ro["size"])
    prior = {**blank, "id": "x", "path": "/p", "digest": None, "image_digest": None,
             "virtual_size": 1 << 30, "actual_size": 200_000, "verified": None,
             "signed": False}
    grow = await plan(ctx, v, prior, cfg(v, name="d", size="2G"))
    assert not grow.diags.items and not grow.requires_replace
    assert is_unknown(grow.planned["virtual_size"]) and grow.planned["path"] == "/p"
    shrink = await plan(ctx, v, prior, cfg(v, name="d", size="512M"))
    assert paths(shrink.diags) == [("size",)]
    relabel = await plan(ctx, v, prior, cfg(v, name="d", size="1G", labels={"a": "b"}))
    assert relabel.requires_replace == [("labels",)]
    spelled_empty = await plan(ctx, v, prior, cfg(v, name="d", size="1G", labels={}))
    assert not spelled_empty.requires_replace  # null and {} are the same to the daemon


def test_network_snapshot_and_data_source_validation() -> None:
    n = NET_RES
    assert not n.validate(cfg(n, name="lan")).items
    assert paths(n.validate(cfg(n, name="lan", mode="bridge"))) == [("mode",)]
    assert paths(n.validate(cfg(n, name="lan", cidr="10.0.0.0/31"))) == [("cidr",)]
    assert paths(n.validate(cfg(n, name="lan", gateway="192.168.9.1"))) == [("gateway",)]
    assert paths(n.validate(cfg(n, name="lan", mode="vmnet-bridged"))) == [("interface",)]
    assert not n.validate(cfg(n, name="lan", cidr=UNKNOWN, gateway="1.2.3.4")).items
    assert network.mode_value("vmnet-shared") == "VMNET_SHARED"

    assert snapshot.split_import_id("web/s1") == ("web", "s1")
    with pytest.raises(Exception, match="VM/NAME"):
        snapshot.split_import_id("web")
    assert paths(SNAP_RES.validate(cfg(SNAP_RES, vm="web", name="Bad Name"))) == [("name",)]

    ds = VolumeDataSource()
    assert not ds.validate({"name": "d", "digest": None}).items
    assert ds.validate({"name": "d", "digest": "0" * 64}).has_errors
    assert ds.validate({"name": None, "digest": None}).has_errors
    assert paths(ds.validate({"name": None, "digest": "xyz"})) == [("digest",)]
    assert not ds.validate({"name": UNKNOWN, "digest": None}).items


# -- against a real daemon ------------------------------------------------------------------


class Daemon:
    """A daemon for the test's data dir, a client, and contexts like the servicer's."""

    def __init__(self, data_dir: Path, core: RemoteCore) -> None:
        self.data_dir = data_dir
        self.core = core
        self.stopping = asyncio.Event()

    def ctx(self, core: Any = None) -> Context:
        self.stopping = asyncio.Event()
        target = core or self.core

        async def get() -> Any:
            return target

        return Context(get, self.stopping)

    async def create(self, res: Resource, config: dict[str, Any]) -> ApplyResult:
        """validate → plan → apply, as terraform drives a create; checks consistency."""
        diags = res.validate(config)
        assert not diags.has_errors, diags.items
        p = await plan(self.ctx(), res, None, config)
        assert not p.diags.has_errors, p.diags.items
        result = await res.apply(self.ctx(), None, p.planned, config)
        if not result.diags.has_errors:
            assert result.new_state is not None
            assert_consistent(p.planned, result.new_state)
        return result

    async def update(self, res: Resource, prior: dict[str, Any],
                     config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        p = await plan(self.ctx(), res, prior, config)
        assert not p.diags.has_errors and not p.requires_replace, (p.diags.items,
                                                                    p.requires_replace)
        result = await res.apply(self.ctx(), prior, p.planned, config)
        assert not result.diags.has_errors, result.diags.items
        assert result.new_state is not None
        assert_consistent(p.planned, result.new_state)
        return p, result.new_state

    async def delete(self, res: Resource, prior: dict[str, Any]) -> ApplyResult:
        return await res.apply(self.ctx(), prior, None, None)


@pytest.fixture
async def daemon(data_dir: Path) -> AsyncIterator[Daemon]:
    """`infrasim serve` for the data dir (the autouse fixture stops it afterwards)."""
    argv = [sys.executable, "-m", "infrasim_tui", "--data-dir", str(data_dir), "serve"]
    await ensure_daemon(data_dir, autostart=True, serve_argv=argv, log=lambda _: None)
    core = RemoteCore(grpc.aio.insecure_channel(f"unix://{data_dir / 'infrasim.sock'}"),
                      str(data_dir))
    try:
        yield Daemon(data_dir, core)
    finally:
        for v in await core.list_vms():
            if v.status.state in (VMState.RUNNING, VMState.PAUSED, VMState.PENDING):
                await core.stop_vm(v.meta.id, force=True)
        await core.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def guest_cfg(kit: GuestKit, **values: Any) -> dict[str, Any]:
    return vm_cfg(kernel=str(kit.kernel), initrd=str(kit.initrd),
                  cmdline="quiet cryptomgr.notests",
                  shutdown_timeout="1s",  # the cloud kit ignores the power button
                  timeouts={"create": "2m", "update": "1m", "delete": "1m"}, **values)


@pytest.mark.qemu
async def test_vm_lifecycle(daemon: Daemon, cloud_kit: GuestKit) -> None:
    d, core = daemon, daemon.core
    disk = (await d.create(VOL_RES, cfg(VOL_RES, name="disk", size="64M"))).new_state
    assert disk is not None
    assert disk["size"] == "64M" and disk["virtual_size"] == 64 * MIB
    assert disk["format"] == "qcow2" and disk["path"] and disk["kind"] == "disk"
    assert await VOL_RES.read(d.ctx(), disk) == disk
    found, diags = await VolumeDataSource().read(d.ctx(), {"name": "disk", "digest": None})
    assert not diags.items and found["id"] == disk["id"] and found["path"] == disk["path"]

    port = free_port()
    fwd = [{"host_port": port, "guest_port": 22, "protocol": None, "host_addr": None}]
    config = guest_cfg(cloud_kit, volumes=["disk"], port_forward=fwd, labels={"team": "a"})
    created = await d.create(VM_RES, config)
    state = st(created.new_state)
    assert not created.diags.items
    assert state["state"] == "RUNNING" and state["running"] is True
    assert state["pid"] in qemu_pids(d.data_dir)
    assert state["accelerator_used"] == "tcg" and state["qemu_version"]
    assert state["console_path"].endswith("serial.sock") and state["serial_log"]
    assert state["volumes"] == ["disk"] and state["memory_mb"] == 256
    assert state["port_forward"] == [{"host_port": port, "guest_port": 22, "protocol": "tcp",
                                      "host_addr": "127.0.0.1"}]

    # Refresh returns what apply returned; import by name gives the same (bar timeouts).
    assert await VM_RES.read(d.ctx(), state) == state
    imported = await VM_RES.import_state(d.ctx(), "web")
    assert imported == {**state, "timeouts": None}  # shutdown_timeout is kept by the daemon
    assert state["shutdown_timeout"] == "1s" and state["labels"] == {"team": "a"}
    assert (await core.get_vm("web")).meta.labels == {"team": "a", vm.SHUTDOWN_LABEL: "1s"}
    assert await VM_RES.read(d.ctx(), imported) == imported
    assert await VM_RES.import_state(d.ctx(), state["id"]) == imported
    assert await VM_RES.import_state(d.ctx(), "nope") is None

    # Stopped outside terraform: refresh shows it, the plan starts it again.
    await core.stop_vm("web", force=True)
    drifted = await VM_RES.read(d.ctx(), state)
    assert drifted is not None
    assert drifted["running"] is False and drifted["state"] == "STOPPED"
    _, state = await d.update(VM_RES, drifted, config)
    assert state["running"] is True and state["pid"] in qemu_pids(d.data_dir)

    # More memory while running: planned in place, with a warning; the VM restarts.
    bigger = {**config, "memory_mb": 384}
    p, new = await d.update(VM_RES, state, bigger)
    assert paths(p.diags, "warning") == [("memory_mb",)]
    assert new["memory_mb"] == 384 and new["state"] == "RUNNING"
    assert new["pid"] != state["pid"] and new["pid"] in qemu_pids(d.data_dir)
    assert (await core.get_vm("web")).spec.memory_mb == 384
    assert "-m" in (await core.get_vm("web")).status.argv
    # Labels and shutdown_timeout change in place without touching QEMU.
    relabelled = {**bigger, "labels": {"team": "b"}, "shutdown_timeout": "2s"}
    p, new = await d.update(VM_RES, new, relabelled)
    assert not p.diags.items and new["pid"] == p.planned["pid"]
    assert (await core.get_vm("web")).status.pid == new["pid"]
    bigger = relabelled
    # A refresh after the update plans nothing.
    fresh = await VM_RES.read(d.ctx(), new)
    assert fresh == new
    again = await plan(d.ctx(), VM_RES, fresh, bigger)
    assert again.planned == fresh and not again.diags.items

    # A volume in use cannot be deleted: a diagnostic, and the state stays.
    refused = await d.delete(VOL_RES, disk)
    assert refused.diags.has_errors and refused.new_state == disk
    assert "in use" in refused.diags.items[0].detail

    deleted = await d.delete(VM_RES, new)
    assert deleted.new_state is None and not deleted.diags.items
    with pytest.raises(NotFound):
        await core.get_vm("web")
    assert qemu_pids(d.data_dir) == []
    assert await VM_RES.read(d.ctx(), new) is None

    # Now the volume goes, after growing in place (no VM runs it any more).
    _, grown = await d.update(VOL_RES, disk, cfg(VOL_RES, name="disk", size="128M"))
    assert grown["virtual_size"] == 128 * MIB
    shrink = await plan(d.ctx(), VOL_RES, grown, cfg(VOL_RES, name="disk", size="64M"))
    assert paths(shrink.diags) == [("size",)]
    assert (await d.delete(VOL_RES, grown)).new_state is None
    assert await VOL_RES.read(d.ctx(), disk) is None


@pytest.mark.qemu
async def test_cli_made_vm_imports_without_a_diff(daemon: Daemon, cloud_kit: GuestKit) -> None:
    d, core = daemon, daemon.core
    await core.create_volume(_blank("data"))
    port = free_port()
    spec = VMSpec(kernel=str(cloud_kit.kernel), initrd=str(cloud_kit.initrd),
                  cmdline="quiet cryptomgr.notests", memory_mb=256, volume_ids=["data"],
                  port_forwards=[PortForward(port, 22)])
    await core.create_vm("cli", spec, {"made-by": "cli"}, start=True)  # as `infrasim vm create`
    imported = await VM_RES.import_state(d.ctx(), "cli")
    assert imported is not None and imported["volumes"] == ["data"]
    state = st(await VM_RES.read(d.ctx(), imported))
    config = vm_cfg(name="cli", kernel=str(cloud_kit.kernel), initrd=str(cloud_kit.initrd),
                    cmdline="quiet cryptomgr.notests", volumes=["data"],
                    labels={"made-by": "cli"},
                    port_forward=[{"host_port": port, "guest_port": 22, "protocol": None,
                                   "host_addr": None}])
    assert not VM_RES.validate(config).items
    p = await plan(d.ctx(), VM_RES, state, config)
    assert p.planned == state and not p.requires_replace and not p.diags.items
    # Deleted outside terraform: refresh says it is gone (terraform plans a create).
    await core.delete_vm("cli", force=True)
    assert await VM_RES.read(d.ctx(), state) is None


def _blank(name: str) -> Any:
    from infrasim_tui.core.model import VolumeRequest

    return VolumeRequest(name=name, size_bytes=32 * MIB)


@pytest.mark.qemu
async def test_failed_start_taints_and_stop_provider_cancels(daemon: Daemon,
                                                             cloud_kit: GuestKit,
                                                             tmp_path: Path) -> None:
    d, core = daemon, daemon.core
    # A "kernel" that exists but cannot load: QEMU refuses it after the VM was created.
    junk = tmp_path / "not-a-kernel"
    with open(junk, "wb") as f:
        f.truncate(64 * MIB)
    config = vm_cfg(name="bad", kernel=str(junk), initrd=None, memory_mb=32)
    p = await plan(d.ctx(), VM_RES, None, config)
    assert not p.diags.has_errors
    failed = await VM_RES.apply(d.ctx(), None, p.planned, config)
    assert failed.diags.has_errors and "did not start" in failed.diags.items[0].summary
    assert "too large" in failed.diags.items[0].detail
    tainted = failed.new_state
    assert tainted is not None and tainted["id"] and tainted["running"] is False
    assert tainted["state"] == "STOPPED"
    assert (await d.delete(VM_RES, tainted)).new_state is None

    # Plan-time: the daemon judges files on its host (a missing kernel points at kernel).
    missing = await plan(d.ctx(), VM_RES, None, vm_cfg(name="gone", kernel="/no/such/Image",
                                                       initrd=None))
    assert paths(missing.diags) == [("kernel",)]
    # A volume that exists nowhere (neither in the daemon nor in this plan) fails the plan,
    # and the apply too (should it vanish between plan and apply).
    ghost = guest_cfg(cloud_kit, name="novol", volumes=["ghost"], networks=["nonet"])
    p = await plan(d.ctx(), VM_RES, None, ghost)
    assert paths(p.diags) == [("volumes",), ("networks",)]
    unknown_vol = await VM_RES.apply(d.ctx(), None, p.planned, ghost)
    assert paths(unknown_vol.diags) == [("volumes",)] and unknown_vol.new_state is None
    # ...but one this same plan creates is fine (terraform plans it first).
    await plan(d.ctx(), VOL_RES, None, cfg(VOL_RES, name="later", size="1M"))
    p = await plan(d.ctx(), VM_RES, None, guest_cfg(cloud_kit, name="v2", volumes=["later"]))
    assert not p.diags.items
    nosnap = await plan(d.ctx(), SNAP_RES, None, cfg(SNAP_RES, vm="novm", name="s"))
    assert paths(nosnap.diags) == [("vm",)]
    nobase = await plan(d.ctx(), VOL_RES, None, cfg(VOL_RES, name="o", base="nobase"))
    assert paths(nobase.diags) == [("base",)]

    # StopProvider while QEMU is being started: the start settles, QEMU is stopped, the VM
    # is handed back tainted, and nothing keeps running.
    stopping_core = StopDuringStart(core, d)
    config = guest_cfg(cloud_kit, name="ctrl-c")
    p = await plan(d.ctx(), VM_RES, None, config)
    ctx = d.ctx(stopping_core)
    result = await VM_RES.apply(ctx, None, p.planned, config)
    assert stopping_core.start_called
    assert [i.summary for i in result.diags.items] == ["Cancelled"]
    assert result.new_state is not None and result.new_state["running"] is False
    assert qemu_pids(d.data_dir) == []
    assert (await core.get_vm("ctrl-c")).status.state == VMState.STOPPED
    assert (await d.delete(VM_RES, result.new_state)).new_state is None


class StopDuringStart:
    """A core whose start_vm is interrupted by StopProvider (Ctrl-C) right after it began."""

    def __init__(self, core: RemoteCore, daemon: Daemon) -> None:
        self._core = core
        self._daemon = daemon
        self.start_called = False

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        return getattr(self._core, name)  # type: ignore[no-any-return]

    async def start_vm(self, ref: str, **kw: Any) -> VM:
        self.start_called = True
        work = asyncio.ensure_future(self._core.start_vm(ref, **kw))
        self._daemon.stopping.set()  # Ctrl-C while the daemon spawns QEMU...
        await asyncio.sleep(0.05)  # ...seen by the provider before the start returns
        return await work


@pytest.mark.qemu
async def test_network_snapshot_and_lookup_by_digest(daemon: Daemon, cloud_kit: GuestKit,
                                                     tmp_path: Path) -> None:
    d = daemon
    net = (await d.create(NET_RES, cfg(NET_RES, name="lan", cidr="10.9.0.0/24",
                                       gateway="10.9.0.1"))).new_state
    assert net is not None and net["mode"] == "user" and net["dhcp"] is True
    assert net["active"] is False and net["dns"] is None
    assert await NET_RES.read(d.ctx(), net) == net
    assert await NET_RES.import_state(d.ctx(), "lan") == net
    assert (await plan(d.ctx(), NET_RES, net, cfg(NET_RES, name="lan", cidr="10.9.0.0/24",
                                                  gateway="10.9.0.1"))).planned == net

    image = tmp_path / "seed.img"
    image.write_bytes(b"infrasim" * 4096)
    seed = (await d.create(VOL_RES, cfg(VOL_RES, name="seed", source=str(image),
                                        read_only=True))).new_state
    assert seed is not None and seed["digest"] and seed["format"] == "raw"
    assert seed["size"] == "32K" and seed["image_digest"] == seed["digest"]
    by_digest, diags = await VolumeDataSource().read(d.ctx(), {"name": None,
                                                               "digest": seed["digest"]})
    assert not diags.items and by_digest["name"] == "seed" and by_digest["read_only"] is True
    _, diags = await VolumeDataSource().read(d.ctx(), {"name": None, "digest": "f" * 64})
    assert paths(diags) == [("digest",)]
    await d.create(VOL_RES, cfg(VOL_RES, name="root", size="32M"))

    config = guest_cfg(cloud_kit, name="snap-vm", volumes=["root", "seed"], networks=["lan"])
    vm_state = (await d.create(VM_RES, config)).new_state
    assert vm_state is not None and vm_state["networks"] == ["lan"]
    assert st(await NET_RES.read(d.ctx(), net))["active"] is True
    assert (await d.delete(NET_RES, net)).diags.has_errors  # in use

    snap = (await d.create(SNAP_RES, cfg(SNAP_RES, vm="snap-vm", name="s1",
                                         description="before"))).new_state
    assert snap is not None and snap["with_memory"] is True and snap["state"] == "ready"
    assert snap["signed"] is True and snap["vm_id"] == vm_state["id"]
    assert snap["parent_id"] is None and snap["created_at"].endswith("Z")
    assert await SNAP_RES.read(d.ctx(), snap) == snap
    assert await SNAP_RES.import_state(d.ctx(), "snap-vm/s1") == snap
    s2 = (await d.create(SNAP_RES, cfg(SNAP_RES, vm=vm_state["id"], name="s2"))).new_state
    assert s2 is not None and s2["parent_id"] == snap["id"] and s2["vm"] == vm_state["id"]
    assert (await d.delete(SNAP_RES, snap)).new_state is None
    assert await SNAP_RES.read(d.ctx(), snap) is None
    assert st(await SNAP_RES.read(d.ctx(), s2))["parent_id"] is None  # moved up

    assert (await d.delete(VM_RES, vm_state)).new_state is None
    assert await SNAP_RES.read(d.ctx(), s2) is None  # its VM is gone
    assert (await d.delete(SNAP_RES, s2)).new_state is None  # deleting it again is fine
    assert (await d.delete(NET_RES, net)).new_state is None
    assert await NET_RES.read(d.ctx(), net) is None
    assert qemu_pids(d.data_dir) == []
