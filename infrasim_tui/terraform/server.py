"""``terraform-provider-infrasim``: the go-plugin side of the provider process.

terraform starts the provider several times per command and waits for its handshake line,
so start-up is kept small: only os/sys/signal are imported before stdout is secured and only
grpc before the handshake. The services are registered as generic handlers naming their
methods, so protobuf, msgpack and the servicer load right after the handshake line, while
terraform connects; resources, the core and the daemon connection load on first use.

    terraform-provider-infrasim            as terraform runs it (needs go-plugin's cookie)
    terraform-provider-infrasim --debug    serve for TF_REATTACH_PROVIDERS (tests, debugging)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

MAGIC_COOKIE_KEY = "TF_PLUGIN_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2"
PROTOCOL_VERSION = 6
CORE_PROTOCOL_VERSION = 1  # go-plugin's own
PROVIDER_ADDRESS = "registry.terraform.io/infrasim/infrasim"
NOT_A_COMMAND = ("This binary is a plugin. These are not meant to be executed directly.\n"
                 "Please execute the program that consumes these plugins, which will\n"
                 "load any plugins automatically\n")
MAX_MESSAGE = 256 << 20  # as terraform's own client
SHUTDOWN_GRACE = 0.5  # seconds in-flight RPCs get after Shutdown/SIGTERM
#: The RPCs of tfplugin6.Provider served (tfplugin6.proto's service; a test keeps them equal).
#: Each takes ``<Name>.Request`` and returns ``<Name>.Response``.
PROVIDER_RPCS = (
    "GetMetadata", "GetProviderSchema", "ValidateProviderConfig", "ValidateResourceConfig",
    "ValidateDataResourceConfig", "UpgradeResourceState", "ConfigureProvider", "ReadResource",
    "PlanResourceChange", "ApplyResourceChange", "ImportResourceState", "ReadDataSource",
    "StopProvider",
)


def _fail(message: str) -> int:
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # terraform passes PYTHONDONTWRITEBYTECODE on, which would make every one of the
    # provider's several starts per command compile its modules again (~10 ms): cache them.
    sys.dont_write_bytecode = False
    if args in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if args == ["--debug"]:
        return _serve(debug=True, handshake_fd=-1)
    if args:
        return _fail(f"usage: terraform-provider-infrasim [--debug] (got {' '.join(args)})")
    if os.environ.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE:
        return _fail(NOT_A_COMMAND)
    versions = (os.environ.get("PLUGIN_PROTOCOL_VERSIONS") or str(PROTOCOL_VERSION)).split(",")
    if str(PROTOCOL_VERSION) not in (v.strip() for v in versions):
        return _fail(f"terraform-provider-infrasim speaks plugin protocol {PROTOCOL_VERSION}; "
                     f"terraform offers {','.join(versions)}: use terraform 1.0 or later")
    # The handshake line must be the first thing on stdout: keep the real stdout for it alone
    # and send fd 1 (anything a library prints) to stderr, which terraform logs.
    sys.stdout.flush()
    handshake_fd = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches us as StopProvider
    return _serve(debug=False, handshake_fd=handshake_fd)


def _socket_dir() -> str:
    """A private (0700) temp dir short enough for a unix socket path (< 100 bytes), where
    go-plugin asks (PLUGIN_UNIX_SOCKET_DIR) or in the temp dir; made by hand because
    tempfile's imports cost a few ms of every start."""
    base = os.environ.get("PLUGIN_UNIX_SOCKET_DIR") or os.environ.get("TMPDIR") or "/tmp"
    if len(base) > 60 or not os.path.isdir(base):
        base = "/tmp"
    while True:
        path = os.path.join(base, f"tfis-{os.urandom(5).hex()}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _serve(*, debug: bool, handshake_fd: int) -> int:
    import asyncio

    return asyncio.run(_run(debug=debug, handshake_fd=handshake_fd))


class _Servicer:
    """The Provider servicer and the protocol messages, loaded once (after the handshake)."""

    def __init__(self) -> None:
        self.provider: Any = None
        self.messages: Any = None

    def load(self) -> None:
        if self.provider is None:
            from .gen import tfplugin6_pb2
            from .provider import Provider

            self.messages, self.provider = tfplugin6_pb2, Provider()


def handlers(servicer: _Servicer, shutdown: Callable[[], None]) -> list[Any]:
    """Generic handlers for ``tfplugin6.Provider`` and go-plugin's ``plugin.GRPCController``
    that need neither protobuf nor the servicer until a call arrives."""
    import grpc

    def method(name: str) -> Any:
        def decode(data: bytes) -> Any:
            servicer.load()
            return getattr(servicer.messages, name).Request.FromString(data)

        async def call(request: Any, context: Any) -> Any:
            return await getattr(servicer.provider, name)(request, context)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=decode,
            response_serializer=lambda msg: msg.SerializeToString())

    async def shutdown_call(request: bytes, context: Any) -> bytes:
        shutdown()
        return b""  # plugin.Empty

    return [
        grpc.method_handlers_generic_handler(
            "tfplugin6.Provider", {name: method(name) for name in PROVIDER_RPCS}),
        grpc.method_handlers_generic_handler("plugin.GRPCController", {
            "Shutdown": grpc.unary_unary_rpc_method_handler(
                shutdown_call, request_deserializer=bytes, response_serializer=bytes)}),
    ]


async def _run(*, debug: bool, handshake_fd: int) -> int:
    import asyncio
    import logging

    import grpc
    import grpc.aio

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    done = asyncio.Event()
    sock_dir = _socket_dir()
    sock = os.path.join(sock_dir, "plugin.sock")
    servicer = _Servicer()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
    server.add_generic_rpc_handlers(handlers(servicer, done.set))
    client_cert = os.environ.get("PLUGIN_CLIENT_CERT", "")
    cert_b64 = ""
    try:
        if client_cert and not debug:
            from .tls import server_certificate

            key_pem, cert_pem, cert_b64 = server_certificate()
            # terraform's client key is ECDSA P-521, which grpcio does not offer in its
            # certificate request: asking for a client certificate breaks the handshake.
            creds = grpc.ssl_server_credentials([(key_pem, cert_pem)],
                                                require_client_auth=False)
            server.add_secure_port(f"unix:{sock}", creds)
        else:
            server.add_insecure_port(f"unix:{sock}")
        await server.start()

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        if debug:
            loop.add_signal_handler(signal.SIGINT, done.set)
            _print_reattach(sock)
        else:
            line = f"{CORE_PROTOCOL_VERSION}|{PROTOCOL_VERSION}|unix|{sock}|grpc|{cert_b64}\n"
            os.write(handshake_fd, line.encode())
        servicer.load()  # while terraform connects
        await done.wait()
        await server.stop(SHUTDOWN_GRACE)
        if servicer.provider is not None:
            await servicer.provider.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(sock)
        with contextlib.suppress(OSError):
            os.rmdir(sock_dir)
    return 0


def _print_reattach(sock: str) -> None:
    import json

    spec = {PROVIDER_ADDRESS: {"Protocol": "grpc", "ProtocolVersion": PROTOCOL_VERSION,
                               "Pid": os.getpid(), "Test": True,
                               "Addr": {"Network": "unix", "String": sock}}}
    sys.stdout.write(f"TF_REATTACH_PROVIDERS='{json.dumps(spec, separators=(',', ':'))}'\n")
    sys.stdout.flush()
    sys.stderr.write("terraform-provider-infrasim: serving in debug mode; export the line "
                     "above and run terraform; Ctrl-C or SIGTERM stops\n")


__all__ = ["MAGIC_COOKIE_KEY", "MAGIC_COOKIE_VALUE", "NOT_A_COMMAND", "main"]
