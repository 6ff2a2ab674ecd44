"""The ``tfplugin6.Provider`` servicer: protocol messages in, framework calls, messages out.

Resources see plain Python values and :class:`~.framework.Diagnostics`; this module does the
decoding (msgpack/JSON by schema), the framework's default plan, the provider configuration
(the daemon is reached lazily, on the first call that needs it: during plan the configuration
may still be unknown) and the conversion of every error into a diagnostic, so terraform never
sees a failed RPC for a failed operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from . import registry
from .convert import diags_to_proto, path_to_proto, schema_to_proto
from .framework import (
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
    wholly_known,
)
from .framework import (
    Path as AttrPath,
)
from .gen import tfplugin6_pb2 as pb
from .gen import tfplugin6_pb2_grpc as pbg
from .values import (
    NULL,
    TypeMismatch,
    block_type,
    decode_object,
    encode_object,
    equal,
    format_path,
    from_plain,
    normalize,
    schema_type,
)

log = logging.getLogger("terraform-provider-infrasim")

PROVIDER_SCHEMA = Schema(
    description="InfraSim: QEMU virtual machines managed by an InfraSim daemon.",
    attrs=(
        Attr("data_dir", "string", optional=True,
             description="Data dir of the local daemon (started when none answers). Default: "
                         "$INFRASIM_DATA_DIR, else the platform's data dir."),
        Attr("address", "string", optional=True,
             description="host:port of a remote daemon (default $INFRASIM_ADDRESS); excludes "
                         "data_dir."),
        Attr("token", "string", optional=True, sensitive=True,
             description="API token of the remote daemon (default $INFRASIM_TOKEN)."),
        Attr("tls_ca", "string", optional=True,
             description="PEM file of the CA that signed the remote daemon's certificate."),
        Attr("autostart", "bool", optional=True,
             description="Start a local daemon when none answers (default true)."),
    ),
)

CAPABILITIES = pb.ServerCapabilities(plan_destroy=True, get_provider_schema_optional=False)

#: Blocks that only tell the provider how to work (not what the object is): changing them
#: alone updates the state in place without planning any computed attribute unknown.
SETTINGS_BLOCKS = ("timeouts",)

Connect = Callable[[dict[str, Any]], Awaitable[Any]]


# -- errors → diagnostics ---------------------------------------------------------------------


class UnknownType(LookupError):
    """terraform named a resource type or data source this provider does not serve."""


_FIELD_STEP = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def field_path(field: str, schema: Schema, field_paths: dict[str, AttrPath]) -> AttrPath:
    """The attribute path of a core error field (``port_forwards[0].host_port``), or ``()``.

    The longest prefix found in ``field_paths`` is translated; otherwise a field whose first
    name is an attribute or block of ``schema`` is taken as a path as it is.
    """
    steps: list[str | int] = [int(i) if i else name for i, name in _FIELD_STEP.findall(field)]
    for n in range(len(steps), 0, -1):
        key = format_path(tuple(steps[:n]))
        if key in field_paths:
            return (*field_paths[key], *steps[n:])
    if steps and isinstance(steps[0], str) and (schema.attr(steps[0]) or schema.block(steps[0])):
        return tuple(steps)
    return ()


def error_diags(exc: Exception, schema: Schema | None = None,
                field_paths: dict[str, AttrPath] | None = None) -> Diagnostics:
    """An exception from a resource (or the core behind it) as diagnostics."""
    from ..core.errors import InfraSimError, InvalidSpec

    diags = Diagnostics()
    if isinstance(exc, Cancelled):
        return diags.error("cancelled", str(exc))
    if isinstance(exc, TimeoutError):
        return diags.error("timed out", str(exc) or "the operation did not finish in time")
    if isinstance(exc, InvalidSpec):
        path = field_path(exc.field, schema, field_paths or {}) if schema else ()
        return diags.error(exc.message, path=path)
    if isinstance(exc, InfraSimError):
        return diags.error(exc.message)
    if isinstance(exc, UnknownType):
        return diags.error(str(exc), "this terraform-provider-infrasim does not serve it; "
                           "is the provider older than the configuration?")
    if isinstance(exc, TypeMismatch):
        return diags.error("terraform-provider-infrasim produced an invalid value", str(exc),
                           path=exc.path)
    log.error("internal error", exc_info=exc)
    return diags.error("internal error in terraform-provider-infrasim",
                       f"{type(exc).__name__}: {exc}")


class _Collect:
    """``with _Collect(...) as diags:`` — exceptions inside become error diagnostics.

    BaseExceptions (asyncio cancellation of the RPC) pass through.
    """

    def __init__(self, schema: Schema | None = None,
                 field_paths: dict[str, AttrPath] | None = None,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.diags = Diagnostics()
        self.failed = False
        self._schema = schema
        self._field_paths = field_paths
        self._on_error = on_error

    def use(self, schema: Schema, field_paths: dict[str, AttrPath]) -> Schema:
        """Map later errors onto this resource's attributes; returns ``schema``."""
        self._schema, self._field_paths = schema, field_paths
        return schema

    def __enter__(self) -> Diagnostics:
        return self.diags

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if isinstance(exc, Exception):
            self.failed = True
            self.diags.extend(error_diags(exc, self._schema, self._field_paths))
            if self._on_error is not None:
                self._on_error(exc)
            return True
        return False


# -- the default plan -------------------------------------------------------------------------


def default_plan(schema: Schema, prior: dict[str, Any] | None, proposed: dict[str, Any] | None,
                 config: dict[str, Any] | None) -> PlanResult:
    """The framework's plan, before the resource adjusts it.

    Destroy: null. Create: ``proposed`` with every computed attribute that the configuration
    leaves null planned unknown. Update: no change at all → the prior state (no diff); a
    change in :data:`SETTINGS_BLOCKS` (``timeouts``) only → the prior state with the new
    settings; otherwise computed attributes the configuration leaves null become unknown
    unless ``stable`` (they keep the prior value), and force_new attributes or blocks whose
    proposed value differs from the prior one are listed in ``requires_replace``.
    """
    if proposed is None:
        return PlanResult(planned=None)
    if prior is None:
        return PlanResult(planned=_mark_computed(schema.attrs, schema.blocks, proposed, config,
                                                 creating=True))
    settings = [b.name for b in schema.blocks if b.name in SETTINGS_BLOCKS]
    essence = Schema(attrs=schema.attrs,
                     blocks=tuple(b for b in schema.blocks if b.name not in settings))
    if equal(proposed, prior, schema_type(essence)):
        planned = copy.deepcopy(prior)
        planned.update({name: copy.deepcopy(proposed.get(name)) for name in settings})
        return PlanResult(planned=planned)
    planned = _mark_computed(schema.attrs, schema.blocks, proposed, config, creating=False)
    return PlanResult(planned=planned, requires_replace=replace_paths(schema, prior, proposed))


def _mark_computed(attrs: Iterable[Attr], blocks: Iterable[Block], obj: dict[str, Any],
                   config: Any, *, creating: bool) -> dict[str, Any]:
    out = dict(obj)
    cfg = config if isinstance(config, dict) else {}
    for a in attrs:
        if not a.computed or cfg.get(a.name) is not None:
            continue  # set in the configuration: the proposed value is the configured one
        if creating:
            if out.get(a.name) is None:
                out[a.name] = UNKNOWN
        elif not a.stable:
            out[a.name] = UNKNOWN
    for b in blocks:
        v, cv = out.get(b.name), cfg.get(b.name)
        if b.nesting == "single":
            if isinstance(v, dict):
                out[b.name] = _mark_computed(b.attrs, (), v, cv, creating=creating)
        elif isinstance(v, list):
            cfg_elems = cv if isinstance(cv, list) else []
            out[b.name] = [
                _mark_computed(b.attrs, (), e, _config_element(b, i, e, cfg_elems),
                               creating=creating) if isinstance(e, dict) else e
                for i, e in enumerate(v)
            ]
    return out


def _config_element(b: Block, i: int, elem: dict[str, Any], cfg_elems: list[Any]) -> Any:
    """The configuration element that ``elem`` (proposed) came from: by index in a list, by
    equal non-computed attributes in a set (terraform does not keep set order)."""
    if b.nesting == "list":
        return cfg_elems[i] if i < len(cfg_elems) else None
    own = [a for a in b.attrs if not a.computed]
    for c in cfg_elems:
        if isinstance(c, dict) and all(equal(c.get(a.name), elem.get(a.name), a.type)
                                       for a in own):
            return c
    return None


def replace_paths(schema: Schema, prior: dict[str, Any], proposed: dict[str, Any]
                  ) -> list[AttrPath]:
    """Paths of force_new attributes and blocks whose proposed value differs from the prior."""
    paths: list[AttrPath] = [
        (a.name,) for a in schema.attrs
        if a.force_new and not equal(prior.get(a.name), proposed.get(a.name), a.type)
    ]
    for b in schema.blocks:
        pv, nv = prior.get(b.name), proposed.get(b.name)
        if b.force_new:
            if not equal(pv, nv, block_type(b)):
                paths.append((b.name,))
            continue
        fn = [a for a in b.attrs if a.force_new]
        if not fn:
            continue
        if b.nesting == "single":
            pd, nd = (pv if isinstance(pv, dict) else {}), (nv if isinstance(nv, dict) else {})
            paths += [(b.name, a.name) for a in fn
                      if not equal(pd.get(a.name), nd.get(a.name), a.type)]
        elif b.nesting == "list" and isinstance(pv, list) and isinstance(nv, list):
            for i, (pe, ne) in enumerate(zip(pv, nv, strict=False)):
                paths += [(b.name, i, a.name) for a in fn
                          if not equal(pe.get(a.name), ne.get(a.name), a.type)]
        else:  # a set: elements have no identity, compare what the force_new fields hold
            obj = ["object", {a.name: a.type for a in fn}]
            proj = [{a.name: e.get(a.name) for a in fn} for e in (pv or []) if isinstance(e, dict)]
            nproj = [{a.name: e.get(a.name) for a in fn} for e in (nv or []) if isinstance(e, dict)]
            if not equal(proj, nproj, ["set", obj]):
                paths.append((b.name,))
    return paths


def missing_required(schema: Schema, config: dict[str, Any]) -> Diagnostics:
    """Required attributes left null (terraform checks this too; this names the path)."""
    diags = Diagnostics()
    for a in schema.attrs:
        if a.required and config.get(a.name) is None:
            diags.error(f"Missing required argument {a.name!r}", path=(a.name,))
    return diags


def unknown_paths(value: Any, path: AttrPath = ()) -> list[AttrPath]:
    if isinstance(value, Unknown):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in unknown_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in unknown_paths(v, (*path, i))]
    return []


def _strip_unknowns(value: Any) -> Any:
    if isinstance(value, Unknown):
        return None
    if isinstance(value, dict):
        return {k: _strip_unknowns(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_unknowns(v) for v in value]
    return value


# -- the provider configuration ---------------------------------------------------------------


def validate_provider_config(config: dict[str, Any], env: dict[str, str] | None = None
                             ) -> Diagnostics:
    env = dict(os.environ) if env is None else env
    diags = Diagnostics()
    address, data_dir = config.get("address"), config.get("data_dir")
    if isinstance(address, str) and address and isinstance(data_dir, str) and data_dir:
        diags.error("address and data_dir exclude each other",
                    "address reaches a remote daemon; data_dir a local one.", path=("address",))
    token = config.get("token")
    if (isinstance(address, str) and address and token is None
            and not env.get("INFRASIM_TOKEN")):
        diags.error("a remote daemon needs its API token",
                    "Set token (or INFRASIM_TOKEN); it is in the daemon's data dir, file "
                    "api-token.", path=("token",))
    if config.get("tls_ca") is not None and address is None and not env.get("INFRASIM_ADDRESS"):
        diags.warning("tls_ca only applies to a remote daemon (address)", path=("tls_ca",))
    return diags


async def connect_from_config(config: dict[str, Any]) -> Any:
    """A RemoteCore for the provider configuration (the CLI's rules: see rpc.connect)."""
    from ..rpc.connect import connect_core

    autostart = config.get("autostart")
    data_dir = config.get("data_dir")
    return await connect_core(
        address=config.get("address") or "", token=config.get("token") or "",
        tls_ca=config.get("tls_ca") or "",
        data_dir=Path(data_dir) if data_dir else None,
        autostart=True if autostart is None else bool(autostart),
    )


# -- the servicer -----------------------------------------------------------------------------


class Provider(pbg.ProviderServicer):
    """One instance per process; terraform may configure it more than once (reattach)."""

    def __init__(self, resources: Callable[[], list[Resource]] = registry.resources,
                 data_sources: Callable[[], list[DataSource]] = registry.data_sources,
                 connect: Connect = connect_from_config) -> None:
        self._load_resources = resources
        self._load_data_sources = data_sources
        self._connect = connect
        self._config: dict[str, Any] = {}
        self._core: Any = None
        self._stale_cores: list[Any] = []
        self._core_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._schema_response: pb.GetProviderSchema.Response | None = None

    # -- plumbing -----------------------------------------------------------------------------

    def _resource(self, type_name: str) -> Resource:
        for r in self._load_resources():
            if r.type_name == type_name:
                return r
        raise UnknownType(f"unknown resource type {type_name!r}")

    def _data_source(self, type_name: str) -> DataSource:
        for d in self._load_data_sources():
            if d.type_name == type_name:
                return d
        raise UnknownType(f"unknown data source {type_name!r}")

    def context(self, private: bytes = b"") -> Context:
        """A Context for one call; after StopProvider, new calls get a fresh stop event."""
        if self._stopping.is_set():
            self._stopping = asyncio.Event()
        ctx = Context(self._get_core, self._stopping)
        ctx.private = private
        return ctx

    async def _get_core(self) -> Any:
        from ..core.errors import Unavailable

        async with self._core_lock:
            if self._core is None:
                unknown = sorted(k for k, v in self._config.items() if isinstance(v, Unknown))
                if unknown:
                    raise Unavailable(f"the provider setting(s) {', '.join(unknown)} are not "
                                      "known until apply; the daemon cannot be reached yet")
                self._core = await self._connect(dict(self._config))
            return self._core

    def _collect(self) -> _Collect:
        return _Collect(on_error=self._forget_core_if_unavailable)

    def _forget_core_if_unavailable(self, exc: Exception) -> None:
        """A daemon that stopped answering: reconnect (and autostart) on the next call, which
        matters when one process serves many commands (reattach)."""
        from ..core.errors import Unavailable

        if isinstance(exc, Unavailable) and self._core is not None:
            self._stale_cores.append(self._core)  # closed in close(): calls may still use it
            self._core = None

    async def close(self) -> None:
        cores = [c for c in (*self._stale_cores, self._core) if c is not None]
        self._core, self._stale_cores = None, []
        for core in cores:
            with contextlib.suppress(Exception):
                await core.close()

    # -- schema and configuration -------------------------------------------------------------

    async def GetMetadata(self, request: pb.GetMetadata.Request, context: Any
                          ) -> pb.GetMetadata.Response:
        resp = pb.GetMetadata.Response(server_capabilities=CAPABILITIES)
        with _Collect() as diags:
            resp.resources.extend(pb.GetMetadata.ResourceMetadata(type_name=r.type_name)
                                  for r in self._load_resources())
            resp.data_sources.extend(pb.GetMetadata.DataSourceMetadata(type_name=d.type_name)
                                     for d in self._load_data_sources())
        resp.diagnostics.extend(diags_to_proto(diags))
        return resp

    async def GetProviderSchema(self, request: pb.GetProviderSchema.Request, context: Any
                                ) -> pb.GetProviderSchema.Response:
        if self._schema_response is None:
            resp = pb.GetProviderSchema.Response(provider=schema_to_proto(PROVIDER_SCHEMA),
                                                 server_capabilities=CAPABILITIES)
            with _Collect() as diags:
                for r in self._load_resources():
                    resp.resource_schemas[r.type_name].CopyFrom(schema_to_proto(r.schema))
                for d in self._load_data_sources():
                    resp.data_source_schemas[d.type_name].CopyFrom(schema_to_proto(d.schema))
            if diags:
                resp.diagnostics.extend(diags_to_proto(diags))
                return resp  # not cached: a fixed resource module is picked up next time
            self._schema_response = resp
        return self._schema_response

    async def ValidateProviderConfig(self, request: pb.ValidateProviderConfig.Request,
                                     context: Any) -> pb.ValidateProviderConfig.Response:
        resp = pb.ValidateProviderConfig.Response()
        with _Collect(PROVIDER_SCHEMA) as diags:
            config = decode_object(request.config.msgpack, PROVIDER_SCHEMA) or {}
            diags.extend(validate_provider_config(config))
        resp.diagnostics.extend(diags_to_proto(diags, PROVIDER_SCHEMA))
        return resp

    async def ConfigureProvider(self, request: pb.ConfigureProvider.Request, context: Any
                                ) -> pb.ConfigureProvider.Response:
        resp = pb.ConfigureProvider.Response()
        with _Collect(PROVIDER_SCHEMA) as diags:
            config = decode_object(request.config.msgpack, PROVIDER_SCHEMA) or {}
            if config != self._config:  # reattach: the same process serves many commands
                await self.close()
                self._config = config
        resp.diagnostics.extend(diags_to_proto(diags, PROVIDER_SCHEMA))
        return resp

    async def StopProvider(self, request: pb.StopProvider.Request, context: Any
                           ) -> pb.StopProvider.Response:
        self._stopping.set()
        return pb.StopProvider.Response(Error="")

    # -- validation and state upgrades --------------------------------------------------------

    async def ValidateResourceConfig(self, request: pb.ValidateResourceConfig.Request,
                                     context: Any) -> pb.ValidateResourceConfig.Response:
        resp = pb.ValidateResourceConfig.Response()
        schema: Schema | None = None
        with _Collect() as diags:
            res = self._resource(request.type_name)
            schema = res.schema
            config = decode_object(request.config.msgpack, schema) or {}
            diags.extend(missing_required(schema, config))
            diags.extend(res.validate(config))
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    async def ValidateDataResourceConfig(self, request: pb.ValidateDataResourceConfig.Request,
                                         context: Any
                                         ) -> pb.ValidateDataResourceConfig.Response:
        resp = pb.ValidateDataResourceConfig.Response()
        schema: Schema | None = None
        with _Collect() as diags:
            ds = self._data_source(request.type_name)
            schema = ds.schema
            config = decode_object(request.config.msgpack, schema) or {}
            diags.extend(missing_required(schema, config))
            diags.extend(ds.validate(config))
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    async def UpgradeResourceState(self, request: pb.UpgradeResourceState.Request,
                                   context: Any) -> pb.UpgradeResourceState.Response:
        """Runs on every plan and refresh: stored JSON (any schema version) → msgpack."""
        resp = pb.UpgradeResourceState.Response()
        schema: Schema | None = None
        with _Collect() as diags:
            res = self._resource(request.type_name)
            schema = res.schema
            raw = request.raw_state.json
            if not raw:
                raise ValueError("the stored state has no JSON form (flatmap state predates "
                                 "this provider)")
            import json

            state = res.upgrade(int(request.version), json.loads(raw))
            upgraded = from_plain(state, schema_type(schema))
            resp.upgraded_state.msgpack = encode_object(
                None if upgraded is None else normalize(upgraded, schema), schema)
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    # -- managed resources --------------------------------------------------------------------

    async def ReadResource(self, request: pb.ReadResource.Request, context: Any
                           ) -> pb.ReadResource.Response:
        resp = pb.ReadResource.Response(private=request.private)
        resp.new_state.msgpack = request.current_state.msgpack or NULL
        schema: Schema | None = None
        collect = self._collect()
        with collect as diags:
            res = self._resource(request.type_name)
            schema = collect.use(res.schema, res.field_paths)
            state = decode_object(request.current_state.msgpack, schema)
            if state is not None:
                new = await res.read(self.context(request.private), state)
                resp.new_state.msgpack = encode_object(new, schema)
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    async def PlanResourceChange(self, request: pb.PlanResourceChange.Request, context: Any
                                 ) -> pb.PlanResourceChange.Response:
        resp = pb.PlanResourceChange.Response()
        resp.planned_state.msgpack = NULL
        schema: Schema | None = None
        collect = self._collect()
        with collect as diags:
            res = self._resource(request.type_name)
            schema = collect.use(res.schema, res.field_paths)
            prior = decode_object(request.prior_state.msgpack, schema)
            proposed = decode_object(request.proposed_new_state.msgpack, schema)
            config = decode_object(request.config.msgpack, schema)
            result = default_plan(schema, prior, proposed, config)
            result.private = request.prior_private
            if proposed is not None:
                result = await res.plan(self.context(request.prior_private), prior, proposed,
                                        config or {}, result)
            diags.extend(result.diags)
            resp.planned_state.msgpack = encode_object(result.planned, schema)
            resp.requires_replace.extend(path_to_proto(p, schema)
                                         for p in result.requires_replace)
            resp.planned_private = result.private
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    async def ApplyResourceChange(self, request: pb.ApplyResourceChange.Request, context: Any
                                  ) -> pb.ApplyResourceChange.Response:
        """Errors keep the object in state: the resource's partial new state when it returns
        one (terraform then marks a new object tainted), else the prior state."""
        resp = pb.ApplyResourceChange.Response()
        resp.new_state.msgpack = request.prior_state.msgpack or NULL
        schema: Schema | None = None
        collect = self._collect()
        with collect as diags:
            res = self._resource(request.type_name)
            schema = collect.use(res.schema, res.field_paths)
            prior = decode_object(request.prior_state.msgpack, schema)
            planned = decode_object(request.planned_state.msgpack, schema)
            config = decode_object(request.config.msgpack, schema)
            result = ApplyResult(new_state=prior)
            try:
                result = await res.apply(self.context(request.planned_private), prior, planned,
                                         config)
            finally:  # on an exception too: the prior state stays
                new_state = result.new_state
                if new_state is None and result.diags.has_errors:
                    new_state = prior
                if new_state is not None and not wholly_known(new_state):
                    where = ", ".join(format_path(p) for p in unknown_paths(new_state))
                    diags.error("terraform-provider-infrasim left values unknown after apply",
                                f"unknown: {where}")
                    new_state = _strip_unknowns(new_state)
                resp.new_state.msgpack = encode_object(new_state, schema)
                resp.private = result.private
                diags.extend(result.diags)
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    async def ImportResourceState(self, request: pb.ImportResourceState.Request, context: Any
                                  ) -> pb.ImportResourceState.Response:
        resp = pb.ImportResourceState.Response()
        schema: Schema | None = None
        collect = self._collect()
        with collect as diags:
            res = self._resource(request.type_name)
            schema = collect.use(res.schema, res.field_paths)
            ctx = self.context()
            state = await res.import_state(ctx, request.id)
            if state is None:
                diags.error(f"Cannot import {request.type_name} {request.id!r}: not found")
            else:
                imported = resp.imported_resources.add(type_name=request.type_name,
                                                       private=ctx.private)
                imported.state.msgpack = encode_object(state, schema)
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp

    # -- data sources -------------------------------------------------------------------------

    async def ReadDataSource(self, request: pb.ReadDataSource.Request, context: Any
                             ) -> pb.ReadDataSource.Response:
        """The result is laid over the configuration, so a data source returns only what it
        computes (arguments keep their configured values, as terraform requires)."""
        resp = pb.ReadDataSource.Response()
        schema: Schema | None = None
        collect = self._collect()
        with collect as diags:
            ds = self._data_source(request.type_name)
            schema = collect.use(ds.schema, ds.field_paths)
            config = decode_object(request.config.msgpack, schema) or {}
            state, read_diags = await ds.read(self.context(), config)
            diags.extend(read_diags)
            resp.state.msgpack = encode_object({**config, **state}, schema)
        resp.diagnostics.extend(diags_to_proto(diags, schema))
        return resp


__all__ = ["CAPABILITIES", "PROVIDER_SCHEMA", "Provider", "connect_from_config",
           "default_plan", "error_diags", "field_path", "missing_required", "replace_paths",
           "validate_provider_config"]
