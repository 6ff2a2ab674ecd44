"""Authentication for the ``infrasim.v1`` gRPC API.

Two transports, two rules:

* the unix socket ``<data dir>/infrasim.sock`` (mode 0600 inside a 0700 data dir): the file
  mode is the authentication, calls need no token;
* TCP (only when asked for with ``--listen`` / ``daemon.grpc_listen``): every call must carry
  ``authorization: Bearer <token>``, the token being the content of ``<data dir>/api-token``
  (:func:`load_or_create_token`); optionally with TLS (:func:`server_credentials`).

Server side, add :class:`BearerTokenInterceptor` to ``grpc.aio.server(interceptors=...)``; it
serves both transports, telling them apart by the peer address of each call.

Client side, which helper to use:

* unix socket: ``grpc.aio.insecure_channel("unix:///abs/path")``, nothing else;
* TCP with TLS: ``grpc.aio.secure_channel(target, grpc.composite_channel_credentials(
  channel_credentials(ca), token_call_credentials(token)))``. gRPC only sends call
  credentials over a secure channel, so this is the way for TLS;
* plain TCP (development, or a trusted network): ``grpc.aio.insecure_channel(target,
  interceptors=bearer_client_interceptors(token))``. The token then travels in clear text.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import inspect
import ipaddress
import os
import re
import secrets
import ssl
import stat
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio

from ..core.errors import InvalidSpec, Unavailable

TOKEN_FILE = "api-token"
# Listen address used by ``--listen :PORT``: loopback, never all interfaces by accident.
DEFAULT_LISTEN_HOST = "127.0.0.1"
AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer"
# A token an operator writes by hand must still be a valid metadata value without spaces.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,512}")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")

# Generic only in the type stubs: a string, so nothing subscripts the class at run time.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


# --------------------------------------------------------------------------------------------
# The token file


def load_or_create_token(data_dir: Path) -> str:
    """The API token of a data dir: read ``<data_dir>/api-token``, creating it (0600) if absent.

    A new token is 32 random bytes, urlsafe base64 without padding. Creation is atomic: the
    token is written to a private temporary file that is then hard-linked into place, so a
    concurrent reader sees either no file or the whole token, and of two concurrent creators
    one wins and both return its token. A token file that group or others can access is
    refused (:class:`Unavailable`), saying how to fix it.
    """
    root = Path(os.path.abspath(os.path.expanduser(data_dir)))
    path = root / TOKEN_FILE
    token = _read_token(path)
    if token is not None:
        return token
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise Unavailable(f"cannot create the data dir {root}: {exc.strerror}") from None
    new = "t" + secrets.token_urlsafe(32)  # never "-…": operators pass it as `--token TOKEN`
    tmp = root / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, f"{new}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails with EEXIST if another process created it meanwhile
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            _create_exclusive(path, new)  # a filesystem without hard links
    except OSError as exc:
        raise Unavailable(
            f"cannot create the API token file {path}: {exc.strerror}; check that the data "
            "dir is writable by you"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    token = _read_token(path)
    if token is None:  # deleted between link and read: someone is playing with the file
        raise Unavailable(f"the API token file {path} vanished while being created; retry")
    return token


def _create_exclusive(path: Path, token: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{token}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_token(path: Path) -> str | None:
    """The token in ``path``, None if there is no such file; Unavailable if it is unsafe/bad."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unavailable(
                f"the API token file {path} is a symlink; replace it with a regular file "
                f"(or delete it to get a new token)"
            ) from None
        raise Unavailable(f"cannot read the API token file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unavailable(
                f"the API token file {path} is not a regular file; delete it to get a new token"
            )
        if st.st_uid != os.getuid():
            raise Unavailable(
                f"the API token file {path} is owned by uid {st.st_uid}, not by you "
                f"(uid {os.getuid()}); delete it to get a new token"
            )
        if st.st_mode & 0o077:
            raise Unavailable(
                f"the API token file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`, or delete it "
                "to get a new token (the old one may have leaked)"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    token = data.decode("ascii", "replace").strip()
    if not _TOKEN_RE.fullmatch(token):
        raise Unavailable(
            f"the API token file {path} does not hold a valid token (16 to 512 printable "
            "ASCII characters, no spaces); delete it to get a new one"
        )
    return token


# --------------------------------------------------------------------------------------------
# Server side


def _unix_peer(peer: str) -> bool:
    """True for a client on a unix *path* socket (``unix:...``).

    gRPC reports such a peer as ``unix:`` (the client's socket is unnamed); TCP peers are
    ``ipv4:...`` / ``ipv6:...``. Abstract unix sockets (``unix-abstract:``) have no file mode
    guarding them, so they are not trusted.
    """
    return peer.startswith("unix:")


def _bearer_matches(metadata: Iterable[tuple[str, str | bytes]] | None, token: bytes) -> bool:
    ok = False
    for key, value in metadata or ():
        if key.lower() != AUTH_METADATA_KEY:
            continue
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        scheme, _, presented = raw.strip().partition(b" ")
        if scheme.lower() != _BEARER.encode():
            continue
        # compare_digest: time independent of where the strings differ. No early exit on a
        # match either, so the number of headers is all that timing tells.
        ok |= hmac.compare_digest(presented.strip(), token)
    return ok


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets unix-socket calls through; TCP calls need ``authorization: Bearer <token>``.

    A ``grpc.aio`` server interceptor only sees the method name and the metadata, not the
    peer. So a call with the right token gets the method's own handler; any other call gets a
    handler wrapped so that the peer check runs first, inside the call, where
    ``context.peer()`` exists: unix peers proceed, the rest are aborted with UNAUTHENTICATED.
    No method is exempt (health checks included).
    """

    def __init__(self, token: str, *, token_file: Path | None = None) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._token = token.encode("utf-8")
        where = str(token_file) if token_file is not None else f"<data dir>/{TOKEN_FILE}"
        self.denied_message = (
            f"missing or wrong API token; read it from {where} (or pass --token)"
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED whoever asks
            return None
        if _bearer_matches(handler_call_details.invocation_metadata, self._token):
            return handler
        return _guarded(handler, self.denied_message)


def _guarded(handler: Handler, message: str) -> Handler:
    """``handler`` with a check that only unix peers may run it, for every call shape."""
    wrap: Callable[..., Handler]
    if handler.request_streaming and handler.response_streaming:
        behaviour, wrap = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behaviour, wrap = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behaviour, wrap = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behaviour, wrap = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    if behaviour is None:
        return handler
    return wrap(
        _guard_behaviour(behaviour, handler.response_streaming, message),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _guard_behaviour(
    behaviour: Callable[..., Any], response_streaming: bool, message: str
) -> Callable[..., Any]:
    """Wrap one servicer method, keeping the kind of callable grpc.aio dispatches on.

    grpc.aio inspects the handler: a coroutine function (for streaming responses: the
    reader/writer API), an async generator function, or a plain function (sync stack, run in
    the migration thread pool). The wrapper must be of the same kind, or grpc.aio would drive
    it the wrong way. A sync streaming handler is *called* on the event loop thread (only its
    generator is iterated in the pool), so its check runs lazily inside a generator: the sync
    context's ``abort`` blocks on the loop and would deadlock there.
    """

    async def check_async(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not _unix_peer(context.peer()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def check_sync(context: grpc.ServicerContext) -> None:
        if not _unix_peer(context.peer()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if inspect.isasyncgenfunction(behaviour):

        async def guarded_agen(request: Any, context: Any) -> AsyncIterator[Any]:
            await check_async(context)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return guarded_agen

    if inspect.iscoroutinefunction(behaviour) or (
        not response_streaming and inspect.isawaitable(behaviour)
    ):

        async def guarded_coro(request: Any, context: Any) -> Any:
            await check_async(context)
            return await behaviour(request, context)

        return guarded_coro

    if response_streaming:

        def guarded_gen(request: Any, context: Any) -> Iterable[Any]:
            check_sync(context)
            yield from behaviour(request, context)

        return guarded_gen

    def guarded_sync(request: Any, context: Any) -> Any:
        check_sync(context)
        return behaviour(request, context)

    return guarded_sync


def server_credentials(cert_file: Path, key_file: Path) -> grpc.ServerCredentials:
    """TLS credentials for the TCP listener from PEM files (certificate chain, private key).

    The pair is checked here with the stdlib ``ssl`` module (gRPC itself would only fail at
    the first handshake): unreadable files, non-PEM content, an encrypted key or a key that
    does not match the certificate give :class:`InvalidSpec` naming ``daemon.tls_cert`` or
    ``daemon.tls_key``.
    """
    cert = _read_pem(cert_file, "daemon.tls_cert", "certificate")
    key = _read_pem(key_file, "daemon.tls_key", "private key")
    if b"ENCRYPTED" in key:
        raise InvalidSpec(
            "daemon.tls_key",
            f"{key_file} is encrypted with a passphrase; InfraSim needs an unencrypted key "
            "(protect it with file mode 0600 instead)",
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # Never prompts: a callable password that returns nothing instead of a tty prompt.
        ctx.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise InvalidSpec(
            "daemon.tls_cert",
            f"{cert_file} and {key_file} are not a matching PEM certificate and private key "
            f"({exc.reason or exc})",
        ) from None
    except OSError as exc:
        raise InvalidSpec("daemon.tls_cert", f"cannot load {cert_file}: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(ca_file: Path | None) -> grpc.ChannelCredentials:
    """TLS credentials for a client: trust ``ca_file`` (PEM), or the system roots if None."""
    if ca_file is None:
        return grpc.ssl_channel_credentials()
    return grpc.ssl_channel_credentials(root_certificates=_read_pem(ca_file, "tls_ca",
                                                                    "CA certificate"))


def _read_pem(path: Path, field: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidSpec(
            field, f"cannot read the {what} file {path}: {exc.strerror or exc}"
        ) from None
    if b"-----BEGIN " not in data:
        raise InvalidSpec(field, f"{path} is not a PEM {what} (no '-----BEGIN' line)")
    return data


# --------------------------------------------------------------------------------------------
# Client side


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Per-call credentials sending ``authorization: Bearer <token>``.

    gRPC attaches call credentials only on secure (TLS) channels: compose them with
    :func:`channel_credentials` via ``grpc.composite_channel_credentials``. For plain TCP use
    :func:`bearer_client_interceptors` instead.
    """
    return grpc.access_token_call_credentials(token)


class BearerClientInterceptor:
    """Adds ``authorization: Bearer <token>`` to every call of a ``grpc.aio`` channel.

    Use the instances from :func:`bearer_client_interceptors`: grpc.aio files each
    interceptor under the *first* call type it implements, so one object implementing all
    four would only ever see unary-unary calls. Hence one subclass per call type.
    """

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata()
        for key, value in details.metadata or ():
            if key.lower() != AUTH_METADATA_KEY:
                metadata.add(key, value)
        metadata.add(AUTH_METADATA_KEY, f"Bearer {self._token}")
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


class BearerUnaryUnaryInterceptor(BearerClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryUnaryCall[Any, Any]]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryUnaryCall[Any, Any]:
        return await continuation(self._details(client_call_details), request)


class BearerUnaryStreamInterceptor(
    BearerClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.UnaryStreamCall[Any, Any]]
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryStreamCall[Any, Any]:
        return await continuation(self._details(client_call_details), request)


class BearerStreamUnaryInterceptor(
    BearerClientInterceptor, grpc.aio.StreamUnaryClientInterceptor
):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[Any] | Iterable[Any]],
            Awaitable[grpc.aio.StreamUnaryCall[Any, Any]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> grpc.aio.StreamUnaryCall[Any, Any]:
        return await continuation(self._details(client_call_details), request_iterator)


class BearerStreamStreamInterceptor(
    BearerClientInterceptor, grpc.aio.StreamStreamClientInterceptor
):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[Any] | Iterable[Any]],
            Awaitable[grpc.aio.StreamStreamCall[Any, Any]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> grpc.aio.StreamStreamCall[Any, Any]:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the bearer token to all four call types of a grpc.aio channel."""
    return [
        BearerUnaryUnaryInterceptor(token),
        BearerUnaryStreamInterceptor(token),
        BearerStreamUnaryInterceptor(token),
        BearerStreamStreamInterceptor(token),
    ]


# --------------------------------------------------------------------------------------------
# Listen addresses


def parse_listen(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` for the TCP listener: ``127.0.0.1:7443``, ``[::1]:7443``, ``:7443``.

    An empty host means loopback (``127.0.0.1``), never all interfaces: ``0.0.0.0:PORT`` or
    ``[::]:PORT`` must be written out. IPv6 addresses need brackets. Port 0 asks the OS for a
    free port (the daemon reports the one it got). The host is returned without brackets;
    :func:`format_address` puts them back.
    """
    text = addr.strip()
    example = "use HOST:PORT, e.g. 127.0.0.1:7443, [::1]:7443 or :7443"
    if not text:
        raise InvalidSpec("listen", f"empty address; {example}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidSpec("listen", f"{addr!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise InvalidSpec("listen", f"{addr!r}: missing ':PORT' after ']'; {example}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidSpec("listen", f"{addr!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise InvalidSpec(
                "listen", f"{addr!r}: put an IPv6 address in brackets, e.g. [::1]:7443"
            )
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise InvalidSpec("listen", f"{addr!r}: missing ':PORT'; {example}")
        host = host or DEFAULT_LISTEN_HOST
        if not _valid_host(host):
            raise InvalidSpec("listen", f"{addr!r}: {host!r} is not an IP address or host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise InvalidSpec("listen", f"{addr!r}: port {port_text!r} is not a number; {example}")
    port = int(port_text)
    if port > 65535:
        raise InvalidSpec("listen", f"{addr!r}: port {port} is out of range (0-65535)")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):  # looks like an IPv4 address but is not one
        return False
    return len(host) <= 253 and _HOSTNAME_RE.fullmatch(host) is not None


def format_address(host: str, port: int) -> str:
    """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
