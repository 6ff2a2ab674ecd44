"""Resumable downloads against a real HTTP server on 127.0.0.1 (Range, If-Range, ETag, cuts)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infrasim_tui.core.download import (
    DownloadError,
    DownloadResult,
    download,
    meta_path,
    parse_content_range,
    validator,
)
from infrasim_tui.core.errors import InvalidSpec, Unavailable


@dataclass
class Behaviour:
    """What the test server does; tests change it between attempts."""

    body: bytes = b""
    etag: str = '"v1"'
    last_modified: str = ""
    ignore_range: bool = False
    cut_after: int | None = None  # send this many body bytes, then drop the connection (once)
    stall: threading.Event | None = None  # after the first 64 KiB, wait for this
    requests: list[dict[str, str]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        b = self.server.behaviour
        b.requests.append({"path": self.path, **dict(self.headers.items())})
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/file")
            self.end_headers()
            return
        if self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/file")
            self.end_headers()
            return
        if self.path != "/file":
            self.send_error(404)
            return
        body, start, status = b.body, 0, 200
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        current = b.etag or b.last_modified
        if rng and not b.ignore_range and (if_range is None or if_range == current):
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        if b.etag:
            self.send_header("ETag", b.etag)
        if b.last_modified:
            self.send_header("Last-Modified", b.last_modified)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if b.cut_after is not None:
            payload, b.cut_after = payload[: b.cut_after], None
            self.close_connection = True
        if b.stall is not None:
            self.wfile.write(payload[:65536])
            self.wfile.flush()
            b.stall.wait(10)
            payload = payload[65536:]
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    srv = _Server(("127.0.0.1", 0), Handler)
    srv.behaviour = Behaviour(body=os.urandom(3 * (1 << 20) + 12345))
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv.behaviour
    finally:
        if srv.behaviour.stall is not None:
            srv.behaviour.stall.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


async def interrupted(url: str, dest: Path, b: Behaviour, at: int) -> None:
    b.cut_after = at
    with pytest.raises(DownloadError) as exc:
        await download(url, dest, chunk=64 * 1024)
    assert "run the same command again to resume" in exc.value.message
    assert f"after {at} bytes" in exc.value.message
    assert dest.stat().st_size == at
    assert json.loads(meta_path(dest).read_text())["validator"] == b.etag


# --- pure ---------------------------------------------------------------------------------------


def test_content_range_and_validator() -> None:
    assert parse_content_range("bytes 100-199/1000") == (100, 1000)
    assert parse_content_range("bytes */1000") == (None, 1000)
    assert parse_content_range("bytes 0-9/*") == (0, None)
    assert parse_content_range("junk") == (None, None)
    assert validator('"abc"', "Tue, 01 Jan 2030 00:00:00 GMT") == '"abc"'
    assert validator('W/"abc"', "Tue, 01 Jan 2030 00:00:00 GMT") == (
        "Tue, 01 Jan 2030 00:00:00 GMT")  # weak ETags are not allowed in If-Range
    assert validator("", "") == ""


# --- a real server ------------------------------------------------------------------------------


async def test_full_download_with_progress(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    dest = tmp_path / "img.part"
    calls: list[tuple[int, int | None]] = []
    threads: set[int] = set()

    def progress(done: int, total: int | None) -> None:
        calls.append((done, total))
        threads.add(threading.get_ident())

    result = await download(f"{base}/file", dest, progress=progress, chunk=256 * 1024)
    assert result == DownloadResult(dest, len(b.body), 0)
    assert dest.read_bytes() == b.body
    assert not meta_path(dest).exists()
    assert calls[0] == (0, len(b.body)) and calls[-1] == (len(b.body), len(b.body))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert threads == {threading.get_ident()}  # marshalled onto the event loop


async def test_interrupted_then_resumed(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    dest = tmp_path / "img.part"
    await interrupted(f"{base}/file", dest, b, at=(1 << 20) + 777)
    result = await download(f"{base}/file", dest)
    assert result.resumed_from == (1 << 20) + 777
    assert result.size == len(b.body)
    assert dest.read_bytes() == b.body
    last = b.requests[-1]
    assert last["Range"] == f"bytes={(1 << 20) + 777}-" and last["If-Range"] == '"v1"'
    assert not meta_path(dest).exists()


async def test_server_ignoring_range_restarts(server: tuple[str, Behaviour],
                                              tmp_path: Path) -> None:
    base, b = server
    dest = tmp_path / "img.part"
    await interrupted(f"{base}/file", dest, b, at=500_000)
    b.ignore_range = True
    result = await download(f"{base}/file", dest)
    assert result.resumed_from == 0
    assert "Range" in b.requests[-1]  # it was asked, and answered 200
    assert dest.read_bytes() == b.body


async def test_changed_remote_file_restarts(server: tuple[str, Behaviour],
                                            tmp_path: Path) -> None:
    base, b = server
    dest = tmp_path / "img.part"
    await interrupted(f"{base}/file", dest, b, at=700_000)
    b.body, b.etag = os.urandom(2 * (1 << 20)), '"v2"'
    result = await download(f"{base}/file", dest)
    assert result.resumed_from == 0 and result.size == len(b.body)
    assert dest.read_bytes() == b.body  # the new version, not v1's head spliced onto v2


async def test_last_modified_is_used_without_etag(server: tuple[str, Behaviour],
                                                  tmp_path: Path) -> None:
    base, b = server
    b.etag, b.last_modified = "", "Tue, 01 Jan 2030 00:00:00 GMT"
    dest = tmp_path / "img.part"
    b.cut_after = 100_000
    with pytest.raises(DownloadError):
        await download(f"{base}/file", dest)
    result = await download(f"{base}/file", dest)
    assert result.resumed_from == 100_000
    assert b.requests[-1]["If-Range"] == b.last_modified
    assert dest.read_bytes() == b.body


async def test_partial_file_without_meta_restarts(server: tuple[str, Behaviour],
                                                  tmp_path: Path) -> None:
    base, b = server
    dest = tmp_path / "img.part"
    dest.write_bytes(b"not from this server" * 1000)
    result = await download(f"{base}/file", dest)
    assert result.resumed_from == 0
    assert "Range" not in b.requests[-1]
    assert dest.read_bytes() == b.body


async def test_complete_file_answered_416_is_done(server: tuple[str, Behaviour],
                                                  tmp_path: Path) -> None:
    base, b = server
    dest = tmp_path / "img.part"
    dest.write_bytes(b.body)  # finished, but the process died before dropping the meta
    meta_path(dest).write_text(json.dumps({"url": f"{base}/file", "etag": b.etag,
                                           "validator": b.etag, "total": len(b.body)}))
    calls: list[tuple[int, int | None]] = []
    result = await download(f"{base}/file", dest, progress=lambda d, t: calls.append((d, t)))
    assert result == DownloadResult(dest, len(b.body), len(b.body))
    assert calls[-1] == (len(b.body), len(b.body))
    assert not meta_path(dest).exists()


async def test_redirects(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    result = await download(f"{base}/redirect", tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b.body and result.size == len(b.body)
    with pytest.raises(DownloadError, match="not http"):
        await download(f"{base}/to-ftp", tmp_path / "b")


async def test_http_error(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError) as exc:
        await download(f"{base}/missing", tmp_path / "x")
    assert exc.value.status == 404
    assert exc.value.message == f"GET {base}/missing: HTTP 404 Not Found; check the URL"
    assert isinstance(exc.value, Unavailable)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.img",
                                 "example.org/x.img", "http:///nohost", ""])
async def test_only_http_and_https(url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec) as exc:
        await download(url, tmp_path / "x")
    assert exc.value.field == "source"


async def test_connection_refused_says_how_to_resume(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"Connection refused.*run the same command again"):
        await download(f"http://127.0.0.1:{port}/file", tmp_path / "x", timeout=5)


async def test_unwritable_destination(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError, match="cannot write"):
        await download(f"{base}/file", tmp_path / "no-such-dir" / "x")


async def test_cancel_stops_the_worker(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    base, b = server
    b.stall = threading.Event()
    dest = tmp_path / "img.part"
    task = asyncio.create_task(download(f"{base}/file", dest, chunk=16 * 1024))
    for _ in range(200):
        if dest.exists() and dest.stat().st_size > 0:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    threading.Timer(0.2, b.stall.set).start()  # the worker notices at its next read
    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 5
    size = dest.stat().st_size
    await asyncio.sleep(0.2)
    assert dest.stat().st_size == size < len(b.body)  # nothing writes after cancel returns
    assert meta_path(dest).exists()  # and the partial download can be resumed
    b.stall = None
    result = await download(f"{base}/file", dest)
    assert result.resumed_from == size and dest.read_bytes() == b.body
