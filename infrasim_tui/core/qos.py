"""QoS profiles: validated records that VM NICs name, applied live by the switch.

A profile changes what the switch does to frames, never the guest: updating one re-shapes every
attached link at once, and deleting one is refused while a VM still names it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from .errors import AlreadyExists, InvalidSpec, WrongState
from .lora import validate_lora_spec
from .model import VM, QosProfile, QosProfileSpec, ResourceMeta
from .store import Store
from .validation import validate_labels, validate_name

DISTRIBUTIONS = ("uniform", "normal", "pareto")
DIRECTIONS = ("egress", "ingress", "both")
MAX_FRAME = 1514  # Ethernet frame without FCS: a bucket must hold one
MAX_RATE_BPS = 100_000_000_000
MAX_DELAY_MS = 60_000.0
MAX_QUEUE_BYTES = 256 << 20

Emit = Callable[[QosProfile, str, str], Awaitable[None]]
Applied = Callable[[QosProfile], Awaitable[None]]
Links = Callable[[str], int]  # profile id -> live switch ports using it


def validate_qos_spec(spec: QosProfileSpec) -> None:
    """Pure: refuse a profile the shaper cannot honour, naming the field."""
    if not 0 <= spec.rate_bps <= MAX_RATE_BPS:
        raise InvalidSpec("rate_bps", f"{spec.rate_bps} is out of range: 0 (unlimited).."
                          f"{MAX_RATE_BPS}")
    if spec.burst_bytes < 0 or spec.burst_bytes > MAX_QUEUE_BYTES:
        raise InvalidSpec("burst_bytes", f"{spec.burst_bytes} is out of range: 0.."
                          f"{MAX_QUEUE_BYTES}")
    if 0 < spec.burst_bytes < MAX_FRAME:
        raise InvalidSpec("burst_bytes", f"{spec.burst_bytes} bytes cannot hold a full frame: "
                          f"use at least {MAX_FRAME} (or 0 for the default)")
    if spec.burst_bytes and not spec.rate_bps:
        raise InvalidSpec("burst_bytes", "a burst needs a rate (rate_bps)")
    if spec.queue_bytes < 0 or spec.queue_bytes > MAX_QUEUE_BYTES:
        raise InvalidSpec("queue_bytes", f"{spec.queue_bytes} is out of range: 0.."
                          f"{MAX_QUEUE_BYTES}")
    if 0 < spec.queue_bytes < MAX_FRAME:
        raise InvalidSpec("queue_bytes", f"{spec.queue_bytes} bytes cannot hold a full frame: "
                          f"use at least {MAX_FRAME} (or 0 for the default)")
    for name in ("delay_ms", "jitter_ms"):
        value = getattr(spec, name)
        if not math.isfinite(value) or not 0 <= value <= MAX_DELAY_MS:
            raise InvalidSpec(name, f"{value} is out of range: 0..{MAX_DELAY_MS:g} ms")
    if spec.distribution not in DISTRIBUTIONS:
        raise InvalidSpec("distribution", f"{spec.distribution!r}: use one of "
                          f"{', '.join(DISTRIBUTIONS)}")
    for name in ("loss_pct", "ge_p_pct", "ge_r_pct", "ge_bad_loss_pct", "ge_good_loss_pct",
                 "duplicate_pct", "reorder_pct"):
        value = getattr(spec, name)
        if not math.isfinite(value) or not 0 <= value <= 100:
            raise InvalidSpec(name, f"{value} is not a percentage (0..100)")
    if spec.ge_p_pct and not spec.ge_r_pct:
        raise InvalidSpec("ge_r_pct", "with a bad state that is never left every frame is lost "
                          "after the first transition: give P(bad -> good) > 0")
    if not 0 <= spec.seed < 2**63:
        raise InvalidSpec("seed", f"{spec.seed} is out of range: 0..2^63-1")
    if spec.direction not in DIRECTIONS:
        raise InvalidSpec("direction", f"{spec.direction!r}: use one of {', '.join(DIRECTIONS)}")
    if spec.lora is not None:
        validate_lora_spec(spec.lora, "lora")


def shapes(spec: QosProfileSpec, direction: str) -> bool:
    """Whether a profile acts on ``direction`` ("egress" leaves the VM, "ingress" enters it)."""
    return spec.direction in ("both", direction)


class QosService:
    def __init__(self, store: Store, emit: Emit, applied: Applied, links: Links) -> None:
        self.store = store
        self._emit = emit
        self._applied = applied  # the switch re-shapes live links
        self._links = links

    async def create(self, name: str, spec: QosProfileSpec,
                     labels: dict[str, str] | None = None) -> QosProfile:
        validate_name(name)
        validate_labels(labels or {})
        validate_qos_spec(spec)
        if await self.store.find(QosProfile, name) is not None:
            raise AlreadyExists("qos_profile", name)
        prof = await self.store.create(QosProfile(
            meta=ResourceMeta(name=name, labels=dict(labels or {})), spec=spec))
        await self._emit(prof, "qos_profile.created", f"{name} created")
        return prof

    async def get(self, ref: str) -> QosProfile:
        return self._with_status(await self.store.get(QosProfile, ref), await self._users())

    async def all(self) -> list[QosProfile]:
        users = await self._users()
        return [self._with_status(p, users) for p in await self.store.list(QosProfile)]

    def _with_status(self, prof: QosProfile, users: dict[str, list[str]]) -> QosProfile:
        prof.status.attached_vm_ids = users.get(prof.meta.id, [])
        prof.status.links = self._links(prof.meta.id)
        return prof

    async def _users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for vm in await self.store.list(VM):
            for pid in dict.fromkeys([vm.spec.qos_profile_id, *vm.spec.nic_qos.values()]):
                if pid:
                    out.setdefault(pid, []).append(vm.meta.id)
        return out

    async def update(self, ref: str, spec: QosProfileSpec) -> QosProfile:
        validate_qos_spec(spec)
        prof = await self.store.get(QosProfile, ref)
        prof.spec = spec
        prof = await self.store.update(prof)
        await self._applied(prof)
        await self._emit(prof, "qos_profile.updated", f"{prof.meta.name} updated (applied live)")
        return await self.get(prof.meta.id)

    async def delete(self, ref: str) -> None:
        prof = await self.store.get(QosProfile, ref)
        users = (await self._users()).get(prof.meta.id, [])
        if users:
            names = [vm.meta.name for vm in await self.store.list(VM) if vm.meta.id in users]
            raise WrongState(f"QoS profile {prof.meta.name!r} is used by VM {', '.join(names)}; "
                             "detach it first")
        await self.store.delete(QosProfile, prof.meta.id)
        await self._emit(prof, "qos_profile.deleted", f"{prof.meta.name} deleted")

    async def resolve(self, ref: str, field_name: str) -> str:
        """A profile's id from its name or id, as the VM spec keeps it."""
        prof = await self.store.find(QosProfile, ref)
        if prof is None:
            raise InvalidSpec(field_name, f"no QoS profile {ref!r}")
        return prof.meta.id
