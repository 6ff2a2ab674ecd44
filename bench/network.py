"""Network benchmarks (issue 8): the SEGMENT switch against what it replaces, in the same run.

1. Unshaped TCP throughput between two real guests through the switch vs a direct QEMU-to-QEMU
   ``dgram`` link between a second pair started by hand with the same argv (each socket sends
   to the other's), both directions, rounds alternated     goal >= 0.8x
2. Added latency with no impairment: guest ping RTT through the switch vs the direct link; and
   host-side, frame in -> frame out through a Switch in a child process vs a bare relay (p50/p99)
3. CPU of the switch, in a child process fed by fake QEMU sockets: one link at 10, 50 and
   100 Mbit/s of 1514-byte frames (-> % of a core per 10 Mbit/s); 20 links at 1 Mbit/s each
   with a token bucket and delay profile; the ceiling when frames are sent as fast as possible,
   with the receiving socket capped by ``net.unix.max_dgram_qlen`` like QEMU's and without.
   Baseline: the same child relaying the same frames with a bare recv/send loop.

While the guests stream, the bench also records where the time goes (CPU of each QEMU, of the
switch's process and of the host; how often QEMU's receive queue, capped at
``net.unix.max_dgram_qlen`` datagrams, was full so the switch had to hold frames back), so the
bottleneck is measured, not guessed.

``python -m bench.network child MODE DIR LINKS [PROFILE_JSON]`` is the child process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient

from infrasim_tui.core.console import SerialConsole
from infrasim_tui.core.guest import GuestKit, build_guest
from infrasim_tui.core.model import NetworkMode, NetworkSpec, QosProfileSpec, VMState
from infrasim_tui.core.orchestrator import Orchestrator
from infrasim_tui.core.switch import PortConfig, SegmentConfig, Switch

from .common import BANNER, pct, scratch_core, spec

THROUGHPUT_GOAL = 0.8
FULL_FRAME = 1514
PING_FRAME = 98  # an ICMP echo request of ping's default size
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental: never DHCP, never IP
SOCK_BUFFER = 4 << 20
SHAPED = QosProfileSpec(rate_bps=1_000_000, delay_ms=20, jitter_ms=2, direction="egress")


# == host side: a Switch (or a bare relay) in a child process, fed by fake QEMU sockets =========


def mac(i: int, side: str) -> bytes:
    return bytes([0x02, 0, 0, i >> 8 & 255, i & 255, 0x0A if side == "a" else 0x0B])


def make_frame(dst: bytes, src: bytes, size: int, seq: int = 0) -> bytes:
    head = dst + src + ETHERTYPE + seq.to_bytes(4, "big")
    return head + bytes(size - len(head))


@dataclass(frozen=True)
class LinkPaths:
    """One link: two fake QEMU NICs (a sends, b receives) and the child's two sockets."""

    a_qemu: str
    a_sw: str
    b_qemu: str
    b_sw: str


def link_paths(d: str, i: int) -> LinkPaths:
    return LinkPaths(f"{d}/{i}a.vm", f"{d}/{i}a.sw", f"{d}/{i}b.vm", f"{d}/{i}b.sw")


def _dgram(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUFFER)
    s.bind(path)
    s.setblocking(False)
    return s


class Relay:
    """The baseline: the same sockets as a switch port pair, frames copied from one to the
    other with the same read batching and the same hold-back queue, and nothing else (no MAC
    table, no shaper, no stats)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, paths: LinkPaths) -> None:
        self.loop = loop
        self.a = _dgram(paths.a_sw)
        self.b = _dgram(paths.b_sw)
        self.a.connect(paths.a_qemu)
        self.b.connect(paths.b_qemu)
        self.out: dict[socket.socket, deque[bytes]] = {self.a: deque(), self.b: deque()}
        self.dropped = 0
        loop.add_reader(self.a.fileno(), self._pump, self.a, self.b)
        loop.add_reader(self.b.fileno(), self._pump, self.b, self.a)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        for _ in range(256):
            try:
                frame = src.recv(65536)
            except BlockingIOError:
                return
            self._send(dst, frame)

    def _send(self, dst: socket.socket, frame: bytes) -> None:
        out = self.out[dst]
        if not out:
            try:
                dst.send(frame)
                return
            except BlockingIOError:
                self.loop.add_writer(dst.fileno(), self._flush, dst)
        if len(out) < 1024:
            out.append(frame)
        else:
            self.dropped += 1

    def _flush(self, dst: socket.socket) -> None:
        out = self.out[dst]
        try:
            while out:
                dst.send(out[0])
                out.popleft()
        except BlockingIOError:
            return
        self.loop.remove_writer(dst.fileno())


async def serve_child(mode: str, d: str, links: int, profile: QosProfileSpec | None) -> None:
    loop = asyncio.get_running_loop()
    switch = Switch(lambda _event: None)  # the 2 Hz stats publisher still runs: part of the cost
    relays = []
    for i in range(links):
        p = link_paths(d, i)
        if mode == "relay":
            relays.append(Relay(loop, p))
            continue
        seg = SegmentConfig(network_id=f"n{i}", network=f"net{i}", cidr="10.99.0.0/24",
                            dhcp=False)
        for side, sw, qemu, prof in (("a", p.a_sw, p.a_qemu, profile),
                                     ("b", p.b_sw, p.b_qemu, None)):
            switch.attach(seg, PortConfig(
                network_id=seg.network_id, network=seg.network, vm_id=f"vm{i}{side}",
                vm=f"vm{i}{side}", nic="net1", mac=mac(i, side).hex(":"), switch_path=sw,
                qemu_path=qemu, profile_id="p" if prof else "", profile="p" if prof else "",
                spec=prof))
    def dropped() -> int:
        if mode == "relay":
            return sum(r.dropped for r in relays)
        return sum(n for st in switch.stats() for cause, n in st.drops.items()
                   if cause != "bucket")  # the bucket's drops are its job, not a failure

    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):  # until stdin closes
        if line.strip() == "stats":
            print(json.dumps({"dropped": dropped()}), flush=True)
    await switch.close()


def child_main(argv: list[str]) -> None:
    mode, d, links = argv[0], argv[1], int(argv[2])
    profile = QosProfileSpec(**json.loads(argv[3])) if len(argv) > 3 else None
    asyncio.run(serve_child(mode, d, links, profile))


class Child:
    """A switch or relay child process and the parent's fake QEMU sockets for its links."""

    def __init__(self, mode: str, links: int, profile: QosProfileSpec | None = None) -> None:
        self.mode = mode
        self.dir = tempfile.mkdtemp(prefix="isnb-")
        self.paths = [link_paths(self.dir, i) for i in range(links)]
        self.a = [_dgram(p.a_qemu) for p in self.paths]
        self.b = [_dgram(p.b_qemu) for p in self.paths]
        args = [mode, self.dir, str(links)]
        if profile is not None:
            args.append(json.dumps({k: v for k, v in vars(profile).items() if k != "lora"}))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.network", "child", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"{mode} child did not start: {line!r}")
        self.ps = psutil.Process(self.proc.pid)

    def dropped(self) -> int:
        """Frames the child has dropped so far (its hold-back queue to a fake QEMU was full)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["dropped"])

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def prime(self) -> None:
        """One frame each way per link: the switch learns both MACs and connects to both
        fake QEMUs (as DHCP does for real guests), so later frames never flood."""
        for i, p in enumerate(self.paths):
            self.b[i].sendto(make_frame(mac(i, "a"), mac(i, "b"), 64), p.b_sw)
            self.a[i].sendto(make_frame(mac(i, "b"), mac(i, "a"), 64), p.a_sw)
        deadline = time.monotonic() + 5
        pending = {s for pair in zip(self.a, self.b, strict=True) for s in pair}
        while pending and time.monotonic() < deadline:
            for s in list(pending):
                with contextlib.suppress(BlockingIOError):
                    s.recv(65536)
                    pending.discard(s)
            time.sleep(0.001)
        if pending:
            raise RuntimeError(f"{self.mode} child: {len(pending)} priming frames never arrived")
        time.sleep(0.7)  # a delay profile holds frames 20 ms; the stats tick runs at 2 Hz
        for s in self.a + self.b:
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.recv(65536)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for s in self.a + self.b:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def host_latency(child: Child, count: int, size: int = PING_FRAME) -> dict[str, float]:
    """Frame in at a's switch socket -> frame out at b's fake QEMU, one at a time (µs)."""
    a, b, p = child.a[0], child.b[0], child.paths[0]
    b.setblocking(True)
    b.settimeout(1.0)
    lat: list[float] = []
    lost = 0
    try:
        for seq in range(1, count + 1):
            frame = make_frame(mac(0, "b"), mac(0, "a"), size, seq)
            t0 = time.perf_counter()
            a.sendto(frame, p.a_sw)
            try:
                while True:
                    got = b.recv(65536)
                    if got[14:18] == frame[14:18]:
                        break
            except TimeoutError:
                lost += 1
                continue
            lat.append(time.perf_counter() - t0)
            time.sleep(0.0005)
    finally:
        b.setblocking(False)
    return {"p50_us": pct(lat, 50) * 1e6, "p99_us": pct(lat, 99) * 1e6, "count": count,
            "lost": lost}


async def host_load(child: Child, links: int, rate_bps: float, seconds: float,
                    warmup: float = 1.0, size: int = FULL_FRAME) -> dict[str, float]:
    """Send ``rate_bps`` of ``size``-byte frames on each of ``links`` (0 = as fast as the
    sockets take them); the child's CPU and what arrives are measured over ``seconds``."""
    loop = asyncio.get_running_loop()
    rx = [0]
    blocked = [0]

    def drain(s: socket.socket) -> None:
        for _ in range(512):
            try:
                rx[0] += len(s.recv(65536))
            except BlockingIOError:
                return

    frames = [make_frame(mac(i, "b"), mac(i, "a"), size) for i in range(links)]
    for s in child.b[:links] + child.a[:links]:
        loop.add_reader(s.fileno(), drain, s)
    stop = asyncio.Event()

    async def pace() -> None:
        fps = rate_bps / (size * 8)
        t0 = loop.time()
        sent = [0] * links
        while not stop.is_set():
            elapsed = loop.time() - t0
            for i in range(links):
                if rate_bps:  # links out of phase, like independent guests
                    due = int(elapsed * fps + i / links) + 1
                    burst, sent[i] = due - sent[i], due
                else:
                    burst = 64
                s, dst, f = child.a[i], child.paths[i].a_sw, frames[i]
                for _ in range(burst):
                    try:
                        s.sendto(f, dst)
                    except BlockingIOError:
                        blocked[0] += 1
                        if not rate_bps:  # flat out: wait until the child has room, no spinning
                            await loop.sock_sendto(s, f, dst)
                        break
            await asyncio.sleep(0.001 if rate_bps else 0)

    task = asyncio.create_task(pace())
    try:
        await asyncio.sleep(warmup)
        d0 = child.dropped()
        c0, r0, t0 = child.cpu(), rx[0], time.perf_counter()
        await asyncio.sleep(seconds)
        c1, r1, t1 = child.cpu(), rx[0], time.perf_counter()
        d1 = child.dropped()
    finally:
        stop.set()
        await task
        await asyncio.sleep(0.3)
        for s in child.b[:links] + child.a[:links]:
            loop.remove_reader(s.fileno())
    wall = t1 - t0
    return {"offered_mbps": rate_bps * links / 1e6, "delivered_mbps": (r1 - r0) * 8 / wall / 1e6,
            "cpu_pct": (c1 - c0) / wall * 100, "sender_blocked": blocked[0],
            "dropped_mbps": (d1 - d0) * size * 8 / wall / 1e6}


async def bench_host(rounds: int, window: float) -> dict[str, Any]:
    """Switch and relay children in alternating order; per figure the median of the rounds."""
    rates = (10e6, 50e6, 100e6)
    runs: dict[str, list[dict[str, Any]]] = {"switch": [], "relay": []}
    for r in range(rounds):
        for mode in (("relay", "switch") if r % 2 else ("switch", "relay")):
            out: dict[str, Any] = {}
            child = Child(mode, 1)
            try:
                child.prime()
                out["latency"] = host_latency(child, 2000)
                for rate in rates:
                    out[f"load_{rate / 1e6:g}"] = await host_load(child, 1, rate, window)
                out["ceiling"] = await host_load(child, 1, 0, min(window, 3.0))
                # the same, b's fake QEMU connected back to its port: the kernel then lifts
                # the max_dgram_qlen cap on b's queue (real QEMU never connects)
                child.b[0].connect(child.paths[0].b_sw)
                out["ceiling_no_qlen"] = await host_load(child, 1, 0, min(window, 3.0))
            finally:
                child.close()
            # 20 links: the switch shaped and unshaped; the relay cannot shape (one run, both)
            for key, profile in (("links20", SHAPED), ("links20_unshaped", None)):
                if mode == "relay" and key == "links20_unshaped":
                    out[key] = out["links20"]
                    continue
                child = Child(mode, 20, profile if mode == "switch" else None)
                try:
                    child.prime()
                    out[key] = await host_load(child, 20, 1e6, window * 1.5)
                finally:
                    child.close()
            runs[mode].append(out)
    return {mode: _median_of(rs) for mode, rs in runs.items()} | {
        "runs": runs, "rounds": rounds, "window_s": window,
        "shaped_profile": vars(SHAPED) | {"lora": None}}


def _median_of(rs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in rs[0].items():
        if isinstance(val, dict):
            out[key] = _median_of([r[key] for r in rs])
        else:
            out[key] = statistics.median(r[key] for r in rs)
    return out


# == guest side: two pairs of real guests ========================================================


async def shell(console: SerialConsole, command: str, timeout: float = 15.0) -> str:
    """Type ``command`` on a guest's serial console and return its output (between markers)."""
    tag = os.urandom(3).hex()
    start = console.total_bytes
    await console.write(f"echo B''{tag}; {command}; echo E''{tag}\n".encode())
    end = await console.wait_for(re.compile(f"E{tag}\r?\n".encode()), timeout, start=start)
    hist = console.history()
    text = hist[len(hist) - (console.total_bytes - start):][: end - start]
    body = text.decode("utf-8", "replace").replace("\r", "")
    body = body.split(f"\nB{tag}\n", 1)[-1]
    return body.rsplit(f"E{tag}", 1)[0].rstrip("\n")


class BareVM:
    """A core VM's argv run by hand: private sockets, its segment NIC replaced by a ``dgram``
    socket that sends straight to the peer's, and a static address on the kernel line."""

    def __init__(self, argv: list[str], run_dirs: list[str], workdir: Path, mine: str,
                 peer: str, address: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        out = []
        for a in argv:
            for d in run_dirs:
                a = a.replace(d, str(workdir))
            if a.startswith("dgram,"):
                nid = a.split(",")[1]
                a = (f"dgram,{nid},local.type=unix,local.path={mine},"
                     f"remote.type=unix,remote.path={peer}")
            out.append(a)
        i = out.index("-append")
        out[i + 1] += f" infrasim.net1=static:{address}"
        self.argv = out
        self.qmp = QMPClient("bare")
        self.console = SerialConsole(str(workdir / "serial.sock"), str(workdir / "serial.log"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        qmp = str(self.workdir / "qmp.sock")
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"bare QEMU exited: {err}")
            if os.path.exists(qmp):
                with contextlib.suppress(Exception):
                    await self.qmp.connect(qmp)
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("bare QEMU never opened its QMP socket")
            await asyncio.sleep(0.01)
        await self.console.connect()
        await self.qmp.execute("cont")

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        await self.console.close()
        if self.proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10)
            except TimeoutError:
                self.proc.kill()


@dataclass
class Guests:
    """Two guests joined either through the switch or directly."""

    label: str
    consoles: tuple[SerialConsole, SerialConsole]
    ips: tuple[str, str]
    pids: tuple[int, int]
    pause: Callable[[], Awaitable[None]]
    resume: Callable[[], Awaitable[None]]


async def _ready(console: SerialConsole) -> None:
    await console.wait_for(BANNER, 90, start=console.live_start)
    await shell(console, "true", timeout=30)  # the shell is up


async def _address(console: SerialConsole, ip: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = await shell(console, "ip -4 -o addr show eth1")
        if f" {ip}/" in out:
            return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"eth1 never got {ip}: {out!r}")


async def _quiet_link(g: Guests, macs: tuple[str, str]) -> None:
    """Static neighbours and no IPv6: only the measured traffic crosses the link."""
    for me, other in ((0, 1), (1, 0)):
        await shell(g.consoles[me], f"ip neigh replace {g.ips[other]} lladdr {macs[other]} "
                    "dev eth1 nud permanent; echo 1 > /proc/sys/net/ipv6/conf/eth1/disable_ipv6")


async def switch_pair(core: Orchestrator, kit: GuestKit) -> tuple[Guests, list[str]]:
    await core.create_network("lan", NetworkSpec(mode=NetworkMode.SEGMENT, cidr="10.77.0.0/24"))
    ids = []
    for name in ("alpha", "beta"):
        s = spec(kit)
        s.network_ids = ["lan"]
        ids.append((await core.create_vm(name, s)).meta.id)
    for i in ids:
        await core.start_vm(i)
    await asyncio.gather(*(_ready(core.console(i)) for i in ids))
    vms = [await core.get_vm(i) for i in ids]
    ips = [vm.status.addresses["lan"][0].split("/")[0] for vm in vms]
    consoles = (core.console(ids[0]), core.console(ids[1]))
    for c, ip in zip(consoles, ips, strict=True):
        await _address(c, ip)
    macs = [next(n.mac for n in vm.status.nics if n.network == "lan") for vm in vms]

    async def pause() -> None:
        for i in ids:
            await core.pause_vm(i)

    async def resume() -> None:
        for i in ids:
            await core.resume_vm(i)

    g = Guests("switch", consoles, (ips[0], ips[1]), (vms[0].status.pid, vms[1].status.pid),
               pause, resume)
    await _quiet_link(g, (macs[0], macs[1]))
    return g, macs


async def direct_pair(core: Orchestrator, work: Path,
                      macs: list[str]) -> tuple[Guests, list[BareVM]]:
    vms = [await core.get_vm(n) for n in ("alpha", "beta")]
    socks = [str(work / "a.sock"), str(work / "b.sock")]
    ips = ["10.78.0.2", "10.78.0.3"]
    bare = []
    for k, vm in enumerate(vms):
        dirs = sorted({vm.status.run_dir, os.path.dirname(vm.status.qmp_socket),
                       os.path.dirname(vm.status.serial_socket)}, key=len, reverse=True)
        bare.append(BareVM(vm.status.argv, dirs, work / f"bare{k}", socks[k], socks[1 - k],
                           f"{ips[k]}/24"))
    for b in bare:
        await b.start()
    await asyncio.gather(*(_ready(b.console) for b in bare))
    for b, ip in zip(bare, ips, strict=True):
        await _address(b.console, ip)

    async def pause() -> None:
        for b in bare:
            await b.qmp.execute("stop")

    async def resume() -> None:
        for b in bare:
            await b.qmp.execute("cont")

    g = Guests("direct", (bare[0].console, bare[1].console), (ips[0], ips[1]),
               (bare[0].pid, bare[1].pid), pause, resume)
    await _quiet_link(g, (macs[0], macs[1]))
    return g, bare


@dataclass
class Monitor:
    """CPU of the guests' QEMUs, of this process (which runs the switch) and of the host over a
    window; with a switch, how often it held frames back because QEMU's queue was full."""

    pids: tuple[int, int]
    switch: Switch | None = None
    lags: list[float] = field(default_factory=list)
    backlog_samples: int = 0
    backlogged: int = 0
    backlog_max: int = 0

    def snapshot(self) -> tuple[float, list[float], float, float, float]:
        cpus = []
        for pid in self.pids:
            t = psutil.Process(pid).cpu_times()
            cpus.append(t.user + t.system)
        me = psutil.Process().cpu_times()
        host = psutil.cpu_times()
        busy = sum(host) - host.idle - getattr(host, "iowait", 0.0)
        return time.perf_counter(), cpus, me.user + me.system, busy, self.drops()

    def drops(self) -> float:
        if self.switch is None:
            return 0.0
        return float(sum(s.drops.get("overflow", 0) for s in self.switch.stats()))

    def frames(self) -> int:
        if self.switch is None:
            return 0
        return sum(s.frames for s in self.switch.stats() if s.direction == "egress")

    async def sample(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - t0 - 0.01)
            if self.switch is not None:
                depth = max((p.backlog for p in self.switch.ports()), default=0)
                self.backlog_samples += 1
                self.backlogged += depth > 0
                self.backlog_max = max(self.backlog_max, depth)


async def stream(g: Guests, src: int, port: int, ramp: float, window: float,
                 switch: Switch | None, loopback: bool = False) -> dict[str, float]:
    """TCP from guest ``src`` to the other: received bytes counted inside the receiver. With
    ``loopback``, within ``src`` over ``lo``: what the guest's own CPU allows with no NIC."""
    dst = src if loopback else 1 - src
    ip, dev = ("127.0.0.1", "lo") if loopback else (g.ips[dst], "eth1")

    async def rx_bytes() -> tuple[float, int]:
        t0 = time.monotonic()
        out = await shell(g.consoles[dst], f"cat /sys/class/net/{dev}/statistics/rx_bytes")
        return (t0 + time.monotonic()) / 2, int(out.strip().splitlines()[-1])

    async def guest_cpu() -> list[tuple[int, int]]:
        """(busy, total) jiffies of each guest's own CPU: 100 % busy means the emulated CPU,
        not the network, sets the pace."""
        out = []
        for c in g.consoles:
            line = (await shell(c, "head -1 /proc/stat")).strip().splitlines()[-1].split()
            ticks = [int(x) for x in line[1:]]
            out.append((sum(ticks) - ticks[3] - ticks[4], sum(ticks)))
        return out

    await shell(g.consoles[dst], f"(sleep 600 | nc -l -p {port} > /dev/null &) ; sleep 0.2")
    await shell(g.consoles[src], f"(dd if=/dev/zero bs=64k count=100000 2>/dev/null | "
                f"nc {ip} {port} &) ; sleep 0.1")
    mon = Monitor((g.pids[src], g.pids[dst]), switch)
    try:
        await asyncio.sleep(ramp)
        stop = asyncio.Event()
        sampler = asyncio.create_task(mon.sample(stop))
        f0 = mon.frames()
        s0 = mon.snapshot()
        g0 = await guest_cpu()
        t0, b0 = await rx_bytes()
        await asyncio.sleep(window)
        t1, b1 = await rx_bytes()
        g1 = await guest_cpu()
        s1 = mon.snapshot()
        f1 = mon.frames()
        stop.set()
        await sampler
    finally:
        for c in g.consoles:
            await shell(c, "killall nc dd sleep 2>/dev/null; true")
    wall = s1[0] - s0[0]
    frames = f1 - f0
    my_cpu = s1[2] - s0[2]
    busy = [100 * (g1[k][0] - g0[k][0]) / max(1, g1[k][1] - g0[k][1]) for k in (src, dst)]
    return {
        "mbps": (b1 - b0) * 8 / (t1 - t0) / 1e6,
        "guest_tx_busy_pct": busy[0],
        "guest_rx_busy_pct": busy[1],
        "qemu_tx_cpu_pct": (s1[1][0] - s0[1][0]) / wall * 100,
        "qemu_rx_cpu_pct": (s1[1][1] - s0[1][1]) / wall * 100,
        "core_cpu_pct": my_cpu / wall * 100,
        "host_busy_cores": (s1[3] - s0[3]) / wall,
        "loop_lag_p99_ms": pct(mon.lags, 99) * 1e3 if mon.lags else 0.0,
        "switch_frames_s": frames / wall,
        "core_cpu_us_per_frame": my_cpu / frames * 1e6 if frames else 0.0,
        "held_back_pct": (100 * mon.backlogged / mon.backlog_samples
                          if mon.backlog_samples else 0.0),
        "held_back_max_frames": float(mon.backlog_max),
        "overflow_drops": s1[4] - s0[4],
    }


def _rtts(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


async def bench_guests(kit: GuestKit, rounds: int, ramp: float, window: float,
                       pings: int) -> dict[str, Any]:
    async with scratch_core() as (core, work):
        bare: list[BareVM] = []
        try:
            sw, macs = await switch_pair(core, kit)
            await sw.pause()  # the two pairs boot one after the other: half the contention
            direct, bare = await direct_pair(core, work, macs)
            await direct.pause()
            tput: dict[str, dict[str, list[dict[str, float]]]] = {
                g: {"a_to_b": [], "b_to_a": []} for g in ("switch", "direct")}
            rtts: dict[str, list[float]] = {"switch": [], "direct": []}
            sent = {"switch": 0, "direct": 0}
            loop_runs: list[dict[str, float]] = []
            port = 5000
            for r in range(rounds):  # alternate who goes first: drift hits both alike
                for g in ((sw, direct) if r % 2 == 0 else (direct, sw)):
                    await g.resume()
                    await asyncio.sleep(0.5)
                    sid = core.switch if g is sw else None
                    for src, key in ((0, "a_to_b"), (1, "b_to_a")):
                        port += 1
                        res = await stream(g, src, port, ramp, window, sid)
                        tput[g.label][key].append(res)
                        print(f"  round {r + 1} {g.label:6} {key}: {res['mbps']:.1f} Mbit/s",
                              flush=True)
                    if g is sw:
                        port += 1
                        lo = await stream(g, 0, port, ramp, window, None, loopback=True)
                        loop_runs.append(lo)
                        print(f"  round {r + 1} alpha loopback: {lo['mbps']:.1f} Mbit/s",
                              flush=True)
                    # into a file: no serial output (the core pumps it) while the pings fly
                    out = await shell(g.consoles[0], f"ping -c {pings} -i 0.01 -W 2 {g.ips[1]}"
                                      " > /tmp/ping.out; cat /tmp/ping.out",
                                      timeout=60 + pings * 0.05)
                    rtts[g.label] += _rtts(out)
                    sent[g.label] += pings
                    await g.pause()
        finally:
            for b in bare:
                await b.quit()
            for vm in await core.list_vms():
                if vm.status.state in (VMState.RUNNING, VMState.PAUSED, VMState.PENDING):
                    with contextlib.suppress(Exception):
                        await core.stop_vm(vm.meta.id, force=True)
    return {"throughput": tput, "loopback": {
        k: statistics.median(x[k] for x in loop_runs) for k in ("mbps", "guest_tx_busy_pct")
    } | {"runs_mbps": [x["mbps"] for x in loop_runs]}, "ping": {
        g: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "received": len(v), "sent": sent[g]}
        for g, v in rtts.items()}, "rounds": rounds, "window_s": window, "ramp_s": ramp}


def summarise_throughput(tput: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g, dirs in tput.items():
        out[g] = {}
        for key, runs in dirs.items():
            out[g][key] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            out[g][key]["runs_mbps"] = [r["mbps"] for r in runs]
    for key in ("a_to_b", "b_to_a"):
        out[f"ratio_{key}"] = out["switch"][key]["mbps"] / out["direct"][key]["mbps"]
    allsw = [r["mbps"] for runs in tput["switch"].values() for r in runs]
    alldi = [r["mbps"] for runs in tput["direct"].values() for r in runs]
    out["ratio"] = statistics.median(allsw) / statistics.median(alldi)
    out["goal"] = THROUGHPUT_GOAL
    return out


async def run(rounds: int = 3, ramp: float = 1.0, window: float = 8.0, pings: int = 300,
              host_rounds: int = 3, host_window: float = 4.0) -> dict[str, Any]:
    load0 = os.getloadavg()
    host = await bench_host(host_rounds, host_window)
    guests = await bench_guests(build_guest("cloud"), rounds, ramp, window, pings)
    return {
        "throughput": summarise_throughput(guests.pop("throughput")),
        "guest_loopback": guests.pop("loopback"), "guest_ping": guests.pop("ping"),
        "guest_run": guests, "host": host,
        "machine": {"cpus": os.cpu_count(), "load_before": load0, "load_after": os.getloadavg(),
                    "max_dgram_qlen": Path("/proc/sys/net/unix/max_dgram_qlen").read_text()
                    .strip() if os.path.exists("/proc/sys/net/unix/max_dgram_qlen") else "n/a"},
    }


def report(r: dict[str, Any]) -> str:
    t, p, h, m = r["throughput"], r["guest_ping"], r["host"], r["machine"]
    sw, rl = h["switch"], h["relay"]

    def ok(good: bool) -> str:
        return "ok" if good else "MISSED"

    lines = [f"host: {m['cpus']} cpus, load {m['load_before'][0]:.1f} before / "
             f"{m['load_after'][0]:.1f} after, net.unix.max_dgram_qlen {m['max_dgram_qlen']}"]
    for key, label in (("a_to_b", "alpha→beta"), ("b_to_a", "beta→alpha")):
        s, d = t["switch"][key], t["direct"][key]
        lines.append(
            f"1. TCP {label}: switch {s['mbps']:.1f} Mbit/s vs direct dgram {d['mbps']:.1f} "
            f"Mbit/s: {t[f'ratio_{key}']:.2f}x  (runs {_fmt(s['runs_mbps'])} / "
            f"{_fmt(d['runs_mbps'])})")
    lines.append(f"   overall median ratio {t['ratio']:.2f}x (goal ≥ {t['goal']}x) "
                 f"{ok(t['ratio'] >= t['goal'])}")
    for label in ("switch", "direct"):
        x = t[label]["a_to_b"]
        lines.append(
            f"   where the time goes ({label}, alpha→beta): guest CPUs busy (as the guests see "
            f"them) tx {x['guest_tx_busy_pct']:.0f} % rx {x['guest_rx_busy_pct']:.0f} %; host "
            f"CPU of QEMU tx {x['qemu_tx_cpu_pct']:.0f} %"
            f", QEMU rx {x['qemu_rx_cpu_pct']:.0f} %, core process {x['core_cpu_pct']:.0f} % "
            f"of a core; host busy {x['host_busy_cores']:.2f} of {m['cpus']} cores"
            + (f"; {x['switch_frames_s']:.0f} frames/s through the switch, "
               f"{x['core_cpu_us_per_frame']:.1f} µs core CPU/frame; QEMU's queue full "
               f"{x['held_back_pct']:.1f} % of the time (max {x['held_back_max_frames']:.0f} "
               f"held), {x['overflow_drops']:.0f} dropped; loop lag p99 "
               f"{x['loop_lag_p99_ms']:.1f} ms" if label == "switch" else ""))
    lo = r["guest_loopback"]
    lines.append(f"   reference: TCP over lo inside alpha (no NIC; sender and receiver share its "
                 f"one vCPU) {lo['mbps']:.1f} Mbit/s, guest CPU {lo['guest_tx_busy_pct']:.0f} % "
                 f"busy (runs {_fmt(lo['runs_mbps'])})")
    ps, pd = p["switch"], p["direct"]
    lines.append(
        f"2. guest ping RTT: switch p50 {ps['p50_ms']:.3f} p99 {ps['p99_ms']:.3f} ms vs direct "
        f"p50 {pd['p50_ms']:.3f} p99 {pd['p99_ms']:.3f} ms: adds "
        f"{ps['p50_ms'] - pd['p50_ms']:+.3f} ms at p50, {ps['p99_ms'] - pd['p99_ms']:+.3f} ms at "
        f"p99 ({ps['received']}/{ps['sent']} and {pd['received']}/{pd['sent']} received)")
    sl, rl_ = sw["latency"], rl["latency"]
    lines.append(
        f"   host frame in→out ({PING_FRAME} B): switch p50 {sl['p50_us']:.0f} µs p99 "
        f"{sl['p99_us']:.0f} µs vs bare relay p50 {rl_['p50_us']:.0f} p99 {rl_['p99_us']:.0f} "
        f"µs: adds {sl['p50_us'] - rl_['p50_us']:+.0f} µs at p50 "
        f"({sl['p50_us'] / rl_['p50_us']:.2f}x)")
    for rate in (10, 50, 100):
        a, b = sw[f"load_{rate}"], rl[f"load_{rate}"]
        lines.append(
            f"3. one link {rate:>3} Mbit/s of {FULL_FRAME} B frames: switch "
            f"{a['cpu_pct']:.1f} % of a core ({a['cpu_pct'] / (a['delivered_mbps'] / 10):.2f} % "
            f"per 10 Mbit/s, delivered {a['delivered_mbps']:.1f}) vs relay {b['cpu_pct']:.1f} % "
            f"({b['cpu_pct'] / (b['delivered_mbps'] / 10):.2f} % per 10 Mbit/s): "
            f"{a['cpu_pct'] / b['cpu_pct']:.2f}x")
    marg = [(x["load_100"]["cpu_pct"] - x["load_10"]["cpu_pct"])
            / ((x["load_100"]["delivered_mbps"] - x["load_10"]["delivered_mbps"]) / 10)
            for x in (sw, rl)]
    lines.append(f"   marginal cost 10→100 Mbit/s: switch {marg[0]:.2f} % of a core per 10 Mbit/s "
                 f"vs relay {marg[1]:.2f} %: {marg[0] / marg[1]:.2f}x")
    a, b = sw["links20"], rl["links20"]
    lines.append(
        f"   20 links x 1 Mbit/s, bucket {SHAPED.rate_bps / 1e6:g} Mbit/s + delay "
        f"{SHAPED.delay_ms:g}±{SHAPED.jitter_ms:g} ms: switch {a['cpu_pct']:.1f} % of a core "
        f"(delivered {a['delivered_mbps']:.2f} of {a['offered_mbps']:.0f} Mbit/s) vs unshaped "
        f"relay {b['cpu_pct']:.1f} %: {a['cpu_pct'] / b['cpu_pct']:.2f}x; the switch unshaped "
        f"{sw['links20_unshaped']['cpu_pct']:.1f} %")
    for key, label in (("ceiling", "receiver unconnected, like QEMU (max_dgram_qlen applies)"),
                       ("ceiling_no_qlen", "receiver connected back (no qlen cap)")):
        a, b = sw[key], rl[key]
        lines.append(
            f"   ceiling, {label}: switch {a['delivered_mbps']:.0f} Mbit/s at "
            f"{a['cpu_pct']:.0f} % of a core ({_us_per_frame(a):.1f} µs/frame) vs relay "
            f"{b['delivered_mbps']:.0f} Mbit/s at {b['cpu_pct']:.0f} % "
            f"({_us_per_frame(b):.1f} µs/frame): {a['delivered_mbps'] / b['delivered_mbps']:.2f}x;"
            f" dropped {a['dropped_mbps']:.0f} / {b['dropped_mbps']:.0f} Mbit/s;"
            f" rounds {_fmt([x[key]['delivered_mbps'] for x in h['runs']['switch']])} / "
            f"{_fmt([x[key]['delivered_mbps'] for x in h['runs']['relay']])} Mbit/s")
    return "\n".join(lines)


def _us_per_frame(x: dict[str, float]) -> float:
    fps = x["delivered_mbps"] * 1e6 / (FULL_FRAME * 8)
    return x["cpu_pct"] / 100 / fps * 1e6 if fps else 0.0


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.0f}" for x in xs)


__all__ = ["report", "run"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    child_main(sys.argv[2:])
