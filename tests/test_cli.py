"""The ``infrasim`` command line, run as a user would: separate processes, real guests, and the
interactive console in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from infrasim_tui.core.guest import GuestKit

from .conftest import INFRASIM, infrasim, qemu_pids, wait_sync

pytestmark = pytest.mark.qemu


def test_version_and_status(data_dir: Path) -> None:
    r = infrasim(data_dir, "version", "--output", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["version"]
    r = infrasim(data_dir, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["data_dir"] == str(data_dir)
    assert st["host"]["accelerators"]["aarch64"] == "tcg"
    assert st["vms"]["RUNNING"] == 0


def test_exit_codes_and_messages(data_dir: Path, cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "vm", "get", "nope")
    assert r.returncode == 3 and "vm 'nope' not found" in r.stderr
    r = infrasim(data_dir, "vm", "create", "x", "--kernel", str(cloud_kit.kernel),
                 "--memory", "1")
    assert r.returncode == 2 and "memory_mb" in r.stderr
    r = infrasim(data_dir, "vm", "create", "x", "--kernel", str(cloud_kit.kernel),
                 "--forward", "80")
    assert r.returncode == 2 and "port_forwards[0]" in r.stderr
    r = infrasim(data_dir, "vm", "create", "x", "--kernel", str(cloud_kit.kernel),
                 "--initrd", str(cloud_kit.initrd))
    assert r.returncode == 0, r.stderr
    r = infrasim(data_dir, "vm", "stop", "x")
    assert r.returncode == 4 and "it is STOPPED" in r.stderr
    r = infrasim(data_dir, "vm", "create", "x", "--kernel", str(cloud_kit.kernel))
    assert r.returncode == 5 and "already exists" in r.stderr
    r = infrasim(data_dir, "vm", "list", "-o", "json")
    assert [v["meta"]["name"] for v in json.loads(r.stdout)] == ["x"]


def test_vm_lifecycle_through_the_cli(data_dir: Path, cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "vm", "create", "c1", "--kernel", str(cloud_kit.kernel), "--initrd",
                 str(cloud_kit.initrd), "--cmdline", "quiet", "--label", "team=qa", "--start",
                 "-o", "json")
    assert r.returncode == 0, r.stderr
    vm = json.loads(r.stdout)
    assert vm["status"]["state"] == "RUNNING" and vm["meta"]["labels"] == {"team": "qa"}
    pid = vm["status"]["pid"]
    # The VM outlives the command that started it.
    assert qemu_pids(data_dir) == [pid]
    assert wait_sync(lambda: b"INFRASIM-GUEST-READY" in
                     infrasim(data_dir, "console", "c1", "--log").stdout.encode(), 60)
    r = infrasim(data_dir, "vm", "list")
    assert r.returncode == 0 and "c1" in r.stdout and "RUNNING" in r.stdout
    assert "NAME" in r.stdout.splitlines()[0]
    # A piped (non-tty) console session: type a command, read its answer.
    r = infrasim(data_dir, "console", "c1", "--no-history", input="echo $((40+2))\n")
    assert r.returncode == 0, r.stderr
    assert "42" in r.stdout
    for verb, state in [("pause", "PAUSED"), ("resume", "RUNNING")]:
        r = infrasim(data_dir, "vm", verb, "c1", "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["status"]["state"] == state, r.stderr
    r = infrasim(data_dir, "vm", "stop", "c1", "--force")
    assert r.returncode == 0 and "STOPPED" in r.stdout
    assert qemu_pids(data_dir) == []
    r = infrasim(data_dir, "vm", "delete", "c1")
    assert r.returncode == 0
    assert json.loads(infrasim(data_dir, "vm", "list", "-o", "json").stdout) == []


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by ./dev setup")
def test_interactive_console_in_a_real_terminal(data_dir: Path, cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "vm", "create", "tty", "--kernel", str(cloud_kit.kernel),
                 "--initrd", str(cloud_kit.initrd), "--start")
    assert r.returncode == 0, r.stderr
    sock = f"infrasim-test-{uuid.uuid4().hex[:8]}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              check=True).stdout

    env_cmd = f"{INFRASIM} --data-dir {data_dir} console tty; echo EXIT=$?; sleep 30"
    tmux("new-session", "-d", "-x", "120", "-y", "40", env_cmd)
    try:
        def screen() -> str:
            return tmux("capture-pane", "-p")

        assert wait_sync(lambda: "Ctrl+] to detach" in screen(), 30), screen()
        assert wait_sync(lambda: "guest:" in screen(), 60), screen()
        tmux("send-keys", "echo typed-$((7*6))", "Enter")
        assert wait_sync(lambda: "typed-42" in screen(), 15), screen()
        tmux("send-keys", "C-]")
        assert wait_sync(lambda: "EXIT=0" in screen(), 15), screen()
        assert "Detached from tty" in screen()
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
    # Detaching left the VM running.
    r = infrasim(data_dir, "vm", "get", "tty", "-o", "json")
    assert json.loads(r.stdout)["status"]["state"] == "RUNNING"
    infrasim(data_dir, "vm", "stop", "tty", "--force")


def test_one_daemon_serves_many_clients(data_dir: Path, cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "vm", "create", "o1", "--kernel", str(cloud_kit.kernel),
                 "--initrd", str(cloud_kit.initrd), "--start")
    assert r.returncode == 0, r.stderr
    assert "started an InfraSim daemon" in r.stderr  # autostart says so
    holder = subprocess.Popen([INFRASIM, "--data-dir", str(data_dir), "console", "o1"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        assert holder.stderr is not None
        assert "Connected to" in holder.stderr.readline().decode()
        # While a console is attached, other commands work: the daemon owns the data dir.
        r = infrasim(data_dir, "vm", "list", "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)[0]["meta"]["name"] == "o1"
        assert "started" not in r.stderr  # the running daemon answered
        r = infrasim(data_dir, "vm", "stop", "o1", "--force")
        assert r.returncode == 0, r.stderr
        assert holder.wait(timeout=15) == 0  # the console saw the VM go away
    finally:
        holder.kill()
        holder.wait()
    # A second daemon for the same data dir refuses, naming the owner.
    from infrasim_tui.core.lock import DataDirLock
    from infrasim_tui.core.paths import DataDir

    owner = DataDirLock.owner_pid(DataDir(data_dir))
    r = infrasim(data_dir, "serve", timeout=30)
    assert r.returncode == 7 and f"owned by process {owner}" in r.stderr
    # --no-autostart with no daemon: a clear refusal.
    from .conftest import stop_daemon

    stop_daemon(data_dir)
    r = infrasim(data_dir, "--no-autostart", "vm", "list")
    assert r.returncode == 7 and "no InfraSim daemon answers" in r.stderr


def test_demo_command_reaches_the_shell(data_dir: Path, cloud_kit: GuestKit) -> None:
    t0 = time.monotonic()
    r = infrasim(data_dir, "demo", "--no-attach", timeout=180)
    assert r.returncode == 0, r.stderr
    assert "INFRASIM-GUEST-READY" in r.stdout
    assert "is at its shell prompt" in r.stderr
    assert time.monotonic() - t0 < 60
    # Idempotent: a second run finds the running demo VM and does not start another.
    pids = qemu_pids(data_dir)
    r = infrasim(data_dir, "demo", "--no-attach", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "already running" in r.stderr and qemu_pids(data_dir) == pids
    infrasim(data_dir, "vm", "stop", "demo", "--force")
    assert os.path.exists(data_dir / "infrasim.db")


def test_guest_build_prints_the_kit(data_dir: Path, cloud_kit: GuestKit) -> None:
    r = infrasim(data_dir, "guest", "build", "--offline", "-o", "json")
    assert r.returncode == 0, r.stderr
    kit = json.loads(r.stdout)
    assert Path(kit["kernel"]).is_file() and Path(kit["initrd"]).is_file()
    assert kit["kernel"] == str(cloud_kit.kernel)
    r = infrasim(data_dir, "guest", "build", "--flavour", "all", "--offline", "-o", "json")
    assert r.returncode == 0, r.stderr
    kits = json.loads(r.stdout)
    assert set(kits) == {"cloud", "generic"} and Path(kits["generic"]["dtb"]).is_file()


def test_storage_commands(data_dir: Path, cloud_kit: GuestKit, tmp_path: Path) -> None:
    img = tmp_path / "base.img"
    img.write_bytes(b"CLI-BASE".ljust(512, b"\0") + b"\0" * (4 << 20))
    r = infrasim(data_dir, "volume", "create", "base", "--from", str(img), "--read-only")
    assert r.returncode == 0, r.stderr
    r = infrasim(data_dir, "volume", "sign", "base", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"]["verified"] == "verified"
    assert infrasim(data_dir, "volume", "create", "disk", "--base", "base").returncode == 0
    r = infrasim(data_dir, "volume", "list")
    assert r.returncode == 0 and "base" in r.stdout and "verified" in r.stdout
    r = infrasim(data_dir, "volume", "delete", "base")
    assert r.returncode == 4 and "overlay disk" in r.stderr
    r = infrasim(data_dir, "volume", "create", "x", "--size", "lots")
    assert r.returncode == 2 and "size" in r.stderr
    r = infrasim(data_dir, "key", "list", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["host"] is True
    r = infrasim(data_dir, "key", "add", "junk", "not-a-key")
    assert r.returncode == 2, r.stderr

    r = infrasim(data_dir, "vm", "create", "sv", "--kernel", str(cloud_kit.kernel), "--initrd",
                 str(cloud_kit.initrd), "--disk", "disk", "--start")
    assert r.returncode == 0, r.stderr
    assert wait_sync(lambda: b"guest:" in
                     infrasim(data_dir, "console", "sv", "--log").stdout.encode(), 60)
    for name in ("one", "two"):
        r = infrasim(data_dir, "snapshot", "create", "sv", name, "--description", f"{name}!")
        assert r.returncode == 0, r.stderr
    assert infrasim(data_dir, "snapshot", "restore", "sv", "one").returncode == 0
    assert infrasim(data_dir, "snapshot", "create", "sv", "three").returncode == 0
    r = infrasim(data_dir, "snapshot", "tree", "sv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].startswith("└── one")
    assert "├── two" in r.stdout and "└── three" in r.stdout and "◀ current" in r.stdout
    r = infrasim(data_dir, "snapshot", "verify", "sv")
    assert r.returncode == 0 and "verified" in r.stdout
    r = infrasim(data_dir, "snapshot", "list", "sv", "-o", "json")
    assert {s["spec"]["description"] for s in json.loads(r.stdout)} == {"one!", "two!", ""}
    assert infrasim(data_dir, "vm", "stop", "sv", "--force").returncode == 0
    r = infrasim(data_dir, "image", "gc")
    assert r.returncode == 0 and "removed 0" in r.stdout


def test_host_key_protected_by_a_passphrase(data_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"\1" * 65536)
    assert infrasim(data_dir, "volume", "create", "ro", "--from", str(img),
                    "--read-only").returncode == 0
    env = {**os.environ, "INFRASIM_KEY_PASSPHRASE": "correct horse"}
    r = subprocess.run([INFRASIM, "--data-dir", str(data_dir), "key", "protect"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "now encrypted" in r.stdout, r.stderr
    key = json.loads((data_dir / "keys" / "host.key").read_text())
    assert key.get("encrypted") and (data_dir / "keys" / "host.key").stat().st_mode & 0o777 == 0o600
    # Signing happens in the daemon, which gets the passphrase from its environment (an
    # autostarted daemon inherits the CLI's).
    from .conftest import stop_daemon

    stop_daemon(data_dir)
    r = infrasim(data_dir, "volume", "sign", "ro")  # no passphrase anywhere
    assert r.returncode != 0 and "passphrase" in r.stderr
    for phrase, ok in (("wrong horse", False), ("correct horse", True)):
        stop_daemon(data_dir)
        env["INFRASIM_KEY_PASSPHRASE"] = phrase
        r = subprocess.run([INFRASIM, "--data-dir", str(data_dir), "volume", "sign", "ro"],
                           env=env, capture_output=True, text=True)
        assert (r.returncode == 0) == ok, r.stderr
        if not ok:
            assert "wrong passphrase" in r.stderr
