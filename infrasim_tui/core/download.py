"""Resumable http(s) downloads into a partial file, with the standard library only.

An interrupted download keeps its bytes in ``dest``; the next call asks for the rest with
``Range``. So that a file that changed on the server is never spliced onto the old one, the
validator the server gave (a strong ETag, else Last-Modified) is saved next to ``dest`` in
``<dest>.meta`` and sent back as ``If-Range``: a server whose file changed answers 200 with the
whole new file, and we start over. A server that ignores ``Range`` (200) also restarts us, as
does a partial file with no saved validator. The caller verifies the digest; we don't hash.

urllib blocks, so the transfer runs in a worker thread (:func:`asyncio.to_thread`); progress
is marshalled back to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPException, HTTPMessage, HTTPResponse
from pathlib import Path
from typing import IO, Any

from .errors import InvalidSpec, Unavailable

Progress = Callable[[int, int | None], None]

_SCHEMES = ("http", "https")
_PROGRESS_INTERVAL = 0.1  # seconds between progress reports (the final one is always sent)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
_USER_AGENT = "infrasim-download/1"


class DownloadError(Unavailable):
    """The download failed; ``status`` is the HTTP status when the server answered with one."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class _Cancelled(Exception):
    """The awaiting task was cancelled; the worker thread stops at the next chunk."""


@dataclass(frozen=True)
class DownloadResult:
    """``size`` is the complete file's size; ``resumed_from`` the bytes kept from before."""

    path: Path
    size: int
    resumed_from: int


def meta_path(dest: Path) -> Path:
    """Where the validators of a partial ``dest`` are kept (removed once it is complete)."""
    return dest.with_name(dest.name + ".meta")


def check_url(url: str) -> None:
    """Only http and https: urllib would also open ``file:`` and ``ftp:`` URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in _SCHEMES or not parts.netloc:
        raise InvalidSpec("source", f"{url!r} is not an http:// or https:// URL")


def parse_content_range(value: str) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` → (100, 1000); ``bytes */1000`` → (None, 1000); unknown → None."""
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def validator(etag: str, last_modified: str) -> str:
    """What to send as ``If-Range``: a strong ETag, else Last-Modified (weak ETags may not be
    used there), else nothing — and then we cannot resume safely."""
    if etag and not etag.startswith("W/"):
        return etag
    return last_modified


async def download(url: str, dest: Path, *,
                   progress: Progress | None = None, timeout: float = 30.0,
                   chunk: int = 1 << 20) -> DownloadResult:
    """Fetch ``url`` into ``dest``, resuming a partial ``dest`` when the server allows it.

    ``progress(done, total)`` runs on the event loop; ``total`` is None when the server does
    not say. ``timeout`` applies to connecting and to each read.
    """
    check_url(url)
    dest = Path(dest)
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()

    def report(done: int, total: int | None) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, done, total)

    job = _Job(url, dest, report, timeout, max(chunk, 1), cancelled)
    task = asyncio.ensure_future(asyncio.to_thread(job.run))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Stop the thread at its next chunk and wait, so nobody writes dest after we return.
        cancelled.set()
        with contextlib.suppress(_Cancelled, Exception):
            await task
        raise


class _NoOddRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but only to http(s) (urllib would also follow one to ftp:)."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in _SCHEMES:
            raise DownloadError(f"{req.full_url} redirects to {newurl!r}, which is not http(s); "
                                "refusing to follow", url=req.full_url, status=code)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoOddRedirects())


class _Restart(Exception):
    """The partial file can't be continued: start again from byte zero."""


@dataclass
class _Job:
    url: str
    dest: Path
    report: Progress
    timeout: float
    chunk: int
    cancelled: threading.Event

    def run(self) -> DownloadResult:
        offset = self._resume_offset()
        for _ in range(3):
            try:
                return self._attempt(offset)
            except _Restart:
                offset = 0
        raise DownloadError(f"{self.url}: the server keeps answering range requests "
                            f"inconsistently; delete {self.dest} and try again", url=self.url)

    def _resume_offset(self) -> int:
        """How many bytes of ``dest`` may be kept: all of them only when we know which remote
        version they came from."""
        try:
            size = self.dest.stat().st_size
        except FileNotFoundError:
            return 0
        meta = self._load_meta()
        if size == 0 or meta.get("url") != self.url or not meta.get("validator"):
            return 0
        return size

    def _attempt(self, offset: int) -> DownloadResult:
        meta = self._load_meta() if offset else {}
        req = urllib.request.Request(self.url, headers={"User-Agent": _USER_AGENT,
                                                        "Accept-Encoding": "identity"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
            req.add_header("If-Range", str(meta["validator"]))
        try:
            resp: HTTPResponse = _OPENER.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with contextlib.closing(e):
                if e.code == 416 and offset:
                    return self._unsatisfiable(offset, e.headers, meta)
                raise self._http_error(e.code, e.reason) from None
        except (urllib.error.URLError, OSError, HTTPException) as e:
            raise self._interrupted(offset, e) from None
        with resp:
            if resp.status == 206 and offset:
                start, total = parse_content_range(resp.headers.get("Content-Range", ""))
                etag = resp.headers.get("ETag", "")
                if start != offset or (etag and meta.get("etag") and etag != meta["etag"]):
                    raise _Restart  # a server that ignored If-Range, or a range we didn't ask
            elif resp.status in (200, 203):
                offset, total = 0, _int(resp.headers.get("Content-Length"))
            else:
                raise self._http_error(resp.status, resp.reason)
            self._save_meta(resp.headers, total)
            return self._receive(resp, offset, total)

    def _receive(self, resp: HTTPResponse, offset: int, total: int | None) -> DownloadResult:
        done = offset
        with self._open(offset) as f:
            self._write(f.truncate, offset)
            f.seek(offset)
            self.report(done, total)
            last = time.monotonic()
            while True:
                try:
                    data = resp.read1(self.chunk)
                except (OSError, HTTPException) as e:
                    self._write(f.flush)
                    raise self._interrupted(done, e) from None
                if self.cancelled.is_set():
                    self._write(f.flush)
                    raise _Cancelled
                if not data:
                    break
                self._write(f.write, data)
                done += len(data)
                if time.monotonic() - last >= _PROGRESS_INTERVAL:
                    last = time.monotonic()
                    self.report(done, total)
            self._write(f.flush)
            if total is not None and done < total:
                raise self._interrupted(done, ConnectionError(
                    f"the server closed the connection at byte {done} of {total}"))
            self._write(os.fsync, f.fileno())
        self.report(done, total if total is not None else done)
        self._drop_meta()
        return DownloadResult(self.dest, done, offset)

    def _open(self, offset: int) -> IO[bytes]:
        try:
            return open(self.dest, "r+b" if offset else "wb")
        except OSError as e:
            raise self._write_error(e) from None

    def _write(self, op: Callable[..., object], *args: Any) -> None:
        """A file operation whose OSError means our disk, not the network, failed."""
        try:
            op(*args)
        except OSError as e:
            raise self._write_error(e) from None

    def _write_error(self, e: OSError) -> DownloadError:
        return DownloadError(f"cannot write {self.dest}: {e.strerror or e}", url=self.url)

    def _unsatisfiable(self, offset: int, headers: Message,
                       meta: dict[str, Any]) -> DownloadResult:
        """416 to ``bytes=<size>-``: done if the file is complete, else start over."""
        _, total = parse_content_range(headers.get("Content-Range", ""))
        if total is None:
            total = _int(meta.get("total"))
        if total != offset:
            raise _Restart
        self.report(offset, total)
        self._drop_meta()
        return DownloadResult(self.dest, offset, offset)

    def _http_error(self, status: int, reason: str) -> DownloadError:
        hint = ("check the URL" if 400 <= status < 500
                else "the server failed; try again later")
        return DownloadError(f"GET {self.url}: HTTP {status} {reason}; {hint}",
                             url=self.url, status=status)

    def _interrupted(self, done: int, e: BaseException) -> DownloadError:
        reason = getattr(e, "reason", None) or e
        where = f" after {done} bytes" if done else ""
        return DownloadError(
            f"download of {self.url} interrupted{where}: {reason}; run the same command again "
            "to resume", url=self.url)

    # -- the .meta file --

    def _load_meta(self) -> dict[str, Any]:
        try:
            data = json.loads(meta_path(self.dest).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_meta(self, headers: Message, total: int | None) -> None:
        etag = headers.get("ETag", "")
        meta = {"url": self.url, "etag": etag, "total": total,
                "validator": validator(etag, headers.get("Last-Modified", ""))}
        path = meta_path(self.dest)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, path)
        except OSError as e:
            raise DownloadError(f"cannot write {path}: {e.strerror}", url=self.url) from None

    def _drop_meta(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            meta_path(self.dest).unlink()


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None
