"""Reach a daemon as a client: the CLI and the Terraform provider share this, so both find the
same daemon from the same settings.

A TCP ``address`` (argument or ``$INFRASIM_ADDRESS``) means a daemon elsewhere, which needs
its API token (argument or ``$INFRASIM_TOKEN``) and optionally a TLS CA. Otherwise the data
dir's unix socket, starting a daemon there when none answers (``autostart``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ..core.errors import InvalidSpec
from .autostart import ensure_daemon
from .client import RemoteCore

ENV_ADDRESS = "INFRASIM_ADDRESS"
ENV_TOKEN = "INFRASIM_TOKEN"


def serve_argv(data_root: Path, config_path: Path | None = None) -> list[str]:
    """The command that starts a daemon for ``data_root`` (this interpreter, this package)."""
    argv = [sys.executable, "-m", "infrasim_tui", "--data-dir", str(data_root)]
    if config_path is not None:
        argv += ["--config", str(Path(config_path).absolute())]
    return [*argv, "serve"]


def _stderr_log(line: str) -> None:
    print(f"infrasim: {line}", file=sys.stderr)


async def connect_core(
    *,
    address: str = "",
    token: str = "",
    tls_ca: str = "",
    data_dir: Path | None = None,
    config_path: Path | None = None,
    autostart: bool = True,
    log: Callable[[str], None] = _stderr_log,
    env: Mapping[str, str] | None = None,
) -> RemoteCore:
    """A RemoteCore for these settings; empty ``address``/``token`` fall back to ``env``.

    ``data_dir`` None means the configured default (``config_path``, ``$INFRASIM_DATA_DIR``,
    the platform's data dir). Raises InvalidSpec (field ``token``) for a TCP address without
    a token, and Unavailable when no daemon answers and none may or could be started.
    """
    env = os.environ if env is None else env
    address = address or env.get(ENV_ADDRESS, "")
    if address:  # a daemon elsewhere, over TCP: token (and TLS) required
        token = token or env.get(ENV_TOKEN, "")
        if not token:
            raise InvalidSpec("token", "a TCP daemon needs its API token (--token or "
                              f"{ENV_TOKEN}; it is in the daemon's data dir, file api-token)")
        from .auth import bearer_client_interceptors, channel_credentials

        interceptors: Any = bearer_client_interceptors(token)
        if tls_ca:
            channel = grpc.aio.secure_channel(address, channel_credentials(Path(tls_ca)),
                                              interceptors=interceptors)
        else:
            channel = grpc.aio.insecure_channel(address, interceptors=interceptors)
        return RemoteCore(channel, address)
    from ..core.config import load_config
    from ..core.paths import DataDir

    cfg = load_config(config_path, data_dir)
    data = DataDir(cfg.daemon.data_dir)
    await ensure_daemon(data.root, autostart=autostart,
                        serve_argv=serve_argv(data.root, config_path), log=log)
    channel = grpc.aio.insecure_channel(f"unix://{data.socket}")
    return RemoteCore(channel, str(data.root))


__all__ = ["ENV_ADDRESS", "ENV_TOKEN", "connect_core", "serve_argv"]
