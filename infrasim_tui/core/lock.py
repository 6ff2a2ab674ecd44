"""One core per data dir, enforced with ``flock`` on ``<data dir>/infrasim.lock``.

flock, not a pidfile check: the kernel drops the lock when the owner dies, even by SIGKILL,
so a crashed core never blocks the next one. The pid written into the file only serves
error messages and :meth:`DataDirLock.owner_pid`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from types import TracebackType

from infrasim_tui.core.errors import DataDirLocked, Unavailable
from infrasim_tui.core.paths import DataDir

# A probe by owner_pid() holds a shared lock for microseconds; acquire() retries at least this
# long so such a probe is never mistaken for a running core.
_PROBE_GRACE = 0.05
_RETRY_INTERVAL = 0.01


class DataDirLock:
    """Exclusive ownership of a data dir for this process (blocking calls: startup only)."""

    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, retrying for up to ``wait`` seconds; DataDirLocked if still taken."""
        if self._fd is not None:
            return
        path = self.data_dir.lock
        try:
            self.data_dir.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            # os.open's fds are close-on-exec: QEMU children must not inherit the lock, or a
            # killed core whose guests survive would still "own" the data dir.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise Unavailable(f"cannot create the lock file {path}: {exc.strerror}") from None
        deadline = time.monotonic() + max(wait, _PROBE_GRACE)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise Unavailable(
                            f"cannot lock {path}: {exc.strerror}; put the data dir on a local "
                            "filesystem that supports flock"
                        ) from None
                if time.monotonic() >= deadline:
                    raise DataDirLocked(str(self.data_dir.root), _read_pid(fd))
                time.sleep(_RETRY_INTERVAL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; the pid is cleared first so nobody reads a stale owner."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only fd of the open file description unlocks it

    @staticmethod
    def owner_pid(data_dir: DataDir) -> int | None:
        """Pid of the live owner, or None if nobody holds the lock.

        Probes with a non-blocking shared lock that is dropped at once, so a free data dir
        stays free; the pid can be None too while an owner is still writing it.
        """
        try:
            fd = os.open(data_dir.lock, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                return _read_pid(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None
