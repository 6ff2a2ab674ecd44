"""The console over SSH with the real OpenSSH client, in a private tmux server: log in with an
operator key, see the fleet, open a running VM and its live serial console, type into the
guest, Ctrl+] back, quit with exit status 0. The daemon is `infrasim serve --ssh`."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infrasim_tui.core.guest import READY_BANNER, GuestKit

from .conftest import infrasim, wait_sync


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("ssh") is None,
                    reason="tmux and openssh-client are installed by ./dev setup")
def test_openssh_client_journey(tmp_path: Path, data_dir: Path, cloud_kit: GuestKit) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "op", "-f", str(key)],
                   check=True)
    r = infrasim(data_dir, "ssh-key", "add", str(key) + ".pub", "--role", "operator")
    assert r.returncode == 0, r.stderr
    port = free_port()
    daemon = subprocess.Popen([sys.executable, "-m", "infrasim_tui", "--data-dir", str(data_dir),
                               "serve", "--ssh", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sock = f"infrasim-ssh-{uuid.uuid4().hex[:8]}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              check=True).stdout

    try:
        assert wait_sync(lambda: (data_dir / "infrasim.sock").exists(), 30)
        r = infrasim(data_dir, "vm", "create", "ssh-vm", "--kernel", str(cloud_kit.kernel),
                     "--initrd", str(cloud_kit.initrd), "--cmdline", "cryptomgr.notests",
                     "--start")
        assert r.returncode == 0, r.stderr
        ssh = (f"env -u COLUMNS -u LINES TERM=xterm-256color ssh -tt -e none -p {port} "
               f"-i {key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o PasswordAuthentication=no "
               f"-o LogLevel=ERROR alice@127.0.0.1; echo EXIT=$?; sleep 30")
        tmux("new-session", "-d", "-x", "150", "-y", "45", ssh)

        def screen() -> str:
            return tmux("capture-pane", "-p")

        assert wait_sync(lambda: "ssh-vm" in screen() and "running" in screen(), 30), screen()
        assert "SHA256:" in screen()  # the host key's fingerprint, to compare
        tmux("resize-window", "-x", "170", "-y", "45")  # the console follows the window:

        def bar_at_right_edge() -> bool:  # its right-aligned palette hint moves to column 170
            return any(line.rstrip().endswith("^p palette") and len(line.rstrip()) > 160
                       for line in screen().splitlines())

        assert wait_sync(bar_at_right_edge, 10), screen()
        tmux("resize-window", "-x", "150", "-y", "45")
        tmux("send-keys", "c")  # open the VM with its console focused
        assert wait_sync(lambda: READY_BANNER in screen(), 60), screen()
        tmux("send-keys", "echo ssh-$((6*7))", "Enter")
        assert wait_sync(lambda: "ssh-42" in screen(), 20), screen()
        tmux("send-keys", "C-]")
        time.sleep(0.3)
        tmux("send-keys", "Escape")
        # back on the fleet (its crumbs show the sort key) before the next key, or ESC q
        # would arrive as Alt+Q
        assert wait_sync(lambda: "↕" in screen().split("\n", 1)[0], 10), screen()
        tmux("send-keys", "q")
        assert wait_sync(lambda: "EXIT=0" in screen(), 15), screen()
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
    audit = (data_dir / "ssh" / "audit.log").read_text()
    assert "alice" in audit and "operator" in audit
