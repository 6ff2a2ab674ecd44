"""The content-addressed image store: every image is stored once, under its BLAKE3 digest.

Layout: ``<images_dir>/blake3/<digest[:2]>/<digest>`` (read-only, 0444) and ``<images_dir>/tmp``
for copies and downloads in progress (same file system, so placing a file is an atomic rename).
The digest is always computed from the copy the store owns, never from the source, which may
change while it is read. Which images are still needed is the caller's business (volumes in the
database reference digests); this module only provides the primitives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from infrasim_tui.core.digest import Progress, blake3_file_stamped, check_digest
from infrasim_tui.core.errors import IntegrityError, InvalidSpec, NotFound, Unavailable
from infrasim_tui.core.fsutil import fsync_dir, open_regular

_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredImage:
    digest: str
    path: Path
    size: int  # apparent size in bytes (sparse images occupy less on disk)


class ImageStore:
    def __init__(self, images_dir: Path) -> None:
        self.root = Path(os.path.abspath(images_dir))
        self._objects = self.root / "blake3"

    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self._objects / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def tmp_dir(self) -> Path:
        """Where downloads go before :meth:`adopt`; created if missing."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    async def import_file(self, src: Path, *, expected_digest: str = "",
                          progress: Progress | None = None) -> StoredImage:
        """Copy ``src`` into the store (holes stay holes) and return it by digest.

        ``progress`` covers the copy, then the hash of the copy: its total is twice the size.
        With ``expected_digest``, a copy with another digest is deleted and IntegrityError
        raised. The work runs in one worker thread, which also cleans up after itself.
        """
        if expected_digest:
            check_digest(expected_digest, "expected_digest")
        return await asyncio.to_thread(self._import_sync, Path(src), expected_digest, progress)

    async def adopt(self, tmp_file: Path, *, expected_digest: str = "",
                    progress: Progress | None = None) -> StoredImage:
        """Hash a file already written into :meth:`tmp_dir` and move it into place.

        The file is consumed: moved into the store, or deleted on a digest mismatch.
        """
        if expected_digest:
            check_digest(expected_digest, "expected_digest")
        tmp_file = Path(os.path.abspath(tmp_file))
        if tmp_file.parent != self.tmp_dir():
            raise InvalidSpec("tmp_file", f"{tmp_file} is not in {self.tmp_dir()}; only files "
                              "there can be adopted (use import_file for others)")
        return await asyncio.to_thread(self._place_sync, tmp_file, expected_digest, progress, 0)

    def list(self) -> list[StoredImage]:
        """Every stored image, sorted by digest."""
        images = []
        for fan in sorted(self._objects.glob("??")):
            for entry in sorted(fan.iterdir()):
                if not _DIGEST.fullmatch(entry.name) or entry.name[:2] != fan.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    images.append(StoredImage(entry.name, entry, entry.stat().st_size))
        return images

    def remove(self, digest: str) -> int:
        """Delete an image; returns the bytes it occupied on disk (0 if hard-linked elsewhere)."""
        path = self.path_for(digest)
        try:
            st = path.stat()
            path.unlink()
        except FileNotFoundError:
            raise NotFound("image", digest) from None
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
        return st.st_blocks * 512 if st.st_nlink == 1 else 0

    # --- worker-thread side ---------------------------------------------------------------

    def _import_sync(self, src: Path, expected: str,
                     progress: Progress | None) -> StoredImage:
        src_fd, st = open_regular(src, "image file")
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp_dir(), prefix="import-", suffix=".part")
            tmp = Path(name)
            try:
                try:
                    with os.fdopen(fd, "r+b") as dst:
                        _copy_sparse(src_fd, dst.fileno(), st.st_size, src, progress)
                except OSError as exc:
                    raise Unavailable(f"copying {src} into the image store failed: "
                                      f"{exc.strerror or exc}") from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        finally:
            os.close(src_fd)
        return self._place_sync(tmp, expected, progress, st.st_size)

    def _place_sync(self, tmp: Path, expected: str, progress: Progress | None,
                    progress_base: int) -> StoredImage:
        """Hash ``tmp`` (a file of ours), verify, make it read-only and rename it into place."""
        try:
            wrapped = progress
            if progress is not None and progress_base:
                def wrapped(done: int, total: int) -> None:
                    progress(progress_base + done, progress_base + total)
            digest, stamp = blake3_file_stamped(tmp, wrapped)
            if expected and digest != expected:
                raise IntegrityError(
                    f"image {tmp.name}: content digest {digest[:16]}… does not match the "
                    f"expected digest {expected[:16]}… (full: {digest} vs {expected}); the "
                    "copy was deleted: check the source or the digest you were given")
            final = self.path_for(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_file():  # already stored: content-addressed, so keep the one we have
                tmp.unlink()
                return StoredImage(digest, final, final.stat().st_size)
            with open(tmp, "rb") as handle:
                os.fchmod(handle.fileno(), 0o444)
                os.fsync(handle.fileno())  # contents on disk before the name is
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return StoredImage(digest, final, stamp.size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _copy_sparse(src_fd: int, dst_fd: int, size: int, src: Path,
                 progress: Progress | None) -> None:
    """Copy the data extents of ``src_fd`` (holes are skipped) and extend ``dst_fd`` to size."""
    if progress is not None:
        progress(0, 2 * size)
    for start, end in _data_extents(src_fd, size):
        offset = start
        while offset < end:
            n = _copy_range(src_fd, dst_fd, offset, min(_CHUNK, end - offset))
            if n == 0:
                raise Unavailable(f"{src} shrank while it was copied; retry when nothing "
                                  "writes to it")
            offset += n
            if progress is not None:
                progress(offset, 2 * size)
    os.ftruncate(dst_fd, size)
    if progress is not None:
        progress(size, 2 * size)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the regions holding data; the whole file without SEEK_DATA."""
    if size == 0:
        return []
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    extents = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole after offset
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            offset = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)]
        raise
    return extents


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    """Copy ``count`` bytes at ``offset``; in-kernel (reflink where the file system can)."""
    try:
        return os.copy_file_range(src_fd, dst_fd, count, offset, offset)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (
                errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    data = os.pread(src_fd, count, offset)
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.pwrite(dst_fd, view[written:], offset + written)
    return len(data)



