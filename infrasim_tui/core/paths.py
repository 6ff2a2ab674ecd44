"""Layout of a data dir: one directory holds one InfraSim "world" (database, lock, run state).

Everything that names a file inside a data dir goes through :class:`DataDir`, so two worlds
(``--data-dir``) never share a file by accident.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from infrasim_tui.core.errors import Unavailable

# A unix socket path must fit ``sockaddr_un.sun_path``: 104 bytes on macOS, 108 on Linux,
# including the NUL. We stay under 100 so the same layout works on both.
SUN_PATH_BUDGET = 100
# Socket file names placed in a socket dir ("qmp.sock", "serial.sock", ...) must be at most
# this long; socket_dir() reserves room for them.
MAX_SOCKET_NAME = 20
# Short fallback for socket dirs. Literal /tmp rather than $TMPDIR: on macOS $TMPDIR is
# /var/folders/xx/.../T/, itself long enough to eat half the budget.
SHORT_SOCKET_ROOT = Path("/tmp")


@dataclass(frozen=True)
class DataDir:
    """Paths inside one data dir. ``root`` is made absolute (``~`` expanded) on construction."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(os.path.expanduser(self.root))))

    @property
    def db(self) -> Path:
        return self.root / "infrasim.db"

    @property
    def lock(self) -> Path:
        return self.root / "infrasim.lock"

    @property
    def socket(self) -> Path:
        """The core's own API socket (the CLI talks to a running core through it)."""
        return self.root / "infrasim.sock"

    @property
    def run_root(self) -> Path:
        return self.root / "run"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def host_facts(self) -> Path:
        return self.root / "host-facts.json"

    def run_dir(self, vm_id: str) -> Path:
        """Per-VM runtime files: pidfile, serial log, QEMU stderr log. Not created here."""
        return self.run_root / _component(vm_id)

    def socket_dir(self, vm_id: str) -> Path:
        """A private (0700) directory for the VM's unix sockets, created if missing.

        It is :meth:`run_dir` when socket paths there fit :data:`SUN_PATH_BUDGET`; otherwise a
        short directory ``/tmp/infrasim-<uid>/<hash of root>/<vm_id>``. The hash makes the
        mapping deterministic, so a restarted core finds the sockets of VMs it left running,
        and keeps two data dirs apart.
        """
        run_dir = self.run_dir(vm_id)
        if _fits(run_dir):
            _make_private_dir(run_dir, parents=True)
            return run_dir
        base = SHORT_SOCKET_ROOT / f"infrasim-{os.getuid()}"
        _make_private_dir(base, parents=False)
        _check_private_dir(base)
        digest = hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=5).hexdigest()
        short = base / digest / _component(vm_id)
        if not _fits(short):  # an unusually long id: hash it too, still deterministic
            vm_hash = hashlib.blake2b(vm_id.encode(), digest_size=8).hexdigest()
            short = base / digest / vm_hash
        _make_private_dir(short.parent, parents=False)
        _make_private_dir(short, parents=False)
        return short

    def ensure(self) -> None:
        """Create the root (0700 when new) and the subdirs the core writes into."""
        _make_private_dir(self.root, parents=True)
        _make_private_dir(self.run_root, parents=False)
        _make_private_dir(self.keys_dir, parents=False)
        # Keys are secrets: tighten the dir even if someone loosened it.
        os.chmod(self.keys_dir, 0o700)


def _fits(directory: Path) -> bool:
    return len(os.fsencode(str(directory))) + 1 + MAX_SOCKET_NAME <= SUN_PATH_BUDGET


def _component(vm_id: str) -> str:
    """Refuse ids that would escape the run dir; store ids are hex, so this only guards bugs."""
    if not vm_id or vm_id in (".", "..") or "/" in vm_id or "\0" in vm_id:
        raise ValueError(f"invalid VM id {vm_id!r} for a path component")
    return vm_id


def _make_private_dir(path: Path, *, parents: bool) -> None:
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise Unavailable(
                f"{path} exists and is not a directory; move it away so InfraSim can use it"
            ) from None


def _check_private_dir(path: Path) -> None:
    """Refuse a shared /tmp dir that another user created or can write to (socket hijack)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise Unavailable(f"{path} is not a plain directory; remove it and retry")
    if st.st_uid != os.getuid():
        raise Unavailable(
            f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
            "another user may be trying to intercept InfraSim's sockets: remove it and retry"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
