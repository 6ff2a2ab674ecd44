"""Data source ``infrasim_volume``: an existing volume, looked up by ``name`` or by ``digest``
(the BLAKE3 of its file, or of the image it is), with the same attributes the resource reports.
"""

from __future__ import annotations

from typing import Any

from ..framework import Attr, Context, DataSource, Diagnostics, Schema, is_unknown
from .volume import output_attrs, state_from_volume

SCHEMA = Schema(
    description="An existing volume, by name or by digest.",
    attrs=(
        Attr("name", "string", optional=True, computed=True,
             description="The volume's name (give this or digest)."),
        Attr("digest", "string", optional=True, computed=True,
             description="BLAKE3 of the volume's file or image (give this or name)."),
        *(a for a in output_attrs(computed_args=True) if a.name != "digest"),
    ),
)


def pick_by_digest(volumes: list[Any], digest: str) -> list[Any]:
    """Volumes whose content is ``digest``: the file's own digest first, then a read-only
    volume that is the stored image itself, then any volume on that image."""
    exact = [v for v in volumes if v.status.digest == digest]
    if exact:
        return exact
    on_image = [v for v in volumes if v.status.image_digest == digest]
    read_only = [v for v in on_image if v.spec.read_only]
    return read_only or on_image


class VolumeDataSource(DataSource):
    type_name = "infrasim_volume"
    schema = SCHEMA

    def validate(self, config: dict[str, Any]) -> Diagnostics:
        diags = Diagnostics()
        name, digest = config.get("name"), config.get("digest")
        if is_unknown(name) or is_unknown(digest):
            return diags
        if (name is None) == (digest is None):
            diags.error("Give exactly one of name and digest",
                        "look the volume up either by its name or by its BLAKE3 digest",
                        ("name",) if name is not None else ())
        if isinstance(digest, str):
            from ...core.digest import check_digest
            from ...core.errors import InvalidSpec

            try:
                check_digest(digest)
            except InvalidSpec as exc:
                diags.error("Invalid digest", exc.reason, ("digest",))
        return diags

    async def read(self, ctx: Context, config: dict[str, Any]) -> tuple[dict[str, Any],
                                                                          Diagnostics]:
        from ...core.errors import NotFound

        diags = Diagnostics()
        core = await ctx.core()
        out = dict(config)
        if config.get("name") is not None:
            try:
                vol = await core.get_volume(config["name"])
            except NotFound:
                diags.error("No such volume", f"no volume named {config['name']!r}", ("name",))
                return out, diags
        else:
            found = pick_by_digest(await core.list_volumes(), config["digest"])
            if len(found) != 1:
                detail = ("no volume has this digest" if not found else
                          f"{len(found)} volumes match ({', '.join(v.meta.name for v in found)}); "
                          "look it up by name")
                diags.error("No single volume with this digest", detail, ("digest",))
                return out, diags
            vol = found[0]
        base = ""
        if vol.spec.base_volume_id:
            base = (await core.get_volume(vol.spec.base_volume_id)).meta.name
        state = state_from_volume(vol, base, None)
        out.update({a.name: state.get(a.name) for a in SCHEMA.attrs if a.name in state})
        if config.get("digest") is not None:
            out["digest"] = config["digest"]  # keep what was asked (it may be the image's)
        return out, diags


__all__ = ["SCHEMA", "VolumeDataSource", "pick_by_digest"]
