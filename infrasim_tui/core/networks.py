"""Network resources: validated records that VMs name in ``network_ids``.

Every virt VM has a USER NIC (per-VM NAT with port forwards, 10.0.2.0/24 inside the guest).
SEGMENT networks add a NIC per network plugged into the core's switch (``switch.py``); their
addresses are handed out here, once, and kept by the VM across restarts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable

from .errors import AlreadyExists, InvalidSpec, WrongState
from .model import VM, Network, NetworkMode, NetworkSpec, ResourceMeta
from .store import Store
from .validation import validate_labels, validate_name

USER_NET = ipaddress.ip_network("10.0.2.0/24")  # QEMU user-mode networking inside every guest
IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
Emit = Callable[[Network, str, str], Awaitable[None]]


def validate_network_spec(spec: NetworkSpec, host_os: str) -> None:
    """Pure: refuse what cannot work on this host, naming the field."""
    if spec.mode in (NetworkMode.VMNET_SHARED, NetworkMode.VMNET_BRIDGED) and host_os != "darwin":
        mode = spec.mode.value.lower().replace("_", "-")
        raise InvalidSpec("mode", f"{mode} uses macOS's vmnet framework and exists only on "
                          "macOS; use user (NAT) or segment (VM to VM) here")
    if spec.mode == NetworkMode.VMNET_BRIDGED and not IFACE_RE.match(spec.vmnet_interface):
        raise InvalidSpec("vmnet_interface", "name the host interface to bridge (e.g. en0)")
    try:
        net = ipaddress.ip_network(spec.cidr, strict=True)
    except ValueError as exc:
        raise InvalidSpec("cidr", f"{spec.cidr!r} is not a network in CIDR form ({exc})") \
            from None
    if net.version != 4 or net.prefixlen > 30:
        raise InvalidSpec("cidr", "use an IPv4 network of /30 or larger")
    if spec.mode == NetworkMode.SEGMENT and net.prefixlen > 29:
        raise InvalidSpec("cidr", "a segment needs a /29 or larger (gateway, DHCP server, VMs)")
    if spec.mode == NetworkMode.SEGMENT and net.overlaps(USER_NET):
        raise InvalidSpec("cidr", f"{spec.cidr} overlaps {USER_NET}, the user network every VM "
                          "also has: use another subnet, e.g. 10.10.0.0/24")
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


def pick_segment_cidr(used: Iterable[str]) -> str:
    """The first 10.N.0.0/24 (N from 10) that overlaps no other network."""
    nets = [ipaddress.ip_network(c) for c in used]
    for n in range(10, 256):
        cand = ipaddress.ip_network(f"10.{n}.0.0/24")
        if not any(cand.overlaps(o) for o in nets):
            return str(cand)
    raise InvalidSpec("cidr", "no free 10.N.0.0/24 subnet: give one with --subnet")


def allocate_address(cidr: str, taken: Iterable[str], *, previous: str = "",
                     reserved: Iterable[str] = ()) -> str:
    """Pure: an ``IP/PREFIX`` for a new NIC on ``cidr``.

    ``previous`` (the NIC's address from an earlier start) wins while still free, so a guest
    keeps its address; otherwise the lowest free host from the second one up (the first is left
    for a gateway). ``taken`` are other NICs' addresses (with or without a prefix).
    """
    net = ipaddress.ip_network(cidr)
    busy = {ipaddress.ip_address(a.split("/")[0]) for a in [*taken, *reserved] if a}
    if previous:
        ip = ipaddress.ip_address(previous.split("/")[0])
        if ip in net and ip not in busy and ip not in (net.network_address,
                                                       net.broadcast_address):
            return f"{ip}/{net.prefixlen}"
    hosts = net.hosts()
    next(hosts, None)  # x.x.x.1: by convention a gateway's
    for ip in hosts:
        if ip not in busy:
            return f"{ip}/{net.prefixlen}"
    raise WrongState(f"no free address left in {cidr}")


class NetworkService:
    def __init__(self, store: Store, host_os: str, emit: Emit) -> None:
        self.store = store
        self.host_os = host_os
        self._emit = emit

    async def create(self, name: str, spec: NetworkSpec,
                     labels: dict[str, str] | None = None) -> Network:
        validate_name(name)
        validate_labels(labels or {})
        if spec.mode == NetworkMode.SEGMENT and not spec.cidr:
            spec.cidr = pick_segment_cidr(n.spec.cidr for n in await self.store.list(Network)
                                          if n.spec.mode == NetworkMode.SEGMENT)
        validate_network_spec(spec, self.host_os)
        if await self.store.find(Network, name) is not None:
            raise AlreadyExists("network", name)
        net = await self.store.create(Network(meta=ResourceMeta(name=name,
                                                                labels=dict(labels or {})),
                                              spec=spec))
        await self._emit(net, "network.created", f"{name} created")
        return net

    async def get(self, ref: str) -> Network:
        return self._with_status(await self.store.get(Network, ref), await self._users())

    async def all(self) -> list[Network]:
        users = await self._users()
        return [self._with_status(n, users) for n in await self.store.list(Network)]

    @staticmethod
    def _with_status(net: Network, users: dict[str, list[str]]) -> Network:
        net.status.attached_vm_ids = users.get(net.meta.id, [])
        net.status.active = bool(net.status.attached_vm_ids)
        return net

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
