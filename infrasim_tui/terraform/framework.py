"""The provider's own small framework: schemas as data, values as plain Python, resources as
classes with validate/plan/apply/read/import.

The gRPC servicer (``provider.py``) turns tfplugin6 messages into these types and back, so a
resource never sees msgpack, protobuf or attribute-path messages. Values are plain Python
(str, int, float, bool, None, list, dict) plus :class:`Unknown` for values not known until
apply; a set is a Python list (order is not significant and must not be relied on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Path = tuple[str | int, ...]  # attribute path: names, list indexes or map keys (str)


@dataclass(frozen=True)
class Unknown:
    """A value terraform will only know after apply. ``raw`` keeps refinements (msgpack ext
    12) byte for byte, so they survive a round trip."""

    raw: bytes = b""
    ext_code: int = 0

    def __repr__(self) -> str:
        return "Unknown"


UNKNOWN = Unknown()


def is_unknown(value: Any) -> bool:
    return isinstance(value, Unknown)


def wholly_known(value: Any) -> bool:
    """No unknown anywhere inside ``value``."""
    if isinstance(value, Unknown):
        return False
    if isinstance(value, dict):
        return all(wholly_known(v) for v in value.values())
    if isinstance(value, list):
        return all(wholly_known(v) for v in value)
    return True


# -- schemas --------------------------------------------------------------------------------

#: cty types as terraform's JSON type syntax: "string", "number", "bool", ["list", T],
#: ["set", T], ["map", T], ["object", {"name": T, ...}]
CtyType = Any


@dataclass(frozen=True)
class Attr:
    name: str
    type: CtyType
    required: bool = False
    optional: bool = False
    computed: bool = False
    sensitive: bool = False
    description: str = ""
    force_new: bool = False  # a change plans a replacement (listed in the docs)
    #: computed attributes apply may change are planned unknown unless this is True (e.g. id)
    stable: bool = False


@dataclass(frozen=True)
class Block:
    """A nested block (``port_forward { … }``, ``timeouts { … }``)."""

    name: str
    attrs: tuple[Attr, ...]
    nesting: str = "list"  # "single" | "list" | "set"
    min_items: int = 0
    max_items: int = 0
    description: str = ""
    force_new: bool = False


@dataclass(frozen=True)
class Schema:
    attrs: tuple[Attr, ...]
    blocks: tuple[Block, ...] = ()
    version: int = 0
    description: str = ""

    def attr(self, name: str) -> Attr | None:
        return next((a for a in self.attrs if a.name == name), None)

    def block(self, name: str) -> Block | None:
        return next((b for b in self.blocks if b.name == name), None)


# -- diagnostics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Diag:
    severity: str  # "error" | "warning"
    summary: str
    detail: str = ""
    path: Path = ()


@dataclass
class Diagnostics:
    items: list[Diag] = field(default_factory=list)

    def error(self, summary: str, detail: str = "", path: Path = ()) -> Diagnostics:
        self.items.append(Diag("error", summary, detail, path))
        return self

    def warning(self, summary: str, detail: str = "", path: Path = ()) -> Diagnostics:
        self.items.append(Diag("warning", summary, detail, path))
        return self

    def extend(self, other: Diagnostics) -> Diagnostics:
        self.items.extend(other.items)
        return self

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


# -- operations -----------------------------------------------------------------------------


@dataclass
class PlanResult:
    planned: dict[str, Any] | None
    requires_replace: list[Path] = field(default_factory=list)
    diags: Diagnostics = field(default_factory=Diagnostics)
    private: bytes = b""


@dataclass
class ApplyResult:
    new_state: dict[str, Any] | None  # None = destroyed (or never created)
    diags: Diagnostics = field(default_factory=Diagnostics)
    private: bytes = b""


class Context:
    """What a resource gets for one call: the daemon (connected lazily) and cancellation.

    ``core()`` returns a RemoteCore (same methods as the Orchestrator). ``stopping`` is set when
    terraform calls StopProvider (Ctrl-C): long waits must watch it (see :meth:`wait`).
    """

    #: Opaque bytes terraform keeps with the instance, as the servicer received them: the prior
    #: private in plan, the planned private in apply, the stored private in read. In
    #: import_state, what is set here becomes the imported object's private bytes.
    private: bytes = b""

    def __init__(self, core: Callable[[], Awaitable[Any]], stopping: asyncio.Event) -> None:
        self._core = core
        self.stopping = stopping

    async def core(self) -> Any:
        return await self._core()

    async def wait(self, aw: Awaitable[Any], timeout: float | None = None) -> Any:
        """Await ``aw`` unless terraform asks to stop or ``timeout`` passes (then raise
        :class:`Cancelled` / ``TimeoutError``), cancelling the work either way."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            if stop in done:
                raise Cancelled("terraform asked the provider to stop (Ctrl-C)")
            raise TimeoutError
        finally:
            stop.cancel()


class Cancelled(Exception):
    """StopProvider arrived while an operation was in flight."""


class Resource:
    """Base class: override what the resource needs. Configs may contain :class:`Unknown`."""

    type_name: str = ""
    schema: Schema = Schema(attrs=())
    #: InvalidSpec.field from the core → attribute path, where the names differ (e.g.
    #: {"cpu_cores": ("cpus",)}); fields named like an attribute map by themselves.
    field_paths: dict[str, Path] = {}

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        return Diagnostics()

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        """``default`` is the framework's plan: computed attributes unknown unless stable or
        unchanged, force_new changes in ``requires_replace``. Adjust and return it."""
        return default

    async def apply(self, ctx: Context, prior: dict[str, Any] | None,
                    planned: dict[str, Any] | None, config: dict[str, Any] | None) -> ApplyResult:
        raise NotImplementedError

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        """Refresh from the daemon (never the guest); None when the object is gone."""
        raise NotImplementedError

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        """Partial state for ``terraform import`` (read() runs next); None if not found."""
        return None

    def upgrade(self, version: int, state: dict[str, Any]) -> dict[str, Any]:
        return state


class DataSource:
    type_name: str = ""
    schema: Schema = Schema(attrs=())
    field_paths: dict[str, Path] = {}  # as Resource.field_paths

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        return Diagnostics()

    async def read(self, ctx: Context, config: dict[str, Any]) -> tuple[dict[str, Any],
                                                                          Diagnostics]:
        raise NotImplementedError


def null_object(schema: Schema) -> dict[str, Any]:
    """Every attribute null and every block empty: the shape terraform expects."""
    out: dict[str, Any] = {a.name: None for a in schema.attrs}
    for b in schema.blocks:
        out[b.name] = None if b.nesting == "single" else []
    return out


__all__ = ["UNKNOWN", "ApplyResult", "Attr", "Block", "Cancelled", "Context", "CtyType",
           "DataSource", "Diag", "Diagnostics", "Path", "PlanResult", "Resource", "Schema",
           "Unknown", "is_unknown", "null_object", "wholly_known"]
