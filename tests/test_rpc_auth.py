"""API authentication: unix socket calls are trusted, TCP calls need the bearer token (and may
use TLS); the token file; TLS credentials; listen addresses. A real grpc.aio server with raw
bytes handlers of every call shape, async and sync."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from infrasim_tui.core.errors import InvalidSpec, Unavailable
from infrasim_tui.rpc.auth import (
    TOKEN_FILE,
    BearerTokenInterceptor,
    bearer_client_interceptors,
    channel_credentials,
    format_address,
    load_or_create_token,
    parse_listen,
    server_credentials,
    token_call_credentials,
)

TOKEN = "s3cret-token-for-tests-0123456789abcdef"


def _raw(data: bytes) -> bytes:
    return data


def _uu(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return ch.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)


def _us(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return ch.unary_stream(method, request_serializer=_raw, response_deserializer=_raw)


def _su(ch: grpc.aio.Channel, method: str) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
    return ch.stream_unary(method, request_serializer=_raw, response_deserializer=_raw)


def _ss(ch: grpc.aio.Channel, method: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
    return ch.stream_stream(method, request_serializer=_raw, response_deserializer=_raw)


@dataclass
class Calls:
    """Which servicer methods actually ran (a denied call must not run any)."""

    ran: list[str] = field(default_factory=list)


def _handlers(calls: Calls) -> list[grpc.GenericRpcHandler]:
    async def unary(req: bytes, ctx: Any) -> bytes:
        calls.ran.append("Unary")
        return b"u:" + req

    async def server_stream(req: bytes, ctx: Any) -> AsyncIterator[bytes]:
        calls.ran.append("ServerStream")
        for i in range(3):
            yield b"%d:" % i + req

    async def client_stream(reqs: AsyncIterator[bytes], ctx: Any) -> bytes:
        calls.ran.append("ClientStream")
        return b"+".join([r async for r in reqs])

    async def bidi(reqs: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        calls.ran.append("Bidi")
        async for r in reqs:
            yield b"b:" + r

    async def bidi_rw(reqs: Any, ctx: Any) -> None:
        # Reader/writer API: a coroutine function that writes its responses.
        calls.ran.append("BidiRW")
        while isinstance(msg := await ctx.read(), bytes):
            await ctx.write(b"rw:" + msg)

    def sync_unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        calls.ran.append("SyncUnary")
        return b"su:" + req

    def sync_stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        calls.ran.append("SyncStream")
        yield b"ss1:" + req
        yield b"ss2:" + req

    async def health(req: bytes, ctx: Any) -> bytes:
        calls.ran.append("Check")
        return b"SERVING"

    return [
        grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
                "BidiRW": grpc.stream_stream_rpc_method_handler(bidi_rw),
                "SyncUnary": grpc.unary_unary_rpc_method_handler(sync_unary),
                "SyncStream": grpc.unary_stream_rpc_method_handler(sync_stream),
            },
        ),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(health)}
        ),
    ]


@dataclass
class Served:
    sock: Path
    tcp: str
    tls: str
    calls: Calls
    message: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for CN=localhost, SAN DNS:localhost + IP:127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-out", str(d / "other-key.pem")],
        check=True, capture_output=True, timeout=30,
    )
    return d


@pytest.fixture
async def served(tmp_path: Path, pki: Path) -> AsyncIterator[Served]:
    calls = Calls()
    interceptor = BearerTokenInterceptor(TOKEN, token_file=tmp_path / TOKEN_FILE)
    pool = ThreadPoolExecutor(max_workers=4)
    server = grpc.aio.server(interceptors=[interceptor], migration_thread_pool=pool)
    server.add_generic_rpc_handlers(_handlers(calls))

    async def registered(req: bytes, ctx: Any) -> bytes:
        calls.ran.append("Registered")
        return b"r:" + req

    # As generated *_pb2_grpc code registers services (grpcio-tools >= 1.62): a separate
    # dispatch path in grpc.aio that must be intercepted just the same.
    server.add_registered_method_handlers(
        "test.Registered", {"Unary": grpc.unary_unary_rpc_method_handler(registered)}
    )
    sock = tmp_path / "s.sock"
    server.add_insecure_port(f"unix:{sock}")
    port = server.add_insecure_port("127.0.0.1:0")
    tls_port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(pki / "cert.pem", pki / "key.pem")
    )
    await server.start()
    try:
        yield Served(sock, f"127.0.0.1:{port}", f"127.0.0.1:{tls_port}", calls,
                     interceptor.denied_message)
    finally:
        await server.stop(None)
        pool.shutdown(wait=False)


async def _requests(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def _call_all(channel: grpc.aio.Channel, **kw: Any) -> dict[str, Any]:
    """Every call shape once; results by method."""
    out: dict[str, Any] = {}
    out["Unary"] = await _uu(channel, "/test.Echo/Unary")(b"x", timeout=5, **kw)
    out["ServerStream"] = [
        m async for m in _us(channel, "/test.Echo/ServerStream")(b"x", timeout=5, **kw)
    ]
    out["ClientStream"] = await _su(channel, "/test.Echo/ClientStream")(
        _requests(b"a", b"b"), timeout=5, **kw
    )
    out["Bidi"] = [
        m async for m in _ss(channel, "/test.Echo/Bidi")(
            _requests(b"a", b"b"), timeout=5, **kw
        )
    ]
    out["BidiRW"] = [
        m async for m in _ss(channel, "/test.Echo/BidiRW")(
            _requests(b"a", b"b"), timeout=5, **kw
        )
    ]
    out["SyncUnary"] = await _uu(channel, "/test.Echo/SyncUnary")(b"x", timeout=5, **kw)
    out["SyncStream"] = [
        m async for m in _us(channel, "/test.Echo/SyncStream")(b"x", timeout=5, **kw)
    ]
    out["Check"] = await _uu(channel, "/grpc.health.v1.Health/Check")(
        b"", timeout=5, **kw
    )
    out["Registered"] = await _uu(channel, "/test.Registered/Unary")(b"x", timeout=5, **kw)
    return out


EXPECTED = {
    "Unary": b"u:x",
    "ServerStream": [b"0:x", b"1:x", b"2:x"],
    "ClientStream": b"a+b",
    "Bidi": [b"b:a", b"b:b"],
    "BidiRW": [b"rw:a", b"rw:b"],
    "SyncUnary": b"su:x",
    "SyncStream": [b"ss1:x", b"ss2:x"],
    "Check": b"SERVING",
    "Registered": b"r:x",
}


async def _each_denied(channel: grpc.aio.Channel, message: str) -> None:
    """Every call shape, one at a time, fails UNAUTHENTICATED with ``message``."""
    attempts: list[tuple[str, Any]] = [
        ("Unary", lambda: _uu(channel, "/test.Echo/Unary")(b"x", timeout=5)),
        ("ServerStream", lambda: _drain(_us(channel, "/test.Echo/ServerStream")(
            b"x", timeout=5))),
        ("ClientStream", lambda: _su(channel, "/test.Echo/ClientStream")(
            _requests(b"a"), timeout=5)),
        ("Bidi", lambda: _drain(_ss(channel, "/test.Echo/Bidi")(
            _requests(b"a"), timeout=5))),
        ("BidiRW", lambda: _drain(_ss(channel, "/test.Echo/BidiRW")(
            _requests(b"a"), timeout=5))),
        ("SyncUnary", lambda: _uu(channel, "/test.Echo/SyncUnary")(b"x", timeout=5)),
        ("SyncStream", lambda: _drain(_us(channel, "/test.Echo/SyncStream")(
            b"x", timeout=5))),
        ("Check", lambda: _uu(channel, "/grpc.health.v1.Health/Check")(b"", timeout=5)),
        ("Registered", lambda: _uu(channel, "/test.Registered/Unary")(b"x", timeout=5)),
    ]
    for name, attempt in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await attempt()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert info.value.details() == message, name


async def _drain(call: Any) -> list[bytes]:
    return [m async for m in call]


async def test_unix_socket_calls_need_no_token(served: Served) -> None:
    async with grpc.aio.insecure_channel(f"unix://{served.sock}") as ch:
        assert await _call_all(ch) == EXPECTED


async def test_unix_socket_calls_with_a_wrong_token_still_pass(served: Served) -> None:
    async with grpc.aio.insecure_channel(
        f"unix:{served.sock}", interceptors=bearer_client_interceptors("wrong-token-xxxxxxxx")
    ) as ch:
        assert await _call_all(ch) == EXPECTED


async def test_tcp_without_token_is_unauthenticated_and_runs_nothing(served: Served) -> None:
    assert f"{served.sock.parent / TOKEN_FILE}" in served.message
    assert served.message.startswith("missing or wrong API token; read it from ")
    assert served.message.endswith("(or pass --token)")
    async with grpc.aio.insecure_channel(served.tcp) as ch:
        await _each_denied(ch, served.message)
    assert served.calls.ran == []


async def test_tcp_with_wrong_token_is_unauthenticated(served: Served) -> None:
    wrong = TOKEN[:-1] + "X"
    async with grpc.aio.insecure_channel(
        served.tcp, interceptors=bearer_client_interceptors(wrong)
    ) as ch:
        await _each_denied(ch, served.message)
    # Not a bearer scheme, or the token in the wrong header: denied as well.
    async with grpc.aio.insecure_channel(served.tcp) as ch:
        for md in ((("authorization", TOKEN),), (("authorization", f"Basic {TOKEN}"),),
                   (("x-token", f"Bearer {TOKEN}"),), (("authorization", "Bearer "),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _uu(ch, "/test.Echo/Unary")(b"x", timeout=5, metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
    assert served.calls.ran == []


async def test_tcp_with_token_passes_for_every_call_shape(served: Served) -> None:
    async with grpc.aio.insecure_channel(
        served.tcp, interceptors=bearer_client_interceptors(TOKEN)
    ) as ch:
        assert await _call_all(ch) == EXPECTED
        # The interceptor replaces an authorization header the caller set itself.
        got = await _uu(ch, "/test.Echo/Unary")(
            b"y", timeout=5, metadata=(("authorization", "Bearer nope"), ("x-other", "1"))
        )
        assert got == b"u:y"
    # A hand-made header works too; the scheme is case-insensitive.
    async with grpc.aio.insecure_channel(served.tcp) as ch:
        got = await _uu(ch, "/test.Echo/Unary")(
            b"z", timeout=5, metadata=(("authorization", f"bearer {TOKEN}"),)
        )
        assert got == b"u:z"


async def test_unknown_method_is_unimplemented_for_anyone(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.tcp) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _uu(ch, "/test.Echo/Nope")(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_tls_with_ca_and_token(served: Served, pki: Path) -> None:
    creds = grpc.composite_channel_credentials(
        channel_credentials(pki / "cert.pem"), token_call_credentials(TOKEN)
    )
    async with grpc.aio.secure_channel(served.tls, creds) as ch:
        assert await _call_all(ch) == EXPECTED
    # TLS is no substitute for the token.
    async with grpc.aio.secure_channel(served.tls, channel_credentials(pki / "cert.pem")) as ch:
        await _each_denied(ch, served.message)
    # The interceptor route works over TLS as well.
    async with grpc.aio.secure_channel(
        served.tls, channel_credentials(pki / "cert.pem"),
        interceptors=bearer_client_interceptors(TOKEN),
    ) as ch:
        assert await _uu(ch, "/test.Echo/Unary")(b"x", timeout=5) == b"u:x"


async def test_plaintext_client_to_tls_port_fails(served: Served) -> None:
    async with grpc.aio.insecure_channel(
        served.tls, interceptors=bearer_client_interceptors(TOKEN)
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _uu(ch, "/test.Echo/Unary")(b"x", timeout=3)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)
    assert served.calls.ran == []


async def test_tls_client_with_untrusted_ca_fails(served: Served, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(other / "k.pem"), "-out", str(other / "c.pem"), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    creds = grpc.composite_channel_credentials(
        channel_credentials(other / "c.pem"), token_call_credentials(TOKEN)
    )
    async with grpc.aio.secure_channel(served.tls, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _uu(ch, "/test.Echo/Unary")(b"x", timeout=3)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)


def test_interceptor_refuses_an_empty_token() -> None:
    with pytest.raises(ValueError):
        BearerTokenInterceptor("")


# --- the token file ------------------------------------------------------------------------


def test_token_created_0600_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "world"  # created on demand
    token = load_or_create_token(data)
    path = data / TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) == 44 and token[0] == "t"  # "t" + 32 bytes, urlsafe base64 unpadded
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert path.read_text().strip() == token
    assert load_or_create_token(data) == token
    assert [p.name for p in data.iterdir()] == [TOKEN_FILE]  # no temp file left behind
    assert load_or_create_token(tmp_path / "other") != token


def test_token_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_token(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_token(tmp_path)
    path = tmp_path / TOKEN_FILE
    path.chmod(0o644)
    with pytest.raises(Unavailable) as info:
        load_or_create_token(tmp_path)
    assert f"chmod 600 {path}" in info.value.message
    assert "0644" in info.value.message
    path.chmod(0o600)
    load_or_create_token(tmp_path)


def test_token_file_junk_or_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text("has spaces in it, not a token\n")
    path.chmod(0o600)
    with pytest.raises(Unavailable, match="does not hold a valid token"):
        load_or_create_token(tmp_path)
    path.unlink()
    real = tmp_path / "real"
    real.write_text("x" * 43)
    real.chmod(0o600)
    path.symlink_to(real)
    with pytest.raises(Unavailable, match="symlink"):
        load_or_create_token(tmp_path)


def test_hand_written_token_is_used(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"my-own-long-token-123\n")
    os.close(fd)
    assert load_or_create_token(tmp_path) == "my-own-long-token-123"


def test_concurrent_creation_agrees_on_one_token(tmp_path: Path) -> None:
    world = tmp_path / "world"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_token(world))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert [p.name for p in world.iterdir()] == [TOKEN_FILE]


# --- TLS credentials -----------------------------------------------------------------------


def test_server_credentials_errors_name_the_field(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(InvalidSpec) as info:
        server_credentials(tmp_path / "missing.pem", pki / "key.pem")
    assert info.value.field == "daemon.tls_cert" and "cannot read" in info.value.message
    with pytest.raises(InvalidSpec) as info:
        server_credentials(pki / "cert.pem", tmp_path / "missing.pem")
    assert info.value.field == "daemon.tls_key"
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem\n")
    with pytest.raises(InvalidSpec) as info:
        server_credentials(junk, pki / "key.pem")
    assert info.value.field == "daemon.tls_cert" and "not a PEM" in info.value.message
    with pytest.raises(InvalidSpec) as info:
        server_credentials(pki / "cert.pem", pki / "other-key.pem")
    assert info.value.field == "daemon.tls_cert" and "matching" in info.value.message
    # Certificate and key swapped.
    with pytest.raises(InvalidSpec):
        server_credentials(pki / "key.pem", pki / "cert.pem")
    encrypted = tmp_path / "enc.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki / "key.pem"), "-aes256", "-passout", "pass:pw",
         "-out", str(encrypted)],
        check=True, capture_output=True, timeout=30,
    )
    with pytest.raises(InvalidSpec) as info:
        server_credentials(pki / "cert.pem", encrypted)
    assert info.value.field == "daemon.tls_key" and "passphrase" in info.value.message


def test_channel_credentials(tmp_path: Path, pki: Path) -> None:
    assert isinstance(channel_credentials(None), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(pki / "cert.pem"), grpc.ChannelCredentials)
    with pytest.raises(InvalidSpec) as info:
        channel_credentials(tmp_path / "nope.pem")
    assert info.value.field == "tls_ca"


# --- listen addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:7443", ("127.0.0.1", 7443)),
        ("[::1]:7443", ("::1", 7443)),
        (":7443", ("127.0.0.1", 7443)),
        (" 10.0.0.5:1 ", ("10.0.0.5", 1)),
        ("0.0.0.0:7443", ("0.0.0.0", 7443)),
        ("[::]:7443", ("::", 7443)),
        ("localhost:65535", ("localhost", 65535)),
        ("host-1.example.org:443", ("host-1.example.org", 443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_parse_listen_ok(addr: str, expected: tuple[str, int]) -> None:
    assert parse_listen(addr) == expected


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("", "empty"),
        ("7443", "missing ':PORT'"),
        ("127.0.0.1", "missing ':PORT'"),
        ("127.0.0.1:", "not a number"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:-1", "not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:٣", "not a number"),
        ("::1:7443", "brackets"),
        ("[::1]7443", "missing ':PORT'"),
        ("[::1:7443", "missing ']'"),
        ("[127.0.0.1]:7443", "not an IPv6"),
        ("256.1.1.1:7443", "not an IP address or host name"),
        ("bad host:7443", "not an IP address or host name"),
        ("-bad:7443", "not an IP address or host name"),
        ("a/b:7443", "not an IP address or host name"),
    ],
)
def test_parse_listen_refuses_junk(addr: str, why: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_listen(addr)
    assert info.value.field == "listen"
    assert why in info.value.reason


def test_format_address() -> None:
    assert format_address("::1", 7443) == "[::1]:7443"
    assert format_address("127.0.0.1", 7443) == "127.0.0.1:7443"
    assert format_address(*parse_listen("[::]:1")) == "[::]:1"
