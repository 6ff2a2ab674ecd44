"""Terraform values ⇄ plain Python, guided by cty types. Pure: no I/O, no protobuf.

Terraform sends values as msgpack (and stored state as JSON) with no type information of
their own: the same bytes mean a list or a set, a map or an object, depending on the schema.
So every function here takes the cty type (terraform's JSON type syntax, see
:data:`~infrasim_tui.terraform.framework.CtyType`).

Python side: str, bool, int (a number that is integral), float, None (null), list (list, set
and tuple), dict (object and map) and :class:`~infrasim_tui.terraform.framework.Unknown`.
An unknown is any msgpack extension type; its code and payload are kept so refinements
(ext 12) go back to terraform byte for byte. ``"dynamic"`` values travel as
``[type JSON, value]``; they decode to the plain value and encode with the type implied by
the Python value (a list becomes a tuple, a dict an object).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import msgpack

from .framework import Block, CtyType, Path, Schema, Unknown

PRIMITIVES = ("string", "number", "bool")
NULL = b"\xc0"  # msgpack nil: a null object (destroyed, gone)


class TypeMismatch(ValueError):
    """A value that does not fit its type; ``path`` says where."""

    def __init__(self, path: Path, message: str) -> None:
        where = format_path(path) or "value"
        super().__init__(f"{where}: {message}")
        self.path = path


def format_path(path: Path) -> str:
    """``("disk", 0, "size")`` → ``disk[0].size`` (for messages)."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


# -- types --------------------------------------------------------------------------------


def kind(ty: CtyType) -> str:
    """"string" | "number" | "bool" | "dynamic" | "list" | "set" | "map" | "object" | "tuple"."""
    if isinstance(ty, str):
        if ty in (*PRIMITIVES, "dynamic"):
            return ty
    elif isinstance(ty, list | tuple) and ty and ty[0] in ("list", "set", "map", "object",
                                                               "tuple"):
        return str(ty[0])
    raise ValueError(f"not a cty type: {ty!r}")


def block_type(block: Block) -> CtyType:
    """The type of a nested block's value: an object, or a list/set of them."""
    obj = ["object", {a.name: a.type for a in block.attrs}]
    if block.nesting == "single":
        return obj
    if block.nesting in ("list", "set"):
        return [block.nesting, obj]
    raise ValueError(f"block {block.name}: unsupported nesting {block.nesting!r}")


def schema_type(schema: Schema) -> CtyType:
    """The object type of a whole resource/data source/provider config."""
    atys: dict[str, CtyType] = {a.name: a.type for a in schema.attrs}
    for b in schema.blocks:
        atys[b.name] = block_type(b)
    return ["object", atys]


def implied_type(value: Any) -> CtyType:
    """The cty type terraform would infer for a plain Python value (for dynamic values)."""
    if value is None or isinstance(value, Unknown):
        return "dynamic"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return ["tuple", [implied_type(v) for v in value]]
    if isinstance(value, dict):
        return ["object", {str(k): implied_type(v) for k, v in value.items()}]
    raise ValueError(f"no cty type for {type(value).__name__}")


# -- msgpack ------------------------------------------------------------------------------


def _ext_hook(code: int, data: bytes) -> Unknown:
    return Unknown(raw=data, ext_code=code)


def decode_msgpack(data: bytes, ty: CtyType) -> Any:
    """A msgpack DynamicValue as Python; empty bytes are null."""
    if not data:
        return None
    raw = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook,
                          use_list=True)
    return _from_wire(raw, ty, (), msgpack_dynamic=True)


def encode_msgpack(value: Any, ty: CtyType) -> bytes:
    """Python as a msgpack DynamicValue of type ``ty`` (TypeMismatch when it does not fit)."""
    out: bytes = msgpack.packb(_to_wire(value, ty, ()), use_bin_type=True)
    return out


def _number(value: Any, path: Path) -> int | float:
    if isinstance(value, bool):
        raise TypeMismatch(path, f"expected a number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, str):  # cty sends numbers that fit no machine type as strings
        try:
            return int(value)
        except ValueError:
            try:
                return _number(float(value), path)
            except ValueError:
                pass
    raise TypeMismatch(path, f"expected a number, got {value!r}")


def _from_wire(raw: Any, ty: CtyType, path: Path, *, msgpack_dynamic: bool) -> Any:
    """Decoded msgpack/JSON (plain containers) → typed Python."""
    if isinstance(raw, Unknown):
        return raw
    k = kind(ty)
    if k == "dynamic":
        return _dynamic_from_wire(raw, path, msgpack_dynamic=msgpack_dynamic)
    if raw is None:
        return None
    if k == "string":
        if isinstance(raw, str):
            return raw
        if isinstance(raw, bytes):
            return raw.decode()
        raise TypeMismatch(path, f"expected a string, got {raw!r}")
    if k == "number":
        return _number(raw, path)
    if k == "bool":
        if isinstance(raw, bool):
            return raw
        raise TypeMismatch(path, f"expected a bool, got {raw!r}")
    if k in ("list", "set"):
        if not isinstance(raw, list):
            raise TypeMismatch(path, f"expected a {k}, got {raw!r}")
        return [_from_wire(v, ty[1], (*path, i), msgpack_dynamic=msgpack_dynamic)
                for i, v in enumerate(raw)]
    if k == "tuple":
        etys = ty[1]
        if not isinstance(raw, list) or len(raw) != len(etys):
            raise TypeMismatch(path, f"expected a tuple of {len(etys)}, got {raw!r}")
        return [_from_wire(v, t, (*path, i), msgpack_dynamic=msgpack_dynamic)
                for i, (v, t) in enumerate(zip(raw, etys, strict=True))]
    if not isinstance(raw, dict):
        raise TypeMismatch(path, f"expected an {k}, got {raw!r}")
    if k == "map":
        return {str(key): _from_wire(v, ty[1], (*path, str(key)),
                                     msgpack_dynamic=msgpack_dynamic)
                for key, v in raw.items()}
    atys: dict[str, CtyType] = ty[1]
    # Attributes missing from the wire are null; unknown ones are dropped (a removed attribute
    # in old state: UpgradeResourceState is where they go away).
    return {name: _from_wire(raw.get(name), aty, (*path, name), msgpack_dynamic=msgpack_dynamic)
            for name, aty in atys.items()}


def _dynamic_from_wire(raw: Any, path: Path, *, msgpack_dynamic: bool) -> Any:
    if raw is None:
        return None
    if msgpack_dynamic:  # [type JSON (bin), value]
        if not (isinstance(raw, list) and len(raw) == 2):
            raise TypeMismatch(path, f"expected a [type, value] pair, got {raw!r}")
        import json

        tjson = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return _from_wire(raw[1], json.loads(tjson), path, msgpack_dynamic=True)
    if isinstance(raw, dict) and set(raw) == {"value", "type"}:  # JSON state
        return _from_wire(raw["value"], raw["type"], path, msgpack_dynamic=False)
    return _from_wire(raw, implied_type(raw), path, msgpack_dynamic=False)


def _to_wire(value: Any, ty: CtyType, path: Path) -> Any:
    """Typed Python → msgpack-ready plain containers (unknowns as ExtType)."""
    if isinstance(value, Unknown):
        return msgpack.ExtType(value.ext_code, value.raw)
    k = kind(ty)
    if k == "dynamic":
        if value is None:
            return None
        import json

        ity = implied_type(value)
        tjson = json.dumps(ity, separators=(",", ":")).encode()
        return [tjson, _to_wire(value, ity, path)]
    if value is None:
        return None
    if k == "string":
        if isinstance(value, str):
            return value
        raise TypeMismatch(path, f"expected a string, got {value!r}")
    if k == "number":
        n = _number(value, path)
        if isinstance(n, int) and not -(2**63) <= n < 2**64:
            return str(n)  # beyond msgpack integers: cty parses the decimal string
        return n
    if k == "bool":
        if isinstance(value, bool):
            return value
        raise TypeMismatch(path, f"expected a bool, got {value!r}")
    if k in ("list", "set", "tuple"):
        if not isinstance(value, list | tuple):
            raise TypeMismatch(path, f"expected a {k} (a Python list), got {value!r}")
        if k == "tuple":
            if len(value) != len(ty[1]):
                raise TypeMismatch(path, f"expected a tuple of {len(ty[1])}, got {value!r}")
            return [_to_wire(v, t, (*path, i)) for i, (v, t) in enumerate(zip(value, ty[1],
                                                                             strict=True))]
        return [_to_wire(v, ty[1], (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise TypeMismatch(path, f"expected an {k} (a Python dict), got {value!r}")
    if k == "map":
        return {str(key): _to_wire(v, ty[1], (*path, str(key))) for key, v in value.items()}
    atys: dict[str, CtyType] = ty[1]
    extra = sorted(set(value) - set(atys))
    if extra:
        raise TypeMismatch(path, f"attribute(s) not in the schema: {', '.join(extra)}")
    return {name: _to_wire(value.get(name), aty, (*path, name)) for name, aty in atys.items()}


# -- JSON (stored state) ------------------------------------------------------------------


def decode_json(data: bytes | str, ty: CtyType) -> Any:
    """JSON (terraform's stored state, ``RawState.json``) as Python; empty is null."""
    import json

    if not data:
        return None
    return from_plain(json.loads(data), ty)


def from_plain(value: Any, ty: CtyType) -> Any:
    """Plain decoded JSON (or a dict an upgrade function returned) shaped to ``ty``: numbers
    normalised, missing attributes null, attributes the type lacks dropped."""
    return _from_wire(value, ty, (), msgpack_dynamic=False)


# -- schema-guided helpers ----------------------------------------------------------------


def decode_object(data: bytes, schema: Schema) -> dict[str, Any] | None:
    """A whole config/state object from msgpack (None when null)."""
    out = decode_msgpack(data, schema_type(schema))
    if isinstance(out, Unknown):  # wholly unknown: every field unknown, so callers index it
        return {name: out for name in (*[a.name for a in schema.attrs],
                                       *[b.name for b in schema.blocks])}
    return out if out is None else normalize(out, schema)


def encode_object(value: dict[str, Any] | None, schema: Schema) -> bytes:
    """A whole state object as msgpack; see :func:`normalize` for what is filled in."""
    if value is None:
        return NULL
    return encode_msgpack(normalize(value, schema), schema_type(schema))


def normalize(obj: dict[str, Any], schema: Schema) -> dict[str, Any]:
    """Every attribute present (missing → null); list/set blocks never null (→ []) since
    terraform represents absent blocks as empty collections."""
    out = dict(obj)
    for a in schema.attrs:
        out.setdefault(a.name, None)
    for b in schema.blocks:
        sub = Schema(attrs=b.attrs)
        v = out.get(b.name)
        if b.nesting == "single":
            out[b.name] = normalize(v, sub) if isinstance(v, dict) else v
        elif v is None:
            out[b.name] = []
        elif isinstance(v, list):
            out[b.name] = [normalize(e, sub) if isinstance(e, dict) else e for e in v]
    return out


def canonical(value: Any, ty: CtyType) -> Hashable:
    """A hashable form where equal cty values are equal: sets compare without order,
    1 == 1.0, and an unknown equals nothing known."""
    if isinstance(value, Unknown):
        return ("<unknown>", value.ext_code, value.raw)
    if value is None:
        return None
    k = kind(ty)
    if k == "dynamic":
        return canonical(value, implied_type(value))
    if k in PRIMITIVES:
        return (k, value)
    if k == "list":
        return ("list", tuple(canonical(v, ty[1]) for v in value))
    if k == "tuple":
        return ("tuple", tuple(canonical(v, t) for v, t in zip(value, ty[1], strict=True)))
    if k == "set":
        return ("set", tuple(sorted((canonical(v, ty[1]) for v in value), key=repr)))
    if k == "map":
        return ("map", tuple(sorted((str(key), canonical(v, ty[1]))
                                    for key, v in value.items())))
    return ("object", tuple((name, canonical(value.get(name), aty))
                            for name, aty in sorted(ty[1].items())))


def equal(a: Any, b: Any, ty: CtyType) -> bool:
    """cty equality of two Python values of type ``ty`` (sets are unordered)."""
    return canonical(a, ty) == canonical(b, ty)


__all__ = ["TypeMismatch", "block_type", "canonical", "decode_json",
           "decode_msgpack", "decode_object", "encode_msgpack", "encode_object", "equal",
           "format_path", "from_plain", "implied_type", "kind", "normalize", "schema_type"]
