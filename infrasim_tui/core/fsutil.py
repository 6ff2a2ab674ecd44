"""Small file-system primitives shared by the image store, the digest cache and the guest kit.

They exist so that "open only a regular file, with an error an operator can act on" and "make a
rename durable" are written once.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import InvalidSpec, NotFound, Unavailable


def open_regular(path: Path, what: str = "file") -> tuple[int, os.stat_result]:
    """Open ``path`` read-only and return (fd, stat) — refusing anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotFound(what, str(path)) from None
    except PermissionError:
        raise Unavailable(f"cannot read {path}: permission denied; fix its mode or owner") \
            from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InvalidSpec("path", f"{path} is not a regular file; give an image file")
    return fd, st


def fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` survive a power cut (best effort where unsupported)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
