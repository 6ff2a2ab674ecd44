"""BLAKE3 digests of (large) files, and a cache of verdicts keyed by file identity.

Disk images are gigabytes, and checking them on every VM start would cost seconds each, so
:class:`VerdictCache` remembers a digest together with the file's :class:`FileStamp` (device,
inode, size, mtime, ctime) and re-hashes only when one of those changed. ctime is what makes
this sound: a write, a chmod or a ``touch`` back to an old mtime all move it, and it cannot be
set from user space.

Hashing memory-maps the file and lets BLAKE3 use every core (as ``b3sum`` does). Caveat of any
mmap reader: if another process truncates the file while it is hashed, the kernel kills us with
SIGBUS; hash files InfraSim owns (the image store's are read-only), not a running VM's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3

from infrasim_tui.core.errors import InvalidSpec
from infrasim_tui.core.fsutil import fsync_dir, open_regular

Progress = Callable[[int, int], None]
"""``(bytes_done, bytes_total)``; called from the hashing thread, so marshal to the loop."""

# Large enough that the per-call overhead (and BLAKE3's fan-out to threads) vanishes, small
# enough that progress moves every fraction of a second.
SLICE_BYTES = 256 * 1024 * 1024

# A file whose ctime/mtime is this close to the moment we stat it may still be written to within
# the same timestamp tick (coarse kernel clocks before Linux 6.13; 2 s on FAT), and such a write
# would leave the stamp unchanged. Its digest is returned but not cached (git's "racy clean").
RACY_WINDOW_S = 2.0

CACHE_VERSION = 1

_DIGEST = re.compile(r"[0-9a-f]{64}")


def _new_hasher() -> Any:
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def blake3_bytes(data: bytes) -> str:
    """Hex BLAKE3 digest of ``data`` (64 lowercase hex characters, like ``b3sum``)."""
    return str(blake3.blake3(data).hexdigest())


def check_digest(digest: str, field: str = "digest") -> str:
    """``digest`` if it is a BLAKE3 hex digest (64 lowercase hex), else InvalidSpec(field)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidSpec(field, f"{digest!r} is not a BLAKE3 digest (64 lowercase hex "
                          "characters, as printed by b3sum)")
    return digest


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    dev: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        return cls.from_stat(os.stat(path))

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileStamp:
        return cls(inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
                   ctime_ns=st.st_ctime_ns, dev=st.st_dev)


def _hash_fd(fd: int, size: int, progress: Progress | None, slice_bytes: int) -> str:
    hasher = _new_hasher()
    if progress is not None:
        progress(0, size)
    if size == 0:  # mmap refuses empty files
        return str(hasher.hexdigest())
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for offset in range(0, size, slice_bytes):
                end = min(offset + slice_bytes, size)
                hasher.update(view[offset:end])  # releases the GIL; fans out to threads
                if progress is not None:
                    progress(end, size)
        finally:
            view.release()
    return str(hasher.hexdigest())


def blake3_file_stamped(path: Path, progress: Progress | None = None,
                        slice_bytes: int = SLICE_BYTES) -> tuple[str, FileStamp]:
    """Digest of the file at ``path`` and the stamp of the very file that was hashed, taken
    (from the open file) before reading it: a cache entry needs both to describe one version."""
    if slice_bytes <= 0:
        raise ValueError("slice_bytes must be positive")
    fd, st = open_regular(path)
    try:
        digest = _hash_fd(fd, st.st_size, progress, slice_bytes)
        return digest, FileStamp.from_stat(st)
    finally:
        os.close(fd)


def blake3_file(path: Path, progress: Progress | None = None, *,
                slice_bytes: int = SLICE_BYTES) -> str:
    """Hex BLAKE3 digest of a file, equal to ``b3sum``'s. Blocks: use the async variant on a loop.

    Memory-mapped and multi-threaded; fed in ``slice_bytes`` slices so ``progress`` can be
    reported (first ``(0, total)``, then after each slice, last ``(total, total)``).
    """
    return blake3_file_stamped(path, progress, slice_bytes)[0]


async def blake3_file_async(path: Path, progress: Progress | None = None, *,
                            slice_bytes: int = SLICE_BYTES) -> str:
    """:func:`blake3_file` in a worker thread; ``progress`` is called from that thread."""
    return await asyncio.to_thread(blake3_file, path, progress, slice_bytes=slice_bytes)


class VerdictCache:
    """Digests of files remembered with their :class:`FileStamp`, persisted as JSON.

    Safe to share between threads of one process. The file is rewritten atomically on every
    ``put``, so a crash leaves the old or the new cache, never a torn one; an unreadable cache
    file is treated as empty (it only saves time, it never decides anything on its own).
    """

    def __init__(self, path: Path, *, racy_window_s: float = RACY_WINDOW_S) -> None:
        self.path = Path(path)
        self.racy_window_ns = int(racy_window_s * 1e9)
        self._lock = threading.Lock()  # guards _entries; never held across I/O
        self._write_lock = threading.Lock()  # orders writes of the file
        self._generation = 0
        self._written = 0
        self._entries: dict[str, tuple[FileStamp, str]] = self._load()

    @staticmethod
    def _key(path: Path) -> str:
        return os.path.abspath(path)

    def _load(self) -> dict[str, tuple[FileStamp, str]]:
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("version") != CACHE_VERSION:
                return {}
            return {key: (FileStamp(**value["stamp"]), str(value["digest"]))
                    for key, value in raw["entries"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def get(self, path: Path) -> str | None:
        """The cached digest if the file's current stamp equals the stored one, else None."""
        with self._lock:
            entry = self._entries.get(self._key(path))
        if entry is None:
            return None
        try:
            current = FileStamp.of(path)
        except OSError:
            return None
        return entry[1] if current == entry[0] else None

    def put(self, path: Path, stamp: FileStamp, digest: str) -> None:
        """Remember ``digest`` for the file version ``stamp`` (taken before it was hashed).

        Writes the cache file: call it from a worker thread when on the loop.
        """
        with self._lock:
            self._entries[self._key(path)] = (stamp, digest)
        self._save()

    def forget(self, path: Path) -> None:
        with self._lock:
            if self._entries.pop(self._key(path), None) is None:
                return
        self._save()

    def _save(self) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            data = {"version": CACHE_VERSION,
                    "entries": {key: {"stamp": asdict(stamp), "digest": digest}
                                for key, (stamp, digest) in self._entries.items()}}
        with self._write_lock:
            if generation < self._written:  # a newer snapshot is already on disk
                return
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)
            self._written = generation

    def _cacheable(self, before: FileStamp, stamped_at_ns: int, path: Path) -> bool:
        try:
            after = FileStamp.of(path)
        except OSError:
            return False
        settled = stamped_at_ns - max(before.mtime_ns, before.ctime_ns) > self.racy_window_ns
        return after == before and settled

    def _digest_sync(self, path: Path, progress: Progress | None) -> tuple[str, bool]:
        cached = self.get(path)
        if cached is not None:
            return cached, True
        stamped_at_ns = time.time_ns()
        digest, before = blake3_file_stamped(path, progress)
        # The stamp is of the opened file, taken before reading; caching needs the path to
        # still name that same, unchanged version afterwards.
        if self._cacheable(before, stamped_at_ns, path):
            self.put(path, before, digest)
        return digest, False

    async def digest(self, path: Path, progress: Progress | None = None) -> tuple[str, bool]:
        """``(digest, from_cache)``; hashes (in a thread) when the file's stamp changed.

        A file modified while it was hashed, or modified too recently to trust its timestamps
        (see :data:`RACY_WINDOW_S`), gets its digest returned but not cached. A hit costs one
        ``stat`` and is answered on the loop: a thread hop would cost more than the lookup.
        """
        cached = self.get(path)
        if cached is not None:
            return cached, True
        return await asyncio.to_thread(self._digest_sync, path, progress)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``): readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
