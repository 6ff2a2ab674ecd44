"""Framework types → tfplugin6 messages: schemas, diagnostics, attribute paths. Pure.

Only protobuf message construction lives here (no gRPC, no msgpack), so the mapping that
terraform depends on (nesting modes, type JSON, path steps) is unit-testable on its own.
"""

from __future__ import annotations

from typing import Any

from .framework import Attr, Block, CtyType, Diagnostics, Path, Schema
from .gen import tfplugin6_pb2 as pb
from .values import kind, schema_type

_NESTING = {
    "single": pb.Schema.NestedBlock.SINGLE,
    "list": pb.Schema.NestedBlock.LIST,
    "set": pb.Schema.NestedBlock.SET,
}


def type_json(ty: CtyType) -> bytes:
    """A cty type in terraform's JSON type syntax (compact, as terraform writes it)."""
    import json  # here: only GetProviderSchema needs it, not every start

    kind(ty)  # refuse a malformed type here, not in terraform's error message
    return json.dumps(ty, separators=(",", ":")).encode()


def attr_to_proto(a: Attr) -> pb.Schema.Attribute:
    if not (a.required or a.optional or a.computed):
        raise ValueError(f"attribute {a.name}: set one of required, optional, computed")
    if a.required and (a.optional or a.computed):
        raise ValueError(f"attribute {a.name}: required excludes optional and computed")
    return pb.Schema.Attribute(
        name=a.name, type=type_json(a.type), description=a.description,
        required=a.required, optional=a.optional, computed=a.computed, sensitive=a.sensitive,
        description_kind=pb.PLAIN,
    )


def block_to_proto(b: Block) -> pb.Schema.NestedBlock:
    if b.nesting not in _NESTING:
        raise ValueError(f"block {b.name}: nesting must be one of {', '.join(_NESTING)}")
    return pb.Schema.NestedBlock(
        type_name=b.name,
        block=pb.Schema.Block(attributes=[attr_to_proto(a) for a in b.attrs],
                              description=b.description, description_kind=pb.PLAIN),
        nesting=_NESTING[b.nesting], min_items=b.min_items, max_items=b.max_items,
    )


def schema_to_proto(schema: Schema) -> pb.Schema:
    return pb.Schema(
        version=schema.version,
        block=pb.Schema.Block(
            version=schema.version,
            attributes=[attr_to_proto(a) for a in schema.attrs],
            block_types=[block_to_proto(b) for b in schema.blocks],
            description=schema.description,
            description_kind=pb.PLAIN,
        ),
    )


def path_to_proto(path: Path, schema: Schema | None = None) -> pb.AttributePath:
    """An attribute path as terraform's steps.

    With the schema, a name is an attribute of an object or a key of a map, as the type at
    that point says; ints index lists. Paths stop at a set (its elements have no index
    terraform could map back to the configuration). Without a schema: ints are list
    indexes, names at the start or after an index are attributes, a name after a name is a
    map key.
    """
    steps: list[pb.AttributePath.Step] = []
    ty: Any = schema_type(schema) if schema is not None else None  # None: not known
    prev: str | int | None = None
    for step in path:
        k = _kind_or_none(ty)
        if k == "set":
            break
        if isinstance(step, int):
            steps.append(pb.AttributePath.Step(element_key_int=step))
            if k == "list":
                ty = ty[1]
            elif k == "tuple" and 0 <= step < len(ty[1]):
                ty = ty[1][step]
            else:
                ty = None
        elif k == "object" or (k is None and (prev is None or isinstance(prev, int))):
            steps.append(pb.AttributePath.Step(attribute_name=step))
            ty = ty[1].get(step) if k == "object" else None
        else:
            steps.append(pb.AttributePath.Step(element_key_string=step))
            ty = ty[1] if k == "map" else None
        prev = step
    return pb.AttributePath(steps=steps)


def _kind_or_none(ty: CtyType | None) -> str | None:
    if ty is None:
        return None
    k = kind(ty)
    return None if k == "dynamic" else k


def diags_to_proto(diags: Diagnostics, schema: Schema | None = None) -> list[pb.Diagnostic]:
    out = []
    for d in diags.items:
        msg = pb.Diagnostic(
            severity=pb.Diagnostic.ERROR if d.severity == "error" else pb.Diagnostic.WARNING,
            summary=d.summary, detail=d.detail,
        )
        if d.path:
            msg.attribute.CopyFrom(path_to_proto(d.path, schema))
        out.append(msg)
    return out


__all__ = ["attr_to_proto", "block_to_proto", "diags_to_proto", "path_to_proto",
           "schema_to_proto", "type_json"]
