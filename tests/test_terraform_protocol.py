"""The Terraform provider's protocol layer: values, schema and diagnostic conversion, the
default plan, the servicer, the go-plugin handshake, and real terraform (reattach and the
filesystem-mirror launch path) against a daemon."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from infrasim_tui.core.errors import InvalidSpec, NotFound
from infrasim_tui.terraform import server, tls
from infrasim_tui.terraform.convert import diags_to_proto, path_to_proto, schema_to_proto
from infrasim_tui.terraform.framework import (
    UNKNOWN,
    ApplyResult,
    Attr,
    Block,
    Cancelled,
    Context,
    DataSource,
    Diagnostics,
    PlanResult,
    Resource,
    Schema,
    Unknown,
)
from infrasim_tui.terraform.gen import tfplugin6_pb2 as pb
from infrasim_tui.terraform.gen import tfplugin6_pb2_grpc as pbg
from infrasim_tui.terraform.provider import (
    Provider,
    default_plan,
    error_diags,
    field_path,
    validate_provider_config,
)
from infrasim_tui.terraform.values import (
    TypeMismatch,
    canonical,
    decode_json,
    decode_msgpack,
    decode_object,
    encode_msgpack,
    encode_object,
    equal,
    schema_type,
)

PROVIDER_EXE = str(Path(sys.executable).with_name("terraform-provider-infrasim"))
TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed")

# -- a small schema used throughout -------------------------------------------------------

PORT = Block("port", attrs=(Attr("host", "number", required=True),
                            Attr("guest", "number", required=True, force_new=True),
                            Attr("proto", "string", optional=True, computed=True)))
DISK = Block("disk", nesting="set", attrs=(Attr("name", "string", required=True),
                                           Attr("size", "number", optional=True,
                                                force_new=True),
                                           Attr("path", "string", computed=True)))
OPTS = Block("opts", nesting="single", attrs=(Attr("debug", "bool", optional=True),))
SCHEMA = Schema(
    attrs=(
        Attr("id", "string", computed=True, stable=True),
        Attr("name", "string", required=True, force_new=True),
        Attr("memory_mb", "number", optional=True, computed=True),
        Attr("labels", ["map", "string"], optional=True),
        Attr("tags", ["set", "string"], optional=True),
        Attr("token", "string", optional=True, sensitive=True, description="secret"),
        Attr("state", "string", computed=True),
        Attr("pair", ["tuple", ["string", "number"]], optional=True),
        Attr("extra", "dynamic", optional=True),
    ),
    blocks=(PORT, DISK, OPTS),
    version=2,
)
TYPE = schema_type(SCHEMA)


def obj(**kw: Any) -> dict[str, Any]:
    """A full object of SCHEMA: everything null/empty unless given."""
    out: dict[str, Any] = {a.name: None for a in SCHEMA.attrs}
    out.update(port=[], disk=[], opts=None)
    out.update(kw)
    return out


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(("ty", "value"), [
    ("string", "héllo"), ("number", 42), ("number", -1.5), ("number", 2**70), ("bool", False),
    ("string", None), (["list", "number"], [3, 1, 2]), (["set", "string"], ["b", "a"]),
    (["map", "bool"], {"x": True, "y": False}), (["tuple", ["string", "number"]], ["a", 1]),
    (["object", {"a": ["list", ["object", {"b": "string"}]]}], {"a": [{"b": "c"}, {"b": None}]}),
    ("dynamic", {"k": ["v", 1]}), ("dynamic", None),
])
def test_values_round_trip(ty: Any, value: Any) -> None:
    data = encode_msgpack(value, ty)
    assert decode_msgpack(data, ty) == value
    assert encode_msgpack(decode_msgpack(data, ty), ty) == data


def test_numbers_are_int_when_integral() -> None:
    assert decode_msgpack(msgpack.packb(2.0), "number") == 2
    assert isinstance(decode_msgpack(msgpack.packb(2.0), "number"), int)
    assert decode_msgpack(msgpack.packb(2.5), "number") == 2.5
    big = "123456789012345678901234567890"  # cty sends what fits no machine number as text
    assert decode_msgpack(msgpack.packb(big), "number") == int(big)
    assert decode_msgpack(b"", "string") is None


def test_unknowns_survive_byte_for_byte() -> None:
    refined = msgpack.ExtType(12, msgpack.packb({1: False, 2: "pre"}))  # refinements
    wire = msgpack.packb({"name": msgpack.ExtType(0, b""), "memory_mb": refined,
                          "tags": [msgpack.ExtType(0, b"")]}, use_bin_type=True)
    ty = ["object", {"name": "string", "memory_mb": "number", "tags": ["set", "string"]}]
    value = decode_msgpack(wire, ty)
    assert isinstance(value["name"], Unknown) and value["name"].ext_code == 0
    assert value["memory_mb"] == Unknown(raw=refined.data, ext_code=12)
    assert isinstance(value["tags"][0], Unknown)
    assert encode_msgpack(value, ty) == wire
    assert decode_msgpack(msgpack.packb(msgpack.ExtType(0, b"")), TYPE) == Unknown()


def test_dynamic_values_carry_their_type() -> None:
    wire = encode_msgpack({"a": 1}, "dynamic")
    tjson, inner = msgpack.unpackb(wire)
    assert json.loads(tjson) == ["object", {"a": "number"}]
    assert inner == {"a": 1}


def test_encode_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(TypeMismatch, match=r"port\[0\]\.host: expected a number"):
        encode_object(obj(name="a", port=[{"host": "x", "guest": 1}]), SCHEMA)
    with pytest.raises(TypeMismatch, match="not in the schema: bogus"):
        encode_object(obj(name="a", bogus=1), SCHEMA)
    with pytest.raises(TypeMismatch, match="expected a string"):
        encode_msgpack(3, "string")


def test_objects_are_normalised_by_schema() -> None:
    # A resource may leave attributes out and blocks null: they come out null and [].
    data = encode_object({"name": "a", "port": None}, SCHEMA)
    assert decode_object(data, SCHEMA) == obj(name="a")
    assert encode_object(None, SCHEMA) == b"\xc0"
    assert decode_object(b"\xc0", SCHEMA) is None


def test_json_state_decodes_by_schema() -> None:
    state = {"id": "x", "name": "a", "memory_mb": 256.0, "removed_attr": 1,
             "port": [{"host": 8080, "guest": 80, "proto": "tcp"}],
             "extra": {"value": ["a", 1], "type": ["tuple", ["string", "number"]]}}
    value = decode_json(json.dumps(state).encode(), TYPE)
    assert value["memory_mb"] == 256 and isinstance(value["memory_mb"], int)
    assert "removed_attr" not in value and value["labels"] is None
    assert value["extra"] == ["a", 1]
    assert value["port"] == [{"host": 8080, "guest": 80, "proto": "tcp"}]


def test_equality_ignores_set_order() -> None:
    a = obj(name="a", tags=["x", "y"], disk=[{"name": "d1", "size": 1, "path": None},
                                            {"name": "d2", "size": 2, "path": None}])
    b = obj(name="a", tags=["y", "x"], disk=[{"name": "d2", "size": 2.0, "path": None},
                                            {"name": "d1", "size": 1, "path": None}])
    assert equal(a, b, TYPE)
    assert not equal(a, obj(name="a", tags=["x"]), TYPE)
    assert canonical(UNKNOWN, "string") != canonical("x", "string")


# -- conversion ---------------------------------------------------------------------------


def test_schema_to_proto() -> None:
    msg = schema_to_proto(SCHEMA)
    assert msg.version == 2 and msg.block.version == 2
    attrs = {a.name: a for a in msg.block.attributes}
    assert json.loads(attrs["labels"].type) == ["map", "string"]
    assert attrs["labels"].type == b'["map","string"]'
    assert attrs["name"].required and not attrs["name"].optional
    assert attrs["memory_mb"].optional and attrs["memory_mb"].computed
    assert attrs["token"].sensitive and attrs["token"].description == "secret"
    blocks = {b.type_name: b for b in msg.block.block_types}
    assert blocks["port"].nesting == pb.Schema.NestedBlock.LIST
    assert blocks["disk"].nesting == pb.Schema.NestedBlock.SET
    assert blocks["opts"].nesting == pb.Schema.NestedBlock.SINGLE
    assert [a.name for a in blocks["port"].block.attributes] == ["host", "guest", "proto"]
    with pytest.raises(ValueError, match="set one of required"):
        schema_to_proto(Schema(attrs=(Attr("x", "string"),)))


def _steps(path: pb.AttributePath) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for s in path.steps:
        which = s.WhichOneof("selector")
        assert which is not None
        out.append((which, getattr(s, which)))
    return out


def test_paths_to_proto() -> None:
    assert _steps(path_to_proto(("port", 1, "host"), SCHEMA)) == [
        ("attribute_name", "port"), ("element_key_int", 1), ("attribute_name", "host")]
    assert _steps(path_to_proto(("labels", "env"), SCHEMA)) == [
        ("attribute_name", "labels"), ("element_key_string", "env")]
    assert _steps(path_to_proto(("opts", "debug"), SCHEMA)) == [
        ("attribute_name", "opts"), ("attribute_name", "debug")]
    # Set elements have no index terraform can map back: the path stops at the set.
    assert _steps(path_to_proto(("disk", 0, "size"), SCHEMA)) == [("attribute_name", "disk")]
    # Without a schema: a name after a name is a map key, after an index an attribute.
    assert _steps(path_to_proto(("labels", "env"))) == [
        ("attribute_name", "labels"), ("element_key_string", "env")]
    assert _steps(path_to_proto(("port", 0, "host"))) == [
        ("attribute_name", "port"), ("element_key_int", 0), ("attribute_name", "host")]


def test_diagnostics_to_proto() -> None:
    diags = Diagnostics().error("bad", "detail", path=("port", 0, "host")).warning("meh")
    err, warn = diags_to_proto(diags, SCHEMA)
    assert err.severity == pb.Diagnostic.ERROR and err.summary == "bad"
    assert err.detail == "detail" and len(err.attribute.steps) == 3
    assert warn.severity == pb.Diagnostic.WARNING and not warn.HasField("attribute")


def test_core_errors_become_diagnostics_at_their_attribute() -> None:
    assert field_path("memory_mb", SCHEMA, {}) == ("memory_mb",)
    assert field_path("cpu_cores", SCHEMA, {}) == ()
    assert field_path("cpu_cores", SCHEMA, {"cpu_cores": ("cpus",)}) == ("cpus",)
    assert field_path("port_forwards[1].host_port", SCHEMA,
                      {"port_forwards": ("port",), "port_forwards[1].host_port": ()}) == ()
    assert field_path("port_forwards[1].host_port", SCHEMA,
                      {"port_forwards": ("port",)}) == ("port", 1, "host_port")
    d = error_diags(InvalidSpec("memory_mb", "must be at least 64"), SCHEMA, {}).items[0]
    assert d.path == ("memory_mb",) and "at least 64" in d.summary
    assert error_diags(NotFound("VM", "x"), SCHEMA).items[0].summary == "VM 'x' not found"
    assert error_diags(Cancelled("stop")).items[0].summary == "cancelled"
    assert error_diags(RuntimeError("boom")).items[0].summary.startswith("internal error")


def test_provider_config_validation() -> None:
    assert not validate_provider_config({"data_dir": "/x"}, env={})
    diags = validate_provider_config({"address": "h:1", "data_dir": "/x"}, env={})
    assert [d.path for d in diags.items] == [("address",), ("token",)]
    assert not validate_provider_config({"address": "h:1"}, env={"INFRASIM_TOKEN": "t"})
    # Unknown values (known only at apply) are not judged.
    assert not validate_provider_config({"address": UNKNOWN, "data_dir": "/x"}, env={})


# -- the default plan ---------------------------------------------------------------------


def test_plan_create_marks_unset_computed_unknown() -> None:
    config = obj(name="a", port=[{"host": 1, "guest": 2, "proto": None}])
    plan = default_plan(SCHEMA, None, config, config)
    p = plan.planned
    assert p is not None and plan.requires_replace == []
    assert p["id"] is UNKNOWN and p["state"] is UNKNOWN and p["memory_mb"] is UNKNOWN
    assert p["name"] == "a" and p["labels"] is None
    assert p["port"][0] == {"host": 1, "guest": 2, "proto": UNKNOWN}
    set_in_config = obj(name="a", memory_mb=512)
    p = default_plan(SCHEMA, None, set_in_config, set_in_config).planned
    assert p is not None and p["memory_mb"] == 512


def test_plan_without_change_is_the_prior_state() -> None:
    prior = obj(id="i", name="a", memory_mb=256, state="running", tags=["x", "y"])
    proposed = obj(id="i", name="a", memory_mb=256, state="running", tags=["y", "x"])
    config = obj(name="a", tags=["y", "x"])
    plan = default_plan(SCHEMA, prior, proposed, config)
    assert plan.planned == prior and plan.requires_replace == []


def test_plan_update_and_replace() -> None:
    prior = obj(id="i", name="a", memory_mb=256, state="running",
                port=[{"host": 1, "guest": 2, "proto": "tcp"}],
                disk=[{"name": "d", "size": 1, "path": "/p"}])
    # In place: computed attributes the config leaves null become unknown, stable ones stay.
    proposed = {**prior, "labels": {"k": "v"}}
    config = obj(name="a", labels={"k": "v"}, port=[{"host": 1, "guest": 2, "proto": None}],
                 disk=[{"name": "d", "size": 1, "path": None}])
    plan = default_plan(SCHEMA, prior, proposed, config)
    p = plan.planned
    assert p is not None and plan.requires_replace == []
    assert p["id"] == "i" and p["state"] is UNKNOWN and p["memory_mb"] is UNKNOWN
    assert p["labels"] == {"k": "v"} and p["port"][0]["proto"] is UNKNOWN
    assert p["disk"][0]["path"] is UNKNOWN and p["disk"][0]["size"] == 1
    # memory_mb set in config keeps the configured value.
    p = default_plan(SCHEMA, prior, {**proposed, "memory_mb": 512},
                     {**config, "memory_mb": 512}).planned
    assert p is not None and p["memory_mb"] == 512
    # force_new attributes, nested ones, and set blocks.
    proposed = {**prior, "name": "b", "port": [{"host": 1, "guest": 3, "proto": "tcp"}],
                "disk": [{"name": "d", "size": 2, "path": "/p"}]}
    plan = default_plan(SCHEMA, prior, proposed, config)
    assert sorted(plan.requires_replace, key=str) == sorted(
        [("name",), ("port", 0, "guest"), ("disk",)], key=str)
    # An unknown force_new value may differ: replace.
    plan = default_plan(SCHEMA, prior, {**prior, "name": UNKNOWN}, config)
    assert plan.requires_replace == [("name",)]
    # Changing a non-force_new nested attribute does not replace.
    plan = default_plan(SCHEMA, prior, {**prior, "port": [{"host": 9, "guest": 2,
                                                           "proto": "tcp"}]}, config)
    assert plan.requires_replace == []


def test_plan_timeouts_change_only_updates_settings() -> None:
    timeouts = Block("timeouts", nesting="single",
                     attrs=(Attr("create", "string", optional=True),))
    schema = Schema(attrs=SCHEMA.attrs, blocks=(*SCHEMA.blocks, timeouts))
    prior = {**obj(id="i", name="a", memory_mb=256, state="running"),
             "timeouts": {"create": "5m"}}
    proposed = {**prior, "timeouts": {"create": "10m"}}
    plan = default_plan(schema, prior, proposed, {**obj(name="a"), "timeouts": {"create": "10m"}})
    assert plan.planned == proposed and plan.requires_replace == []


def test_plan_destroy_is_null() -> None:
    assert default_plan(SCHEMA, obj(name="a"), None, None).planned is None


# -- the servicer, called directly ---------------------------------------------------------


class FakeResource(Resource):
    type_name = "infrasim_fake"
    schema = SCHEMA
    field_paths = {"cpu_cores": ("memory_mb",)}

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        self.seen.append(config)
        d = Diagnostics()
        if config.get("memory_mb") == 1:
            d.error("too small", path=("memory_mb",))
        return d

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        default.private = b"planned:" + ctx.private
        return default

    async def apply(self, ctx: Context, prior: dict[str, Any] | None,
                    planned: dict[str, Any] | None, config: dict[str, Any] | None
                    ) -> ApplyResult:
        assert planned is not None
        if planned["name"] == "fail":
            raise InvalidSpec("cpu_cores", "too many")
        if planned["name"] == "wait":
            await ctx.wait(asyncio.sleep(30))
        state = {**planned, "id": "i1", "state": "running", "memory_mb": 256,
                 "port": [{**p, "proto": "tcp"} for p in planned["port"]],
                 "disk": [{**d, "path": "/p"} for d in planned["disk"]]}
        return ApplyResult(state, private=ctx.private + b"+applied")

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        return None if state["id"] == "gone" else state

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        return {"id": id, "name": "imported"} if id == "i1" else None


def _dv(value: Any) -> pb.DynamicValue:
    return pb.DynamicValue(msgpack=encode_object(value, SCHEMA))


@pytest.fixture
def provider() -> Provider:
    fake = FakeResource()

    async def no_core(config: dict[str, Any]) -> Any:
        raise AssertionError("no daemon in these tests")

    return Provider(resources=lambda: [fake], data_sources=lambda: [], connect=no_core)


async def test_servicer_schema_and_validation(provider: Provider) -> None:
    schema = await provider.GetProviderSchema(pb.GetProviderSchema.Request(), None)
    assert schema.server_capabilities.plan_destroy
    assert not schema.server_capabilities.get_provider_schema_optional
    assert set(schema.resource_schemas) == {"infrasim_fake"}
    assert {a.name for a in schema.provider.block.attributes} == {
        "data_dir", "address", "token", "tls_ca", "autostart"}
    meta = await provider.GetMetadata(pb.GetMetadata.Request(), None)
    assert [r.type_name for r in meta.resources] == ["infrasim_fake"]

    cfg = msgpack.packb({**obj(name=msgpack.ExtType(0, b""), memory_mb=1)}, use_bin_type=True)
    resp = await provider.ValidateResourceConfig(
        pb.ValidateResourceConfig.Request(type_name="infrasim_fake",
                                          config=pb.DynamicValue(msgpack=cfg)), None)
    (d,) = resp.diagnostics
    assert d.summary == "too small" and d.attribute.steps[0].attribute_name == "memory_mb"
    resp = await provider.ValidateResourceConfig(
        pb.ValidateResourceConfig.Request(type_name="infrasim_nope", config=_dv(obj())), None)
    assert resp.diagnostics[0].summary == "unknown resource type 'infrasim_nope'"


async def test_servicer_plan_apply_read_import(provider: Provider) -> None:
    config = obj(name="a", port=[{"host": 1, "guest": 2, "proto": None}])
    plan = await provider.PlanResourceChange(pb.PlanResourceChange.Request(
        type_name="infrasim_fake", prior_state=pb.DynamicValue(msgpack=b"\xc0"),
        proposed_new_state=_dv(config), config=_dv(config), prior_private=b"p"), None)
    assert not plan.diagnostics and plan.planned_private == b"planned:p"
    planned = decode_object(plan.planned_state.msgpack, SCHEMA)
    assert planned is not None and planned["id"] == UNKNOWN

    applied = await provider.ApplyResourceChange(pb.ApplyResourceChange.Request(
        type_name="infrasim_fake", prior_state=pb.DynamicValue(msgpack=b"\xc0"),
        planned_state=plan.planned_state, config=_dv(config),
        planned_private=plan.planned_private), None)
    assert not applied.diagnostics and applied.private == b"planned:p+applied"
    state = decode_object(applied.new_state.msgpack, SCHEMA)
    assert state is not None and state["id"] == "i1" and state["port"][0]["proto"] == "tcp"

    # A failing update keeps the prior state and maps the core's field onto the attribute.
    failing = {**state, "name": "fail"}
    resp = await provider.ApplyResourceChange(pb.ApplyResourceChange.Request(
        type_name="infrasim_fake", prior_state=_dv(state), planned_state=_dv(failing),
        config=_dv(failing)), None)
    (d,) = resp.diagnostics
    assert d.summary == "cpu_cores: too many"
    assert d.attribute.steps[0].attribute_name == "memory_mb"
    assert decode_object(resp.new_state.msgpack, SCHEMA) == state

    read = await provider.ReadResource(pb.ReadResource.Request(
        type_name="infrasim_fake", current_state=_dv(state), private=b"keep"), None)
    assert decode_object(read.new_state.msgpack, SCHEMA) == state and read.private == b"keep"
    gone = await provider.ReadResource(pb.ReadResource.Request(
        type_name="infrasim_fake", current_state=_dv({**state, "id": "gone"})), None)
    assert decode_object(gone.new_state.msgpack, SCHEMA) is None

    imp = await provider.ImportResourceState(pb.ImportResourceState.Request(
        type_name="infrasim_fake", id="i1"), None)
    (res,) = imp.imported_resources
    assert res.type_name == "infrasim_fake"
    assert decode_object(res.state.msgpack, SCHEMA) == obj(id="i1", name="imported")
    missing = await provider.ImportResourceState(pb.ImportResourceState.Request(
        type_name="infrasim_fake", id="zz"), None)
    assert not missing.imported_resources and "not found" in missing.diagnostics[0].summary

    destroy = await provider.PlanResourceChange(pb.PlanResourceChange.Request(
        type_name="infrasim_fake", prior_state=_dv(state),
        proposed_new_state=pb.DynamicValue(msgpack=b"\xc0"),
        config=pb.DynamicValue(msgpack=b"\xc0")), None)
    assert destroy.planned_state.msgpack == b"\xc0"


async def test_servicer_upgrades_json_state(provider: Provider) -> None:
    raw = json.dumps({"id": "i", "name": "a", "memory_mb": 256, "old": True}).encode()
    resp = await provider.UpgradeResourceState(pb.UpgradeResourceState.Request(
        type_name="infrasim_fake", version=1, raw_state=pb.RawState(json=raw)), None)
    assert not resp.diagnostics
    assert decode_object(resp.upgraded_state.msgpack, SCHEMA) == obj(id="i", name="a",
                                                                     memory_mb=256)


async def test_stop_provider_cancels_in_flight_work(provider: Provider) -> None:
    config = obj(name="wait")
    apply = asyncio.create_task(provider.ApplyResourceChange(pb.ApplyResourceChange.Request(
        type_name="infrasim_fake", prior_state=pb.DynamicValue(msgpack=b"\xc0"),
        planned_state=_dv(config), config=_dv(config)), None))
    await asyncio.sleep(0.05)
    stop = await provider.StopProvider(pb.StopProvider.Request(), None)
    assert stop.Error == ""
    resp = await asyncio.wait_for(apply, 5)
    assert resp.diagnostics[0].summary == "cancelled"
    assert resp.new_state.msgpack == b"\xc0"  # nothing was created
    # A request after the stop gets a fresh event.
    assert not provider.context().stopping.is_set()


async def test_unavailable_daemon_is_reconnected_on_next_call() -> None:
    from infrasim_tui.core.errors import Unavailable

    connects: list[dict[str, Any]] = []

    class Core:
        async def close(self) -> None:
            pass

    async def connect(config: dict[str, Any]) -> Any:
        connects.append(config)
        return Core()

    class DS(DataSource):
        type_name = "infrasim_flaky"
        schema = Schema(attrs=(Attr("n", "number", computed=True),))
        calls = 0

        async def read(self, ctx: Context, config: dict[str, Any]
                       ) -> tuple[dict[str, Any], Diagnostics]:
            await ctx.core()
            DS.calls += 1
            if DS.calls == 1:
                raise Unavailable("the daemon went away")
            return {"n": DS.calls}, Diagnostics()

    p = Provider(resources=lambda: [], data_sources=lambda: [DS()], connect=connect)
    await p.ConfigureProvider(pb.ConfigureProvider.Request(
        config=pb.DynamicValue(msgpack=msgpack.packb({"data_dir": "/d"}))), None)
    req = pb.ReadDataSource.Request(type_name="infrasim_flaky",
                                    config=pb.DynamicValue(msgpack=msgpack.packb({"n": None})))
    first = await p.ReadDataSource(req, None)
    assert first.diagnostics[0].summary == "the daemon went away"
    second = await p.ReadDataSource(req, None)
    assert not second.diagnostics and msgpack.unpackb(second.state.msgpack) == {"n": 2}
    assert len(connects) == 2 and connects[0]["data_dir"] == "/d"
    await p.close()


async def test_unknown_provider_config_is_an_error_only_when_the_daemon_is_needed() -> None:
    p = Provider(resources=lambda: [], data_sources=lambda: [])
    await p.ConfigureProvider(pb.ConfigureProvider.Request(config=pb.DynamicValue(
        msgpack=msgpack.packb({"data_dir": msgpack.ExtType(0, b"")}))), None)
    with pytest.raises(Exception, match="data_dir are not known until apply"):
        await p.context().core()


async def test_data_source_result_is_laid_over_config() -> None:
    class DS(DataSource):
        type_name = "infrasim_thing"
        schema = Schema(attrs=(Attr("name", "string", required=True),
                               Attr("size", "number", computed=True)))

        async def read(self, ctx: Context, config: dict[str, Any]
                       ) -> tuple[dict[str, Any], Diagnostics]:
            return {"size": 3}, Diagnostics().warning("w")

    p = Provider(resources=lambda: [], data_sources=lambda: [DS()])
    resp = await p.ReadDataSource(pb.ReadDataSource.Request(
        type_name="infrasim_thing",
        config=pb.DynamicValue(msgpack=msgpack.packb({"name": "n", "size": None}))), None)
    assert msgpack.unpackb(resp.state.msgpack) == {"name": "n", "size": 3}
    assert resp.diagnostics[0].summary == "w"


def test_served_rpcs_match_the_proto() -> None:
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["Provider"].methods]
    assert list(server.PROVIDER_RPCS) == methods
    assert all(hasattr(pbg.ProviderServicer, m) for m in methods)


# -- TLS certificate ------------------------------------------------------------------------


def test_tls_certificate_is_made_once_and_private(tmp_path: Path) -> None:
    key, cert, b64 = tls.server_certificate(str(tmp_path))
    assert (tmp_path / tls.CERT_NAME).stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key and cert.startswith(b"-----BEGIN CERTIFICATE-----")
    assert "=" not in b64
    again = tls.server_certificate(str(tmp_path))
    assert again == (key, cert, b64)


# -- the plugin process ---------------------------------------------------------------------


def _plugin_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TF_PLUGIN_MAGIC_COOKIE=server.MAGIC_COOKIE_VALUE, PLUGIN_PROTOCOL_VERSIONS="5,6",
               PLUGIN_MIN_PORT="10000", PLUGIN_MAX_PORT="25000",
               PLUGIN_CLIENT_CERT="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    return env


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    proc = subprocess.Popen([PROVIDER_EXE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_plugin_env(tmp_path))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    try:
        yield proc, line.rstrip("\n").split("|")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _channel(parts: list[str]) -> grpc.Channel:
    b64 = parts[5]
    pem = ("-----BEGIN CERTIFICATE-----\n"
           + "\n".join(textwrap.wrap(base64.b64encode(_der(b64)).decode(), 64))
           + "\n-----END CERTIFICATE-----\n").encode()
    creds = grpc.ssl_channel_credentials(root_certificates=pem)
    return grpc.secure_channel(f"unix:{parts[3]}", creds,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def _der(b64: str) -> bytes:
    return base64.b64decode(b64 + "=" * (-len(b64) % 4))


def test_handshake_tls_schema_and_shutdown(
        plugin: tuple[subprocess.Popen[bytes], list[str]], tmp_path: Path) -> None:
    proc, parts = plugin
    assert parts[:3] == ["1", "6", "unix"] and parts[4] == "grpc", parts
    assert len(parts[3]) < 100 and Path(parts[3]).is_socket()
    assert "=" not in parts[5]
    der = _der(parts[5])
    text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-text"], input=der,
                          capture_output=True, check=True).stdout.decode()
    assert "DNS:localhost" in text

    with _channel(parts) as channel:
        stub = pbg.ProviderStub(channel)
        resp = stub.GetProviderSchema(pb.GetProviderSchema.Request(), timeout=10)
        assert "infrasim_host" in resp.data_source_schemas
        assert resp.server_capabilities.plan_destroy
        # SIGINT is ignored (terraform sends StopProvider for Ctrl-C).
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None
        assert stub.StopProvider(pb.StopProvider.Request(), timeout=5).Error == ""
        shutdown = channel.unary_unary("/plugin.GRPCController/Shutdown",
                                       request_serializer=bytes,
                                       response_deserializer=bytes)
        start = time.monotonic()
        assert shutdown(b"", timeout=5) == b""
    assert proc.wait(timeout=2) == 0
    assert time.monotonic() - start < 2
    assert not Path(parts[3]).exists()  # its socket dir is cleaned up
    assert proc.stdout is not None and proc.stdout.read() == b""  # the handshake line alone


def test_sigterm_exits(plugin: tuple[subprocess.Popen[bytes], list[str]]) -> None:
    proc, parts = plugin
    assert parts[1] == "6"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=2) == 0


def test_without_cookie_it_says_it_is_a_plugin() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TF_PLUGIN_MAGIC_COOKIE"}
    proc = subprocess.run([PROVIDER_EXE], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("This binary is a plugin.")
    wrong = subprocess.run([PROVIDER_EXE], env={**_plugin_env(Path("/nonexistent")),
                                                "PLUGIN_PROTOCOL_VERSIONS": "5"},
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1 and "protocol 6" in wrong.stderr


# -- real terraform -------------------------------------------------------------------------

HOST_CONFIG = """
terraform {
  required_providers {
    infrasim = { source = "infrasim/infrasim" }
  }
}
provider "infrasim" { data_dir = "%s" }
data "infrasim_host" "h" {}
output "accel" { value = data.infrasim_host.h.accelerator }
output "os" { value = data.infrasim_host.h.os }
"""


def _tf_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1", TF_INPUT="0", NO_COLOR="1")
    env.pop("TF_LOG", None)
    env.update(extra)
    return env


def _terraform(workdir: Path, env: dict[str, str], *args: str,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert TERRAFORM is not None
    proc = subprocess.run([TERRAFORM, *args, "-no-color"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"terraform {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _outputs(workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    assert TERRAFORM is not None
    out = subprocess.run([TERRAFORM, "output", "-json"], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return {k: v["value"] for k, v in json.loads(out).items()}


def _daemon_accelerator(data_dir: Path) -> str:
    infrasim = str(Path(sys.executable).with_name("infrasim"))
    out = subprocess.run([infrasim, "--data-dir", str(data_dir), "status", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return ""
    return str(json.loads(out.stdout)["host"]["accelerators"].get("aarch64", ""))


@pytest.fixture
def debug_provider(tmp_path: Path) -> Iterator[str]:
    """A provider in debug mode; yields the TF_REATTACH_PROVIDERS value."""
    with open(tmp_path / "provider.log", "wb") as log:
        proc = subprocess.Popen([PROVIDER_EXE, "--debug"], stdout=subprocess.PIPE, stderr=log,
                                env=_tf_env())
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    try:
        assert line.startswith("TF_REATTACH_PROVIDERS='"), line
        value = line.split("=", 1)[1].strip("'")
        spec = json.loads(value)["registry.terraform.io/infrasim/infrasim"]
        assert spec["ProtocolVersion"] == 6 and spec["Pid"] == proc.pid
        assert spec["Addr"]["Network"] == "unix"
        yield value
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


@needs_terraform
def test_terraform_reattach_host(debug_provider: str, data_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "tf"
    work.mkdir()
    (work / "main.tf").write_text(HOST_CONFIG % data_dir)
    env = _tf_env(TF_REATTACH_PROVIDERS=debug_provider, TF_CLI_CONFIG_FILE="/dev/null")
    _terraform(work, env, "apply", "-auto-approve")
    outputs = _outputs(work, env)
    assert outputs["accel"] in ("tcg", "kvm")
    assert outputs["accel"] == _daemon_accelerator(data_dir)
    assert outputs["os"] == sys.platform


@needs_terraform
def test_terraform_mirror_launch(data_dir: Path, tmp_path: Path) -> None:
    """The real launch path: terraform installs the provider from a filesystem mirror and
    starts it per command (cookie, TLS, Shutdown)."""
    mirror = tmp_path / "mirror"
    exe = (mirror / "registry.terraform.io/infrasim/infrasim/0.1.0/linux_amd64"
           / "terraform-provider-infrasim_v0.1.0")
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\nexec "{PROVIDER_EXE}" "$@"\n')
    exe.chmod(0o755)
    cli_config = tmp_path / "cli.tfrc"
    cli_config.write_text(textwrap.dedent(f"""
        provider_installation {{
          filesystem_mirror {{
            path    = "{mirror}"
            include = ["registry.terraform.io/infrasim/*"]
          }}
        }}
    """))
    work = tmp_path / "tf"
    work.mkdir()
    (work / "main.tf").write_text(HOST_CONFIG % data_dir)
    env = _tf_env(TF_CLI_CONFIG_FILE=str(cli_config), XDG_CACHE_HOME=str(tmp_path / "cache"))
    _terraform(work, env, "init")
    assert (work / ".terraform.lock.hcl").is_file()
    start = time.monotonic()
    plan = _terraform(work, env, "plan")
    assert 'accel = "' in plan.stdout
    # Shutdown works: terraform would otherwise wait 2 s per provider process (3 per plan).
    assert time.monotonic() - start < 6
    _terraform(work, env, "apply", "-auto-approve")
    assert _outputs(work, env)["accel"] in ("tcg", "kvm")


# A provider serving a fake resource kept in a JSON file: real terraform drives create, no-op,
# update in place, replace, import and destroy through this protocol layer.
FAKE_PROVIDER = r'''
import json, os, sys
from pathlib import Path

from infrasim_tui.terraform import registry, server
from infrasim_tui.terraform.framework import ApplyResult, Attr, Block, Diagnostics, Resource, Schema

STORE = Path(os.environ["FAKE_STORE"])


def load():
    return json.loads(STORE.read_text()) if STORE.exists() else {}


class Thing(Resource):
    type_name = "infrasim_thing"
    schema = Schema(attrs=(
        Attr("id", "string", computed=True, stable=True),
        Attr("name", "string", required=True, force_new=True),
        Attr("size", "number", optional=True, computed=True),
        Attr("labels", ["map", "string"], optional=True),
        Attr("tags", ["set", "string"], optional=True),
        Attr("generation", "number", computed=True),
    ), blocks=(Block("port", attrs=(Attr("host", "number", required=True),
                                     Attr("proto", "string", optional=True, computed=True))),))

    def validate(self, config):
        d = Diagnostics()
        if isinstance(config.get("size"), int) and config["size"] > 100:
            d.error("size too large", "at most 100", path=("size",))
        return d

    async def apply(self, ctx, prior, planned, config):
        db = load()
        if planned is None:
            db.pop(prior["id"], None)
            STORE.write_text(json.dumps(db))
            return ApplyResult(None)
        state = dict(planned)
        state["id"] = prior["id"] if prior else "t-" + planned["name"]
        state["size"] = planned["size"] if isinstance(planned["size"], int) else 10
        state["generation"] = (prior["generation"] + 1) if prior else 1
        state["port"] = [{**p, "proto": p["proto"] if isinstance(p["proto"], str) else "tcp"}
                         for p in planned["port"]]
        db[state["id"]] = state
        STORE.write_text(json.dumps(db))
        return ApplyResult(state)

    async def read(self, ctx, state):
        return load().get(state["id"])

    async def import_state(self, ctx, id):
        return load().get(id)


registry.resources = lambda: [Thing()]
sys.exit(server.main(["--debug"]))
'''


@needs_terraform
def test_terraform_resource_lifecycle(tmp_path: Path) -> None:
    store = tmp_path / "store.json"
    script = tmp_path / "fake_provider.py"
    script.write_text(FAKE_PROVIDER)
    with open(tmp_path / "provider.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=log, env=_tf_env(FAKE_STORE=str(store)))
    assert proc.stdout is not None
    reattach = proc.stdout.readline().decode().strip().split("=", 1)[1].strip("'")
    work = tmp_path / "tf"
    work.mkdir()
    env = _tf_env(TF_REATTACH_PROVIDERS=reattach, TF_CLI_CONFIG_FILE="/dev/null")

    def config(body: str) -> None:
        (work / "main.tf").write_text(textwrap.dedent("""
            terraform {
              required_providers {
                infrasim = { source = "infrasim/infrasim" }
              }
            }
            provider "infrasim" {}
        """) + textwrap.dedent(body))

    def state() -> dict[str, Any]:
        return dict(json.loads(store.read_text()))

    try:
        config('''
            resource "infrasim_thing" "a" {
              name = "one"
              tags = ["x", "y"]
              labels = { env = "dev" }
              port { host = 8080 }
            }
            output "gen" { value = infrasim_thing.a.generation }
        ''')
        _terraform(work, env, "apply", "-auto-approve")
        assert state()["t-one"]["generation"] == 1
        assert state()["t-one"]["port"] == [{"host": 8080, "proto": "tcp"}]
        # No change: the plan is empty (set order, computed values, blocks all stable).
        plan = _terraform(work, env, "plan", "-detailed-exitcode")
        assert "No changes" in plan.stdout
        # In place: the computed generation is planned unknown and then set.
        config('''
            resource "infrasim_thing" "a" {
              name = "one"
              size = 20
              tags = ["y", "x", "z"]
              labels = { env = "dev" }
              port { host = 8080 }
            }
            output "gen" { value = infrasim_thing.a.generation }
        ''')
        plan = _terraform(work, env, "plan")
        assert "1 to change" in plan.stdout and "(known after apply)" in plan.stdout
        _terraform(work, env, "apply", "-auto-approve")
        assert _outputs(work, env)["gen"] == 2 and state()["t-one"]["size"] == 20
        # Validation errors point at the attribute's line.
        config('''
            resource "infrasim_thing" "a" {
              name = "one"
              size = 200
            }
        ''')
        assert TERRAFORM is not None
        bad = subprocess.run([TERRAFORM, "plan", "-no-color"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "size too large" in bad.stderr
        assert "size = 200" in bad.stderr  # terraform quotes the configuration line
        # A force_new change replaces.
        config('''
            resource "infrasim_thing" "a" {
              name = "two"
            }
        ''')
        plan = _terraform(work, env, "plan")
        assert "must be replaced" in plan.stdout and "forces replacement" in plan.stdout
        _terraform(work, env, "apply", "-auto-approve")
        assert set(state()) == {"t-two"}
        # Import by id into a fresh state, then destroy.
        (work / "terraform.tfstate").unlink()
        _terraform(work, env, "import", "infrasim_thing.a", "t-two")
        plan = _terraform(work, env, "plan", "-detailed-exitcode")
        assert "No changes" in plan.stdout
        _terraform(work, env, "destroy", "-auto-approve")
        assert state() == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
