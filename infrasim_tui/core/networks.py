"""Network resources: validated records that VMs name in ``network_ids``.

This release wires USER networking (per-VM NAT with port forwards) into every virt VM; the
records let operators and Terraform declare networks now, and the switch that joins SEGMENT
networks arrives with the traffic-shaper issue.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable

from .errors import AlreadyExists, InvalidSpec, WrongState
from .model import VM, Network, NetworkMode, NetworkSpec, ResourceMeta
from .store import Store
from .validation import validate_labels, validate_name

IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
Emit = Callable[[Network, str, str], Awaitable[None]]


def validate_network_spec(spec: NetworkSpec, host_os: str) -> None:
    """Pure: refuse what cannot work on this host, naming the field."""
    if spec.mode in (NetworkMode.VMNET_SHARED, NetworkMode.VMNET_BRIDGED) and host_os != "darwin":
        raise InvalidSpec("mode", f"{spec.mode.value.lower()} uses macOS's vmnet framework and "
                          "exists only on macOS; use user here")
    if spec.mode == NetworkMode.VMNET_BRIDGED and not IFACE_RE.match(spec.vmnet_interface):
        raise InvalidSpec("vmnet_interface", "name the host interface to bridge (e.g. en0)")
    try:
        net = ipaddress.ip_network(spec.cidr, strict=True)
    except ValueError as exc:
        raise InvalidSpec("cidr", f"{spec.cidr!r} is not a network in CIDR form ({exc})") \
            from None
    if net.version != 4 or net.prefixlen > 30:
        raise InvalidSpec("cidr", "use an IPv4 network of /30 or larger")
    for field in ("gateway", "dns"):
        value = getattr(spec, field)
        if not value:
            continue
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise InvalidSpec(field, f"{value!r} is not an IP address") from None
        if addr not in net:
            raise InvalidSpec(field, f"{value} is outside {spec.cidr}")


class NetworkService:
    def __init__(self, store: Store, host_os: str, emit: Emit) -> None:
        self.store = store
        self.host_os = host_os
        self._emit = emit

    async def create(self, name: str, spec: NetworkSpec,
                     labels: dict[str, str] | None = None) -> Network:
        validate_name(name)
        validate_labels(labels or {})
        validate_network_spec(spec, self.host_os)
        if await self.store.find(Network, name) is not None:
            raise AlreadyExists("network", name)
        net = await self.store.create(Network(meta=ResourceMeta(name=name,
                                                                labels=dict(labels or {})),
                                              spec=spec))
        await self._emit(net, "network.created", f"{name} created")
        return net

    async def get(self, ref: str) -> Network:
        return await self.store.get(Network, ref)

    async def all(self) -> list[Network]:
        nets = await self.store.list(Network)
        users = await self._users()
        for n in nets:
            n.status.attached_vm_ids = users.get(n.meta.id, [])
            n.status.active = bool(n.status.attached_vm_ids)
        return nets

    async def _users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for vm in await self.store.list(VM):
            for nid in vm.spec.network_ids:
                out.setdefault(nid, []).append(vm.meta.id)
        return out

    async def delete(self, ref: str) -> None:
        net = await self.store.get(Network, ref)
        vms = [vm.meta.name for vm in await self.store.list(VM)
               if net.meta.id in vm.spec.network_ids or net.meta.name in vm.spec.network_ids]
        if vms:
            raise WrongState(f"network {net.meta.name!r} is used by VM {', '.join(vms)}")
        await self.store.delete(Network, net.meta.id)
        await self._emit(net, "network.deleted", f"{net.meta.name} deleted")
