"""An async wrapper around ``qemu-img``: disk images, overlays, internal snapshots, conversion.

Every command line is built by a pure ``*_argv`` function (unit-tested without QEMU); the
:class:`QemuImg` methods only run them with :func:`asyncio.create_subprocess_exec`, so the event
loop never blocks. Formats are always given explicitly — ``-f``/``-F`` or ``--image-opts`` —
because letting qemu-img probe lets a guest that wrote a qcow2 header into its raw disk make the
host open arbitrary files as that disk's backing file. Only :meth:`QemuImg.info` may probe, and
only when the caller passes no format (it is how an imported image's format is discovered).

Facts about qemu-img 7.2 this module works around:

* ``create`` silently overwrites an existing file, so we refuse first.
* ``snapshot`` has no ``-f``; ``--image-opts`` names the driver instead.
* ``snapshot -c`` accepts a tag that already exists (two snapshots, one name), and ``-a`` looks a
  snapshot up by ID before tag, so tag ``"1"`` may apply a different snapshot whose ID is 1: we
  refuse duplicate and all-digit tags.
* An image that a running QEMU holds open can only be read with ``-U`` (force-share).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import AlreadyExists, InvalidSpec, NotFound, QemuError, Unavailable
from .units import format_size

StrPath = str | os.PathLike[str]

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
_MAX_IMAGE_SIZE = (1 << 63) - 1  # qemu-img keeps sizes in int64
_MAX_MESSAGE = 1500
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
# ``check`` exits 2 (corruptions) or 3 (leaks) with a full JSON report: findings, not failures.
_CHECK_REPORT_CODES = (0, 2, 3)


class QemuImgError(QemuError):
    """qemu-img exited non-zero; the message carries its own words, trimmed to one line."""

    def __init__(self, verb: str, argv: Sequence[str], stderr: str, returncode: int,
                 *, display: dict[str, str] | None = None) -> None:
        detail = trim_stderr(stderr, display=display) or f"exit status {returncode}"
        if "lock" in detail and "Is another process using the image" in detail:
            detail += " (a running VM has this image open: stop it first)"
        super().__init__(f"qemu-img {verb} failed: {detail}")
        self.verb = verb
        self.argv = tuple(argv)
        self.stderr = stderr
        self.returncode = returncode


@dataclass(frozen=True)
class SnapshotInfo:
    """One internal snapshot; ``vm_state_size`` > 0 means it holds RAM too (a ``savevm``)."""

    tag: str
    id: str
    vm_state_size: int
    date_sec: int
    vm_clock_nsec: int


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image (``backing_file`` as recorded in it)."""

    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str
    backing_format: str
    snapshots: tuple[SnapshotInfo, ...]
    dirty: bool
    encrypted: bool


# --- pure argv builders ------------------------------------------------------------------------


def _path_arg(path: StrPath) -> str:
    """A path qemu-img can't mistake for an option (``-x``) or a protocol (``nbd:…``, ``json:…``):
    relative paths get a ``./`` prefix, which puts a ``/`` before any colon."""
    s = os.fspath(path)
    if not s:
        raise InvalidSpec("path", "an image path must not be empty")
    return s if os.path.isabs(s) else "./" + s


def image_opts(path: StrPath, fmt: str) -> str:
    """An ``--image-opts`` string naming the driver, so nothing is probed (commas doubled)."""
    _check_fmt("fmt", fmt)
    filename = os.path.abspath(os.fspath(path)).replace(",", ",,")
    return f"driver={fmt},file.driver=file,file.filename={filename}"


def _check_fmt(field: str, fmt: str) -> None:
    if not re.fullmatch(r"[a-z0-9_-]+", fmt or ""):
        raise InvalidSpec(field, f"{fmt!r} is not an image format name (e.g. qcow2 or raw)")


def _check_backing(backing: str, backing_fmt: str) -> None:
    if not os.path.isabs(backing):
        raise InvalidSpec("backing", f"{backing!r} must be an absolute path (qemu-img would "
                          "resolve a relative one against the overlay's directory)")
    if not backing_fmt:
        raise InvalidSpec("backing_fmt", "required with a backing file: qemu-img must never "
                          "guess a backing image's format")
    _check_fmt("backing_fmt", backing_fmt)


def check_tag(tag: str) -> None:
    """Refuse tags qemu-img would misread: empty, all digits (looked up as a snapshot ID)."""
    if not tag or not tag.strip():
        raise InvalidSpec("tag", "a snapshot tag must not be empty")
    if tag.isdigit():
        raise InvalidSpec("tag", f"{tag!r}: a tag must not be all digits (qemu-img would "
                          "look it up as a snapshot ID)")


def info_argv(binary: str, path: StrPath, *, fmt: str = "", force_share: bool = False,
              backing_chain: bool = False) -> list[str]:
    argv = [binary, "info", "--output=json"]
    if fmt:
        _check_fmt("fmt", fmt)
        argv += ["-f", fmt]
    if force_share:
        argv.append("-U")
    if backing_chain:
        argv.append("--backing-chain")
    return [*argv, _path_arg(path)]


def create_argv(binary: str, path: StrPath, *, size: int | None, fmt: str = "qcow2",
                backing: str = "", backing_fmt: str = "", preallocation: str = "") -> list[str]:
    _check_fmt("fmt", fmt)
    argv = [binary, "create", "-q", "-f", fmt]
    if backing:
        _check_backing(backing, backing_fmt)
        argv += ["-b", backing, "-F", backing_fmt]
    elif backing_fmt:
        raise InvalidSpec("backing_fmt", "given without a backing file")
    elif size is None:
        raise InvalidSpec("size", "required for an image without a backing file")
    if preallocation:
        if preallocation not in PREALLOCATION_MODES:
            raise InvalidSpec("preallocation", f"{preallocation!r} is not one of "
                              f"{', '.join(PREALLOCATION_MODES)}")
        argv += ["-o", f"preallocation={preallocation}"]
    argv.append(_path_arg(path))
    if size is not None:
        if size <= 0:
            raise InvalidSpec("size", f"{size} bytes: a size must be greater than zero")
        argv.append(str(size))
    return argv


def resize_argv(binary: str, path: StrPath, size: int, *, fmt: str = "qcow2",
                shrink: bool = False) -> list[str]:
    _check_fmt("fmt", fmt)
    if size <= 0:
        raise InvalidSpec("size", f"{size} bytes: a size must be greater than zero")
    argv = [binary, "resize", "-q", "-f", fmt]
    if shrink:
        argv.append("--shrink")
    return [*argv, _path_arg(path), str(size)]


def convert_argv(binary: str, src: StrPath, dst: StrPath, *, src_fmt: str, dst_fmt: str,
                 progress: bool = False) -> list[str]:
    _check_fmt("src_fmt", src_fmt)
    _check_fmt("dst_fmt", dst_fmt)
    argv = [binary, "convert", "-p" if progress else "-q", "-f", src_fmt, "-O", dst_fmt]
    return [*argv, _path_arg(src), _path_arg(dst)]


def snapshot_argv(binary: str, op: str, path: StrPath, tag: str, *,
                  fmt: str = "qcow2") -> list[str]:
    """``op`` is ``create``, ``apply`` or ``delete``."""
    flags = {"create": "-c", "apply": "-a", "delete": "-d"}
    if op not in flags:
        raise ValueError(f"unknown snapshot op {op!r}")
    check_tag(tag)
    return [binary, "snapshot", "-q", "--image-opts", flags[op], tag, image_opts(path, fmt)]


def check_argv(binary: str, path: StrPath, *, fmt: str = "qcow2",
               force_share: bool = False) -> list[str]:
    _check_fmt("fmt", fmt)
    argv = [binary, "check", "--output=json", "-f", fmt]
    if force_share:
        argv.append("-U")
    return [*argv, _path_arg(path)]


def rebase_argv(binary: str, path: StrPath, backing: str, backing_fmt: str, *,
                fmt: str = "qcow2", unsafe: bool = False) -> list[str]:
    """An empty ``backing`` detaches the image (safe mode first copies the backing data in)."""
    _check_fmt("fmt", fmt)
    argv = [binary, "rebase", "-q", "-f", fmt]
    if unsafe:
        argv.append("-u")
    if backing:
        _check_backing(backing, backing_fmt)
        argv += ["-b", backing, "-F", backing_fmt]
    else:
        argv += ["-b", ""]
    return [*argv, _path_arg(path)]


# --- pure parsers ------------------------------------------------------------------------------


def trim_stderr(stderr: str, *, display: dict[str, str] | None = None) -> str:
    """qemu-img's stderr as one line: ``qemu-img:`` prefixes and usage hints dropped,
    ``--image-opts`` strings shown as the plain path (``display`` maps one to the other)."""
    text = stderr
    for raw, shown in (display or {}).items():
        text = text.replace(raw, shown)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("qemu-img:"):
            line = line[len("qemu-img:"):].strip()
        if line and not line.startswith("Try 'qemu-img --help'"):
            lines.append(line)
    out = "; ".join(lines)
    return out if len(out) <= _MAX_MESSAGE else out[: _MAX_MESSAGE - 1] + "…"


def _snapshot(d: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        tag=str(d.get("name", "")), id=str(d.get("id", "")),
        vm_state_size=int(d.get("vm-state-size", 0)), date_sec=int(d.get("date-sec", 0)),
        vm_clock_nsec=int(d.get("vm-clock-sec", 0)) * 1_000_000_000
        + int(d.get("vm-clock-nsec", 0)))


def parse_image_info(d: dict[str, Any]) -> ImageInfo:
    """One entry of ``qemu-img info --output=json``."""
    return ImageInfo(
        path=str(d.get("filename", "")), format=str(d.get("format", "")),
        virtual_size=int(d.get("virtual-size", 0)), actual_size=int(d.get("actual-size", 0)),
        backing_file=str(d.get("backing-filename", "")),
        backing_format=str(d.get("backing-filename-format", "")),
        snapshots=tuple(_snapshot(s) for s in d.get("snapshots", ())),
        dirty=bool(d.get("dirty-flag", False)), encrypted=bool(d.get("encrypted", False)))


def parse_progress(output: bytes) -> list[float]:
    """Fractions (0.0 to 1.0) from ``qemu-img -p`` output: ``    (12.50/100%)\\r`` repeated."""
    return [min(float(m.group(1)) / 100.0, 1.0) for m in _PROGRESS_RE.finditer(output)]


# --- the runner --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: bytes
    stderr: str


class QemuImg:
    """Runs ``qemu-img``; each method is one invocation (plus a read-only ``info`` where a
    precondition gives a clearer error than qemu-img would)."""

    def __init__(self, binary: str = "qemu-img") -> None:
        self.binary = binary

    async def info(self, path: StrPath, *, fmt: str = "", force_share: bool = False) -> ImageInfo:
        """``force_share`` (-U) reads an image a running QEMU holds open (may be mid-write).
        Without ``fmt`` the format is probed: pass it for images a guest has written to."""
        argv = info_argv(self.binary, path, fmt=fmt, force_share=force_share)
        out = await self._run("info", argv)
        return replace(parse_image_info(_json(out, argv)), path=os.fspath(path))

    async def chain(self, path: StrPath, *, fmt: str = "",
                    force_share: bool = False) -> list[ImageInfo]:
        """The image, then its backing file, and so on down to the base."""
        argv = info_argv(self.binary, path, fmt=fmt, force_share=force_share,
                         backing_chain=True)
        out = await self._run("info", argv)
        data = _json(out, argv)
        infos = [parse_image_info(d) for d in (data if isinstance(data, list) else [data])]
        return [replace(infos[0], path=os.fspath(path)), *infos[1:]]

    async def create(self, path: StrPath, *, size: int | None, fmt: str = "qcow2",
                     backing: str = "", backing_fmt: str = "",
                     preallocation: str = "") -> None:
        """Refuses to overwrite (qemu-img itself would, silently). ``size=None`` with a backing
        file takes the backing file's size."""
        argv = create_argv(self.binary, path, size=size, fmt=fmt, backing=backing,
                           backing_fmt=backing_fmt, preallocation=preallocation)
        if os.path.lexists(path):
            raise AlreadyExists("image", os.fspath(path))
        try:
            await self._run("create", argv)
        except BaseException:
            # Whatever qemu-img left behind is ours: the path did not exist before.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    async def resize(self, path: StrPath, size: int, *, fmt: str = "qcow2",
                     shrink: bool = False) -> None:
        """Grow, or with ``shrink=True`` shrink (data past the new end is lost)."""
        argv = resize_argv(self.binary, path, size, fmt=fmt, shrink=shrink)
        if not shrink:
            current = (await self.info(path, fmt=fmt)).virtual_size
            if size < current:
                raise InvalidSpec("size", f"{format_size(size)} is smaller than the image's "
                                  f"{format_size(current)}; shrinking deletes the data past the "
                                  "new end, so it must be asked for explicitly (shrink)")
        await self._run("resize", argv)

    async def convert(self, src: StrPath, dst: StrPath, *, src_fmt: str, dst_fmt: str,
                      progress: Callable[[float], None] | None = None) -> None:
        """Copy ``src`` into a new image ``dst`` (refused if it exists; removed on failure).
        ``progress`` gets fractions 0.0 to 1.0 as qemu-img reports them, on the loop."""
        argv = convert_argv(self.binary, src, dst, src_fmt=src_fmt, dst_fmt=dst_fmt,
                            progress=progress is not None)
        if os.path.lexists(dst):
            raise AlreadyExists("image", os.fspath(dst))
        last = -1.0

        def on_stdout(data: bytes) -> None:
            nonlocal last
            for frac in parse_progress(data):
                if frac != last and progress is not None:
                    last = frac
                    progress(frac)

        try:
            await self._run("convert", argv, on_stdout=on_stdout if progress else None)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise

    async def snapshot_list(self, path: StrPath, *, fmt: str = "qcow2",
                            force_share: bool = False) -> list[SnapshotInfo]:
        return list((await self.info(path, fmt=fmt, force_share=force_share)).snapshots)

    async def snapshot_create(self, path: StrPath, tag: str, *, fmt: str = "qcow2") -> None:
        """Only on a stopped VM's image: QEMU holds a running one's lock (use QMP then)."""
        argv = snapshot_argv(self.binary, "create", path, tag, fmt=fmt)
        if tag in await self._tags(path, fmt):
            raise AlreadyExists("snapshot", tag)
        await self._run("snapshot", argv, display=_display(path, fmt))

    async def snapshot_apply(self, path: StrPath, tag: str, *, fmt: str = "qcow2") -> None:
        argv = snapshot_argv(self.binary, "apply", path, tag, fmt=fmt)
        await self._require_snapshot(path, tag, fmt)
        await self._run("snapshot", argv, display=_display(path, fmt))

    async def snapshot_delete(self, path: StrPath, tag: str, *, fmt: str = "qcow2") -> None:
        argv = snapshot_argv(self.binary, "delete", path, tag, fmt=fmt)
        await self._require_snapshot(path, tag, fmt)
        await self._run("snapshot", argv, display=_display(path, fmt))

    async def check(self, path: StrPath, *, fmt: str = "qcow2",
                    force_share: bool = False) -> dict[str, Any]:
        """qemu-img's JSON report; corruptions/leaks are findings in it, not exceptions."""
        argv = check_argv(self.binary, path, fmt=fmt, force_share=force_share)
        result = await self._exec(argv)
        if result.returncode in _CHECK_REPORT_CODES:
            with contextlib.suppress(ValueError):
                data = json.loads(result.stdout)
                if isinstance(data, dict):
                    return data
        raise QemuImgError("check", argv, result.stderr, result.returncode)

    async def rebase(self, path: StrPath, backing: str, backing_fmt: str, *,
                     fmt: str = "qcow2", unsafe: bool = False) -> None:
        """Point ``path`` at another backing file. Safe mode copies differing data so the guest
        sees the same disk; ``unsafe`` only rewrites the header (for a moved backing file)."""
        argv = rebase_argv(self.binary, path, backing, backing_fmt, fmt=fmt, unsafe=unsafe)
        await self._run("rebase", argv)

    # -- plumbing --

    async def _tags(self, path: StrPath, fmt: str) -> set[str]:
        """Snapshot tags, read as part of a ``snapshot`` verb (so errors are named that way)."""
        out = await self._run("snapshot", info_argv(self.binary, path, fmt=fmt))
        return {s.tag for s in parse_image_info(_json(out, ["", "snapshot"])).snapshots}

    async def _require_snapshot(self, path: StrPath, tag: str, fmt: str) -> None:
        if tag not in await self._tags(path, fmt):
            raise NotFound("snapshot", tag)

    async def _run(self, verb: str, argv: list[str], *,
                   on_stdout: Callable[[bytes], None] | None = None,
                   display: dict[str, str] | None = None) -> bytes:
        result = await self._exec(argv, on_stdout=on_stdout)
        if result.returncode != 0:
            raise QemuImgError(verb, argv, result.stderr, result.returncode, display=display)
        return result.stdout

    async def _exec(self, argv: list[str], *,
                    on_stdout: Callable[[bytes], None] | None = None) -> _Result:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except (FileNotFoundError, PermissionError) as e:
            raise Unavailable(
                f"{self.binary} cannot be run ({e.strerror}); install QEMU's image tools "
                "(Debian/Ubuntu: apt-get install qemu-utils; macOS: brew install qemu)"
            ) from None
        assert proc.stdout is not None and proc.stderr is not None
        try:
            if on_stdout is None:
                stdout, stderr = await proc.communicate()
            else:
                stdout, stderr = await asyncio.gather(
                    _pump(proc.stdout, on_stdout), proc.stderr.read())
                await proc.wait()
        except BaseException:
            # Cancelled (or the callback failed): don't leave qemu-img writing behind our back.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        assert proc.returncode is not None
        return _Result(proc.returncode, stdout, stderr.decode("utf-8", "replace"))


async def _pump(stream: asyncio.StreamReader, sink: Callable[[bytes], None]) -> bytes:
    """Feed ``sink`` complete ``\\r``-terminated progress records as they arrive."""
    chunks, pending = [], b""
    while data := await stream.read(4096):
        chunks.append(data)
        pending += data
        cut = max(pending.rfind(b"\r"), pending.rfind(b"\n"))
        if cut >= 0:
            sink(pending[: cut + 1])
            pending = pending[cut + 1:]
    if pending:
        sink(pending)
    return b"".join(chunks)


def _display(path: StrPath, fmt: str) -> dict[str, str]:
    return {image_opts(path, fmt): os.fspath(path)}


def _json(out: bytes, argv: Sequence[str]) -> Any:
    try:
        return json.loads(out)
    except ValueError:
        raise QemuImgError(argv[1] if len(argv) > 1 else "?", argv,
                           f"unreadable JSON output: {out[:200]!r}", 0) from None
