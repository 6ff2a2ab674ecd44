"""The provider's resource types and data sources, imported on first use (not at start: the
handshake must not wait for resource modules and the core model they import)."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from .framework import DataSource, Resource

_RESOURCES_INIT = Path(__file__).resolve().parent / "resources" / "__init__.py"


def _package() -> Any:
    """``resources/__init__.py`` (exports RESOURCES and DATA_SOURCES, lists of instances)."""
    return importlib.import_module(f"{__package__}.resources")


@functools.cache
def resources() -> list[Resource]:
    if not _RESOURCES_INIT.is_file():  # the resource modules are not written yet
        return []
    found: list[Resource] = list(_package().RESOURCES)
    return found


@functools.cache
def data_sources() -> list[DataSource]:
    """``resources.DATA_SOURCES`` plus ``infrasim_host`` (defined here, always served)."""
    from .resources.host import HostDataSource

    found: list[DataSource] = []
    if _RESOURCES_INIT.is_file():
        found = list(_package().DATA_SOURCES)
    if not any(d.type_name == HostDataSource.type_name for d in found):
        found.append(HostDataSource())
    return found


__all__ = ["data_sources", "resources"]
