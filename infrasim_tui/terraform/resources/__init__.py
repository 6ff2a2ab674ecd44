"""The provider's resources and data sources.

Importing this package loads only schemas and the small framework; each resource imports the
core's modules inside its methods, so a provider process that only answers GetSchema stays
fast (terraform starts one several times per command).
"""

from __future__ import annotations

from ..framework import DataSource, Resource
from .network import NetworkResource
from .qos_profile import QosProfileResource
from .snapshot import SnapshotResource
from .vm import VMResource
from .volume import VolumeResource
from .volume_data import VolumeDataSource

RESOURCES: list[Resource] = [VMResource(), VolumeResource(), NetworkResource(),
                             SnapshotResource(), QosProfileResource()]


def _host_data_sources() -> list[DataSource]:
    """``infrasim_host`` lives in ``.host`` (written separately); tolerate its absence."""
    try:
        from . import host
    except ImportError:
        return []
    found = getattr(host, "DATA_SOURCES", None)
    if isinstance(found, list):
        return [d for d in found if isinstance(d, DataSource)]
    out: list[DataSource] = []
    for value in vars(host).values():
        if isinstance(value, DataSource):
            out.append(value)
        elif (isinstance(value, type) and issubclass(value, DataSource)
              and value is not DataSource and value.type_name == "infrasim_host"):
            out.append(value())
    unique = {d.type_name: d for d in out}
    return list(unique.values())


DATA_SOURCES: list[DataSource] = [VolumeDataSource(), *_host_data_sources()]

__all__ = ["DATA_SOURCES", "RESOURCES"]
