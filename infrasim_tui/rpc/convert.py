"""Field-by-field conversion between the core's dataclasses and the generated API messages.

The mapping is generic: a dataclass and a message correspond when they have the same field names
with compatible types, and nested messages are found through the message's descriptors, never by
naming conventions. Type correspondences:

=============================  ===================================================================
dataclass field                message field
=============================  ===================================================================
``str`` ``bytes`` ``bool``     ``string`` ``bytes`` ``bool``
``int``                        any integer type (range checked when set)
``float``                      ``double``
StrEnum                        a proto enum whose values are ``<ENUM_NAME>_<VALUE>`` (``VMState``
                               → ``VM_STATE_RUNNING``), ``<ENUM_NAME>_UNSPECIFIED = 0`` reading as
                               the dataclass field's default; or a ``string`` holding the value
                               (``""`` reads as the default)
dataclass                      a message (always marked present when written; unset reads as the
                               field's default)
``X | None``                   a message, or a proto3 ``optional`` scalar (unset ⇔ ``None``)
``list[X]``                    ``repeated X``
``dict[K, V]``                 ``map<K, V>``; ``V = list[X]`` maps to a message with a single
                               ``repeated X`` field (``map<string, AddressList>``)
=============================  ===================================================================

Every dataclass field must exist in the message and every message field in the dataclass, in
both directions; a mismatch raises :class:`ModelDriftError` naming both sides.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from infrasim_tui.core import model
from infrasim_tui.rpc.gen.infrasim.v1 import infrasim_pb2 as pb

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class ConversionError(ValueError):
    """A value cannot be represented on the other side (bad enum value, int out of range, ...)."""


class ModelDriftError(ConversionError):
    """The dataclass and the message do not correspond field for field."""


_FD = FieldDescriptor
_INT_TYPES = frozenset(
    {
        _FD.TYPE_INT32,
        _FD.TYPE_INT64,
        _FD.TYPE_UINT32,
        _FD.TYPE_UINT64,
        _FD.TYPE_SINT32,
        _FD.TYPE_SINT64,
        _FD.TYPE_FIXED32,
        _FD.TYPE_FIXED64,
        _FD.TYPE_SFIXED32,
        _FD.TYPE_SFIXED64,
    }
)
_SIMPLE_TYPES: dict[type, frozenset[int]] = {
    str: frozenset({_FD.TYPE_STRING}),
    bytes: frozenset({_FD.TYPE_BYTES}),
    bool: frozenset({_FD.TYPE_BOOL}),
    int: _INT_TYPES,
    float: frozenset({_FD.TYPE_DOUBLE}),
}
_TYPE_NAMES = {
    getattr(_FD, name): name.removeprefix("TYPE_").lower()
    for name in dir(_FD)
    if name.startswith("TYPE_")
}

_NO_DEFAULT: Any = object()


def enum_prefix(enum_name: str) -> str:
    """``VMState`` → ``VM_STATE``: the prefix of a proto enum's value names."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", enum_name).upper()


def enum_value_name(enum_desc: EnumDescriptor, member: enum.Enum) -> str:
    """The proto enum value name for a Python enum member (``VM_STATE_RUNNING``)."""
    return f"{enum_prefix(enum_desc.name)}_{str(member.value).upper()}"


# --- type analysis -----------------------------------------------------------------------------


def _describe(fd: FieldDescriptor) -> str:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key, val = (fd.message_type.fields_by_name[n] for n in ("key", "value"))
        return f"map<{_elem_name(key)}, {_elem_name(val)}>"
    return ("repeated " if fd.is_repeated else "") + _elem_name(fd)


def _elem_name(fd: FieldDescriptor) -> str:
    if fd.message_type is not None:
        return fd.message_type.full_name
    if fd.enum_type is not None:
        return fd.enum_type.full_name
    return _TYPE_NAMES.get(fd.type, str(fd.type))


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not get_args(hint) else str(hint)


def _optional_arg(hint: Any) -> Any | None:
    """``X`` for ``X | None`` (and ``Optional[X]``), else None."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0]
    return None


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _field_default(f: dataclasses.Field[Any]) -> Callable[[], Any] | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return lambda: value
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory
    return None


# --- scalar converters -------------------------------------------------------------------------


class _Scalar:
    """One scalar element (a singular field, a list item, a map key or value)."""

    def __init__(
        self,
        encode: Callable[[Any], Any],
        decode: Callable[[Any, Callable[[], Any] | None], Any],
    ) -> None:
        self.encode = encode
        self.decode = decode  # (raw, default-or-None) -> value


def _identity_decode(raw: Any, default: Callable[[], Any] | None) -> Any:
    return raw


def _float_decode(raw: Any, default: Callable[[], Any] | None) -> Any:
    return float(raw)


def _scalar(hint: Any, fd: FieldDescriptor, where: str) -> _Scalar:
    """The converter for a non-message element, or ModelDriftError if the types don't fit."""
    if _is_enum(hint):
        return _enum_scalar(hint, fd, where)
    wanted = _SIMPLE_TYPES.get(hint) if isinstance(hint, type) else None
    if wanted is None or fd.type not in wanted:
        raise ModelDriftError(
            f"{where}: dataclass type {_hint_name(hint)} is not compatible with "
            f"proto type {_elem_name(fd)}"
        )
    if hint is float:
        return _Scalar(lambda v: v, _float_decode)
    return _Scalar(lambda v: v, _identity_decode)


def _enum_scalar(py_enum: type[enum.Enum], fd: FieldDescriptor, where: str) -> _Scalar:
    if fd.type == _FD.TYPE_STRING:
        by_value = {str(m.value): m for m in py_enum}

        def decode_str(raw: Any, default: Callable[[], Any] | None) -> Any:
            if raw == "" and default is not None:
                return default()
            try:
                return by_value[raw]
            except KeyError:
                valid = ", ".join(repr(v) for v in by_value)
                raise ConversionError(
                    f"{where}: {raw!r} is not a {py_enum.__name__} (one of {valid})"
                ) from None

        return _Scalar(lambda v: str(py_enum(v).value), decode_str)

    enum_desc = fd.enum_type
    if fd.type != _FD.TYPE_ENUM or enum_desc is None:
        raise ModelDriftError(
            f"{where}: dataclass type {py_enum.__name__} needs a proto enum or string, "
            f"not {_elem_name(fd)}"
        )
    to_number, to_member = enum_mapping(py_enum, enum_desc, where)

    def encode_enum(v: Any) -> int:
        return to_number[py_enum(v)]

    def decode_enum(raw: Any, default: Callable[[], Any] | None) -> Any:
        member = to_member.get(raw)
        if member is not None:
            return member
        if raw == 0 and default is not None:
            return default()
        name = enum_desc.values_by_number[raw].name if raw in enum_desc.values_by_number else raw
        raise ConversionError(
            f"{where}: {enum_desc.full_name} value {name} has no {py_enum.__name__}"
        )

    return _Scalar(encode_enum, decode_enum)


def enum_mapping(
    py_enum: type[enum.Enum], enum_desc: EnumDescriptor, where: str = ""
) -> tuple[dict[enum.Enum, int], dict[int, enum.Enum]]:
    """Member → proto number and back; every member and every proto value except the 0
    (``*_UNSPECIFIED``) one must have a counterpart, else ModelDriftError."""
    where = where or f"{py_enum.__name__} ↔ {enum_desc.full_name}"
    to_number: dict[enum.Enum, int] = {}
    for member in py_enum:
        name = enum_value_name(enum_desc, member)
        value = enum_desc.values_by_name.get(name)
        if value is None:
            raise ModelDriftError(f"{where}: {py_enum.__name__}.{member.name} has no {name}")
        if value.number == 0:
            raise ModelDriftError(f"{where}: {name} is 0, which is reserved for UNSPECIFIED")
        to_number[member] = value.number
    to_member = {n: m for m, n in to_number.items()}
    for value in enum_desc.values:
        if value.number != 0 and value.number not in to_member:
            raise ModelDriftError(f"{where}: {value.name} has no {py_enum.__name__} member")
    return to_number, to_member


# --- message converters ------------------------------------------------------------------------


class _MessageConv(typing.Protocol):
    def encode(self, value: Any, msg: Message) -> None: ...
    def decode(self, msg: Message) -> Any: ...


class _Field:
    """One dataclass field ↔ one message field."""

    def __init__(
        self,
        name: str,
        encode: Callable[[Any, Message], None],
        decode: Callable[[Message], Any],
    ) -> None:
        self.name = name
        self.encode = encode
        self.decode = decode


class _DataclassConv:
    """A dataclass ↔ a message type; built once per pair and cached."""

    def __init__(self, cls: type[Any], desc: Descriptor) -> None:
        self.cls = cls
        self.desc = desc
        self.fields: list[_Field] = []

    def encode(self, value: Any, msg: Message) -> None:
        if type(value) is not self.cls:
            raise ConversionError(
                f"expected {self.cls.__name__} for {self.desc.full_name}, "
                f"got {type(value).__name__}"
            )
        for f in self.fields:
            f.encode(getattr(value, f.name), msg)

    def decode(self, msg: Message) -> Any:
        if msg.DESCRIPTOR is not self.desc:
            raise ConversionError(f"expected {self.desc.full_name}, got {msg.DESCRIPTOR.full_name}")
        return self.cls(**{f.name: f.decode(msg) for f in self.fields})


class _WrapperConv:
    """A non-dataclass value ↔ a message with a single field (``list[str]`` ↔ ``AddressList``)."""

    def __init__(self, field: _Field) -> None:
        self.field = field

    def encode(self, value: Any, msg: Message) -> None:
        self.field.encode(value, msg)

    def decode(self, msg: Message) -> Any:
        return self.field.decode(msg)


_lock = threading.RLock()
_convs: dict[tuple[type[Any], Descriptor], _DataclassConv] = {}


def converter(cls: type[Any], desc: Descriptor) -> _DataclassConv:
    """The (cached) converter for a dataclass and a message type; raises ModelDriftError when
    they do not correspond field for field, including through nested messages."""
    key = (cls, desc)
    with _lock:
        conv = _convs.get(key)
        if conv is not None:
            return conv
        if not _is_dataclass_type(cls):
            raise ModelDriftError(f"{cls!r} is not a dataclass (for message {desc.full_name})")
        conv = _convs[key] = _DataclassConv(cls, desc)  # registered first: recursive types
        try:
            conv.fields = _compile_fields(cls, desc)
        except BaseException:
            del _convs[key]
            raise
        return conv


def _compile_fields(cls: type[Any], desc: Descriptor) -> list[_Field]:
    hints = get_type_hints(cls)
    dc_fields = {f.name: f for f in dataclasses.fields(cls)}
    pair = f"{cls.__module__}.{cls.__qualname__} ↔ {desc.full_name}"
    only_dc = [n for n in dc_fields if n not in desc.fields_by_name]
    only_pb = [n for n in desc.fields_by_name if n not in dc_fields]
    if only_dc or only_pb:
        parts = []
        if only_dc:
            parts.append(f"dataclass fields missing from the message: {', '.join(only_dc)}")
        if only_pb:
            parts.append(f"message fields missing from the dataclass: {', '.join(only_pb)}")
        raise ModelDriftError(f"{pair}: {'; '.join(parts)}")
    out = []
    for name, f in dc_fields.items():
        if not f.init:
            raise ModelDriftError(f"{pair}: field {name} is not an __init__ field")
        fd = desc.fields_by_name[name]
        where = f"{cls.__qualname__}.{name} ↔ {fd.full_name}"
        out.append(_compile_field(hints[name], fd, _field_default(f), where))
    return out


def _message_conv(hint: Any, desc: Descriptor, where: str, *, wrapper: bool) -> _MessageConv:
    if _is_dataclass_type(hint):
        return converter(hint, desc)
    if wrapper and len(desc.fields) == 1:
        (inner,) = desc.fields
        return _WrapperConv(_compile_field(hint, inner, None, f"{where} ({desc.full_name})"))
    raise ModelDriftError(
        f"{where}: dataclass type {_hint_name(hint)} is not compatible with message "
        f"{desc.full_name}"
    )


def _guard(where: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise protobuf's TypeError/ValueError on a bad value with the field named."""

    def guarded(*args: Any) -> Any:
        try:
            return fn(*args)
        except ConversionError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ConversionError(f"{where}: {exc}") from exc

    return guarded


def _compile_field(
    hint: Any, fd: FieldDescriptor, default: Callable[[], Any] | None, where: str
) -> _Field:
    name = fd.name
    optional = _optional_arg(hint)

    if _is_map(fd):
        return _compile_map(hint, fd, where)

    if fd.is_repeated:
        if get_origin(hint) is not list:
            raise ModelDriftError(
                f"{where}: dataclass type {_hint_name(hint)} is not compatible with {_describe(fd)}"
            )
        (item,) = get_args(hint)
        if fd.message_type is not None:
            mconv = _message_conv(item, fd.message_type, where, wrapper=False)

            def enc_rep_msg(value: Any, msg: Message) -> None:
                container = getattr(msg, name)
                for v in value:
                    mconv.encode(v, container.add())

            def dec_rep_msg(msg: Message) -> Any:
                return [mconv.decode(m) for m in getattr(msg, name)]

            return _Field(name, _guard(where, enc_rep_msg), _guard(where, dec_rep_msg))
        sc = _scalar(item, fd, where)

        def enc_rep(value: Any, msg: Message) -> None:
            getattr(msg, name).extend([sc.encode(v) for v in value])

        def dec_rep(msg: Message) -> Any:
            return [sc.decode(v, None) for v in getattr(msg, name)]

        return _Field(name, _guard(where, enc_rep), _guard(where, dec_rep))

    if fd.message_type is not None:
        target = hint if optional is None else optional
        mconv = _message_conv(target, fd.message_type, where, wrapper=False)

        def enc_msg(value: Any, msg: Message) -> None:
            if value is None:
                if optional is None:
                    raise ConversionError(f"{where}: None for a field that is not optional")
                msg.ClearField(name)
                return
            sub = getattr(msg, name)
            sub.SetInParent()
            mconv.encode(value, sub)

        def dec_msg(msg: Message) -> Any:
            if not msg.HasField(name):
                if optional is not None:
                    return None
                if default is not None:
                    return default()
            return mconv.decode(getattr(msg, name))

        return _Field(name, _guard(where, enc_msg), _guard(where, dec_msg))

    if optional is not None:
        if not fd.has_presence:
            raise ModelDriftError(
                f"{where}: {_hint_name(hint)} needs a proto3 `optional` field to represent None"
            )
        sc = _scalar(optional, fd, where)

        def enc_opt(value: Any, msg: Message) -> None:
            if value is None:
                msg.ClearField(name)
            else:
                setattr(msg, name, sc.encode(value))

        def dec_opt(msg: Message) -> Any:
            return sc.decode(getattr(msg, name), None) if msg.HasField(name) else None

        return _Field(name, _guard(where, enc_opt), _guard(where, dec_opt))

    sc = _scalar(hint, fd, where)

    def enc_scalar(value: Any, msg: Message) -> None:
        setattr(msg, name, sc.encode(value))

    def dec_scalar(msg: Message) -> Any:
        return sc.decode(getattr(msg, name), default)

    return _Field(name, _guard(where, enc_scalar), _guard(where, dec_scalar))


def _compile_map(hint: Any, fd: FieldDescriptor, where: str) -> _Field:
    name = fd.name
    entry = fd.message_type
    assert entry is not None
    if get_origin(hint) is not dict:
        raise ModelDriftError(
            f"{where}: dataclass type {_hint_name(hint)} is not compatible with {_describe(fd)}"
        )
    key_hint, val_hint = get_args(hint)
    key_fd, val_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
    key = _scalar(key_hint, key_fd, where)
    if val_fd.message_type is not None:
        vconv = _message_conv(val_hint, val_fd.message_type, where, wrapper=True)

        def enc_map_msg(value: Any, msg: Message) -> None:
            container = getattr(msg, name)
            for k, v in value.items():
                vconv.encode(v, container[key.encode(k)])

        def dec_map_msg(msg: Message) -> Any:
            return {key.decode(k, None): vconv.decode(v) for k, v in getattr(msg, name).items()}

        return _Field(name, _guard(where, enc_map_msg), _guard(where, dec_map_msg))

    val = _scalar(val_hint, val_fd, where)

    def enc_map(value: Any, msg: Message) -> None:
        container = getattr(msg, name)
        for k, v in value.items():
            container[key.encode(k)] = val.encode(v)

    def dec_map(msg: Message) -> Any:
        return {key.decode(k, None): val.decode(v, None) for k, v in getattr(msg, name).items()}

    return _Field(name, _guard(where, enc_map), _guard(where, dec_map))


# --- public API --------------------------------------------------------------------------------


def to_proto(obj: Any, msg_cls: type[M]) -> M:
    """Dataclass instance → a new ``msg_cls`` message, field by field."""
    msg = msg_cls()
    converter(type(obj), descriptor(msg_cls)).encode(obj, msg)
    return msg


def from_proto(msg: Message, cls: type[T]) -> T:
    """Message → a new ``cls`` dataclass instance, field by field."""
    return typing.cast(T, converter(cls, descriptor(msg)).decode(msg))


def descriptor(msg: Message | type[Message]) -> Descriptor:
    """A message's (or message class's) descriptor, typed for the pure-Python API."""
    return typing.cast(Descriptor, msg.DESCRIPTOR)


def message_type(cls: type[Any]) -> type[Message]:
    """The generated message class of the same name as a model dataclass (``VM`` → ``pb.VM``)."""
    desc = pb.DESCRIPTOR.message_types_by_name.get(cls.__name__)
    if desc is None:
        raise ModelDriftError(f"no message {cls.__name__} in {pb.DESCRIPTOR.name}")
    msg_cls: type[Message] = getattr(pb, cls.__name__)
    return msg_cls


# Kind ("vm", "volume", ...) → message class, for code that handles any resource.
MESSAGE_TYPES: dict[str, type[Message]] = {
    kind: message_type(cls) for kind, cls in model.RESOURCE_TYPES.items()
}


def resource_to_proto(obj: model.Resource) -> Message:
    return to_proto(obj, MESSAGE_TYPES[obj.kind])


def resource_from_proto(kind: str, msg: Message) -> model.Resource:
    return typing.cast(model.Resource, from_proto(msg, model.RESOURCE_TYPES[kind]))


def vm_to_proto(vm: model.VM) -> pb.VM:
    return to_proto(vm, pb.VM)


def vm_from_proto(msg: pb.VM) -> model.VM:
    return from_proto(msg, model.VM)


def network_to_proto(network: model.Network) -> pb.Network:
    return to_proto(network, pb.Network)


def network_from_proto(msg: pb.Network) -> model.Network:
    return from_proto(msg, model.Network)


def volume_to_proto(volume: model.Volume) -> pb.Volume:
    return to_proto(volume, pb.Volume)


def volume_from_proto(msg: pb.Volume) -> model.Volume:
    return from_proto(msg, model.Volume)


def snapshot_to_proto(snapshot: model.Snapshot) -> pb.Snapshot:
    return to_proto(snapshot, pb.Snapshot)


def snapshot_from_proto(msg: pb.Snapshot) -> model.Snapshot:
    return from_proto(msg, model.Snapshot)


def console_to_proto(console: model.Console) -> pb.Console:
    return to_proto(console, pb.Console)


def console_from_proto(msg: pb.Console) -> model.Console:
    return from_proto(msg, model.Console)


def qos_profile_to_proto(profile: model.QosProfile) -> pb.QosProfile:
    return to_proto(profile, pb.QosProfile)


def qos_profile_from_proto(msg: pb.QosProfile) -> model.QosProfile:
    return from_proto(msg, model.QosProfile)


def benchmark_run_to_proto(run: model.BenchmarkRun) -> pb.BenchmarkRun:
    return to_proto(run, pb.BenchmarkRun)


def benchmark_run_from_proto(msg: pb.BenchmarkRun) -> model.BenchmarkRun:
    return from_proto(msg, model.BenchmarkRun)
