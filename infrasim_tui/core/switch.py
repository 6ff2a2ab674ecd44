"""The userspace L2 switch between VMs on SEGMENT networks, with a shaper on every port.

Each SEGMENT NIC is a QEMU ``-netdev dgram`` over unix datagram sockets: one Ethernet frame per
datagram, QEMU bound at ``<nic>.vm``, the switch at ``<nic>.sw`` in the VM's socket dir. Frames
leaving a VM pass its port's egress shaper, the segment forwards them (MAC learning, flooding of
broadcast, multicast and unknown destinations) and each destination's ingress shaper hands them
to its QEMU. Datagram sockets carry no connection, so a new owner process rebinds ``<nic>.sw``
and traffic resumes without touching the guests.

Linux queues at most ``net.unix.max_dgram_qlen`` (often 10) datagrams per socket: the switch
connects each port to its QEMU so the kernel tells it when QEMU has room, and keeps a short
queue of its own meanwhile instead of dropping.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from . import lora
from .dhcp import DhcpResponder, Lease, is_dhcp_client_frame
from .events import Event
from .model import LinkStats, QosProfileSpec, to_dict
from .qos import shapes
from .shaper import DirectionStats, Shaper

log = logging.getLogger(__name__)

STATS_INTERVAL = 0.5  # network.stats events at 2 Hz
READ_BATCH = 256
OUT_QUEUE_FRAMES = 1024
SOCK_BUFFER = 4 << 20
SERVER_MAC = "02:49:53:00:00:01"  # the switch's own (locally administered) DHCP server address


@dataclass(frozen=True)
class PortConfig:
    network_id: str
    network: str
    vm_id: str
    vm: str
    nic: str  # QEMU netdev id
    mac: str
    switch_path: str
    qemu_path: str
    address: str = ""  # "10.10.0.2/24": what DHCP hands this MAC
    profile_id: str = ""
    profile: str = ""  # name, for stats
    spec: QosProfileSpec | None = None


@dataclass(frozen=True)
class SegmentConfig:
    network_id: str
    network: str
    cidr: str
    gateway: str = ""
    dns: str = ""
    dhcp: bool = True


def server_address(cidr: str) -> str:
    """The switch's DHCP server address: the subnet's last usable host."""
    net = ipaddress.ip_network(cidr)
    return str(net.broadcast_address - 1)


class Port:
    """One VM NIC plugged into a segment."""

    def __init__(self, segment: Segment, cfg: PortConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.segment = segment
        self.cfg = cfg
        self._loop = loop
        self.mac = bytes.fromhex(cfg.mac.replace(":", ""))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.switch_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUFFER)
        sock.bind(cfg.switch_path)
        os.chmod(cfg.switch_path, 0o600)
        self.sock = sock
        self._connected = False
        self._closed = False
        self._out: deque[bytes] = deque()
        self._writing = False
        seed = zlib.crc32(f"{cfg.vm_id}/{cfg.nic}".encode())
        self.egress_stats = DirectionStats()
        self.ingress_stats = DirectionStats()
        self.egress = Shaper(loop, self._to_segment, self.egress_stats,
                             _for(cfg.spec, "egress"), air=segment.air, fallback_seed=seed)
        self.ingress = Shaper(loop, self.send, self.ingress_stats, _for(cfg.spec, "ingress"),
                              air=segment.air, fallback_seed=seed ^ 0x5A5A5A5A)
        self._last: dict[str, tuple[int, float]] = {}
        self.throughput = {"egress": 0.0, "ingress": 0.0}
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def backlog(self) -> int:
        """Frames held back because QEMU's receive queue (max_dgram_qlen) was full."""
        return len(self._out)

    def set_profile(self, profile_id: str, name: str, spec: QosProfileSpec | None) -> None:
        self.cfg = replace(self.cfg, profile_id=profile_id, profile=name, spec=spec)
        self.egress.apply(_for(spec, "egress"))
        self.ingress.apply(_for(spec, "ingress"))

    # -- frames from QEMU ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        recv = self.sock.recv
        push = self.egress.push
        for _ in range(READ_BATCH):
            try:
                frame = recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("port %s/%s: recv failed: %s", self.cfg.vm, self.cfg.nic, exc)
                return
            if len(frame) < 14:
                continue
            if is_dhcp_client_frame(frame):
                reply = self.segment.answer_dhcp(frame)
                if reply is not None:
                    self.send(reply)
                    continue
                # not ours to answer (DHCP off, or no address for this MAC): forwarded, as a
                # DHCP server in another guest may answer it
            push(frame)

    def _to_segment(self, frame: bytes) -> None:
        if self._closed:
            # left the shaper after the port was detached: forwarding it would point the MAC
            # table back at this dead port once the VM is plugged in again
            return
        self.segment.forward(self, frame)

    # -- frames to QEMU -----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self._out:
            self._queue(frame)
            return
        try:
            if not self._connected:
                self.sock.connect(self.cfg.qemu_path)
                self._connected = True
            self.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            self._queue(frame)
        except OSError as exc:
            # QEMU not (yet, or any more) bound: its frames are lost like on an unplugged cable
            self._connected = False
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTCONN):
                log.debug("port %s/%s: send failed: %s", self.cfg.vm, self.cfg.nic, exc)
            self.ingress_stats.drop("overflow")

    def _queue(self, frame: bytes) -> None:
        if len(self._out) >= OUT_QUEUE_FRAMES:
            self.ingress_stats.drop("overflow")
            return
        self._out.append(frame)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        out = self._out
        try:
            while out:
                self.sock.send(out[0])
                out.popleft()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._connected = False
            self.ingress_stats.drop("overflow", len(out))
            out.clear()
        self._writing = False
        self._loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        self._closed = True
        fd = self.sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.switch_path)

    # -- stats --------------------------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Throughput over the interval since the last sample (the publisher's tick)."""
        for direction, st in (("egress", self.egress_stats), ("ingress", self.ingress_stats)):
            prev = self._last.get(direction)
            if prev is not None and now > prev[1]:
                self.throughput[direction] = (st.bytes - prev[0]) * 8 / (now - prev[1])
            self._last[direction] = (st.bytes, now)

    def link_stats(self, at: float) -> list[LinkStats]:
        out = []
        for direction, st, shaper in (("egress", self.egress_stats, self.egress),
                                      ("ingress", self.ingress_stats, self.ingress)):
            p50, p99 = st.percentiles_ms(0.5, 0.99)
            out.append(LinkStats(
                network_id=self.cfg.network_id, network=self.cfg.network, vm_id=self.cfg.vm_id,
                vm=self.cfg.vm, nic=self.cfg.nic, mac=self.cfg.mac, direction=direction,
                profile=self.cfg.profile if shaper.spec is not None else "",
                bytes=st.bytes, frames=st.frames, throughput_bps=self.throughput[direction],
                queue_bytes=shaper.queue_bytes, queue_frames=shaper.queue_frames,
                drops=dict(st.drops), delay_hist=list(st.delay_hist),
                delay_p50_ms=p50, delay_p99_ms=p99,
                lora=replace(st.lora) if st.lora is not None else None, at=at))
        return out


def _for(spec: QosProfileSpec | None, direction: str) -> QosProfileSpec | None:
    return spec if spec is not None and shapes(spec, direction) else None


class Segment:
    """One SEGMENT network: its ports, MAC table, radio air and DHCP responder."""

    def __init__(self, cfg: SegmentConfig) -> None:
        self.cfg = cfg
        self.ports: dict[tuple[str, str], Port] = {}  # (vm id, nic) -> port
        self.macs: dict[bytes, Port] = {}
        self.air = lora.Air()
        self._by_mac: dict[str, Port] = {}
        self.dhcp = DhcpResponder(server_address(cfg.cidr), SERVER_MAC, self._lease)

    def _lease(self, mac: str) -> Lease | None:
        port = self._by_mac.get(mac.lower())
        if port is None or not port.cfg.address or not self.cfg.dhcp:
            return None
        ip, prefix = port.cfg.address.split("/")
        return Lease(ip=ip, prefix=int(prefix), router=self.cfg.gateway, dns=self.cfg.dns,
                     hostname=port.cfg.vm)

    def answer_dhcp(self, frame: bytes) -> bytes | None:
        return self.dhcp.handle(frame) if self.cfg.dhcp else None

    def add(self, port: Port) -> None:
        self.ports[(port.cfg.vm_id, port.cfg.nic)] = port
        self._by_mac[port.cfg.mac.lower()] = port

    def remove(self, port: Port) -> None:
        self.ports.pop((port.cfg.vm_id, port.cfg.nic), None)
        self._by_mac.pop(port.cfg.mac.lower(), None)
        for mac in [m for m, p in self.macs.items() if p is port]:
            del self.macs[mac]

    def forward(self, src: Port, frame: bytes) -> None:
        smac = frame[6:12]
        if self.macs.get(smac) is not src and not smac[0] & 1:
            self.macs[smac] = src
        dst = frame[:6]
        if not dst[0] & 1:
            port = self.macs.get(dst)
            if port is not None:
                if port is not src:
                    port.ingress.push(frame)
                return
        for port in self.ports.values():
            if port is not src:
                port.ingress.push(frame)


class Switch:
    """Every segment of one core; publishes ``network.stats`` while any port exists."""

    def __init__(self, publish: Callable[[Event], None]) -> None:
        self._publish = publish
        self.segments: dict[str, Segment] = {}
        self._task: asyncio.Task[None] | None = None

    def attach(self, seg: SegmentConfig, cfg: PortConfig) -> Port:
        loop = asyncio.get_running_loop()
        segment = self.segments.get(seg.network_id)
        if segment is None:
            segment = self.segments[seg.network_id] = Segment(seg)
        old = segment.ports.get((cfg.vm_id, cfg.nic))
        if old is not None:
            segment.remove(old)
            old.close()
        port = Port(segment, cfg, loop)
        segment.add(port)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publisher(), name="switch-stats")
        return port

    def ports(self, vm_id: str = "") -> Iterable[Port]:
        for seg in list(self.segments.values()):
            for port in list(seg.ports.values()):
                if not vm_id or port.cfg.vm_id == vm_id:
                    yield port

    def detach_vm(self, vm_id: str) -> None:
        for port in list(self.ports(vm_id)):
            port.segment.remove(port)
            port.close()
        for nid in [n for n, s in self.segments.items() if not s.ports]:
            del self.segments[nid]

    def reprofile(self, profile_id: str, name: str, spec: QosProfileSpec) -> int:
        """Apply a changed profile to every live port using it; how many there were."""
        n = 0
        for port in self.ports():
            if port.cfg.profile_id == profile_id:
                port.set_profile(profile_id, name, spec)
                n += 1
        return n

    def profile_links(self, profile_id: str) -> int:
        return sum(1 for p in self.ports() if p.cfg.profile_id == profile_id)

    def stats(self, network_id: str = "") -> list[LinkStats]:
        at = time.time()
        out: list[LinkStats] = []
        for nid, seg in self.segments.items():
            if network_id and nid != network_id:
                continue
            for port in seg.ports.values():
                out += port.link_stats(at)
        return out

    async def _publisher(self) -> None:
        loop = asyncio.get_running_loop()
        while self.segments:
            await asyncio.sleep(STATS_INTERVAL)
            now = loop.time()
            at = time.time()
            for nid, seg in list(self.segments.items()):
                links: list[LinkStats] = []
                for port in seg.ports.values():
                    port.sample(now)
                    links += port.link_stats(at)
                if not links:
                    continue
                total = sum(s.throughput_bps for s in links if s.direction == "ingress")
                self._publish(Event(
                    type="network.stats", kind="network", resource_id=nid,
                    name=seg.cfg.network,
                    message=f"{seg.cfg.network}: {len(links) // 2} links, "
                            f"{total / 1e6:.2f} Mbit/s delivered",
                    data={"links": [to_dict(s) for s in links]}, ts=at))

    async def close(self) -> None:
        for port in list(self.ports()):
            port.close()
        self.segments.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
