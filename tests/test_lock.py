"""Data dir ownership (flock across real processes) and the data dir layout (paths)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infrasim_tui.core import paths as paths_mod
from infrasim_tui.core.errors import DataDirLocked, Unavailable
from infrasim_tui.core.lock import DataDirLock
from infrasim_tui.core.paths import MAX_SOCKET_NAME, SUN_PATH_BUDGET, DataDir

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from infrasim_tui.core.lock import DataDirLock
    from infrasim_tui.core.paths import DataDir

    lock = DataDirLock(DataDir(Path(sys.argv[1])))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
    print("released", flush=True)
    time.sleep(60)
    """
)


class Holder:
    """Another process owning the data dir, releasing it after ``hold`` seconds."""

    def __init__(self, tmp_path: Path, root: Path, hold: float = 60.0) -> None:
        script = tmp_path / "holder.py"
        script.write_text(HOLDER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(hold)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "locked\n", self.proc.stderr.read() if self.proc.stderr else line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill9()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "world")


@pytest.fixture
def holder(tmp_path: Path, data: DataDir) -> Iterator[Holder]:
    h = Holder(tmp_path, data.root)
    yield h
    h.close()


def test_acquire_writes_pid_and_release_clears_it(data: DataDir) -> None:
    lock = DataDirLock(data)
    assert DataDirLock.owner_pid(data) is None  # no lock file yet
    lock.acquire()
    try:
        assert lock.held
        assert data.lock.read_text().strip() == str(os.getpid())
        assert DataDirLock.owner_pid(data) == os.getpid()
        lock.acquire()  # idempotent for the holder itself
    finally:
        lock.release()
    assert not lock.held
    assert data.lock.read_text() == ""
    assert DataDirLock.owner_pid(data) is None
    lock.release()  # idempotent


def test_second_lock_in_same_process_is_refused(data: DataDir) -> None:
    with DataDirLock(data):
        with pytest.raises(DataDirLocked) as err:
            DataDirLock(data).acquire()
        assert err.value.pid == os.getpid()
    with DataDirLock(data) as again:  # free after the with block
        assert again.held


def test_other_process_owner_is_named(data: DataDir, holder: Holder) -> None:
    assert DataDirLock.owner_pid(data) == holder.pid
    with pytest.raises(DataDirLocked) as err:
        DataDirLock(data).acquire()
    assert err.value.pid == holder.pid
    assert f"process {holder.pid}" in str(err.value) and str(data.root) in str(err.value)
    # The probe by owner_pid() must not have freed or stolen anything.
    assert DataDirLock.owner_pid(data) == holder.pid


def test_sigkilled_owner_frees_the_data_dir(data: DataDir, holder: Holder) -> None:
    with pytest.raises(DataDirLocked):
        DataDirLock(data).acquire()
    holder.kill9()
    # The dead owner's pid is still in the file, but only a live flock counts.
    assert data.lock.read_text().strip() == str(holder.pid)
    assert DataDirLock.owner_pid(data) is None
    with DataDirLock(data):
        assert data.lock.read_text().strip() == str(os.getpid())


def test_acquire_waits_for_a_release(tmp_path: Path, data: DataDir) -> None:
    h = Holder(tmp_path, data.root, hold=0.3)
    try:
        start = time.monotonic()
        lock = DataDirLock(data)
        lock.acquire(wait=10)
        assert time.monotonic() - start < 5
        assert DataDirLock.owner_pid(data) == os.getpid()
        lock.release()
    finally:
        h.close()


def test_acquire_gives_up_after_wait(data: DataDir, holder: Holder) -> None:
    start = time.monotonic()
    with pytest.raises(DataDirLocked):
        DataDirLock(data).acquire(wait=0.3)
    assert time.monotonic() - start >= 0.3


def test_children_do_not_inherit_the_lock(data: DataDir) -> None:
    """A QEMU spawned by the core must not keep the data dir locked after the core dies."""
    lock = DataDirLock(data)
    lock.acquire()
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        lock.release()
        with DataDirLock(data):
            pass
    finally:
        child.kill()
        child.wait()


# --- paths ----------------------------------------------------------------------------------


def test_layout(tmp_path: Path) -> None:
    d = DataDir(tmp_path)
    assert d.db == tmp_path / "infrasim.db"
    assert d.lock == tmp_path / "infrasim.lock"
    assert d.socket == tmp_path / "infrasim.sock"
    assert d.keys_dir == tmp_path / "keys"
    assert d.host_facts == tmp_path / "host-facts.json"
    assert d.run_dir("abc") == tmp_path / "run" / "abc"
    for bad in ("", "..", "a/b", "."):
        with pytest.raises(ValueError):
            d.run_dir(bad)


def test_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DataDir(Path("rel")).root == tmp_path / "rel"
    assert DataDir(Path("~/w")).root == tmp_path / "home" / "w"
    assert DataDir(Path("rel")) == DataDir(tmp_path / "rel")


def test_ensure_creates_private_dirs(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "a" / "b")
    d.ensure()
    d.ensure()  # idempotent
    for p in (d.root, d.run_root, d.keys_dir):
        assert p.is_dir() and stat.S_IMODE(p.stat().st_mode) == 0o700


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short dir under /tmp: pytest's tmp_path is itself too long on some hosts (macOS)."""
    path = Path(tempfile.mkdtemp(prefix="is-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_short_root_keeps_sockets_in_run_dir(short_tmp: Path) -> None:
    vm_id = "0123456789abcdef"
    # Longest root whose run dir still leaves room for MAX_SOCKET_NAME: exactly the budget.
    run_dir_len = SUN_PATH_BUDGET - 1 - MAX_SOCKET_NAME
    pad = run_dir_len - len(str(short_tmp / "x" / "run" / vm_id)) + 1
    root = short_tmp / ("x" * pad)
    d = DataDir(root)
    assert len(str(d.run_dir(vm_id))) == run_dir_len
    sock = d.socket_dir(vm_id)
    assert sock == d.run_dir(vm_id)
    assert sock.is_dir() and stat.S_IMODE(sock.stat().st_mode) == 0o700
    # One more character and the sockets move to the short fallback.
    longer = DataDir(short_tmp / ("x" * (pad + 1)))
    moved = longer.socket_dir(vm_id)
    try:
        assert moved != longer.run_dir(vm_id)
        assert len(str(moved / ("x" * MAX_SOCKET_NAME))) <= SUN_PATH_BUDGET
    finally:
        shutil.rmtree(moved.parent, ignore_errors=True)


def test_long_root_gets_a_short_deterministic_socket_dir(tmp_path: Path) -> None:
    long_root = tmp_path / ("deep-" * 20) / "world"
    vm_id = "0123456789abcdef"
    d = DataDir(long_root)
    sock = d.socket_dir(vm_id)
    try:
        assert sock != d.run_dir(vm_id)
        assert str(sock).startswith(f"/tmp/infrasim-{os.getuid()}/")
        assert len(str(sock / ("x" * MAX_SOCKET_NAME))) <= SUN_PATH_BUDGET
        assert sock.is_dir() and stat.S_IMODE(sock.stat().st_mode) == 0o700
        # Same data dir (even spelled differently) → same place; another data dir → elsewhere.
        assert DataDir(long_root / "." / "x" / "..").socket_dir(vm_id) == sock
        assert d.socket_dir("fedcba9876543210").parent == sock.parent
        other = DataDir(tmp_path / ("deep-" * 20) / "world2").socket_dir(vm_id)
        assert other.parent != sock.parent
        shutil.rmtree(other.parent)
        # A VM id too long for the budget is hashed, still deterministic and short.
        long_id = "v" * 90
        assert d.socket_dir(long_id) == d.socket_dir(long_id)
        assert len(str(d.socket_dir(long_id) / ("x" * MAX_SOCKET_NAME))) <= SUN_PATH_BUDGET
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


def _long(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / ("deep-" * 20))


def test_shared_socket_dir_hijack_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths_mod, "SHORT_SOCKET_ROOT", tmp_path / "t")
    (tmp_path / "t").mkdir()
    base = tmp_path / "t" / f"infrasim-{os.getuid()}"
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    base.symlink_to(elsewhere)
    with pytest.raises(Unavailable, match="not a plain directory"):
        _long(tmp_path).socket_dir("abc")
    base.unlink()
    base.mkdir(mode=0o777)
    os.chmod(base, 0o777)
    _long(tmp_path).socket_dir("abc")
    assert stat.S_IMODE(base.stat().st_mode) == 0o700  # loosened perms are tightened


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a dir owned by another user")
def test_socket_dir_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths_mod, "SHORT_SOCKET_ROOT", tmp_path / "t")
    base = tmp_path / "t" / f"infrasim-{os.getuid()}"
    base.mkdir(parents=True, mode=0o700)
    os.chown(base, 65534, 65534)
    with pytest.raises(Unavailable, match="owned by uid 65534"):
        _long(tmp_path).socket_dir("abc")


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(Unavailable, match=r"cannot create the lock file .*file/w/infrasim\.lock"):
        DataDirLock(DataDir(tmp_path / "file" / "w")).acquire()


PROBER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from infrasim_tui.core.lock import DataDirLock
    from infrasim_tui.core.paths import DataDir

    data = DataDir(Path(sys.argv[1]))
    print("probing", flush=True)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        DataDirLock.owner_pid(data)
    """
)


def _probe_while_acquiring(tmp_path: Path, data: DataDir) -> int:
    """Acquire/release for 0.4 s while another process probes owner_pid(); count refusals."""
    data.ensure()
    DataDirLock(data).release()
    script = tmp_path / "prober.py"
    script.write_text(PROBER)
    prober = subprocess.Popen([sys.executable, str(script), str(data.root)],
                              stdout=subprocess.PIPE, text=True)
    refused = 0
    try:
        assert prober.stdout and prober.stdout.readline() == "probing\n"
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            lock = DataDirLock(data)
            try:
                lock.acquire()
            except DataDirLocked:
                refused += 1
            lock.release()
    finally:
        prober.kill()
        prober.wait()
        if prober.stdout:
            prober.stdout.close()
    return refused


def test_owner_pid_probes_never_make_acquire_fail(tmp_path: Path, data: DataDir) -> None:
    # With lock._PROBE_GRACE = 0 this sees hundreds of refusals on most runs (not all: it
    # needs the two processes on different CPUs at once).
    assert _probe_while_acquiring(tmp_path, data) == 0

