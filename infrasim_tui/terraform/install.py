"""``infrasim terraform install``: make ``source = "infrasim/infrasim"`` resolvable offline.

There is no registry to publish to, so the provider goes into a local filesystem mirror laid
out as terraform expects (``registry.terraform.io/infrasim/infrasim/VERSION/OS_ARCH/``), with a
small launcher that execs this installation's ``terraform-provider-infrasim``, plus a CLI
configuration that takes ``infrasim/*`` from the mirror and everything else directly. Then
``TF_CLI_CONFIG_FILE=PATH terraform init`` works with no network.
"""

from __future__ import annotations

import compileall
import os
import platform
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

HOSTNAME = "registry.terraform.io"
NAMESPACE = "infrasim"
TYPE = "infrasim"
SOURCE = f"{HOSTNAME}/{NAMESPACE}/{TYPE}"


@dataclass(frozen=True)
class Installed:
    cli_config: Path
    mirror: Path
    version: str
    launcher: Path

    def to_json(self) -> dict[str, str]:
        return {"cli_config": str(self.cli_config), "mirror": str(self.mirror),
                "version": self.version, "launcher": str(self.launcher), "source": SOURCE}


def platform_dir() -> str:
    """Pure-ish: terraform's OS_ARCH name for this machine (linux_amd64, darwin_arm64…)."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine)
    return f"{sys.platform.replace('linux2', 'linux')}_{arch}"


def launcher_text(provider_exe: str) -> str:
    """Pure: the mirror's executable. ``exec`` keeps terraform's pid, fds and signals direct."""
    return f"#!/bin/sh\nexec {shlex.quote(provider_exe)} \"$@\"\n"


def cli_config_text(mirror: Path) -> str:
    """Pure: a CLI configuration taking infrasim/* from the mirror, the rest as usual."""
    return (
        "# Written by `infrasim terraform install`. Use it with\n"
        f"#   TF_CLI_CONFIG_FILE={mirror.parent / 'infrasim.tfrc'} terraform init\n"
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f"    path    = \"{mirror}\"\n"
        f"    include = [\"{HOSTNAME}/{NAMESPACE}/*\"]\n"
        "  }\n"
        "  direct {\n"
        f"    exclude = [\"{HOSTNAME}/{NAMESPACE}/*\"]\n"
        "  }\n"
        "}\n"
    )


def provider_executable() -> str:
    exe = Path(sys.executable).with_name("terraform-provider-infrasim")
    return str(exe)


def install(root: Path, version: str, provider_exe: str | None = None) -> Installed:
    """Write the mirror and the CLI configuration under ``root`` (idempotent)."""
    root = root.absolute()
    mirror = root / "mirror"
    pdir = mirror / HOSTNAME / NAMESPACE / TYPE / version / platform_dir()
    pdir.mkdir(parents=True, exist_ok=True)
    launcher = pdir / f"terraform-provider-{TYPE}_v{version}"
    tmp = launcher.with_suffix(".tmp")
    tmp.write_text(launcher_text(provider_exe or provider_executable()))
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, launcher)
    cfg = root / "infrasim.tfrc"
    cfg.write_text(cli_config_text(mirror))
    # terraform starts the provider 2-5 times per command; with PYTHONDONTWRITEBYTECODE set
    # nothing would ever be cached, so compile the provider's modules once here.
    import infrasim_tui

    compileall.compile_dir(str(Path(infrasim_tui.__file__).parent), quiet=1)
    return Installed(cfg, mirror, version, launcher)


__all__ = ["SOURCE", "Installed", "cli_config_text", "install", "launcher_text",
           "platform_dir"]
