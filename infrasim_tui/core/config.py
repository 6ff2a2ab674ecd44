"""``config.toml``: where the data dir is, where images live, how the daemon listens.

Every value is validated on load and errors name the key and the file, because a typo in a
config file otherwise shows up much later as a confusing failure (or not at all).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.model import NetworkMode
from infrasim_tui.core.paths import DataDir

ENV_DATA_DIR = "INFRASIM_DATA_DIR"
ENV_CONFIG = "INFRASIM_CONFIG"
CONFIG_NAME = "config.toml"

_VMNET_MODES = (NetworkMode.VMNET_SHARED, NetworkMode.VMNET_BRIDGED)
_IFACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # fullmatch: "$" would let "en0\n" in
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class ConfigError(InvalidSpec):
    """A bad config value; ``field`` is ``section.key`` and the message names the file."""

    def __init__(self, field: str, message: str, path: Path | None = None) -> None:
        super().__init__(field, f"{message} (in {path})" if path else message)
        self.path = path


@dataclass(frozen=True)
class DaemonConfig:
    data_dir: Path
    grpc_listen: str = ""  # "" = no TCP listener (the core's unix socket only)
    qemu_path: str = ""  # "" = find qemu-system-* on PATH when needed


@dataclass(frozen=True)
class StorageConfig:
    images_dir: Path
    volumes_dir: Path
    snapshots_dir: Path


@dataclass(frozen=True)
class NetworkConfig:
    default_mode: NetworkMode = NetworkMode.USER
    vmnet_interface: str = "en0"


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    storage: StorageConfig
    network: NetworkConfig
    config_path: Path | None = None  # the file actually read, None when all defaults

    @property
    def data(self) -> DataDir:
        return DataDir(self.daemon.data_dir)


def _is_macos(platform: str | None) -> bool:
    return (platform or sys.platform) == "darwin"


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    value = env.get(var, "")
    # The XDG spec says relative values are invalid and must be ignored.
    return Path(value) if os.path.isabs(value) else _home(env) / fallback


def default_data_dir(
    env: Mapping[str, str] | None = None, *, platform: str | None = None
) -> Path:
    env = os.environ if env is None else env
    if _is_macos(platform):
        return _home(env) / "Library" / "Application Support" / "InfraSim"
    return _xdg(env, "XDG_DATA_HOME", ".local/share") / "infrasim"


def default_config_path(
    env: Mapping[str, str] | None = None, *, platform: str | None = None
) -> Path:
    env = os.environ if env is None else env
    if _is_macos(platform):
        return _home(env) / "Library" / "Application Support" / "InfraSim" / CONFIG_NAME
    return _xdg(env, "XDG_CONFIG_HOME", ".config") / "infrasim" / CONFIG_NAME


def _abs(path: str | Path, base: Path, env: Mapping[str, str]) -> Path:
    """``~`` expanded (with ``env``'s HOME); relative paths anchored at ``base``; symlinks kept."""
    text = str(path)
    if text == "~" or text.startswith("~/"):
        text = str(_home(env)) + text[1:]
    else:
        text = os.path.expanduser(text)  # ~user
    return Path(os.path.abspath(base / text))


# --- reading --------------------------------------------------------------------------------


def _choose_config_file(
    config_path: Path | None,
    env: Mapping[str, str],
    explicit_data_dir: Path | None,
    platform: str | None,
) -> Path | None:
    if config_path is not None:
        path = _abs(config_path, Path.cwd(), env)
        if not path.is_file():
            raise ConfigError("config", f"config file {path} (given with --config) does not exist")
        return path
    if env.get(ENV_CONFIG):
        path = _abs(env[ENV_CONFIG], Path.cwd(), env)
        if not path.is_file():
            raise ConfigError(
                "config", f"config file {path} (from ${ENV_CONFIG}) does not exist; "
                f"create it or unset {ENV_CONFIG}"
            )
        return path
    if explicit_data_dir is not None:
        # A separate world reads only its own config, never the user's global one.
        candidate = explicit_data_dir / CONFIG_NAME
        return candidate if candidate.is_file() else None
    candidate = default_config_path(env, platform=platform)
    return candidate if candidate.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid UTF-8: {exc}") from None


_SCHEMA: dict[str, tuple[str, ...]] = {
    "daemon": ("grpc_listen", "data_dir", "qemu_path"),
    "storage": ("images_dir", "volumes_dir", "snapshots_dir"),
    "network": ("default_mode", "vmnet_interface"),
}


def _toml_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", dict: "table",
             list: "array"}
    return names.get(type(value), type(value).__name__)


def _unknown(name: str, known: Any, where: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return f"unknown {where} {name!r}{hint}"


class _Reader:
    """Typed access to the parsed file; every error names ``section.key`` and the file."""

    def __init__(self, raw: dict[str, Any], path: Path | None) -> None:
        self.path = path
        self.values: dict[str, dict[str, Any]] = {}
        for section, table in raw.items():
            if section not in _SCHEMA:
                raise ConfigError(section, _unknown(section, _SCHEMA, "section"), path)
            if not isinstance(table, dict):
                raise ConfigError(
                    section, f"expected a table [{section}], got {_toml_type(table)}", path
                )
            for key in table:
                if key not in _SCHEMA[section]:
                    raise ConfigError(
                        f"{section}.{key}", _unknown(key, _SCHEMA[section], "key"), path
                    )
            self.values[section] = table

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(field, message, self.path)

    def string(self, field: str) -> str | None:
        section, key = field.split(".")
        if key not in self.values.get(section, {}):
            return None
        value = self.values[section][key]
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_toml_type(value)} {value!r}")
        return value


# --- validation -----------------------------------------------------------------------------


def _check_listen(value: str) -> str | None:
    """None if ``value`` is a valid gRPC HOST:PORT, else why not."""
    if value == "":
        return None
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            return "an IPv6 address must look like [::1]:PORT"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            return "missing host or port"
        if ":" in host:
            return "put an IPv6 address in brackets, e.g. [::1]:50051"
        if not _HOST_RE.fullmatch(host):
            return f"{host!r} is not a host name or IPv4 address"
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return f"port {port!r} must be a number from 1 to 65535"
    return None


def _check_qemu(value: str, base: Path, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(resolved path, None) or (value, why it's unusable). A bare name is looked up on PATH."""
    if value == "":
        return value, None
    if "/" not in value and not value.startswith("~"):
        found = shutil.which(value, path=env.get("PATH", os.defpath))
        if found is None:
            return value, f"{value!r} was not found on PATH; give the full path to QEMU"
        return str(Path(found).absolute()), None
    path = _abs(value, base, env)
    if not path.is_file():
        return value, f"{path} does not exist or is not a file; give the path to qemu-system-*"
    if not os.access(path, os.X_OK):
        return value, f"{path} is not executable; chmod +x it or point to another QEMU"
    return str(path), None


def parse_network_mode(value: str) -> NetworkMode:
    """``user``, ``vmnet-shared``, ``VMNET_SHARED``... → NetworkMode; ValueError otherwise."""
    name = value.strip().upper().replace("-", "_")
    try:
        return NetworkMode[name]
    except KeyError:
        choices = ", ".join(m.name.lower().replace("_", "-") for m in NetworkMode)
        raise ValueError(f"unknown network mode {value!r}; expected one of {choices}") from None


def load_config(
    config_path: Path | None = None,
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    platform: str | None = None,
) -> Config:
    """Resolve and validate the configuration.

    data dir: ``data_dir`` (--data-dir) > $INFRASIM_DATA_DIR > the file's daemon.data_dir >
    platform default. File: ``config_path`` (--config) > $INFRASIM_CONFIG > with an explicit
    data dir, ``<data dir>/config.toml`` if present > default_config_path() if present.
    ``platform`` overrides ``sys.platform`` (tests).
    """
    env = os.environ if env is None else env
    cwd = Path.cwd()
    explicit: Path | None = None
    if data_dir is not None:
        explicit = _abs(data_dir, cwd, env)
    elif env.get(ENV_DATA_DIR):
        explicit = _abs(env[ENV_DATA_DIR], cwd, env)

    path = _choose_config_file(config_path, env, explicit, platform)
    r = _Reader(_read_toml(path) if path else {}, path)
    file_dir = path.parent if path else cwd

    # [daemon]
    file_data_dir = r.string("daemon.data_dir")
    if file_data_dir is not None and not file_data_dir.strip():
        raise r.error("daemon.data_dir", "must not be empty; remove the key to use the default")
    if explicit is not None:
        root = explicit
    elif file_data_dir is not None:
        root = _abs(file_data_dir, file_dir, env)  # relative to the config file that says it
    else:
        root = _abs(default_data_dir(env, platform=platform), cwd, env)
    if root.exists() and not root.is_dir():
        if explicit is None:
            raise r.error("daemon.data_dir", f"{root} exists and is not a directory")
        raise ConfigError(
            "data_dir",
            f"{root} (from --data-dir or ${ENV_DATA_DIR}) exists and is not a directory",
        )

    grpc_listen = r.string("daemon.grpc_listen") or ""
    if (why := _check_listen(grpc_listen)) is not None:
        raise r.error(
            "daemon.grpc_listen",
            f"expected HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051) or \"\", "
            f"got {grpc_listen!r}: {why}",
        )

    qemu_path, why = _check_qemu(r.string("daemon.qemu_path") or "", file_dir, env)
    if why is not None:
        raise r.error("daemon.qemu_path", why)

    # [storage]: relative paths are relative to the data dir, so a world is relocatable.
    def storage(key: str) -> Path:
        value = r.string(f"storage.{key}")
        if value is None:
            return root / key.removesuffix("_dir")
        if not value.strip():
            raise r.error(f"storage.{key}", "must not be empty; remove the key for the default")
        return _abs(value, root, env)

    # [network]
    mode = NetworkMode.USER
    mode_text = r.string("network.default_mode")
    if mode_text is not None:
        try:
            mode = parse_network_mode(mode_text)
        except ValueError as exc:
            raise r.error("network.default_mode", str(exc)) from None
        if mode in _VMNET_MODES and not _is_macos(platform):
            raise r.error(
                "network.default_mode",
                f"{mode_text!r} uses Apple's vmnet, which exists only on macOS; "
                "use 'user' on this host",
            )
    iface = r.string("network.vmnet_interface")
    if iface is None:
        iface = NetworkConfig.vmnet_interface
    elif not _IFACE_RE.fullmatch(iface):
        raise r.error(
            "network.vmnet_interface",
            f"expected an interface name like en0 (1-15 of A-Z a-z 0-9 _ . -), got {iface!r}",
        )

    return Config(
        daemon=DaemonConfig(data_dir=root, grpc_listen=grpc_listen, qemu_path=qemu_path),
        storage=StorageConfig(
            images_dir=storage("images_dir"),
            volumes_dir=storage("volumes_dir"),
            snapshots_dir=storage("snapshots_dir"),
        ),
        network=NetworkConfig(default_mode=mode, vmnet_interface=iface),
        config_path=path,
    )


# --- rendering ------------------------------------------------------------------------------


def _q(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(value, ensure_ascii=False)


def render_default_config(cfg: Config) -> str:
    """A commented config.toml holding ``cfg``'s values; loading it yields ``cfg`` again."""
    root = cfg.daemon.data_dir

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) and p != root else str(p)

    mode = cfg.network.default_mode.name.lower().replace("_", "-")
    modes = ", ".join(m.name.lower().replace("_", "-") for m in NetworkMode)
    return "\n".join(
        [
            "# InfraSim configuration.",
            f"# Read from --config, ${ENV_CONFIG}, <data dir>/{CONFIG_NAME} when --data-dir or",
            f"# ${ENV_DATA_DIR} is given, else {default_config_path()}.",
            "# Unknown sections or keys are errors, so typos don't go unnoticed.",
            "",
            "[daemon]",
            "# gRPC listen address HOST:PORT (IPv6 as [::1]:50051); \"\" = unix socket only.",
            f"grpc_listen = {_q(cfg.daemon.grpc_listen)}",
            f"# Holds the database, the lock and run state. --data-dir and ${ENV_DATA_DIR}",
            "# override it; a relative path is relative to this file.",
            f"data_dir = {_q(str(root))}",
            "# QEMU binary (path, or a name looked up on PATH); \"\" = find qemu-system-* on PATH.",
            f"qemu_path = {_q(cfg.daemon.qemu_path)}",
            "",
            "[storage]",
            "# Relative paths are relative to data_dir.",
            f"images_dir = {_q(rel(cfg.storage.images_dir))}",
            f"volumes_dir = {_q(rel(cfg.storage.volumes_dir))}",
            f"snapshots_dir = {_q(rel(cfg.storage.snapshots_dir))}",
            "",
            "[network]",
            f"# Mode of networks created without one: {modes} (vmnet-* on macOS only).",
            f"default_mode = {_q(mode)}",
            "# Host interface that vmnet-bridged networks bridge to (macOS).",
            f"vmnet_interface = {_q(cfg.network.vmnet_interface)}",
            "",
        ]
    )
