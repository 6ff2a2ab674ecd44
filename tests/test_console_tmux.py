"""The console in a real terminal: `infrasim` in a private tmux server, driven with send-keys
and read with capture-pane. It embeds the core (nothing else owns the data dir) and serves the
API meanwhile, so the CLI works beside it; quitting leaves the VM running."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from infrasim_tui.core.config import load_config
from infrasim_tui.core.guest import READY_BANNER, GuestKit
from infrasim_tui.core.orchestrator import Orchestrator

from .conftest import INFRASIM, guest_spec, infrasim, wait_sync


def create_vm(data_dir: Path, kit: GuestKit, name: str) -> None:
    async def go() -> None:
        core = await Orchestrator.open(load_config(data_dir=data_dir, env={}))
        try:
            await core.create_vm(name, guest_spec(kit))
        finally:
            await core.close()

    asyncio.run(go())


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by ./dev setup")
def test_console_in_tmux_starts_shows_banner_and_stops(data_dir: Path,
                                                       cloud_kit: GuestKit) -> None:
    create_vm(data_dir, cloud_kit, "tty-vm")
    sock = f"infrasim-ui-{uuid.uuid4().hex[:8]}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              check=True).stdout

    # pytest's COLUMNS/LINES would override the pane's real size
    cmd = (f"env -u COLUMNS -u LINES TERM=xterm-256color {INFRASIM} --data-dir {data_dir}; "
           "echo EXIT=$?; sleep 30")
    tmux("new-session", "-d", "-x", "160", "-y", "45", cmd)
    try:
        def screen() -> str:
            return tmux("capture-pane", "-p")

        assert wait_sync(lambda: "tty-vm" in screen() and "stopped" in screen(), 30), screen()
        assert "embedded" in screen()
        tmux("send-keys", "s")  # start the VM under the cursor
        assert wait_sync(lambda: "● running" in screen(), 30), screen()
        # the console serves the API while it owns the data dir: the CLI sees the same world
        r = infrasim(data_dir, "--no-autostart", "vm", "get", "tty-vm", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"]["state"] == "RUNNING"
        tmux("send-keys", "c")  # open the VM with its console focused
        assert wait_sync(lambda: READY_BANNER in screen(), 60), screen()
        tmux("send-keys", "echo tmux-$((6*7))", "Enter")
        assert wait_sync(lambda: "tmux-42" in screen(), 15), screen()
        tmux("send-keys", "C-]")  # leave the console, then stop with confirmation
        # the key bar offers the palette again once the console has let go of the keyboard;
        # an `x` sent before that is typed into the guest
        assert wait_sync(lambda: "^p palette" in screen(), 10), screen()
        tmux("send-keys", "x")
        assert wait_sync(lambda: "Stop tty-vm?" in screen(), 10), screen()
        tmux("send-keys", "y")
        assert wait_sync(lambda: " stopped" in screen().split("\n", 3)[1], 40), screen()
        tmux("send-keys", "Escape")
        assert wait_sync(lambda: "○ stopped" in screen(), 10), screen()
        tmux("send-keys", "s")  # start it again and quit: the VM outlives the console
        assert wait_sync(lambda: "● running" in screen(), 30), screen()
        tmux("send-keys", "q")
        assert wait_sync(lambda: "EXIT=0" in screen(), 15), screen()
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
    r = infrasim(data_dir, "vm", "get", "tty-vm", "-o", "json")
    assert json.loads(r.stdout)["status"]["state"] == "RUNNING", r.stderr
    infrasim(data_dir, "vm", "stop", "tty-vm", "--force")
