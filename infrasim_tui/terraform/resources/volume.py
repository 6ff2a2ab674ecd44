"""``infrasim_volume``: a disk or data volume (blank, imported from a file or URL, or a
copy-on-write overlay on another volume).

``size`` is a string as the CLI takes it ("10G", "512M"; binary units): growing it resizes in
place, shrinking is refused at plan (it would lose data). The daemon cannot change anything
else about a volume, so every other argument forces a replacement. Refresh reads the stored
status only (``verified`` is the last recorded verdict): it never hashes a file.
"""

from __future__ import annotations

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
    is_unknown,
    null_object,
)
from .common import (
    add_error,
    is_planned,
    keep_empty,
    name_and_label_diags,
    note_planned,
    opt,
    replace_paths,
    settle,
    unknown_all,
)

if TYPE_CHECKING:
    from ...core.model import Volume, VolumeRequest

#: Changing these destroys the volume (and its data) and creates a new one.
FORCES_REPLACEMENT: tuple[str, ...] = ("name", "format", "source", "source_digest", "base",
                                       "read_only", "kind", "signature", "public_key",
                                       "labels")
#: Changing these updates the volume in place.
UPDATES_IN_PLACE: tuple[str, ...] = ("size",)
KINDS = ("disk", "weights")
FORMATS = ("qcow2", "raw")
#: Computed from the daemon's record; sizes change as guests write.
OUTPUTS: tuple[str, ...] = ("path", "digest", "image_digest", "virtual_size", "actual_size",
                            "verified", "signed")
RENAMES: dict[str, str] = {"size_bytes": "size", "integrity": "signature"}


def output_attrs(computed_args: bool) -> tuple[Attr, ...]:
    """The attributes both the resource and the data source report."""
    return (
        Attr("id", "string", computed=True, stable=True, description="The volume's id."),
        Attr("path", "string", computed=True, stable=True,
             description="The file a VM opens (on the daemon's host)."),
        Attr("digest", "string", computed=True,
             description="BLAKE3 of the file when it was last hashed (null if never)."),
        Attr("image_digest", "string", computed=True, stable=True,
             description="BLAKE3 of the content-addressed image this volume is or sits on."),
        Attr("virtual_size", "number", computed=True, description="Size the guest sees."),
        Attr("actual_size", "number", computed=True, description="Bytes used on the host."),
        Attr("verified", "string", computed=True,
             description="Last integrity verdict: verified, untrusted, mismatch, "
                         "bad-signature, unsigned; null if never checked."),
        Attr("signed", "bool", computed=True, description="Carries a signature."),
        *(() if not computed_args else (
            Attr("size", "string", computed=True),
            Attr("format", "string", computed=True),
            Attr("source", "string", computed=True),
            Attr("source_digest", "string", computed=True),
            Attr("base", "string", computed=True),
            Attr("read_only", "bool", computed=True),
            Attr("kind", "string", computed=True),
            Attr("labels", ["map", "string"], computed=True),
        )),
    )


SCHEMA = Schema(
    description="A volume: blank, imported (path or URL, optionally pinned by digest and "
                "signed), or a copy-on-write overlay on another volume.",
    attrs=(
        Attr("name", "string", required=True, force_new=True, description="Unique name."),
        Attr("size", "string", optional=True, computed=True, stable=True,
             description='Size, binary units ("10G", "512M"). Required for a blank volume; '
                         "growing resizes in place (VM stopped), shrinking is refused."),
        Attr("format", "string", optional=True, computed=True, force_new=True, stable=True,
             description='"qcow2" (default) or "raw", for blank volumes; imports and overlays '
                         "take the image's format."),
        Attr("source", "string", optional=True, force_new=True,
             description="Absolute path or http(s) URL of an image to import."),
        Attr("source_digest", "string", optional=True, force_new=True,
             description="BLAKE3 the source must hash to (the import is refused otherwise)."),
        Attr("base", "string", optional=True, force_new=True,
             description="Name of the volume this one is a copy-on-write overlay on."),
        Attr("read_only", "bool", optional=True, computed=True, force_new=True, stable=True,
             description="Read-only (default false; always true for weights)."),
        Attr("kind", "string", optional=True, computed=True, force_new=True, stable=True,
             description='"disk" (default) or "weights" (read-only, integrity mandatory).'),
        Attr("signature", "string", optional=True, computed=True, force_new=True, stable=True,
             description="A publisher's Ed25519 signature over the source's digest."),
        Attr("public_key", "string", optional=True, computed=True, force_new=True,
             stable=True, description="The publisher's key (must be trusted to boot)."),
        Attr("labels", ["map", "string"], optional=True, force_new=True,
             description="Labels (the daemon cannot relabel a volume: a change replaces it)."),
        *output_attrs(computed_args=False),
    ),
)


# -- pure mapping ---------------------------------------------------------------------------


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that divides them exactly ("1G", "1536M", "1000")."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def size_bytes(text: Any) -> int | None:
    """Bytes of a size string, None if it is not one."""
    from ...core.errors import InvalidSpec
    from ...core.units import parse_size

    if not isinstance(text, str):
        return None
    try:
        return parse_size(text)
    except InvalidSpec:
        return None


def size_form(prior: Any, actual: int) -> str | None:
    """The state's ``size``: the config's spelling while it means the same bytes."""
    if not actual:
        return None
    return prior if size_bytes(prior) == actual else size_text(actual)


def state_from_volume(vol: Volume, base_name: str, prior: Mapping[str, Any] | None,
                      ) -> dict[str, Any]:
    p = dict(prior or {})
    spec, st = vol.spec, vol.status
    integ = spec.integrity
    return {
        "id": vol.meta.id,
        "name": vol.meta.name,
        "size": size_form(p.get("size"), spec.size_bytes),
        "format": spec.format,
        "source": keep_empty(p.get("source"), spec.source),
        "source_digest": keep_empty(p.get("source_digest"), spec.source_digest),
        "base": base_name or keep_empty(p.get("base"), ""),
        "read_only": spec.read_only,
        "kind": spec.kind.value.lower(),
        "signature": (integ.signature if integ and integ.signature
                      else keep_empty(p.get("signature"), "")),
        "public_key": (integ.public_key if integ and integ.public_key
                       else keep_empty(p.get("public_key"), "")),
        "labels": keep_empty(p.get("labels"), dict(vol.meta.labels)),
        "path": st.path or None,
        "digest": st.digest or None,
        "image_digest": st.image_digest or None,
        "virtual_size": st.virtual_size,
        "actual_size": st.actual_size,
        "verified": st.verified or None,
        "signed": bool(integ and integ.signature),
    }


def request_from_attrs(attrs: Mapping[str, Any]) -> VolumeRequest:
    from ...core.model import VolumeKind, VolumeRequest

    size = attrs.get("size")
    fmt = attrs.get("format")
    return VolumeRequest(
        name=attrs["name"], size_bytes=size_bytes(size) or 0,
        format=fmt if isinstance(fmt, str) else "qcow2",
        source=attrs.get("source") or "", source_digest=attrs.get("source_digest") or "",
        base=attrs.get("base") or "", read_only=attrs.get("read_only") is True,
        kind=VolumeKind((attrs.get("kind") or "disk").upper()),
        labels=dict(attrs.get("labels") or {}),
        signature=attrs.get("signature") or "", public_key=attrs.get("public_key") or "")


def _known(value: Any) -> bool:
    return not is_unknown(value)


def validate_config(config: Mapping[str, Any]) -> Diagnostics:
    """Plan-time checks, each with its attribute's path (unknown values skipped)."""
    from ...core.errors import InvalidSpec

    diags = Diagnostics()
    c = config
    name_and_label_diags(diags, c, "volume")
    for key, allowed in (("kind", KINDS), ("format", FORMATS)):
        value = c.get(key)
        if isinstance(value, str) and value not in allowed:
            diags.error(f"Invalid {key}", f"{value!r}: use {' or '.join(allowed)}", (key,))
    if isinstance(c.get("size"), str):
        from ...core.units import parse_size

        try:
            parse_size(c["size"])
        except InvalidSpec as exc:
            diags.error("Invalid size", exc.reason, ("size",))
    source, base = c.get("source"), c.get("base")
    if source is not None and base is not None:
        diags.error("Conflicting arguments", "give either source (an import) or base (an "
                    "overlay), not both", ("base",))
    if isinstance(source, str) and not source.startswith(("http://", "https://", "/")):
        diags.error("Invalid source", f"{source!r} must be an absolute path or an http(s) URL",
                    ("source",))
    blank = source is None and base is None
    kind, read_only = c.get("kind"), c.get("read_only")
    if blank and c.get("size") is None:
        diags.error("Missing size", 'a blank volume needs a size (e.g. size = "10G")',
                    ("size",))
    if blank and read_only is True:
        diags.error("Invalid read_only", "a blank read-only volume could never hold data",
                    ("read_only",))
    if kind == "weights":
        if read_only is False:
            diags.error("Invalid read_only", "weights volumes are always read-only",
                        ("read_only",))
        if source is None:
            diags.error("Missing source", "a weights volume is imported from a file or URL",
                        ("source",))
    fmt = c.get("format")
    if isinstance(fmt, str) and not blank and _known(source) and _known(base):
        overlay_like = base is not None or read_only is False or (
            read_only is None and kind != "weights")
        if not (fmt == "qcow2" and overlay_like):
            diags.error("Invalid format", "an import or overlay takes its format from the image "
                        "(overlays and writable imports are qcow2); leave format unset",
                        ("format",))
    digest = c.get("source_digest")
    if isinstance(digest, str):
        from ...core.digest import check_digest

        try:
            check_digest(digest, "source_digest")
        except InvalidSpec as exc:
            diags.error("Invalid source_digest", exc.reason, ("source_digest",))
        if source is None:
            diags.error("Invalid source_digest", "pins an imported image: set source too",
                        ("source_digest",))
    sig, pub = c.get("signature"), c.get("public_key")
    if (sig is None) != (pub is None):
        missing = "public_key" if pub is None else "signature"
        diags.error("Incomplete signature", "give both the signature and the publisher's "
                    "public key", (missing,))
    if sig is not None and source is None:
        diags.error("Invalid signature", "a publisher's signature covers an imported image: "
                    "set source too", ("signature",))
    return diags


def plan_values(prior: Mapping[str, Any] | None, config: Mapping[str, Any],
                planned: dict[str, Any]) -> dict[str, Any]:
    """Defaults of optional+computed arguments (create) or the prior's (update); outputs
    unknown on create and, after a resize, the sizes."""
    kind = opt(config, prior, "kind", "disk")
    planned["kind"] = kind
    ro_default: Any = (kind == "weights") if isinstance(kind, str) else UNKNOWN
    read_only = opt(config, prior, "read_only", ro_default)
    planned["read_only"] = read_only
    source, base = config.get("source"), config.get("base")
    if is_unknown(source) or is_unknown(base):
        fmt: Any = UNKNOWN
    elif base is not None or (source is not None and read_only is False):
        fmt = "qcow2"
    elif source is not None:
        fmt = UNKNOWN  # a read-only import is the image itself, in its own format
    else:
        fmt = "qcow2"
    planned["format"] = opt(config, prior, "format", fmt)
    blank = source is None and base is None
    planned["size"] = opt(config, prior, "size", None if blank else UNKNOWN)
    for key in ("signature", "public_key"):
        planned[key] = opt(config, prior, key, None)
    for key in ("name", "source", "source_digest", "base", "labels"):
        planned[key] = config.get(key)
    if prior is None:
        planned["id"] = UNKNOWN
        unknown_all(planned, OUTPUTS)
        return planned
    for key in ("id", *OUTPUTS):
        planned[key] = prior.get(key)
    if size_bytes(planned["size"]) != size_bytes(prior.get("size")):
        unknown_all(planned, ("virtual_size", "actual_size"))
    return planned


def resize_diags(prior: Mapping[str, Any] | None, planned: Mapping[str, Any]) -> Diagnostics:
    """Refuse at plan what a resize cannot do: shrink, or touch a read-only volume."""
    diags = Diagnostics()
    if prior is None:
        return diags
    new, old = size_bytes(planned.get("size")), size_bytes(prior.get("size"))
    if new is None or new == old:
        return diags
    current = max(old or 0, prior.get("virtual_size") or 0)
    if prior.get("read_only") is True:
        diags.error("Cannot resize", "the volume is read-only", ("size",))
    elif new < current:
        diags.error("Cannot shrink a volume",
                    f"{planned.get('size')} is smaller than the volume's {size_text(current)}; "
                    "shrinking loses data, so only growing is supported. To start over with a "
                    "smaller volume, replace it (terraform apply -replace=...).", ("size",))
    return diags


# -- the resource ---------------------------------------------------------------------------


class VolumeResource(Resource):
    type_name = "infrasim_volume"
    schema = SCHEMA
    field_paths = {k: (v,) for k, v in RENAMES.items()}

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        return validate_config(config)

    async def plan(self, ctx: Context, prior: dict[str, Any] | None, proposed: dict[str, Any],
                   config: dict[str, Any], default: PlanResult) -> PlanResult:
        if default.planned is None:
            return default
        planned = plan_values(prior, config, dict(default.planned))
        diags = default.diags.extend(resize_diags(prior, planned))
        if prior is None:
            note_planned("volume", planned.get("name"))
            diags.extend(await _base_check(ctx, planned.get("base")))
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
                await core.delete_volume(prior["id"])
            except NotFound:
                pass
            except InfraSimError as exc:
                add_error(diags, f"Cannot delete volume {prior.get('name')}", exc,
                          hint="Detach it from every VM (and delete its overlays) first.")
                return ApplyResult(prior, diags)
            return ApplyResult(None, diags)
        if prior is None:
            return await self._create(ctx, core, planned)
        try:
            vol = await core.get_volume(prior["id"])
            want = size_bytes(planned.get("size"))
            if want is not None and want != vol.spec.size_bytes:
                vol = await ctx.wait(core.resize_volume(vol.meta.id, want))
        except (InfraSimError, Cancelled) as exc:
            add_error(diags, f"Cannot resize volume {prior.get('name')}", exc, RENAMES,
                      path=("size",))
            return ApplyResult(prior, diags)
        state = await self._state(core, vol, planned)
        return ApplyResult(settle(planned, state, ("digest", "verified", "signed")), diags)

    async def _create(self, ctx: Context, core: Any, planned: dict[str, Any]) -> ApplyResult:
        from ...core.errors import AlreadyExists, InfraSimError

        diags = Diagnostics()
        req = request_from_attrs(planned)
        try:
            vol = await ctx.wait(core.create_volume(req))
        except AlreadyExists as exc:
            return ApplyResult(None, add_error(
                diags, "A volume with this name exists", exc, path=("name",),
                hint=f"Import it to manage it here: terraform import <address> {req.name}"))
        except InfraSimError as exc:
            return ApplyResult(None, add_error(diags, f"Cannot create volume {req.name}", exc,
                                               RENAMES))
        except Cancelled as exc:
            # The import may have finished just before the stop: hand back what exists.
            found = await _find(core, req.name)
            diags.error("Cancelled", f"{exc}; " + ("the volume exists and is tainted."
                                                   if found else "no volume was created."))
            return ApplyResult(await self._state(core, found, planned) if found else None, diags)
        return ApplyResult(await self._state(core, vol, planned), diags)

    async def _state(self, core: Any, vol: Volume, prior: Mapping[str, Any] | None,
                     ) -> dict[str, Any]:
        base = ""
        if vol.spec.base_volume_id:
            if isinstance(prior, Mapping) and isinstance(prior.get("base"), str):
                base = prior["base"]  # the config's name (or id) for it; bases never change
            else:
                base = (await core.get_volume(vol.spec.base_volume_id)).meta.name
        return state_from_volume(vol, base, prior)

    async def read(self, ctx: Context, state: dict[str, Any]) -> dict[str, Any] | None:
        core = await ctx.core()
        vol = await _find(core, state.get("id") or state["name"])
        return None if vol is None else await self._state(core, vol, state)

    async def import_state(self, ctx: Context, id: str) -> dict[str, Any] | None:
        """``terraform import infrasim_volume.disk disk`` (a name) or the volume's id."""
        return await self.read(ctx, {**null_object(SCHEMA), "id": id})


async def _base_check(ctx: Context, base: Any) -> Diagnostics:
    """A base that exists neither in the daemon nor in this plan is a plan-time error (best
    effort: an unreachable daemon is apply's problem)."""
    diags = Diagnostics()
    if not isinstance(base, str) or is_planned("volume", base):
        return diags
    try:
        found = await _find(await ctx.core(), base)
    except Exception:
        return diags
    if found is None:
        diags.error("No such volume", f"no volume {base!r} to layer this one on; create it "
                    "(an infrasim_volume referenced here) or with `infrasim volume create`",
                    ("base",))
    return diags


async def _find(core: Any, ref: str) -> Volume | None:
    from ...core.errors import NotFound

    try:
        vol: Volume = await core.get_volume(ref)
    except NotFound:
        return None
    return vol


__all__ = ["FORCES_REPLACEMENT", "OUTPUTS", "SCHEMA", "UPDATES_IN_PLACE", "VolumeResource",
           "output_attrs", "plan_values", "request_from_attrs", "resize_diags", "size_form",
           "size_text", "state_from_volume", "validate_config"]
