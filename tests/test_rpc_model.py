"""The API messages and the core's dataclasses must not drift apart.

For every resource kind and every dataclass reachable from it: the field names are identical on
both sides, the types are compatible, enums map both ways, and arbitrary instances survive
dataclass → message → bytes → message → dataclass unchanged. Also: the committed generated code
is what ``./dev proto`` produces.
"""

from __future__ import annotations

import dataclasses
import enum
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from infrasim_tui.core import model
from infrasim_tui.rpc import codegen, convert
from infrasim_tui.rpc.convert import ConversionError, ModelDriftError, from_proto, to_proto
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb

FD = FieldDescriptor
REPO = Path(__file__).resolve().parent.parent

# --- walking the model ---------------------------------------------------------------------------


def _optional(hint: Any) -> Any | None:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _elements(hint: Any, fd: FieldDescriptor) -> Iterator[tuple[Any, FieldDescriptor]]:
    """(element type, element descriptor) pairs inside a field: the value itself, list items,
    map keys and values (through a single-field wrapper message for ``dict[str, list[X]]``)."""
    hint = _optional(hint) or hint
    if _is_map(fd):
        key_hint, val_hint = get_args(hint)
        entry = fd.message_type
        assert entry is not None
        yield key_hint, entry.fields_by_name["key"]
        val_fd = entry.fields_by_name["value"]
        if get_origin(val_hint) is list and val_fd.message_type is not None:
            (inner,) = val_fd.message_type.fields
            yield from _elements(val_hint, inner)
        else:
            yield val_hint, val_fd
    elif fd.is_repeated:
        (item,) = get_args(hint)
        yield item, fd
    else:
        yield hint, fd


def _pairs() -> list[tuple[type[Any], Descriptor]]:
    """Every (dataclass, message) pair reachable from RESOURCE_TYPES, via the descriptors."""
    seen: dict[tuple[type[Any], str], tuple[type[Any], Descriptor]] = {}
    todo = [
        (cls, pb.DESCRIPTOR.message_types_by_name[cls.__name__])
        for cls in model.RESOURCE_TYPES.values()
    ]
    while todo:
        cls, desc = todo.pop()
        if (cls, desc.full_name) in seen:
            continue
        seen[cls, desc.full_name] = (cls, desc)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fd = desc.fields_by_name.get(f.name)
            if fd is None:
                continue  # reported by test_field_names_match
            for elem_hint, elem_fd in _elements(hints[f.name], fd):
                if _is_dataclass(elem_hint) and elem_fd.message_type is not None:
                    todo.append((elem_hint, elem_fd.message_type))
    return sorted(seen.values(), key=lambda p: p[0].__name__)


PAIRS = _pairs()
PAIR_IDS = [f"{cls.__name__}-{desc.name}" for cls, desc in PAIRS]


def _enum_fields() -> list[tuple[type[Any], str, type[enum.Enum], FieldDescriptor]]:
    """(owning dataclass, field name, Python enum, message field) for every enum-typed field."""
    out = []
    for cls, desc in PAIRS:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if _is_enum(hint):
                out.append((cls, f.name, hint, desc.fields_by_name[f.name]))
    return out


ENUM_FIELDS = _enum_fields()
ENUM_IDS = [f"{cls.__name__}.{name}" for cls, name, _, _ in ENUM_FIELDS]


def test_walk_reaches_every_nested_dataclass() -> None:
    names = {cls.__name__ for cls, _ in PAIRS}
    for cls in model.RESOURCE_TYPES.values():
        assert {cls.__name__, f"{cls.__name__}Spec", f"{cls.__name__}Status"} <= names
    assert {"ResourceMeta", "PortForward", "IntegrityConfig"} <= names
    by_enum = {(e.__name__, fd.type) for _, _, e, fd in ENUM_FIELDS}
    assert {("VMState", FD.TYPE_ENUM), ("NetworkMode", FD.TYPE_ENUM)} <= by_enum
    assert {("VolumeKind", FD.TYPE_ENUM), ("Machine", FD.TYPE_STRING)} <= by_enum
    assert ("Accelerator", FD.TYPE_STRING) in by_enum


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "desc"), PAIRS, ids=PAIR_IDS)
def test_field_names_match(cls: type[Any], desc: Descriptor) -> None:
    dc_names = {f.name for f in dataclasses.fields(cls)}
    pb_names = set(desc.fields_by_name)
    assert not dc_names - pb_names, f"{cls.__name__} fields missing from {desc.full_name}"
    assert not pb_names - dc_names, f"{desc.full_name} fields missing from {cls.__name__}"


_COMPATIBLE: dict[Any, set[int]] = {
    str: {FD.TYPE_STRING},
    bytes: {FD.TYPE_BYTES},
    bool: {FD.TYPE_BOOL},
    int: {
        FD.TYPE_INT32,
        FD.TYPE_INT64,
        FD.TYPE_UINT32,
        FD.TYPE_UINT64,
        FD.TYPE_SINT32,
        FD.TYPE_SINT64,
        FD.TYPE_FIXED32,
        FD.TYPE_FIXED64,
        FD.TYPE_SFIXED32,
        FD.TYPE_SFIXED64,
    },
    float: {FD.TYPE_DOUBLE},
}


@pytest.mark.parametrize(("cls", "desc"), PAIRS, ids=PAIR_IDS)
def test_field_types_compatible(cls: type[Any], desc: Descriptor) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, fd = hints[f.name], desc.fields_by_name[f.name]
        where = f"{cls.__name__}.{f.name} ({hint}) vs {fd.full_name}"
        inner = _optional(hint)
        if inner is not None:
            assert fd.has_presence and not fd.is_repeated, f"{where}: None needs presence"
        shape = get_origin(inner or hint)
        assert (shape is dict) == _is_map(fd), f"{where}: dict ⇔ map"
        assert (shape is list) == (fd.is_repeated and not _is_map(fd)), f"{where}: list ⇔ repeated"
        for elem_hint, elem_fd in _elements(hint, fd):
            if _is_dataclass(elem_hint):
                assert elem_fd.message_type is not None, f"{where}: dataclass ⇔ message"
            elif _is_enum(elem_hint):
                assert elem_fd.type in (FD.TYPE_ENUM, FD.TYPE_STRING), f"{where}: enum"
            else:
                assert elem_fd.type in _COMPATIBLE.get(elem_hint, set()), where
    convert.converter(cls, desc)  # the converter agrees (it checks the same, recursively)


@pytest.mark.parametrize(("cls", "name", "py_enum", "fd"), ENUM_FIELDS, ids=ENUM_IDS)
def test_enum_values_map_both_ways(
    cls: type[Any], name: str, py_enum: type[enum.Enum], fd: FieldDescriptor
) -> None:
    default = cls()  # every nested spec/status dataclass has all-default fields
    assert isinstance(getattr(default, name), py_enum)
    msg_cls = convert.message_type(cls)
    assert msg_cls.DESCRIPTOR is fd.containing_type

    if fd.type == FD.TYPE_ENUM:
        enum_desc = fd.enum_type
        assert enum_desc is not None
        prefix = convert.enum_prefix(enum_desc.name)
        assert enum_desc.values_by_number[0].name == f"{prefix}_UNSPECIFIED"
        names = {f"{prefix}_{m.value}" for m in py_enum}
        assert names == {v.name for v in enum_desc.values if v.number != 0}
        for member in py_enum:
            msg = to_proto(dataclasses.replace(default, **{name: member}), msg_cls)
            number = getattr(msg, name)
            assert enum_desc.values_by_number[number].name == f"{prefix}_{member.value}"
            assert getattr(from_proto(msg, cls), name) is member
        unspecified = msg_cls(**{name: 0})
        assert getattr(from_proto(unspecified, cls), name) == getattr(default, name)
    else:
        for member in py_enum:
            msg = to_proto(dataclasses.replace(default, **{name: member}), msg_cls)
            assert getattr(msg, name) == member.value
            assert getattr(from_proto(msg, cls), name) is member
        assert getattr(from_proto(msg_cls(**{name: ""}), cls), name) == getattr(default, name)
        with pytest.raises(ConversionError, match="not a"):
            from_proto(msg_cls(**{name: "no-such-value"}), cls)


def test_enum_prefix() -> None:
    assert convert.enum_prefix("VMState") == "VM_STATE"
    assert convert.enum_prefix("NetworkMode") == "NETWORK_MODE"
    assert convert.enum_prefix("VolumeKind") == "VOLUME_KIND"
    assert convert.enum_prefix("HTTPRequestID") == "HTTP_REQUEST_ID"


# --- drift is detected ---------------------------------------------------------------------------


@dataclasses.dataclass
class _ExtraField:
    host_port: int = 0
    guest_port: int = 0
    protocol: str = ""
    host_addr: str = ""
    weight: int = 0


@dataclasses.dataclass
class _MissingField:
    host_port: int = 0
    guest_port: int = 0
    protocol: str = ""


@dataclasses.dataclass
class _WrongType:
    host_port: str = ""
    guest_port: int = 0
    protocol: str = ""
    host_addr: str = ""


class _BiggerState(enum.StrEnum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    PENDING = "PENDING"
    PAUSED = "PAUSED"
    ERROR = "ERROR"
    MIGRATING = "MIGRATING"


class _SmallerKind(enum.StrEnum):
    DISK = "DISK"


@dataclasses.dataclass
class _StatusWithBiggerEnum:
    state: _BiggerState = _BiggerState.STOPPED


def test_unknown_fields_raise_both_ways() -> None:
    with pytest.raises(ModelDriftError, match=r"dataclass fields missing from the message: weight"):
        to_proto(_ExtraField(), pb.PortForward)
    with pytest.raises(ModelDriftError, match=r"dataclass fields missing from the message: weight"):
        from_proto(pb.PortForward(), _ExtraField)
    with pytest.raises(ModelDriftError, match=r"message fields missing from the dataclass: host_a"):
        from_proto(pb.PortForward(), _MissingField)
    with pytest.raises(ModelDriftError, match=r"message fields missing from the dataclass: host_a"):
        to_proto(_MissingField(), pb.PortForward)
    with pytest.raises(ModelDriftError, match=r"host_port.*str.*int32"):
        to_proto(_WrongType(), pb.PortForward)


def test_enum_drift_raises() -> None:
    enum_desc = pb.DESCRIPTOR.enum_types_by_name["VMState"]
    with pytest.raises(ModelDriftError, match="MIGRATING has no VM_STATE_MIGRATING"):
        convert.enum_mapping(_BiggerState, enum_desc)
    volume_kind = pb.DESCRIPTOR.enum_types_by_name["VolumeKind"]
    with pytest.raises(ModelDriftError, match="VOLUME_KIND_WEIGHTS has no _SmallerKind member"):
        convert.enum_mapping(_SmallerKind, volume_kind)


def test_bad_values_raise_conversion_errors() -> None:
    spec = model.VMSpec(cpu_cores=2**31)
    with pytest.raises(ConversionError, match=r"cpu_cores"):
        to_proto(spec, pb.VMSpec)
    with pytest.raises(ConversionError, match=r"VMStatus.state.*99"):
        from_proto(pb.VMStatus(state=99), model.VMStatus)  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="expected VMSpec"):
        to_proto(model.VM(meta=model.ResourceMeta("x"), spec=model.VMStatus()), pb.VM)  # type: ignore[arg-type]


def test_missing_messages_read_as_defaults() -> None:
    vm = from_proto(pb.VM(meta=pb.ResourceMeta(name="a", id="1")), model.VM)
    assert vm.spec == model.VMSpec() and vm.status == model.VMStatus()
    assert vm.meta.name == "a" and vm.meta.id == "1"
    volume = from_proto(pb.Volume(), model.Volume)
    assert volume.spec.integrity is None and volume.spec.kind is model.VolumeKind.DISK
    # An all-empty nested message is still present on the wire and reads back as written.
    spec = model.ConsoleSpec(vm_id="", type="")
    wire = pb.Console.FromString(
        to_proto(model.Console(model.ResourceMeta("c"), spec=spec), pb.Console).SerializeToString()
    )
    assert from_proto(wire, model.Console).spec == spec


def test_typed_helpers() -> None:
    vm = model.VM(
        meta=model.ResourceMeta("demo", labels={"team": "a"}),
        spec=model.VMSpec(port_forwards=[model.PortForward(2222, 22)]),
        status=model.VMStatus(state=model.VMState.RUNNING, addresses={"user": ["10.0.2.15"]}),
    )
    msg = convert.vm_to_proto(vm)
    assert isinstance(msg, pb.VM)
    assert msg.status.state == pb.VM_STATE_RUNNING
    assert list(msg.status.addresses["user"].addresses) == ["10.0.2.15"]
    assert convert.vm_from_proto(msg) == vm
    assert convert.resource_from_proto("vm", convert.resource_to_proto(vm)) == vm
    assert set(convert.MESSAGE_TYPES) == set(model.RESOURCE_TYPES)


# --- round trips ---------------------------------------------------------------------------------

_TEXT = st.text(st.characters(categories=["L", "M", "N", "P", "S", "Zs"]), max_size=12)
_INT_RANGES = {
    **dict.fromkeys((FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32), (-(2**31), 2**31 - 1)),
    **dict.fromkeys((FD.TYPE_UINT32, FD.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64), (-(2**63), 2**63 - 1)),
    **dict.fromkeys((FD.TYPE_UINT64, FD.TYPE_FIXED64), (0, 2**64 - 1)),
}


def _element_strategy(hint: Any, fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    if _is_dataclass(hint):
        assert fd.message_type is not None
        return strategy(hint, fd.message_type)
    if _is_enum(hint):
        return st.sampled_from(list(hint))
    if hint is int:
        lo, hi = _INT_RANGES[fd.type]
        return st.integers(lo, hi)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: _TEXT,
        bytes: st.binary(max_size=12),
        bool: st.booleans(),
        float: st.floats(allow_nan=False, allow_infinity=False),
    }
    return simple[hint]


def _field_strategy(hint: Any, fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    inner = _optional(hint)
    if inner is not None:
        return st.none() | _field_strategy(inner, fd)
    if _is_map(fd):
        (key_hint, key_fd), *_ = _elements(hint, fd)
        _, val_hint = get_args(hint)
        entry = fd.message_type
        assert entry is not None
        val_fd = entry.fields_by_name["value"]
        if get_origin(val_hint) is list and val_fd.message_type is not None:
            (wrapped,) = val_fd.message_type.fields
            values = _field_strategy(val_hint, wrapped)
        else:
            values = _element_strategy(val_hint, val_fd)
        return st.dictionaries(_element_strategy(key_hint, key_fd), values, max_size=3)
    if fd.is_repeated:
        (item,) = get_args(hint)
        return st.lists(_element_strategy(item, fd), max_size=3)
    return _element_strategy(hint, fd)


def strategy(cls: type[Any], desc: Descriptor, **overrides: Any) -> st.SearchStrategy[Any]:
    """Arbitrary instances of ``cls``, built field by field from its type hints."""
    hints = get_type_hints(cls)
    fields = {
        f.name: _field_strategy(hints[f.name], desc.fields_by_name[f.name])
        for f in dataclasses.fields(cls)
    }
    return st.builds(cls, **{**fields, **overrides})


def _round_trip(obj: Any) -> None:
    msg_cls = convert.message_type(type(obj))
    msg = to_proto(obj, msg_cls)
    assert from_proto(msg, type(obj)) == obj
    wire = msg_cls.FromString(msg.SerializeToString(deterministic=True))
    assert from_proto(wire, type(obj)) == obj


KIND_STRATEGIES = {
    kind: strategy(cls, convert.descriptor(convert.message_type(cls)))
    for kind, cls in model.RESOURCE_TYPES.items()
}


@pytest.mark.parametrize("kind", sorted(KIND_STRATEGIES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip(kind: str, data: st.DataObject) -> None:
    obj = data.draw(KIND_STRATEGIES[kind], label=kind)
    _round_trip(obj)


_VOLUME = convert.descriptor(pb.Volume)
_VOLUME_SPEC = convert.descriptor(pb.VolumeSpec)
_INTEGRITY = convert.descriptor(pb.IntegrityConfig)


@settings(max_examples=40, deadline=None)
@given(
    strategy(
        model.Volume,
        _VOLUME,
        spec=strategy(model.VolumeSpec, _VOLUME_SPEC, integrity=st.none()),
    )
)
def test_round_trip_volume_without_integrity(volume: model.Volume) -> None:
    assert volume.spec.integrity is None
    assert not convert.volume_to_proto(volume).spec.HasField("integrity")
    _round_trip(volume)


@settings(max_examples=40, deadline=None)
@given(
    strategy(
        model.Volume,
        _VOLUME,
        spec=strategy(
            model.VolumeSpec,
            _VOLUME_SPEC,
            integrity=strategy(model.IntegrityConfig, _INTEGRITY),
        ),
    )
)
def test_round_trip_volume_with_integrity(volume: model.Volume) -> None:
    assert volume.spec.integrity is not None
    assert convert.volume_to_proto(volume).spec.HasField("integrity")
    _round_trip(volume)


# --- generated code ----------------------------------------------------------------------------


def test_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "infrasim_tui.rpc.codegen", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_code_imports_as_a_package() -> None:
    from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2_grpc

    assert vars(infrasim_pb2_grpc)["infrasim_dot_v1_dot_infrasim__pb2"] is pb
    assert pb.VM.__module__ == "infrasim_tui.rpc.gen.infrasim.v1.infrasim_pb2"
    for path in (p for p in codegen.GEN_ROOT.rglob("*") if p.suffix in (".py", ".pyi")):
        text = path.read_text()
        assert "from infrasim." not in text and "import infrasim." not in text, path


def test_check_names_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = tmp_path / "gen"
    shutil.copytree(codegen.GEN_ROOT, gen, ignore=shutil.ignore_patterns("__pycache__"))
    pb2 = gen / "infrasim/v1/infrasim_pb2.py"
    pb2.write_text(pb2.read_text() + "# edited\n")
    (gen / "infrasim/v1/infrasim_pb2_grpc.pyi").unlink()
    (gen / "infrasim/v1/old_pb2.py").write_text("")
    monkeypatch.setattr(codegen, "GEN_ROOT", gen)
    assert codegen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "generated code is stale; run ./dev proto" in err
    assert "infrasim/v1/infrasim_pb2.py: differs" in err
    assert "infrasim/v1/infrasim_pb2_grpc.pyi: missing" in err
    assert "infrasim/v1/old_pb2.py" in err
    assert "infrasim_pb2_grpc.py:" not in err
    # Regenerating repairs it, and then it is current.
    assert codegen.main([]) == 0
    assert not (gen / "infrasim/v1/old_pb2.py").exists()
    assert codegen.main(["--check"]) == 0
