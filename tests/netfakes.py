"""Fake QEMU NICs for switch tests, and a paced traffic generator for measurements.

A QEMU ``-netdev dgram`` NIC is a unix datagram socket bound at the port's ``qemu_path`` that
sends one raw Ethernet frame per datagram to ``switch_path``. :class:`FakeQemu` plays that part
inside the test's event loop. The ``send``/``recv`` commands (``python -m tests.netfakes``) run
the same timestamped traffic either over UDP (between network namespaces, through Linux tc) or
as raw frames over a switch port, so the tc comparison measures both paths the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infrasim_tui.core.frames import build_udp_ipv4, parse_ipv4_udp
from infrasim_tui.core.model import QosProfileSpec
from infrasim_tui.core.switch import PortConfig, SegmentConfig

REPO = Path(__file__).resolve().parent.parent
ETH_IP_UDP = 14 + 20 + 8  # header bytes around a UDP payload in an Ethernet frame (no FCS)
STAMP = struct.Struct("!Id")  # sequence number, sender's CLOCK_MONOTONIC


def mac(i: int) -> str:
    """A distinct QEMU-style unicast MAC per index."""
    return f"52:54:00:00:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"


def segment_config(network_id: str = "net-1", cidr: str = "10.66.0.0/24") -> SegmentConfig:
    return SegmentConfig(network_id=network_id, network="lan", cidr=cidr, gateway="", dns="")


def port_config(tmp: Path, i: int, *, address: str = "", spec: QosProfileSpec | None = None,
                network_id: str = "net-1") -> PortConfig:
    """Port ``i`` of VM ``vm{i}``; sockets under ``tmp`` (short: unix paths max 107 bytes)."""
    return PortConfig(network_id=network_id, network="lan", vm_id=f"vm-{i}", vm=f"vm{i}",
                      nic="net1", mac=mac(i), switch_path=str(tmp / f"{i}.sw"),
                      qemu_path=str(tmp / f"{i}.vm"), address=address,
                      profile_id="p" if spec else "", profile="p" if spec else "", spec=spec)


class FakeQemu:
    """QEMU's end of one switch port: frames out to the switch, frames in queued with their
    arrival time (``loop.time()``)."""

    def __init__(self, cfg: PortConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.mac = cfg.mac
        self._loop = loop or asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.qemu_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(cfg.qemu_path)
        self.sock.setblocking(False)
        self.received: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                frame = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            self.received.put_nowait((self._loop.time(), frame))

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.cfg.switch_path)

    async def recv(self, timeout: float = 2.0) -> bytes:
        return (await asyncio.wait_for(self.received.get(), timeout))[1]

    async def nothing(self, window: float = 0.2) -> list[bytes]:
        """Frames that arrive within ``window`` (a test asserts the list is empty)."""
        await asyncio.sleep(window)
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait()[1])
        return out

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.qemu_path)


def frame_to(dst: str, src: str, payload: bytes = b"x", *, size: int = 0) -> bytes:
    """An IPv4/UDP frame between two MACs, padded with zeros to ``size`` bytes if larger."""
    frame = build_udp_ipv4(src, dst, "10.66.0.1", "10.66.0.2", 5000, 5001, payload,
                           checksum=False)
    return frame if len(frame) >= size else frame + b"\0" * (size - len(frame))


# --- paced traffic: python -m tests.netfakes send|recv ----------------------------------------


@dataclass(frozen=True)
class Arrival:
    seq: int
    sent: float  # sender's time.monotonic()
    arrived: float  # receiver's time.monotonic()
    size: int  # Ethernet frame bytes (no FCS): what a shaper on the link counts


def paced(rate_bps: float, frame_bytes: int, seconds: float) -> Iterator[int]:
    """Yields sequence numbers at a fixed offered load (``rate_bps`` of ``frame_bytes``
    frames), sleeping to each frame's slot; a late sender catches up so the average holds."""
    interval = frame_bytes * 8 / rate_bps
    start = time.monotonic()
    n = int(seconds / interval)
    for seq in range(n):
        due = start + seq * interval
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield seq


def _send(args: argparse.Namespace) -> int:
    size = args.frame_bytes
    pad = b"\0" * (size - ETH_IP_UDP - STAMP.size)
    if args.mode == "udp":
        host, port = args.dst.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A send buffer larger than any qdisc queue under test: the qdisc, not the socket's
        # back-pressure, decides what is dropped (QEMU's frames get no back-pressure either).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect((host, int(port)))
        for seq in paced(args.rate_bps, size, args.seconds):
            sock.send(STAMP.pack(seq, time.monotonic()) + pad)
    else:
        usock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.bind)
        usock.bind(args.bind)
        usock.connect(args.dst)
        src, dst = args.src_mac, args.dst_mac
        for seq in paced(args.rate_bps, size, args.seconds):
            usock.send(build_udp_ipv4(src, dst, "10.66.0.1", "10.66.0.2", 5000, 5001,
                                      STAMP.pack(seq, time.monotonic()) + pad, checksum=False))
        os.unlink(args.bind)
    return 0


def _recv(args: argparse.Namespace) -> int:
    """Collects arrivals until ``--idle`` seconds pass without one (after the first) or
    ``--max-seconds``; prints them as one JSON list."""
    if args.mode == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", int(args.bind)))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.bind)
        sock.bind(args.bind)
    rows: list[tuple[int, float, float, int]] = []
    print("ready", flush=True)
    deadline = time.monotonic() + args.max_seconds
    sock.settimeout(args.max_seconds)
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        now = time.monotonic()
        if args.mode == "udp":
            payload, size = data, len(data) + ETH_IP_UDP
        else:
            udp = parse_ipv4_udp(data)
            if udp is None:
                continue
            payload, size = udp[4], len(data)
        if len(payload) < STAMP.size:
            continue
        seq, sent = STAMP.unpack_from(payload)
        rows.append((seq, sent, now, size))
        sock.settimeout(max(0.01, min(args.idle, deadline - now)))
        if now >= deadline:
            break
    if args.mode == "unix":
        os.unlink(args.bind)
    print(json.dumps(rows), flush=True)
    return 0


def read_arrivals(text: str) -> list[Arrival]:
    """The ``recv`` command's output (after its ``ready`` line)."""
    last = text.strip().splitlines()[-1]
    return [Arrival(int(s), float(t0), float(t1), int(n)) for s, t0, t1, n in json.loads(last)]


def command(*args: str, netns: str = "") -> list[str]:
    """``python -m tests.netfakes ARGS``, inside network namespace ``netns`` if given."""
    argv = [sys.executable, "-m", "tests.netfakes", *args]
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


async def traffic(send: list[str], recv: list[str], timeout: float = 30.0) -> list[Arrival]:
    """Runs a receiver until it is ready, then the sender; the receiver's arrivals. Both are
    separate processes (as QEMU is), so the event loop running a switch stays free."""
    pipe = asyncio.subprocess.PIPE
    rx = await asyncio.create_subprocess_exec(*recv, stdout=pipe, stderr=pipe, cwd=REPO)
    tx: asyncio.subprocess.Process | None = None
    try:
        assert rx.stdout is not None
        line = await asyncio.wait_for(rx.stdout.readline(), 15)
        if line.strip() != b"ready":
            _, err = await rx.communicate()
            raise RuntimeError(f"receiver failed: {line!r} {err.decode()}")
        tx = await asyncio.create_subprocess_exec(*send, stderr=pipe, cwd=REPO)
        _, tx_err = await asyncio.wait_for(tx.communicate(), timeout)
        if tx.returncode:
            raise RuntimeError(f"sender failed ({tx.returncode}): {tx_err.decode()}")
        out, err = await asyncio.wait_for(rx.communicate(), timeout)
        if rx.returncode:
            raise RuntimeError(f"receiver failed ({rx.returncode}): {err.decode()}")
        return read_arrivals(out.decode())
    finally:
        for proc in (tx, rx):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.netfakes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="paced, timestamped frames")
    s.add_argument("--mode", choices=("udp", "unix"), required=True)
    s.add_argument("--dst", required=True, help="IP:PORT (udp) or the switch port's path")
    s.add_argument("--bind", default="", help="unix: the fake QEMU's own path")
    s.add_argument("--src-mac", default=mac(1))
    s.add_argument("--dst-mac", default=mac(2))
    s.add_argument("--rate-bps", type=float, required=True, help="offered load, frame bytes")
    s.add_argument("--frame-bytes", type=int, default=1442)
    s.add_argument("--seconds", type=float, required=True)
    r = sub.add_parser("recv", help="timestamp arrivals, print them as JSON")
    r.add_argument("--mode", choices=("udp", "unix"), required=True)
    r.add_argument("--bind", required=True, help="UDP port (udp) or the fake QEMU's path")
    r.add_argument("--idle", type=float, default=1.0)
    r.add_argument("--max-seconds", type=float, default=15.0)
    args = ap.parse_args(argv)
    return _send(args) if args.cmd == "send" else _recv(args)


if __name__ == "__main__":
    sys.exit(main())
