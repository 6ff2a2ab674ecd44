"""Frame helpers and the segment DHCP responder: unit tests with client messages built like
busybox udhcpc's and dhclient's, and a real guest that gets its eth1 address from the responder
over a QEMU ``-netdev dgram`` unix socket (then pings both ways through the test's socket)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infrasim_tui.core.dhcp import (
    ACK,
    DECLINE,
    DISCOVER,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    DhcpMessage,
    DhcpResponder,
    Lease,
    build_dhcp,
    is_dhcp_client_frame,
    parse_dhcp,
)
from infrasim_tui.core.frames import (
    BROADCAST,
    arp_reply,
    build_arp,
    build_ipv4,
    build_udp_ipv4,
    describe,
    icmp_echo_reply,
    inet_checksum,
    is_multicast,
    mac_bytes,
    mac_str,
    parse_arp,
    parse_ipv4,
    parse_ipv4_udp,
)
from infrasim_tui.core.guest import GuestKit

from .test_guest import HAVE_APT, QEMU, Guest, booted, wait_banner

SERVER_IP = "10.77.0.1"
SERVER_MAC = "52:54:00:ff:00:01"
CLIENT_MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:65:43:21"
LEASE = Lease(ip="10.77.0.23", prefix=24, router="10.77.0.1", dns="10.77.0.1, 9.9.9.9",
              lease_s=3600, hostname="seg-a")


def leases(table: dict[str, Lease]) -> Callable[[str], Lease | None]:
    return table.get


def responder(table: dict[str, Lease] | None = None) -> DhcpResponder:
    return DhcpResponder(SERVER_IP, SERVER_MAC, leases({CLIENT_MAC: LEASE} if table is None
                                                       else table))


def udhcpc_options(kind: int, *extra: tuple[int, bytes]) -> list[tuple[int, bytes]]:
    """The options busybox 1.35 udhcpc sends (message type first, END added by build_dhcp)."""
    return [
        (53, bytes((kind,))),
        (61, b"\x01" + mac_bytes(CLIENT_MAC)),  # client id: htype + MAC
        *extra,
        (57, (576).to_bytes(2, "big")),  # max message size
        (55, bytes((1, 3, 6, 12, 15, 28, 42))),  # parameter request list
        (60, b"udhcp 1.35.0"),  # vendor class
        (12, b"guest"),
    ]


def client_frame(kind: int, *extra: tuple[int, bytes], mac: str = CLIENT_MAC,
                 ciaddr: str = "0.0.0.0", xid: int = 0x1A2B3C4D, flags: int = 0) -> bytes:
    """A client message in a frame as the client sends it: broadcast from 0.0.0.0 while it has
    no address, unicast from ciaddr to the server when renewing."""
    payload = build_dhcp(op=1, xid=xid, chaddr=mac_bytes(mac), ciaddr=ciaddr, flags=flags,
                         options=udhcpc_options(kind, *extra), secs=3)
    if ciaddr != "0.0.0.0":
        return build_udp_ipv4(mac, SERVER_MAC, ciaddr, SERVER_IP, 68, 67, payload)
    return build_udp_ipv4(mac, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, payload)


def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


@dataclass
class Reply:
    eth_dst: bytes
    eth_src: bytes
    ip_src: str
    ip_dst: str
    sport: int
    dport: int
    msg: DhcpMessage
    yiaddr: str
    ciaddr: str
    raw: bytes


def decode(frame: bytes | None) -> Reply:
    assert frame is not None, "no reply"
    udp = parse_ipv4_udp(frame)
    assert udp is not None, describe(frame)
    src, dst, sport, dport, payload = udp
    msg = parse_dhcp(payload)
    assert msg is not None and msg.op == 2
    # the IPv4 header checksum verifies, and so does the UDP checksum (pseudo header)
    assert inet_checksum(frame[14:34]) == 0
    length = len(payload) + 8
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, 17, length)
    assert inet_checksum(pseudo + frame[34 : 34 + length]) == 0
    return Reply(frame[0:6], frame[6:12], src, dst, sport, dport, msg, msg.yiaddr, msg.ciaddr,
                 payload)


# --------------------------------------------------------------------------------------------
# frames


def test_mac_conversions() -> None:
    raw = mac_bytes("52:54:00:AB:cd:0f")
    assert raw == bytes((0x52, 0x54, 0x00, 0xAB, 0xCD, 0x0F))
    assert mac_str(raw) == "52:54:00:ab:cd:0f"
    assert mac_bytes("52-54-00-ab-cd-0f") == raw == mac_bytes("525400abcd0f") == mac_bytes(raw)
    bad_macs = ("52:54:00:ab:cd", "52:54:00:ab:cd:0f:11", "zz:54:00:ab:cd:0f", "",
                "5:54:00:ab:cd:0f0", "52 54 00 ab cd 0f")
    for bad in bad_macs:
        with pytest.raises(ValueError):
            mac_bytes(bad)
    with pytest.raises(ValueError):
        mac_bytes(b"\x01\x02")
    assert is_multicast(BROADCAST)
    assert is_multicast(mac_bytes("01:00:5e:00:00:01"))  # IPv4 multicast
    assert is_multicast(mac_bytes("33:33:00:00:00:01"))  # IPv6 multicast
    assert not is_multicast(mac_bytes(CLIENT_MAC))
    assert not is_multicast(mac_bytes("02:00:00:00:00:01"))  # locally administered unicast


def test_udp_build_and_parse_round_trip() -> None:
    frame = build_udp_ipv4(CLIENT_MAC, SERVER_MAC, "10.0.0.2", "10.0.0.1", 40000, 53, b"hello")
    assert frame[:6] == mac_bytes(SERVER_MAC) and frame[6:12] == mac_bytes(CLIENT_MAC)
    assert frame[12:14] == b"\x08\x00" and len(frame) == 14 + 20 + 8 + 5
    assert inet_checksum(frame[14:34]) == 0
    assert parse_ipv4_udp(frame) == ("10.0.0.2", "10.0.0.1", 40000, 53, b"hello")
    # Ethernet pads short frames to 60 bytes: the payload still ends where UDP says
    assert parse_ipv4_udp(frame + b"\0" * 13) == ("10.0.0.2", "10.0.0.1", 40000, 53, b"hello")
    # the UDP checksum is right (checked against a hand computation) or 0 when not wanted
    pseudo = ip4("10.0.0.2") + ip4("10.0.0.1") + struct.pack("!BBH", 0, 17, 13)
    assert inet_checksum(pseudo + frame[34:]) == 0
    bare = build_udp_ipv4(CLIENT_MAC, SERVER_MAC, "10.0.0.2", "10.0.0.1", 1, 2, b"x",
                          checksum=False)
    assert bare[40:42] == b"\0\0"
    # not UDP, fragments, truncated packets, other ethertypes
    assert parse_ipv4_udp(frame[:40]) is None
    fragment = bytearray(frame)
    fragment[20] |= 0x20  # more fragments
    assert parse_ipv4_udp(bytes(fragment)) is None
    tcp = build_ipv4(CLIENT_MAC, SERVER_MAC, "10.0.0.2", "10.0.0.1", 6, b"\0" * 20)
    assert parse_ipv4_udp(tcp) is None
    arp = build_arp(1, CLIENT_MAC, "10.0.0.2", "00:00:00:00:00:00", "10.0.0.1")
    assert parse_ipv4_udp(arp) is None and parse_ipv4(arp) is None
    lying = bytearray(frame)
    lying[16:18] = (200).to_bytes(2, "big")  # IP total length beyond the frame
    assert parse_ipv4_udp(bytes(lying)) is None


def test_inet_checksum_reference() -> None:
    # RFC 1071's example words, and the classic IPv4 header example (checksum 0xb861)
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert inet_checksum(header) == 0xB861
    assert inet_checksum(b"\x01") == (~0x0100) & 0xFFFF  # odd length: padded with a zero


def test_describe() -> None:
    who = build_arp(1, CLIENT_MAC, "10.77.0.23", "00:00:00:00:00:00", "10.77.0.1")
    assert describe(who) == (
        f"{CLIENT_MAC} > ff:ff:ff:ff:ff:ff ARP who-has 10.77.0.1 tell 10.77.0.23 (42 bytes)"
    )
    is_at = arp_reply(who, "10.77.0.1", SERVER_MAC)
    assert is_at is not None
    assert f"ARP 10.77.0.1 is-at {SERVER_MAC}" in describe(is_at)
    echo = build_ipv4(CLIENT_MAC, SERVER_MAC, "10.77.0.23", "10.77.0.1", 1,
                      b"\x08\x00\x00\x00\x00\x07\x00\x02" + b"x" * 56)
    assert "IPv4 10.77.0.23 > 10.77.0.1 ICMP echo-request id=7 seq=2 len=56" in describe(echo)
    syn = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    tcp = build_ipv4(CLIENT_MAC, SERVER_MAC, "10.77.0.23", "10.77.0.1", 6, syn)
    assert "IPv4 10.77.0.23:40000 > 10.77.0.1:80 TCP [S] seq=1000 ack=0 len=0" in describe(tcp)
    synack = syn[:13] + b"\x12" + syn[14:]
    assert "TCP [SA]" in describe(build_ipv4(CLIENT_MAC, SERVER_MAC, "1.1.1.1", "2.2.2.2", 6,
                                             synack))
    dhcp = client_frame(DISCOVER)
    assert "IPv4 0.0.0.0:68 > 255.255.255.255:67 UDP" in describe(dhcp)
    assert "ethertype 0x88cc" in describe(mac_bytes(SERVER_MAC) * 2 + b"\x88\xcc" + b"\0" * 46)
    assert describe(b"\0" * 5) == "runt frame (5 bytes)"


def test_arp_and_icmp_echo_answers() -> None:
    who = build_arp(1, CLIENT_MAC, "10.77.0.23", "00:00:00:00:00:00", "10.77.0.1")
    assert who[:6] == BROADCAST
    reply = arp_reply(who, "10.77.0.1", SERVER_MAC)
    assert reply is not None
    arp = parse_arp(reply)
    assert arp is not None and arp.op == 2
    assert (arp.sender_mac, arp.sender_ip) == (mac_bytes(SERVER_MAC), "10.77.0.1")
    assert (arp.target_mac, arp.target_ip) == (mac_bytes(CLIENT_MAC), "10.77.0.23")
    assert reply[:6] == mac_bytes(CLIENT_MAC)
    assert arp_reply(who, "10.77.0.2", SERVER_MAC) is None  # somebody else's address
    assert arp_reply(reply, "10.77.0.23", SERVER_MAC) is None  # replies are not questions

    icmp = b"\x08\x00\x00\x00\x12\x34\x00\x05" + bytes(range(32))
    icmp = icmp[:2] + inet_checksum(icmp).to_bytes(2, "big") + icmp[4:]
    request = build_ipv4(CLIENT_MAC, SERVER_MAC, "10.77.0.23", "10.77.0.1", 1, icmp)
    answer = icmp_echo_reply(request, "10.77.0.1", SERVER_MAC)
    assert answer is not None
    packet = parse_ipv4(answer)
    assert packet is not None
    src, dst, proto, body = packet
    assert (src, dst, proto) == (ip4("10.77.0.1"), ip4("10.77.0.23"), 1)
    assert body[0] == 0 and body[4:] == icmp[4:] and inet_checksum(body) == 0
    assert answer[:6] == mac_bytes(CLIENT_MAC) and answer[6:12] == mac_bytes(SERVER_MAC)
    assert icmp_echo_reply(request, "10.77.0.9", SERVER_MAC) is None
    assert icmp_echo_reply(answer, "10.77.0.23", CLIENT_MAC) is None  # a reply is no request


# --------------------------------------------------------------------------------------------
# DHCP


def test_client_frame_check_is_cheap_and_exact() -> None:
    assert is_dhcp_client_frame(client_frame(DISCOVER))
    offer = responder().handle(client_frame(DISCOVER))
    assert offer is not None and not is_dhcp_client_frame(offer)  # 67 -> 68
    other = build_udp_ipv4(CLIENT_MAC, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 53, b"x")
    assert not is_dhcp_client_frame(other)
    assert not is_dhcp_client_frame(build_arp(1, CLIENT_MAC, "1.2.3.4", BROADCAST, "1.2.3.5"))
    assert not is_dhcp_client_frame(b"\xff" * 20)
    assert responder().handle(other) is None


def test_discover_gets_an_offer_with_every_option() -> None:
    offer = decode(responder().handle(client_frame(DISCOVER, xid=0xCAFE)))
    assert offer.eth_dst == BROADCAST and offer.eth_src == mac_bytes(SERVER_MAC)
    assert (offer.ip_src, offer.ip_dst, offer.sport, offer.dport) == (
        SERVER_IP, "255.255.255.255", 67, 68)
    msg = offer.msg
    assert msg.xid == 0xCAFE and msg.chaddr == mac_bytes(CLIENT_MAC)
    assert msg.msg_type == OFFER and msg.yiaddr == "10.77.0.23" and msg.ciaddr == "0.0.0.0"
    opts = msg.options
    assert opts[54] == ip4(SERVER_IP)
    assert int.from_bytes(opts[51], "big") == 3600
    assert int.from_bytes(opts[58], "big") == 1800
    assert int.from_bytes(opts[59], "big") == 3150
    assert opts[1] == ip4("255.255.255.0") and opts[28] == ip4("10.77.0.255")
    assert opts[3] == ip4("10.77.0.1")
    assert opts[6] == ip4("10.77.0.1") + ip4("9.9.9.9")
    assert opts[12] == b"seg-a"
    assert len(offer.raw) >= 300  # BOOTP minimum
    # the message type comes first (some clients look there only)
    assert offer.raw[240:243] == b"\x35\x01\x02"


def test_request_after_offer_is_acked_and_another_address_is_naked() -> None:
    dhcp = responder()
    selecting = client_frame(REQUEST, (50, ip4("10.77.0.23")), (54, ip4(SERVER_IP)))
    ack = decode(dhcp.handle(selecting))
    assert ack.msg.msg_type == ACK and ack.yiaddr == "10.77.0.23"
    assert ack.eth_dst == BROADCAST and ack.ip_dst == "255.255.255.255"
    assert int.from_bytes(ack.msg.options[51], "big") == 3600
    assert ack.msg.options[1] == ip4("255.255.255.0")

    wrong = client_frame(REQUEST, (50, ip4("10.77.0.99")), (54, ip4(SERVER_IP)))
    nak = decode(dhcp.handle(wrong))
    assert nak.msg.msg_type == NAK and nak.yiaddr == "0.0.0.0"
    assert nak.eth_dst == BROADCAST and nak.ip_dst == "255.255.255.255"
    assert 51 not in nak.msg.options and 1 not in nak.msg.options
    assert nak.msg.options[54] == ip4(SERVER_IP) and b"10.77.0.99" in nak.msg.options[56]

    # the client chose another server's offer: stay silent
    other_server = client_frame(REQUEST, (50, ip4("10.77.0.23")), (54, ip4("10.77.0.254")))
    assert dhcp.handle(other_server) is None


def test_init_reboot_renew_inform() -> None:
    dhcp = responder()
    # INIT-REBOOT: a remembered address, no server id (dhclient after a reboot)
    assert decode(dhcp.handle(client_frame(REQUEST, (50, ip4("10.77.0.23"))))).msg.msg_type == ACK
    assert decode(dhcp.handle(client_frame(REQUEST, (50, ip4("192.168.1.5"))))).msg.msg_type == NAK
    # RENEWING: unicast from ciaddr; the answer is unicast back to it, ciaddr echoed
    renew = decode(dhcp.handle(client_frame(REQUEST, ciaddr="10.77.0.23")))
    assert renew.msg.msg_type == ACK and renew.ciaddr == "10.77.0.23"
    assert renew.eth_dst == mac_bytes(CLIENT_MAC) and renew.ip_dst == "10.77.0.23"
    assert renew.yiaddr == "10.77.0.23"
    stale = decode(dhcp.handle(client_frame(REQUEST, ciaddr="10.77.0.50")))
    assert stale.msg.msg_type == NAK and stale.ip_dst == "255.255.255.255"
    # INFORM: configuration, but no address and no lease time
    inform = decode(dhcp.handle(client_frame(INFORM, ciaddr="10.77.0.23")))
    assert inform.msg.msg_type == ACK and inform.yiaddr == "0.0.0.0"
    assert 51 not in inform.msg.options and inform.msg.options[3] == ip4("10.77.0.1")
    assert inform.ip_dst == "10.77.0.23"
    # DECLINE and RELEASE get no answer
    assert dhcp.handle(client_frame(DECLINE, (50, ip4("10.77.0.23")))) is None
    assert dhcp.handle(client_frame(RELEASE, ciaddr="10.77.0.23")) is None


def test_unknown_clients_and_minimal_leases() -> None:
    table = {CLIENT_MAC: Lease(ip="192.168.7.130", prefix=26)}
    dhcp = responder(table)
    assert dhcp.handle(client_frame(DISCOVER, mac=OTHER_MAC)) is None
    assert dhcp.handle(client_frame(REQUEST, (50, ip4("192.168.7.130")), mac=OTHER_MAC)) is None
    offer = decode(dhcp.handle(client_frame(DISCOVER)))
    assert offer.yiaddr == "192.168.7.130"
    opts = offer.msg.options
    assert opts[1] == ip4("255.255.255.192") and opts[28] == ip4("192.168.7.191")
    assert int.from_bytes(opts[51], "big") == 86400
    for absent in (3, 6, 12):  # no router, DNS or hostname unless the lease has one
        assert absent not in opts
    # the lease is looked up live: a NIC added later is served without a new responder
    table[OTHER_MAC] = Lease(ip="192.168.7.131", prefix=26)
    assert decode(dhcp.handle(client_frame(DISCOVER, mac=OTHER_MAC))).yiaddr == "192.168.7.131"


def test_dhclient_style_messages() -> None:
    """ISC dhclient sets the broadcast flag on some systems, repeats option 55 differently and
    may put options in the file field (overload); chaddr is what counts, not the frame's
    source MAC."""
    dhcp = responder()
    payload = build_dhcp(
        op=1, xid=7, chaddr=mac_bytes(CLIENT_MAC), flags=0x8000,
        options=[(52, b"\x01"), (55, bytes((1, 28, 2, 3, 15, 6, 119, 12)))],
    )
    # the overloaded file field (offset 108, 128 bytes) carries the message type
    body = bytearray(payload)
    body[108:112] = b"\x35\x01\x01\xff"
    frame = build_udp_ipv4(OTHER_MAC, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                           bytes(body))
    offer = decode(dhcp.handle(frame))
    assert offer.msg.msg_type == OFFER and offer.msg.chaddr == mac_bytes(CLIENT_MAC)
    assert offer.msg.flags == 0x8000 and offer.eth_dst == BROADCAST


def test_malformed_messages_are_ignored() -> None:
    dhcp = responder()
    good = client_frame(DISCOVER)
    no_cookie = bytearray(good)
    no_cookie[42 + 236] ^= 0xFF
    assert dhcp.handle(bytes(no_cookie)) is None
    assert dhcp.handle(good[:200]) is None
    truncated_option = build_dhcp(op=1, xid=1, chaddr=mac_bytes(CLIENT_MAC), options=[])
    truncated_option = truncated_option[:240] + b"\x35\x05\x01"  # length beyond the end
    frame = build_udp_ipv4(CLIENT_MAC, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                           truncated_option)
    assert dhcp.handle(frame) is None
    reply_as_request = build_udp_ipv4(
        CLIENT_MAC, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
        build_dhcp(op=2, xid=1, chaddr=mac_bytes(CLIENT_MAC), options=[(53, b"\x01")]),
    )
    assert dhcp.handle(reply_as_request) is None


def test_bad_leases_fail_early() -> None:
    for kwargs in ({"ip": "10.0.0.256", "prefix": 24}, {"ip": "10.0.0.1", "prefix": 33},
                   {"ip": "10.0.0.1", "prefix": 24, "router": "gw"},
                   {"ip": "10.0.0.1", "prefix": 24, "lease_s": 0}):
        with pytest.raises(ValueError):
            Lease(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DhcpResponder("10.0.0", SERVER_MAC, leases({}))


# --------------------------------------------------------------------------------------------
# a real guest


@dataclass
class SegmentPeer:
    """The switch's side of one guest NIC: a unix datagram socket bound at ``path`` that
    answers DHCP, ARP for ``ip`` and pings to ``ip``, and records every frame it sees."""

    path: Path
    guest_path: Path
    dhcp: DhcpResponder
    ip: str = SERVER_IP
    mac: str = SERVER_MAC
    seen: list[tuple[float, bytes]] = field(default_factory=list)
    sent: list[tuple[float, bytes]] = field(default_factory=list)
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.changed = asyncio.Event()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, str(self.guest_path))
        self.sent.append((time.monotonic(), frame))
        self.changed.set()

    def _readable(self) -> None:
        while True:
            try:
                frame = self.sock.recv(65536)
            except BlockingIOError:
                return
            self.seen.append((time.monotonic(), frame))
            self.changed.set()
            reply = (self.dhcp.handle(frame) if is_dhcp_client_frame(frame)
                     else arp_reply(frame, self.ip, self.mac)
                     or icmp_echo_reply(frame, self.ip, self.mac))
            if reply is not None:
                self.send(reply)

    def dhcp_log(self) -> list[tuple[float, str, int]]:
        """(when, "in"/"out", DHCP message type) in time order."""
        out = []
        for direction, frames in (("in", self.seen), ("out", self.sent)):
            for when, frame in frames:
                udp = parse_ipv4_udp(frame)
                if udp is None or {udp[2], udp[3]} != {67, 68}:
                    continue
                msg = parse_dhcp(udp[4])
                if msg is not None:
                    out.append((when, direction, msg.msg_type))
        return sorted(out)

    async def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = "\n".join(describe(f) for _, f in self.seen[-20:])
                raise AssertionError(f"no {what} within {timeout} s; last frames seen:\n{seen}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


@contextlib.contextmanager
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dh-", dir="/tmp"))  # unix socket paths stay short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dgram_nic(name: str, guest: Path, ours: Path, mac: str) -> list[str]:
    return [
        "-netdev",
        f"dgram,id={name},local.type=unix,local.path={guest},remote.type=unix,remote.path={ours}",
        "-device",
        f"virtio-net-pci,netdev={name},mac={mac}",
    ]


@pytest.fixture(scope="module")
def kit() -> GuestKit:
    if QEMU is None or not HAVE_APT:
        pytest.skip("needs qemu-system-aarch64 and apt (to build the guest kit)")
    from infrasim_tui.core.guest import build_guest

    return build_guest("cloud")


async def guest_until(guest: Guest, command: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = await guest.run(command, timeout=10)
        if re.search(pattern, out) or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.3)


@pytest.mark.qemu
@pytest.mark.timeout(150)
async def test_guest_gets_its_segment_address_from_the_responder(kit: GuestKit) -> None:
    """eth0 user-mode NAT; eth1 DHCP from our responder; eth2 static by kernel parameter (its
    peer would answer DHCP, so a wrong config shows); eth3 DHCP nobody answers (the boot must
    not wait for it); eth4 ``none``."""
    macs = [CLIENT_MAC, "52:54:00:12:34:57", "52:54:00:12:34:58", "52:54:00:12:34:59"]
    table = {
        macs[0]: Lease(ip="10.77.0.23", prefix=24, hostname="seg-a"),  # no router: eth0 keeps it
        macs[1]: Lease(ip="10.78.0.50", prefix=24),
        macs[3]: Lease(ip="10.80.0.50", prefix=24),
    }
    with sockdir() as d:
        peers: list[SegmentPeer] = []
        extra = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        for i, mac in enumerate(macs, start=1):
            answers = table if i != 3 else {}  # eth3's server knows nobody
            peers.append(SegmentPeer(d / f"s{i}", d / f"g{i}",
                                     DhcpResponder(f"10.{76 + i}.0.1", SERVER_MAC,
                                                   leases(answers))))
            extra += dgram_nic(f"n{i}", d / f"g{i}", d / f"s{i}", mac)
        seg, static, silent, off = peers
        append = "infrasim.hostname=seg infrasim.net2=static:10.78.0.9/24 infrasim.net4=none"
        try:
            for peer in peers:
                peer.start()
            async with booted(kit, append=append, extra=extra) as guest:
                banner_s, _ = await wait_banner(guest, timeout=40)
                banner_at = guest.started + banner_s
                await seg.wait(lambda: any(t == ACK for _, _, t in seg.dhcp_log()), 30,
                               "DHCP ACK")
                log = seg.dhcp_log()
                kinds = [(direction, kind) for _, direction, kind in log]
                assert kinds[:4] == [("in", DISCOVER), ("out", OFFER), ("in", REQUEST),
                                     ("out", ACK)], kinds
                ack_at = next(t for t, _, kind in log if kind == ACK)
                print(f"\nbanner {banner_s:.2f} s after boot; eth1 lease ACKed "
                      f"{ack_at - guest.started:.2f} s after boot "
                      f"(DISCOVER -> ACK {ack_at - log[0][0]:.3f} s)")

                # the boot did not wait for eth3, whose DHCP server stays silent
                await silent.wait(lambda: bool(silent.dhcp_log()), 20, "DISCOVER on eth3")
                first_discover = silent.dhcp_log()[0][0]
                assert banner_at - first_discover < 4.0, (banner_at - first_discover)

                eth1 = await guest_until(guest, "ip -4 addr show dev eth1", "inet 10.77", 10)
                assert "inet 10.77.0.23/24" in eth1, eth1
                assert (await guest.run("cat /sys/class/net/eth1/address")).strip() == macs[0]
                routes = await guest.run("ip route")
                assert re.search(r"^default via 10\.0\.2\.2 dev eth0", routes, re.M), routes
                assert re.search(r"^10\.77\.0\.0/24 dev eth1", routes, re.M), routes
                assert "udhcpc -i eth1" in await guest.run("ps")  # stays to renew

                eth2 = await guest.run("ip -4 addr show dev eth2")
                assert "inet 10.78.0.9/24" in eth2, eth2
                assert not any(is_dhcp_client_frame(f) for _, f in static.seen)
                eth4 = await guest.run(
                    "ip -4 addr show dev eth4; cat /sys/class/net/eth4/operstate")
                assert "inet" not in eth4 and "down" in eth4, eth4
                assert off.seen == []

                # ping the responder's address from the guest (ARP + ICMP answered by the peer)
                out = await guest.run("ping -c 3 -W 3 10.77.0.1", timeout=20)
                assert " 0% packet loss" in out, out
                # and the guest from the test side: an echo request straight to its MAC
                icmp = b"\x08\x00\x00\x00\x43\x21\x00\x01" + b"infrasim-dhcp-test"
                icmp = icmp[:2] + inet_checksum(icmp).to_bytes(2, "big") + icmp[4:]
                seg.send(build_ipv4(SERVER_MAC, macs[0], "10.77.0.1", "10.77.0.23", 1, icmp))

                def echoed() -> bool:
                    for _, frame in seg.seen:
                        packet = parse_ipv4(frame)
                        if packet and packet[2] == 1 and packet[3][0] == 0 \
                                and packet[3][4:] == icmp[4:]:
                            return True
                    return False

                await seg.wait(echoed, 10, "ICMP echo reply from the guest")
                # only the client with a lease was ever answered on eth3's segment
                assert silent.sent == []
        finally:
            for peer in peers:
                peer.close()
