"""config.toml: resolution order, validation of every key, and rendering."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from infrasim_tui.core.config import (
    Config,
    ConfigError,
    default_config_path,
    default_data_dir,
    load_config,
    render_default_config,
)
from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.model import NetworkMode


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose per-user dirs all live in tmp_path (never the real home)."""
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "PATH": str(tmp_path / "bin"),
    }


def world(tmp_path: Path, text: str, name: str = "world") -> Path:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    (root / "config.toml").write_text(text)
    return root


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: Any) -> Config:
    """Load ``text`` as <data dir>/config.toml of an explicit data dir (a separate world)."""
    return load_config(data_dir=world(tmp_path, text), env=env or {}, **kw)


def bad(tmp_path: Path, text: str, field: str, match: str, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text, **kw)
    assert err.value.field == field, str(err.value)
    assert str(tmp_path / "world" / "config.toml") in str(err.value), "the file must be named"
    assert isinstance(err.value, InvalidSpec)
    assert re.search(match, str(err.value)), f"{match!r} not in {err.value}"
    return err.value


# --- platform defaults ----------------------------------------------------------------------


def test_linux_defaults_follow_xdg(home: dict[str, str], tmp_path: Path) -> None:
    assert default_data_dir(home, platform="linux") == tmp_path / "xdg-data" / "infrasim"
    assert default_config_path(home, platform="linux") == (
        tmp_path / "xdg-config" / "infrasim" / "config.toml"
    )
    # Unset or relative XDG vars (invalid per the spec) fall back to ~/.local/share, ~/.config.
    plain = {"HOME": home["HOME"], "XDG_DATA_HOME": "relative/dir"}
    assert default_data_dir(plain, platform="linux") == Path(home["HOME"], ".local/share/infrasim")
    assert default_config_path(plain, platform="linux") == Path(
        home["HOME"], ".config/infrasim/config.toml"
    )


def test_macos_defaults(home: dict[str, str]) -> None:
    support = Path(home["HOME"], "Library", "Application Support", "InfraSim")
    assert default_data_dir(home, platform="darwin") == support
    assert default_config_path(home, platform="darwin") == support / "config.toml"


def test_all_defaults_without_any_file(home: dict[str, str], tmp_path: Path) -> None:
    cfg = load_config(env=home, platform="linux")
    root = tmp_path / "xdg-data" / "infrasim"
    assert cfg.config_path is None
    assert cfg.daemon.data_dir == root and cfg.data.root == root
    assert (cfg.daemon.grpc_listen, cfg.daemon.qemu_path) == ("", "")
    assert cfg.storage.images_dir == root / "images"
    assert cfg.storage.volumes_dir == root / "volumes"
    assert cfg.storage.snapshots_dir == root / "snapshots"
    assert cfg.network.default_mode is NetworkMode.USER
    assert cfg.network.vmnet_interface == "en0"


# --- resolution order -----------------------------------------------------------------------


def test_data_dir_precedence(home: dict[str, str], tmp_path: Path) -> None:
    global_cfg = Path(home["XDG_CONFIG_HOME"], "infrasim", "config.toml")
    global_cfg.parent.mkdir(parents=True)
    global_cfg.write_text(f'[daemon]\ndata_dir = "{tmp_path / "from-file"}"\n')
    env = {**home, "INFRASIM_DATA_DIR": str(tmp_path / "from-env")}

    assert load_config(env=home).daemon.data_dir == tmp_path / "from-file"
    assert load_config(env=env).daemon.data_dir == tmp_path / "from-env"
    assert load_config(data_dir=tmp_path / "arg", env=env).daemon.data_dir == tmp_path / "arg"
    global_cfg.unlink()
    assert load_config(env=home, platform="linux").daemon.data_dir == (
        tmp_path / "xdg-data" / "infrasim"
    )


def test_config_file_precedence(home: dict[str, str], tmp_path: Path) -> None:
    def cfg_file(name: str, iface: str) -> Path:
        path = tmp_path / name / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'[network]\nvmnet_interface = "{iface}"\n')
        return path

    global_cfg = cfg_file("xdg-config/infrasim", "global0")
    env_cfg = cfg_file("envcfg", "env0")
    arg_cfg = cfg_file("argcfg", "arg0")
    dd_cfg = cfg_file("dd", "dd0")

    def iface(**kw: object) -> tuple[str, Path | None]:
        cfg = load_config(**kw)  # type: ignore[arg-type]
        return cfg.network.vmnet_interface, cfg.config_path

    with_env = {**home, "INFRASIM_CONFIG": str(env_cfg)}
    assert iface(env=home) == ("global0", global_cfg)
    assert iface(env=with_env) == ("env0", env_cfg)
    assert iface(env=with_env, config_path=arg_cfg) == ("arg0", arg_cfg)
    assert iface(env=with_env, config_path=arg_cfg, data_dir=dd_cfg.parent) == ("arg0", arg_cfg)
    assert iface(env=with_env, data_dir=dd_cfg.parent) == ("env0", env_cfg)
    # An explicit data dir reads its own config.toml...
    assert iface(env=home, data_dir=dd_cfg.parent) == ("dd0", dd_cfg)
    dd_env = {**home, "INFRASIM_DATA_DIR": str(dd_cfg.parent)}
    assert iface(env=dd_env) == ("dd0", dd_cfg)
    # ...and never falls back to the user's global one: separate worlds stay separate.
    assert iface(env=home, data_dir=tmp_path / "empty-world") == ("en0", None)
    assert iface(env={**home, "INFRASIM_DATA_DIR": str(tmp_path / "e2")}) == ("en0", None)


def test_missing_explicit_config_is_an_error(home: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{missing}.*does not exist"):
        load_config(config_path=missing, env=home)
    with pytest.raises(ConfigError, match=f"{missing}.*INFRASIM_CONFIG.*does not exist"):
        load_config(env={**home, "INFRASIM_CONFIG": str(missing)})


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = world(tmp_path, '[storage]\nimages_dir = "img"\nvolumes_dir = "/abs/vols"\n'
                           'snapshots_dir = "~/snaps"\n')
    cfg = load_config(data_dir=Path("world"), env={"HOME": str(tmp_path / "h")})
    assert cfg.daemon.data_dir == root  # a relative --data-dir is relative to the cwd
    assert cfg.storage.images_dir == root / "img"  # relative to the data dir
    assert cfg.storage.volumes_dir == Path("/abs/vols")
    assert cfg.storage.snapshots_dir == tmp_path / "h" / "snaps"
    # daemon.data_dir in a file is relative to that file.
    other = tmp_path / "etc" / "config.toml"
    other.parent.mkdir()
    other.write_text('[daemon]\ndata_dir = "../state"\n')
    cfg = load_config(config_path=other, env={})
    assert cfg.daemon.data_dir == tmp_path / "state"
    assert cfg.storage.images_dir == tmp_path / "state" / "images"


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["", "127.0.0.1:50051", "localhost:1", "0.0.0.0:65535", "[::1]:50051", "[::]:8080",
              "my-host.example.com:443"],
)
def test_grpc_listen_accepts(tmp_path: Path, value: str) -> None:
    assert load(tmp_path, f'[daemon]\ngrpc_listen = "{value}"\n').daemon.grpc_listen == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("50051", "missing host or port"),
        (":50051", "missing host or port"),
        ("host:0", "from 1 to 65535"),
        ("host:65536", "from 1 to 65535"),
        ("host:http", "from 1 to 65535"),
        ("host:\u00b2", "from 1 to 65535"),
        ("host\\n:1", "not a host name"),
        ("host:", "from 1 to 65535"),
        ("::1:50051", "in brackets"),
        ("[::1]", "must look like"),
        ("[nope]:1", "not an IPv6 address"),
        ("bad host:1", "not a host name"),
    ],
)
def test_grpc_listen_refuses(tmp_path: Path, value: str, why: str) -> None:
    bad(tmp_path, f'[daemon]\ngrpc_listen = "{value}"\n', "daemon.grpc_listen",
        f"expected HOST:PORT.*{why}")


def test_data_dir_validation(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\ndata_dir = ""\n')
    with pytest.raises(ConfigError, match=r"daemon.data_dir: must not be empty.*c\.toml"):
        load_config(config_path=cfg, env={})
    (tmp_path / "afile").write_text("")
    cfg.write_text('[daemon]\ndata_dir = "afile"\n')
    with pytest.raises(ConfigError, match=r"daemon\.data_dir: .*afile exists and is not a dir"):
        load_config(config_path=cfg, env={})
    with pytest.raises(ConfigError, match=r"^data_dir: .*afile \(from --data-dir"):
        load_config(data_dir=tmp_path / "afile", env={})


def test_qemu_path(tmp_path: Path, home: dict[str, str]) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    qemu = bindir / "qemu-system-aarch64"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    assert load(tmp_path, f'[daemon]\nqemu_path = "{qemu}"\n').daemon.qemu_path == str(qemu)
    # A bare name is looked up on PATH and stored resolved.
    by_name = load(tmp_path, '[daemon]\nqemu_path = "qemu-system-aarch64"\n', env=home)
    assert by_name.daemon.qemu_path == str(qemu)
    bad(tmp_path, '[daemon]\nqemu_path = "qemu-system-x86_64"\n', "daemon.qemu_path",
        "not found on PATH", env=home)
    bad(tmp_path, f'[daemon]\nqemu_path = "{bindir / "missing"}"\n', "daemon.qemu_path",
        "does not exist")
    bad(tmp_path, f'[daemon]\nqemu_path = "{bindir}"\n', "daemon.qemu_path", "not a file")
    qemu.chmod(0o644)
    if os.getuid() != 0 or not os.access(qemu, os.X_OK):  # root may execute anything
        bad(tmp_path, f'[daemon]\nqemu_path = "{qemu}"\n', "daemon.qemu_path", "not executable")


@pytest.mark.parametrize(
    ("text", "mode"),
    [("user", NetworkMode.USER), ("USER", NetworkMode.USER), ("Segment", NetworkMode.SEGMENT)],
)
def test_default_mode_names(tmp_path: Path, text: str, mode: NetworkMode) -> None:
    cfg = load(tmp_path, f'[network]\ndefault_mode = "{text}"\n', platform="linux")
    assert cfg.network.default_mode is mode


@pytest.mark.parametrize(
    ("text", "mode"),
    [("vmnet-shared", NetworkMode.VMNET_SHARED), ("vmnet_shared", NetworkMode.VMNET_SHARED),
     ("VMNET-BRIDGED", NetworkMode.VMNET_BRIDGED)],
)
def test_vmnet_modes_only_on_macos(tmp_path: Path, text: str, mode: NetworkMode) -> None:
    conf = f'[network]\ndefault_mode = "{text}"\n'
    assert load(tmp_path, conf, platform="darwin").network.default_mode is mode
    bad(tmp_path, conf, "network.default_mode", "exists only on macOS", platform="linux")


def test_default_mode_unknown(tmp_path: Path) -> None:
    bad(tmp_path, '[network]\ndefault_mode = "nat"\n', "network.default_mode",
        "unknown network mode 'nat'; expected one of user, vmnet-shared")


@pytest.mark.parametrize("value", ["en0", "bridge100", "a" * 15, "vlan.10", "br_lan-1"])
def test_vmnet_interface_accepts(tmp_path: Path, value: str) -> None:
    conf = f'[network]\nvmnet_interface = "{value}"\n'
    assert load(tmp_path, conf).network.vmnet_interface == value


@pytest.mark.parametrize("value", ["", "a" * 16, "en 0", "en0;rm", "ö0", "en0\\n"])
def test_vmnet_interface_refuses(tmp_path: Path, value: str) -> None:
    bad(tmp_path, f'[network]\nvmnet_interface = "{value}"\n', "network.vmnet_interface",
        "expected an interface name")


@pytest.mark.parametrize("key", ["images_dir", "volumes_dir", "snapshots_dir"])
def test_storage_dir_empty(tmp_path: Path, key: str) -> None:
    bad(tmp_path, f'[storage]\n{key} = ""\n', f"storage.{key}", "must not be empty")


@pytest.mark.parametrize(
    ("text", "field", "kind"),
    [
        ("[daemon]\ngrpc_listen = 50051\n", "daemon.grpc_listen", "integer 50051"),
        ("[daemon]\ndata_dir = true\n", "daemon.data_dir", "boolean"),
        ("[daemon]\nqemu_path = 1.5\n", "daemon.qemu_path", "float"),
        ('[storage]\nimages_dir = ["a"]\n', "storage.images_dir", "array"),
        ("[storage.volumes_dir]\n", "storage.volumes_dir", "table"),
        ("[network]\ndefault_mode = 1\n", "network.default_mode", "integer"),
        ("[network]\nvmnet_interface = 0\n", "network.vmnet_interface", "integer"),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, field: str, kind: str) -> None:
    bad(tmp_path, text, field, f"expected a string, got {kind}")


def test_section_must_be_a_table(tmp_path: Path) -> None:
    bad(tmp_path, 'daemon = "x"\n', "daemon", r"expected a table \[daemon\], got string")


def test_unknown_section_and_keys(tmp_path: Path) -> None:
    bad(tmp_path, "[deamon]\n", "deamon", "unknown section 'deamon'; did you mean 'daemon'")
    bad(tmp_path, "[daemon]\ndata-dir = 'x'\n", "daemon.data-dir",
        "unknown key 'data-dir'; did you mean 'data_dir'")
    bad(tmp_path, "[network]\nzzz = 1\n", "network.zzz",
        "unknown key 'zzz'; known: default_mode, vmnet_interface")
    bad(tmp_path, "top_level = 1\n", "top_level", "unknown section")


def test_invalid_toml(tmp_path: Path) -> None:
    bad(tmp_path, "[daemon\n", "config", r"is not valid TOML: .*line 1")


# --- rendering ------------------------------------------------------------------------------


def test_render_round_trips(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    qemu = bindir / "qemu"
    qemu.write_text("")
    qemu.chmod(0o755)
    cfg = load(
        tmp_path,
        f'[daemon]\ngrpc_listen = "[::1]:7777"\nqemu_path = "{qemu}"\n'
        '[storage]\nimages_dir = "imgs"\nvolumes_dir = "/srv/vol \\"q\\""\n'
        '[network]\ndefault_mode = "segment"\nvmnet_interface = "br0"\n',
    )
    text = render_default_config(cfg)
    for key in ("grpc_listen", "data_dir", "qemu_path", "images_dir", "volumes_dir",
                "snapshots_dir", "default_mode", "vmnet_interface"):
        assert f"\n{key} = " in text
    assert 'images_dir = "imgs"' in text  # data-dir-relative paths stay relative
    out = tmp_path / "rendered.toml"
    out.write_text(text)
    again = load_config(config_path=out, env={})
    assert again.config_path == out
    assert (again.daemon, again.storage, again.network) == (cfg.daemon, cfg.storage, cfg.network)


def test_render_defaults_loads(tmp_path: Path, home: dict[str, str]) -> None:
    cfg = load_config(env=home, platform="linux")
    out = tmp_path / "c.toml"
    out.write_text(render_default_config(cfg))
    again = load_config(config_path=out, env=home, platform="linux")
    assert (again.daemon, again.storage, again.network) == (cfg.daemon, cfg.storage, cfg.network)
