"""``infrasim_snapshot``: one snapshot of a VM's writable disks (plus its memory when the VM
runs), a node in the VM's signed snapshot tree.

Snapshots are immutable, so every argument forces a replacement. Deleting one keeps its data
wherever a child needs it (the daemon moves children up to the parent). Import with
``VM/NAME``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..framework import (
    UNKNOWN,
    ApplyResult,
    Attr,
    Cancelled,
    Context,
    Diagnostics,
    PlanResult,
    Resource,
    Schema,
    null_object,
)
from .common import add_error, guarded, is_planned, keep_empty, replace_paths, unknown_all

if TYPE_CHECKING:
    from ...core.model import Snapshot

FORCES_REPLACEMENT: tuple[str, ...] = ("vm", "name", "description")
UPDATES_IN_PLACE: tuple[str, ...] = ()
OUTPUTS: tuple[str, ...] = ("vm_id", "parent_id", "with_memory", "state", "signed",
                            "created_at")

SCHEMA = Schema(
    description="A snapshot of a VM (disks, and memory when the VM is running).",
    attrs=(
        Attr("id", "string", computed=True, stable=True, description="The snapshot's id."),
        Attr("vm", "string", required=True, force_new=True, description="VM name or id."),
        Attr("name", "string", required=True, force_new=True,
             description="Snapshot name (unique per VM)."),
        Attr("description", "string", optional=True, force_new=True, description="Free text."),
        Attr("vm_id", "string", computed=True, stable=True, description="The VM's id."),
        Attr("parent_id", "string", computed=True,
             description="Parent snapshot's id (null for a root; changes when the parent is "
                         "deleted and this one moves up)."),
        Attr("with_memory", "bool", computed=True, stable=True,
             description="Holds the VM's memory (taken while it ran)."),
        Attr("state", "string", computed=True, description="ready, creating or failed."),
        Attr("signed", "bool", computed=True,
             description="Sealed in the VM's hash chain and signed by the host key."),
        Attr("created_at", "string", computed=True, stable=True,
             description="RFC 3339 UTC time it was taken."),
    ),
)


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def split_import_id(ref: str) -> tuple[str, str]:
    """``VM/NAME`` → (vm, name); InvalidSpec (shown as a diagnostic) otherwise."""
    from ...core.errors import InvalidSpec

    vm, sep, name = ref.partition("/")
    if not sep or not vm or not name or "/" in name:
        raise InvalidSpec("id", f"{ref!r}: import a snapshot as VM/NAME (e.g. "
                          "web/before-upgrade)")
    return vm, name


def state_from_snapshot(snap: Snapshot, vm_ref: str, prior: Mapping[str, Any] | None,
                        ) -> dict[str, Any]:
    from ...core.snapshot_tree import short_name

    p = dict(prior or {})
    return {
        "id": snap.meta.id, "vm": vm_ref, "name": short_name(snap),
        "description": keep_empty(p.get("description"), snap.spec.description),
        "vm_id": snap.spec.vm_id, "parent_id": snap.spec.parent_id or None,
        "with_memory": snap.status.with_memory, "state": snap.status.state or None,
        "signed": bool(snap.status.signature), "created_at": rfc3339(snap.meta.created_at),
    }


class SnapshotResource(Resource):
    type_name = "infrasim_snapshot"
    schema = SCHEMA

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        from ...core.errors import InvalidSpec
        from ...core.validation import validate_name

        diags = Diagnostics()
        if isinstance(config.get("name"), str):
            try:
                validate_name(config["name"])
            except InvalidSpec as exc:
                diags.error("Invalid snapshot name", exc.reason, ("name",))
        return diags

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        if default.planned is None:
            return default
        planned = dict(default.planned)
        for key in ("vm", "name", "description"):
            planned[key] = config.get(key)
        diags = default.diags
        if prior is None:
            planned["id"] = UNKNOWN
            unknown_all(planned, OUTPUTS)
            diags.extend(await _vm_check(ctx, planned.get("vm")))
        else:
            for key in ("id", *OUTPUTS):
                planned[key] = prior.get(key)
        return PlanResult(planned, replace_paths(SCHEMA, prior, planned), diags,
                          default.private)

    async def apply(self, ctx: Context, prior: dict[str, Any] | None,
                    planned: dict[str, Any] | None, config: dict[str, Any] | None) -> ApplyResult:
        from ...core.errors import InfraSimError, NotFound

        diags = Diagnostics()
        core = await ctx.core()
        if planned is None:
            assert prior is not None
            try:
                await core.delete_snapshot(prior.get("vm_id") or prior["vm"], prior["id"])
            except NotFound:
                pass  # the snapshot, or its whole VM, is gone already
            except InfraSimError as exc:
                add_error(diags, f"Cannot delete snapshot {prior.get('name')}", exc)
                return ApplyResult(prior, diags)
            return ApplyResult(None, diags)
        if prior is not None:  # nothing updates in place
            return ApplyResult(planned, diags)
        vm, name = planned["vm"], planned["name"]
        try:
            # A snapshot job must not be cut short (QEMU would keep a tag with no record).
            snap = await guarded(ctx, core.create_snapshot(vm, name,
                                                           planned.get("description") or ""),
                                 None)
        except InfraSimError as exc:
            return ApplyResult(None, add_error(diags, f"Cannot snapshot VM {vm}", exc,
                                               {"volume_ids": "vm"}, path=("vm",)))
        except (Cancelled, TimeoutError) as exc:
            found = await _find(core, vm, name)
            diags.error("Cancelled", f"{exc or 'timed out'}; " + (
                "the snapshot was taken and is tainted." if found else "no snapshot was taken."))
            return ApplyResult(state_from_snapshot(found, vm, planned) if found else None, diags)
        return ApplyResult(state_from_snapshot(snap, vm, planned), diags)

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        core = await ctx.core()
        snap = await _find(core, state.get("vm_id") or state["vm"], state.get("id") or
                           state["name"])
        return None if snap is None else state_from_snapshot(snap, state["vm"], state)

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        """``terraform import infrasim_snapshot.s web/before-upgrade`` (VM name or id)."""
        vm, name = split_import_id(id)
        return await self.read(ctx, {**null_object(SCHEMA), "vm": vm, "name": name})


async def _vm_check(ctx: Context, vm: Any) -> Diagnostics:
    """A VM that exists neither in the daemon nor in this plan is a plan-time error (best
    effort: an unreachable daemon is apply's problem)."""
    from ...core.errors import NotFound

    diags = Diagnostics()
    if not isinstance(vm, str) or is_planned("vm", vm):
        return diags
    try:
        await (await ctx.core()).get_vm(vm)
    except NotFound:
        diags.error("No such VM", f"no VM {vm!r} to snapshot; create it (an infrasim_vm "
                    "referenced here) or with `infrasim vm create`", ("vm",))
    except Exception:
        pass
    return diags


async def _find(core: Any, vm: str, ref: str) -> Snapshot | None:
    from ...core.errors import NotFound

    try:
        snap: Snapshot = await core.get_snapshot(vm, ref)
    except NotFound:
        return None  # the snapshot or its VM is gone
    return snap


__all__ = [
    "FORCES_REPLACEMENT",
    "OUTPUTS",
    "SCHEMA",
    "UPDATES_IN_PLACE",
    "SnapshotResource",
    "rfc3339",
    "split_import_id",
    "state_from_snapshot",
]
