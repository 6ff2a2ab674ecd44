"""SSH console benchmarks (issue 7), against `infrasim serve --ssh` in its own process.

1. Connect to first full frame (the fleet with its VM listed), median of 20 sequential
   sessions (goal ≤ 150 ms), against the SSH floor: the same client against a bare asyncssh
   server that writes one line and exits, same run.
2. Memory of the daemon per additional session (20 sessions open; goal ≤ 3 MiB) and its CPU
   with 20 concurrent sessions each watching a live serial console of one busy guest.
3. Key press to its echo on the client's screen, through SSH, the console pane and the guest
   (p50/p95 of 30 keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import pyte

BIN = Path(sys.executable).parent
INFRASIM = str(BIN / "infrasim")
SESSIONS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Term:
    """A client session with its output fed into a pyte screen."""

    def __init__(self, cols: int = 120, rows: int = 40) -> None:
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.changed = asyncio.Event()
        self.proc: Any = None
        self.conn: Any = None

    def text(self) -> str:
        return "\n".join(self.screen.display)

    async def pump(self) -> None:
        while True:
            data = await self.proc.stdout.read(65536)
            if not data:
                return
            self.stream.feed(data)
            self.changed.set()

    async def until(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{needle!r} not on screen:\n{self.text()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


async def open_term(port: int, key: Any, cols: int = 120, rows: int = 40) -> tuple[Term, Any]:
    t = Term(cols, rows)
    t.conn = await asyncssh.connect("127.0.0.1", port, username="bench", client_keys=[key],
                                    known_hosts=None, agent_path=None, password=None)
    t.proc = await t.conn.create_process(term_type="xterm-256color", term_size=(cols, rows),
                                         encoding=None)
    return t, asyncio.create_task(t.pump())


async def floor_server() -> tuple[Any, int]:
    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False

    async def handle(proc: Any) -> None:
        proc.stdout.write(b"InfraSim floor\r\n")
        proc.exit(0)

    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen("127.0.0.1", 0, server_factory=Server, server_host_keys=[key],
                                   process_factory=handle, encoding=None)
    return server, server.sockets[0].getsockname()[1]


async def run() -> dict[str, Any]:
    from infrasim_tui.core.guest import build_guest

    kit = build_guest("cloud")
    data = Path(tempfile.mkdtemp(prefix="infrasim-bench-ssh-"))
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = data / "bench.pub"
    pub.write_text(key.export_public_key().decode())
    subprocess.run([INFRASIM, "--data-dir", str(data), "ssh-key", "add", str(pub), "--role",
                    "operator"], check=True, capture_output=True)
    port = free_port()
    daemon = subprocess.Popen([sys.executable, "-m", "infrasim_tui", "--data-dir", str(data),
                               "serve", "--ssh", f"127.0.0.1:{port}", "--ssh-rate", "6000",
                               "--ssh-burst", "100", "--ssh-sessions-per-key", "50"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {}
    try:
        while not (data / "infrasim.sock").exists():
            await asyncio.sleep(0.05)
        subprocess.run([INFRASIM, "--data-dir", str(data), "vm", "create", "busy", "--kernel",
                        str(kit.kernel), "--initrd", str(kit.initrd), "--cmdline",
                        "quiet cryptomgr.notests", "--start"], check=True, capture_output=True)
        me = psutil.Process(daemon.pid)

        # 1. connect → first full frame, vs the SSH floor
        ours, floor = [], []
        fserver, fport = await floor_server()
        for _ in range(SESSIONS):
            t0 = time.perf_counter()
            term, pump = await open_term(port, key)
            await term.until("busy")
            ours.append(time.perf_counter() - t0)
            term.proc.stdin.write(b"q")
            await asyncio.wait_for(pump, 10)
            term.conn.close()
            t0 = time.perf_counter()
            ft, fpump = await open_term(fport, key)
            await ft.until("InfraSim floor")
            floor.append(time.perf_counter() - t0)
            await asyncio.wait_for(fpump, 10)
            ft.conn.close()
        fserver.close()
        out["connect"] = {"median_ms": statistics.median(ours) * 1e3,
                          "floor_median_ms": statistics.median(floor) * 1e3}

        # 3. key → echo through SSH, the pane and the guest
        term, pump = await open_term(port, key)
        await term.until("busy")
        term.proc.stdin.write(b"c")
        await term.until("INFRASIM-GUEST-READY", 60)
        lat = []
        for i in range(30):
            ch = "abcdefghijklmnopqrstuvwxyz0123"[i]
            t0 = time.perf_counter()
            term.proc.stdin.write(ch.encode())
            await term.until(f"# {'abcdefghijklmnopqrstuvwxyz0123'[:i + 1]}", 10)
            lat.append(time.perf_counter() - t0)
        term.proc.stdin.write(b"\x15")  # Ctrl+U: clear the line
        out["key_echo"] = {"p50_ms": statistics.median(lat) * 1e3,
                           "p95_ms": sorted(lat)[int(0.95 * (len(lat) - 1))] * 1e3}
        # make the guest busy on its console for the watchers
        term.proc.stdin.write(b"while true; do date; sleep 0.1; done\r")

        # 2. memory per session and CPU with 20 live watchers
        await asyncio.sleep(1.0)
        rss0 = me.memory_info().rss
        terms = []
        for _ in range(SESSIONS):
            t, p = await open_term(port, key)
            await t.until("busy")
            terms.append((t, p))
        await asyncio.sleep(2.0)
        rss_dash = me.memory_info().rss
        for t, _ in terms:
            t.proc.stdin.write(b"\r")  # open the VM view (cursor is on it)
        for t, _ in terms:
            await t.until("following", 30)
        await asyncio.sleep(2.0)
        rss1 = me.memory_info().rss
        c0 = me.cpu_times()
        w0 = time.perf_counter()
        await asyncio.sleep(10.0)
        c1 = me.cpu_times()
        cpu = (c1.user - c0.user + c1.system - c0.system) / (time.perf_counter() - w0) * 100
        out["sessions"] = {"n": SESSIONS,
                           "rss_per_session_mib": (rss_dash - rss0) / SESSIONS / 2**20,
                           "rss_per_session_vm_view_mib": (rss1 - rss0) / SESSIONS / 2**20,
                           "cpu_pct_20_watching": cpu}
        term.proc.stdin.write(b"\x03")
        for t, p in [*terms, (term, pump)]:
            t.conn.close()
            p.cancel()
    finally:
        subprocess.run([INFRASIM, "--data-dir", str(data), "vm", "stop", "busy", "--force"],
                       capture_output=True)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(data, ignore_errors=True)
    return out


def report(r: dict[str, Any]) -> str:
    c, s, k = r["connect"], r["sessions"], r["key_echo"]
    return "\n".join([
        f"1. connect to first full frame, median of {SESSIONS}: {c['median_ms']:.0f} ms "
        f"(goal <= 150 ms); bare asyncssh session {c['floor_median_ms']:.0f} ms -> "
        f"{c['median_ms'] / c['floor_median_ms']:.2f}x",
        f"2. {s['n']} sessions: +{s['rss_per_session_mib']:.2f} MiB each on the fleet (goal <= "
        f"3 MiB), +{s['rss_per_session_vm_view_mib']:.2f} MiB with a VM view and its live "
        "console open; "
        f"daemon CPU {s['cpu_pct_20_watching']:.1f}% of one core with all watching a live "
        "console",
        f"3. key -> echo on the client's screen: p50 {k['p50_ms']:.1f} ms, "
        f"p95 {k['p95_ms']:.1f} ms",
    ])
