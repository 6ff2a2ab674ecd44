"""``infrasim_qos_profile``: how the switch shapes a VM's segment NIC (token bucket, netem-style
impairments, optionally a LoRa radio link).

Every number carries its unit in its name (``rate_bps``, ``delay_ms``, ``loss_pct``), as the API
spells them, so nothing is parsed and nothing is ambiguous ("8mbit" is 8 000 000 bit/s here:
``rate_bps = 8000000``). The daemon applies a changed profile live to every attached link, so
every argument updates in place; only ``name`` and ``labels`` (which the daemon cannot change)
force a replacement. Omitted arguments are planned at the daemon's defaults, so removing one
from the configuration resets it instead of keeping the old value.

Plan-time validation is the core's own pure ``validate_qos_spec``, run again after each error
with the offending field reset, so every problem shows at once, each on its attribute's line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..framework import (
    UNKNOWN,
    ApplyResult,
    Attr,
    Block,
    Context,
    Diagnostics,
    Path,
    PlanResult,
    Resource,
    Schema,
    is_unknown,
    null_object,
    wholly_known,
)
from .common import (
    add_error,
    keep_empty,
    name_and_label_diags,
    note_planned,
    path_of,
    replace_paths,
    settle,
)

if TYPE_CHECKING:
    from ...core.model import LoraSpec, QosProfile, QosProfileSpec

FORCES_REPLACEMENT: tuple[str, ...] = ("name", "labels")
#: Top-level arguments that are QosProfileSpec fields (all change in place, applied live).
SPEC_ATTRS: tuple[str, ...] = (
    "rate_bps", "burst_bytes", "queue_bytes", "delay_ms", "jitter_ms", "distribution",
    "loss_pct", "ge_p_pct", "ge_r_pct", "ge_bad_loss_pct", "ge_good_loss_pct",
    "duplicate_pct", "reorder_pct", "seed", "direction",
)
#: Arguments of the ``lora`` block (LoraSpec fields).
LORA_ATTRS: tuple[str, ...] = (
    "spreading_factor", "bandwidth_khz", "coding_rate", "preamble", "implicit_header", "crc",
    "tx_power_dbm", "distance_m", "frequency_mhz", "d0_m", "path_loss_d0_db",
    "path_loss_exponent", "shadowing_sigma_db", "noise_figure_db", "capture_db",
    "duty_cycle_pct",
)
UPDATES_IN_PLACE: tuple[str, ...] = (*SPEC_ATTRS, "lora")
#: Whole numbers (terraform has one number type; a fraction here is refused at plan).
INT_ATTRS = frozenset({"rate_bps", "burst_bytes", "queue_bytes", "seed"})
LORA_INT_ATTRS = frozenset({"spreading_factor", "bandwidth_khz", "coding_rate", "preamble"})
#: The API cannot tell 0 from "not set" in these (it reads 0 back as the default), so an
#: explicit 0 would show as a diff on every plan: refused at plan instead.
ZERO_MEANS_DEFAULT = frozenset({"ge_r_pct"})
LORA_ZERO_MEANS_DEFAULT = frozenset({"spreading_factor", "bandwidth_khz", "coding_rate",
                                     "preamble", "frequency_mhz", "d0_m", "path_loss_d0_db",
                                     "path_loss_exponent"})


def _n(name: str, description: str) -> Attr:
    """An optional number the plan fills with its default when the configuration omits it."""
    return Attr(name, "number", optional=True, computed=True, description=description)


LORA_BLOCK = Block(
    "lora", nesting="single",
    description="Send every frame over a simulated LoRa radio link: it waits its time on air "
                "(Semtech AN1200.13), is lost below the spreading factor's sensitivity or SNR "
                "floor (log-distance path loss with shadowing), collides with overlapping "
                "frames on the same frequency and SF, and respects the duty cycle.",
    attrs=(
        _n("spreading_factor", "SF 6..12 (default 7; 6 needs implicit_header)."),
        _n("bandwidth_khz", "125 (default), 250 or 500."),
        _n("coding_rate", "N of the coding rate 4/N: 5 (default) .. 8."),
        _n("preamble", "Preamble symbols (default 8)."),
        Attr("implicit_header", "bool", optional=True, computed=True,
             description="Implicit header mode (default false)."),
        Attr("crc", "bool", optional=True, computed=True,
             description="Payload CRC on (default true)."),
        _n("tx_power_dbm", "Transmit power in dBm (default 14)."),
        _n("distance_m", "Distance between the radios in metres (default 100)."),
        _n("frequency_mhz", "Channel in MHz (default 868.1); frames collide only on the same "
                            "frequency and SF."),
        _n("d0_m", "Reference distance of the path-loss model in metres (default 40)."),
        _n("path_loss_d0_db", "Path loss at d0 in dB (default 127.41)."),
        _n("path_loss_exponent", "Path-loss exponent gamma (default 2.08)."),
        _n("shadowing_sigma_db", "Log-normal shadowing sigma in dB (default 3.57)."),
        _n("noise_figure_db", "Receiver noise figure in dB (default 6)."),
        _n("capture_db", "A frame this many dB stronger survives an overlap (default 6)."),
        _n("duty_cycle_pct", "Duty-cycle limit in percent (default 0: unlimited; 1 in most "
                             "EU868 sub-bands)."),
    ),
)

SCHEMA = Schema(
    description="A QoS profile: rate limiting and impairments the switch applies to the "
                "segment NICs of the VMs that name it (infrasim_vm qos_profile/network_qos). "
                "Changes apply live, without touching the guests.",
    attrs=(
        Attr("id", "string", computed=True, stable=True, description="The profile's id."),
        Attr("name", "string", required=True, force_new=True,
             description="Unique name (1-63 of a-z, 0-9 and '-')."),
        Attr("labels", ["map", "string"], optional=True, force_new=True,
             description="Labels (the daemon cannot change them: a change replaces the profile)."),
        _n("rate_bps", "Token-bucket rate in bits per second (default 0: unlimited)."),
        _n("burst_bytes", "Bucket size in bytes, at least one full frame (1514) (default 0: the "
                          "larger of 10 ms at rate and two frames). Needs rate_bps."),
        _n("queue_bytes", "Bytes that may wait for tokens before frames are dropped (default 0: "
                          "the larger of 64 KiB and 250 ms at rate)."),
        _n("delay_ms", "Added one-way delay in milliseconds (default 0)."),
        _n("jitter_ms", "Delay variation in milliseconds (default 0)."),
        Attr("distribution", "string", optional=True, computed=True,
             description='Jitter distribution: "uniform" (default), "normal" or "pareto".'),
        _n("loss_pct", "Random loss in percent (default 0; ignored when ge_p_pct > 0)."),
        _n("ge_p_pct", "Gilbert-Elliott loss: P(good -> bad) in percent; > 0 switches the model "
                       "on (default 0)."),
        _n("ge_r_pct", "Gilbert-Elliott P(bad -> good) in percent (default 100)."),
        _n("ge_bad_loss_pct", "Gilbert-Elliott loss while bad (1-h) in percent (default 100)."),
        _n("ge_good_loss_pct", "Gilbert-Elliott loss while good (1-k) in percent (default 0)."),
        _n("duplicate_pct", "Frames duplicated, in percent (default 0)."),
        _n("reorder_pct", "Frames sent ahead of those still delayed, in percent (default 0)."),
        _n("seed", "Seed of every random draw, for reproducible runs (default 0: a fresh seed "
                   "per attachment)."),
        Attr("direction", "string", optional=True, computed=True,
             description='"egress" (frames leaving the VM), "ingress" (into it) or "both" '
                         "(default)."),
        Attr("attached_vms", ["set", "string"], computed=True,
             description="Names of the VMs that use the profile."),
    ),
    blocks=(LORA_BLOCK,),
)


# -- pure mapping ---------------------------------------------------------------------------


def spec_defaults() -> dict[str, Any]:
    """The daemon's defaults for every top-level spec argument."""
    from ...core.model import QosProfileSpec

    base = QosProfileSpec()
    return {name: getattr(base, name) for name in SPEC_ATTRS}


def lora_defaults() -> dict[str, Any]:
    from ...core.model import LoraSpec

    base = LoraSpec()
    return {name: getattr(base, name) for name in LORA_ATTRS}


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _typed(name: str, value: Any, ints: frozenset[str]) -> Any:
    """A value as the dataclass field holds it (int, float, bool or str)."""
    if name in ints:
        return _whole(value)
    if isinstance(value, bool | str):
        return value
    return float(value)


def lora_from_attrs(block: Mapping[str, Any]) -> LoraSpec:
    from ...core.model import LoraSpec

    values = {k: (block[k] if block.get(k) is not None else v)
              for k, v in lora_defaults().items()}
    return LoraSpec(**{k: _typed(k, v, LORA_INT_ATTRS) for k, v in values.items()})


def spec_from_attrs(attrs: Mapping[str, Any]) -> QosProfileSpec:
    """A QosProfileSpec from (known, well-typed) attribute values; null means the default."""
    from ...core.model import QosProfileSpec

    values = {k: (attrs[k] if attrs.get(k) is not None else v)
              for k, v in spec_defaults().items()}
    spec = QosProfileSpec(**{k: _typed(k, v, INT_ATTRS) for k, v in values.items()})
    lora = attrs.get("lora")
    spec.lora = lora_from_attrs(lora) if isinstance(lora, dict) else None
    return spec


def _number(value: Any) -> Any:
    """Whole floats as ints: what terraform shows for them, and what a config wrote."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def state_from_profile(prof: QosProfile, vm_names: Mapping[str, str],
                       prior: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes of ``prof`` as terraform state; ``prior`` decides only null versus empty."""
    p = dict(prior or {})
    spec = prof.spec
    out: dict[str, Any] = {
        "id": prof.meta.id,
        "name": prof.meta.name,
        "labels": keep_empty(p.get("labels"), dict(prof.meta.labels)),
        "attached_vms": sorted(vm_names.get(i, i) for i in prof.status.attached_vm_ids),
    }
    for name in SPEC_ATTRS:
        out[name] = _number(getattr(spec, name))
    out["lora"] = (None if spec.lora is None
                   else {name: _number(getattr(spec.lora, name)) for name in LORA_ATTRS})
    return out


def plan_values(prior: Mapping[str, Any] | None, config: Mapping[str, Any],
                planned: dict[str, Any]) -> dict[str, Any]:
    """Every omitted argument at its default (also on update: removing an argument resets
    it), the lora block's too; ``id`` and ``attached_vms`` kept from the prior."""
    for key, default in spec_defaults().items():
        value = config.get(key)
        planned[key] = default if value is None else value
    lora = config.get("lora")
    if isinstance(lora, dict):
        planned["lora"] = {k: (d if lora.get(k) is None else lora[k])
                           for k, d in lora_defaults().items()}
    else:
        planned["lora"] = lora  # None, or unknown (a dynamic block)
    planned["name"], planned["labels"] = config.get("name"), config.get("labels")
    if prior is None:
        planned["id"] = UNKNOWN
        planned["attached_vms"] = []  # nothing can name a profile that does not exist yet
    else:
        planned["id"] = prior.get("id")
        planned["attached_vms"] = prior.get("attached_vms")
    for key in SPEC_ATTRS:
        planned[key] = _number(planned[key])
    if isinstance(planned["lora"], dict):
        planned["lora"] = {k: _number(v) for k, v in planned["lora"].items()}
    return planned


# -- validation -----------------------------------------------------------------------------


def validate_config(config: Mapping[str, Any]) -> Diagnostics:
    """Name, labels, whole numbers, and the core's validator on a wholly known spec (a
    partly unknown one is checked at plan again, once the values are known)."""

    diags = Diagnostics()
    name_and_label_diags(diags, config, "QoS profile")
    lora = config.get("lora")
    typed = _type_errors(config, INT_ATTRS, ())
    if isinstance(lora, dict):
        typed += _type_errors(lora, LORA_INT_ATTRS, ("lora",))
    for path, reason in typed:
        diags.error(f"Invalid {path[-1]}", reason, path)
    keys = (*SPEC_ATTRS, "lora")
    if typed or not all(wholly_known(config.get(k)) for k in keys):
        return diags
    for path, reason in spec_errors(config):
        diags.error("Invalid QoS profile", reason, path)
    return diags


def _type_errors(values: Mapping[str, Any], ints: frozenset[str],
                 at: Path) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for key in sorted(ints):
        value = values.get(key)
        if value is None or is_unknown(value):
            continue
        try:
            _whole(value)
        except ValueError as exc:
            out.append(((*at, key), str(exc)))
    return out


def spec_errors(config: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """Every error the core's validator finds in a wholly known config, not just the first:
    after each one the offending field is reset to its default and the check runs again.
    Then explicit zeros the API would read back as defaults."""
    from ...core.errors import InvalidSpec
    from ...core.qos import validate_qos_spec

    spec = spec_from_attrs(config)
    errors: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for _ in range(len(SPEC_ATTRS) + len(LORA_ATTRS) + 1):
        try:
            validate_qos_spec(spec)
            break
        except InvalidSpec as exc:
            path = path_of(exc.field, maps=("labels",), sets=())
            if path in seen:
                break
            seen.add(path)
            errors.append((path, exc.reason))
            if not _reset(spec, path):
                break
    blamed = {p for p, _ in errors}
    lora = config.get("lora")
    zeros: list[tuple[Path, Any]] = [((k,), config.get(k)) for k in sorted(ZERO_MEANS_DEFAULT)]
    if isinstance(lora, dict):
        zeros += [(("lora", k), lora.get(k)) for k in sorted(LORA_ZERO_MEANS_DEFAULT)]
    for path, value in zeros:
        if value is not None and value == 0 and path not in blamed:
            errors.append((path, "0 is not a valid value here (leave it out for the "
                                 "default)"))
    return errors


def _reset(spec: QosProfileSpec, path: Path) -> bool:
    """Put one field (``("delay_ms",)``, ``("lora", "coding_rate")``, ``("lora",)``) back to
    its default so validation can go on to the next field."""
    if len(path) == 1 and path[0] in SPEC_ATTRS:
        setattr(spec, str(path[0]), spec_defaults()[str(path[0])])
        return True
    if path[:1] == ("lora",) and spec.lora is not None:
        if len(path) == 2 and path[1] in LORA_ATTRS:
            setattr(spec.lora, str(path[1]), lora_defaults()[str(path[1])])
        else:
            spec.lora = None
        return True
    return False


# -- the resource ---------------------------------------------------------------------------


class QosProfileResource(Resource):
    type_name = "infrasim_qos_profile"
    schema = SCHEMA

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        return validate_config(config)

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        if default.planned is None:
            return default
        planned = plan_values(prior, config, dict(default.planned))
        diags = default.diags
        if prior is None:
            note_planned("qos_profile", planned.get("name"))
        # values unknown at validate time may be known now (the plan during apply); when
        # they were known, validation passed already (terraform plans nothing otherwise)
        diags.extend(validate_config(config))
        return PlanResult(planned, replace_paths(SCHEMA, prior, planned), diags,
                          default.private)

    async def apply(self, ctx: Context, prior: dict[str, Any] | None,
                    planned: dict[str, Any] | None, config: dict[str, Any] | None) -> ApplyResult:
        from ...core.errors import AlreadyExists, InfraSimError, NotFound

        diags = Diagnostics()
        core = await ctx.core()
        if planned is None:
            assert prior is not None
            return await self._delete(core, prior)
        spec = spec_from_attrs(planned)
        name = planned["name"]
        if prior is None:
            try:
                prof = await core.create_qos_profile(name, spec,
                                                     dict(planned.get("labels") or {}))
            except AlreadyExists as exc:
                return ApplyResult(None, add_error(
                    diags, "A QoS profile with this name exists", exc, path=("name",),
                    hint=f"Import it to manage it here: terraform import <address> {name}"))
            except InfraSimError as exc:
                return ApplyResult(None, add_error(diags, f"Cannot create QoS profile {name}",
                                                   exc))
            return ApplyResult(state_from_profile(prof, {}, planned), diags)
        try:
            prof = await core.update_qos_profile(prior["id"], spec)
        except NotFound as exc:
            return ApplyResult(prior, add_error(
                diags, f"QoS profile {name} is gone", exc,
                hint="It was deleted outside terraform: the next plan creates it again."))
        except InfraSimError as exc:
            return ApplyResult(prior, add_error(diags, f"Cannot update QoS profile {name}",
                                                exc))
        state = state_from_profile(prof, await _vm_names(core, prof), planned)
        return ApplyResult(settle(planned, state, ("attached_vms",)), diags)

    async def _delete(self, core: Any, prior: dict[str, Any]) -> ApplyResult:
        """Refused by the daemon while a VM names the profile: say which, and how to detach."""
        from ...core.errors import InfraSimError, NotFound

        diags = Diagnostics()
        try:
            await core.delete_qos_profile(prior["id"])
        except NotFound:
            pass
        except InfraSimError as exc:
            hint = ("Remove it from those VMs' qos_profile / network_qos first (when the VM "
                    "refers to infrasim_qos_profile.<name>.name, terraform does that in the "
                    "right order), or `infrasim vm update` them.")
            add_error(diags, f"Cannot delete QoS profile {prior.get('name')}", exc, hint=hint)
            return ApplyResult(prior, diags)
        return ApplyResult(None, diags)

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        from ...core.errors import NotFound

        core = await ctx.core()
        try:
            prof = await core.get_qos_profile(state.get("id") or state["name"])
        except NotFound:
            return None
        return state_from_profile(prof, await _vm_names(core, prof), state)

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        """``terraform import infrasim_qos_profile.lossy lossy`` (a name) or the id."""
        return await self.read(ctx, {**null_object(SCHEMA), "id": id})


async def _vm_names(core: Any, prof: QosProfile) -> dict[str, str]:
    """VM id → name, listed only when the profile has users."""
    if not prof.status.attached_vm_ids:
        return {}
    return {v.meta.id: v.meta.name for v in await core.list_vms()}


__all__ = ["FORCES_REPLACEMENT", "LORA_ATTRS", "SCHEMA", "SPEC_ATTRS", "UPDATES_IN_PLACE",
           "QosProfileResource", "lora_from_attrs", "plan_values", "spec_errors",
           "spec_from_attrs", "state_from_profile", "validate_config"]
