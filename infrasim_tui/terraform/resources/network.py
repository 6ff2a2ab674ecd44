"""``infrasim_network``: a network VMs name in ``networks``.

The daemon has no network update, so every argument forces a replacement (the daemon refuses
to delete a network a VM still uses, so terraform must detach the VMs first: reference the
network from the VM and terraform orders it). Modes are spelled as the CLI spells them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..framework import (
    UNKNOWN,
    ApplyResult,
    Attr,
    Context,
    Diagnostics,
    PlanResult,
    Resource,
    Schema,
    null_object,
    wholly_known,
)
from .common import add_error, keep_empty, name_and_label_diags, note_planned, opt, replace_paths

if TYPE_CHECKING:
    from ...core.model import Network, NetworkSpec

FORCES_REPLACEMENT: tuple[str, ...] = ("name", "mode", "cidr", "gateway", "dns", "dhcp",
                                       "interface", "labels")
UPDATES_IN_PLACE: tuple[str, ...] = ()
MODES = ("user", "segment", "vmnet-shared", "vmnet-bridged")
DEFAULT_CIDR = "10.0.2.0/24"
RENAMES: dict[str, str] = {"vmnet_interface": "interface"}

SCHEMA = Schema(
    description="A network: user-mode NAT, a VM-to-VM segment, or macOS vmnet.",
    attrs=(
        Attr("id", "string", computed=True, stable=True, description="The network's id."),
        Attr("name", "string", required=True, force_new=True, description="Unique name."),
        Attr("mode", "string", optional=True, computed=True, force_new=True, stable=True,
             description='"user" (default), "segment", "vmnet-shared" or "vmnet-bridged" '
                         "(vmnet: macOS only)."),
        Attr("cidr", "string", optional=True, computed=True, force_new=True, stable=True,
             description=f'IPv4 network, /30 or larger (default "{DEFAULT_CIDR}").'),
        Attr("gateway", "string", optional=True, force_new=True,
             description="Gateway address inside cidr."),
        Attr("dns", "string", optional=True, force_new=True,
             description="DNS server address inside cidr."),
        Attr("dhcp", "bool", optional=True, computed=True, force_new=True, stable=True,
             description="Serve DHCP (default true)."),
        Attr("interface", "string", optional=True, force_new=True,
             description="Host interface to bridge (vmnet-bridged only, e.g. en0)."),
        Attr("labels", ["map", "string"], optional=True, force_new=True, description="Labels."),
        Attr("active", "bool", computed=True, description="A VM uses it."),
    ),
)


def mode_value(mode: str) -> str:
    """CLI spelling → the core's enum value ("vmnet-shared" → "VMNET_SHARED")."""
    return mode.replace("-", "_").upper()


def spec_from_attrs(attrs: Mapping[str, Any]) -> NetworkSpec:
    from ...core.model import NetworkMode, NetworkSpec

    dhcp = attrs.get("dhcp")
    return NetworkSpec(mode=NetworkMode(mode_value(attrs.get("mode") or "user")),
                       cidr=attrs.get("cidr") or DEFAULT_CIDR, gateway=attrs.get("gateway") or "",
                       dns=attrs.get("dns") or "", dhcp=True if dhcp is None else bool(dhcp),
                       vmnet_interface=attrs.get("interface") or "")


def state_from_network(net: Network, prior: Mapping[str, Any] | None) -> dict[str, Any]:
    p = dict(prior or {})
    spec = net.spec
    return {
        "id": net.meta.id, "name": net.meta.name,
        "mode": spec.mode.value.lower().replace("_", "-"),
        "cidr": spec.cidr,
        "gateway": keep_empty(p.get("gateway"), spec.gateway),
        "dns": keep_empty(p.get("dns"), spec.dns),
        "dhcp": spec.dhcp,
        "interface": keep_empty(p.get("interface"), spec.vmnet_interface),
        "labels": keep_empty(p.get("labels"), dict(net.meta.labels)),
        "active": net.status.active,
    }


def validate_config(config: Mapping[str, Any], host_os: str = "darwin") -> Diagnostics:
    """Name, labels and the core's network checks, with paths. Offline ``host_os`` is
    "darwin" so vmnet modes pass; plan repeats the check with the daemon's host."""
    from ...core.errors import InvalidSpec

    diags = Diagnostics()
    name_and_label_diags(diags, config, "network")
    mode = config.get("mode")
    if isinstance(mode, str) and mode not in MODES:
        diags.error("Invalid mode", f"{mode!r}: use one of {', '.join(MODES)}", ("mode",))
        return diags
    keys = ("mode", "cidr", "gateway", "dns", "dhcp", "interface")
    if not all(wholly_known(config.get(k)) for k in keys):
        return diags
    from ...core.networks import validate_network_spec

    try:
        validate_network_spec(spec_from_attrs(config), host_os)
    except InvalidSpec as exc:
        add_error(diags, "Invalid network", exc, RENAMES)
    return diags


class NetworkResource(Resource):
    type_name = "infrasim_network"
    schema = SCHEMA
    field_paths = {k: (v,) for k, v in RENAMES.items()}

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        return validate_config(config)

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        if default.planned is None:
            return default
        planned = dict(default.planned)
        planned["mode"] = opt(config, prior, "mode", "user")
        planned["cidr"] = opt(config, prior, "cidr", DEFAULT_CIDR)
        planned["dhcp"] = opt(config, prior, "dhcp", True)
        for key in ("name", "gateway", "dns", "interface", "labels"):
            planned[key] = config.get(key)
        diags = default.diags
        if prior is None:
            planned["id"] = UNKNOWN
            planned["active"] = False  # nothing can use a network that does not exist yet
            note_planned("network", planned.get("name"))
            diags.extend(await self._host_check(ctx, config))
        else:
            planned["id"], planned["active"] = prior.get("id"), prior.get("active")
        return PlanResult(planned, replace_paths(SCHEMA, prior, planned), diags,
                          default.private)

    async def _host_check(self, ctx: Context, config: Mapping[str, Any]) -> Diagnostics:
        """vmnet modes exist only on a macOS daemon: ask the daemon which host it runs on
        (best effort; apply reports what really fails)."""
        mode = config.get("mode")
        if not isinstance(mode, str) or not mode.startswith("vmnet"):
            return Diagnostics()
        try:
            core = await ctx.core()
            host_os = str((await ctx.wait(core.status(), timeout=10))["host"]["os"])
        except Exception:
            return Diagnostics()
        return validate_config(config, host_os)

    async def apply(self, ctx: Context, prior: dict[str, Any] | None,
                    planned: dict[str, Any] | None, config: dict[str, Any] | None) -> ApplyResult:
        from ...core.errors import AlreadyExists, InfraSimError, NotFound

        diags = Diagnostics()
        core = await ctx.core()
        if planned is None:
            assert prior is not None
            try:
                await core.delete_network(prior["id"])
            except NotFound:
                pass
            except InfraSimError as exc:
                add_error(diags, f"Cannot delete network {prior.get('name')}", exc)
                return ApplyResult(prior, diags)
            return ApplyResult(None, diags)
        if prior is not None:  # nothing updates in place: only the state can change
            return ApplyResult(planned, diags)
        name = planned["name"]
        try:
            net = await core.create_network(name, spec_from_attrs(planned),
                                            dict(planned.get("labels") or {}))
        except AlreadyExists as exc:
            return ApplyResult(None, add_error(
                diags, "A network with this name exists", exc, path=("name",),
                hint=f"Import it to manage it here: terraform import <address> {name}"))
        except InfraSimError as exc:
            return ApplyResult(None, add_error(diags, f"Cannot create network {name}", exc,
                                               RENAMES))
        return ApplyResult(state_from_network(net, planned), diags)

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        """One ListNetworks: it is the call that reports whether a VM uses the network."""
        core = await ctx.core()
        ref = state.get("id") or state.get("name")
        nets = await core.list_networks()
        net = next((n for n in nets if n.meta.id == ref), None) or next(
            (n for n in nets if n.meta.name == ref), None)
        return None if net is None else state_from_network(net, state)

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        """``terraform import infrasim_network.lan lan`` (a name) or the network's id."""
        return await self.read(ctx, {**null_object(SCHEMA), "id": id})


__all__ = [
    "FORCES_REPLACEMENT",
    "MODES",
    "SCHEMA",
    "UPDATES_IN_PLACE",
    "NetworkResource",
    "mode_value",
    "spec_from_attrs",
    "state_from_network",
    "validate_config",
]
