"""Data source ``infrasim_host``: what the daemon's host can run, so a configuration can
adapt (e.g. pick smaller guests under ``tcg``) or just show which accelerator VMs will get."""

from __future__ import annotations

from typing import Any

from ..framework import Attr, Context, DataSource, Diagnostics, Schema

_DEFAULT_GUEST_ARCH = "aarch64"  # VMSpec's default arch: what a VM gets without `arch`


def _computed(name: str, type_: Any, description: str) -> Attr:
    return Attr(name, type_, computed=True, description=description)


class HostDataSource(DataSource):
    type_name = "infrasim_host"
    schema = Schema(
        description="The host the InfraSim daemon runs on: OS, CPU, QEMU and accelerators.",
        attrs=(
            _computed("id", "string", "The daemon's data dir (one host per data dir)."),
            _computed("os", "string", "Host OS: linux or darwin."),
            _computed("arch", "string", "Host CPU: x86_64 or aarch64."),
            _computed("qemu_version", "string", "QEMU version (empty when QEMU is missing)."),
            _computed("accelerator", "string",
                      f"The accelerator a VM gets by default ({_DEFAULT_GUEST_ARCH} guest, "
                      "accelerator auto): kvm, hvf or tcg."),
            _computed("accelerators", ["map", "string"],
                      "Guest arch → the accelerator that really works for it."),
            _computed("accelerator_reasons", ["map", "string"],
                      "Guest arch → why that accelerator was chosen."),
            _computed("data_dir", "string", "The daemon's data dir."),
            _computed("daemon_version", "string", "The daemon's InfraSim version."),
        ),
    )

    async def read(self, ctx: Context, config: dict[str, Any]) -> tuple[dict[str, Any],
                                                                          Diagnostics]:
        core = await ctx.core()
        st = await ctx.wait(core.status())
        host = st["host"]
        accels: dict[str, str] = dict(host.get("accelerators") or {})
        return {
            "id": st["data_dir"],
            "os": host["os"],
            "arch": host["arch"],
            "qemu_version": host["qemu_version"],
            "accelerator": accels.get(_DEFAULT_GUEST_ARCH, "tcg"),
            "accelerators": accels,
            "accelerator_reasons": dict(host.get("accel_reasons") or {}),
            "data_dir": st["data_dir"],
            "daemon_version": st["version"],
        }, Diagnostics()


__all__ = ["HostDataSource"]
