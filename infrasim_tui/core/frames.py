"""Raw Ethernet frame helpers for the segment switch (one frame per datagram, no FCS).

The switch looks at every frame (thousands per second), so the hot helpers only slice bytes:
``is_multicast`` reads one bit, ``parse_ipv4_udp`` checks the few header bytes it needs and
returns ``None`` for anything else. The builders (UDP, ARP, ICMP echo) serve the switch's own
small services (DHCP, answering for a segment's gateway) and tests; ``describe`` is a short
tcpdump-like summary for logs and assertions. Standard library only.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = [
    "BROADCAST",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "ETH_HLEN",
    "IPPROTO_ICMP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "ArpPacket",
    "arp_reply",
    "build_arp",
    "build_ipv4",
    "build_udp_ipv4",
    "describe",
    "icmp_echo_reply",
    "inet_checksum",
    "ip_bytes",
    "is_multicast",
    "mac_bytes",
    "mac_str",
    "parse_arp",
    "parse_ipv4",
    "parse_ipv4_udp",
]

BROADCAST = b"\xff" * 6
ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

_IPV4 = b"\x08\x00"
_ARP = b"\x08\x06"
_ZERO_IP = b"\0\0\0\0"
_TCP_FLAGS = "FSRPAUEC"  # bit 0 .. bit 7 of the flags byte

Mac = bytes | str


def mac_bytes(mac: Mac) -> bytes:
    """``"52:54:00:12:34:56"`` (``:``/``-`` separated, or bare hex) -> 6 bytes.

    Bytes pass through (checked for length). Raises ValueError for anything else.
    """
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return bytes(mac)
    text = mac.strip()
    sep = ":" if ":" in text else "-" if "-" in text else ""
    groups = text.split(sep) if sep else [text[i : i + 2] for i in range(0, len(text), 2)]
    if len(groups) != 6 or not all(len(g) == 2 and g.isascii() and g.isalnum() for g in groups):
        raise ValueError(f"not a MAC address: {mac!r}")
    try:
        return bytes.fromhex("".join(groups))
    except ValueError:
        raise ValueError(f"not a MAC address: {mac!r}") from None


def mac_str(b: bytes) -> str:
    """6 bytes -> ``"52:54:00:12:34:56"`` (lower case)."""
    return b[:6].hex(":")


def is_multicast(mac: bytes) -> bool:
    """The I/G bit: true for multicast and broadcast destinations (flooded by the switch)."""
    return bool(mac[0] & 1)


def ip_bytes(ip: str) -> bytes:
    """A dotted quad -> 4 bytes; ValueError unless it is exactly ``a.b.c.d``."""
    parts = ip.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise ValueError(f"not an IPv4 address: {ip!r}")
    values = [int(p) for p in parts]
    if any(v > 255 for v in values):
        raise ValueError(f"not an IPv4 address: {ip!r}")
    return bytes(values)


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: one's complement of the one's complement
    sum of its 16-bit big-endian words (an odd length is padded with a zero byte)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --------------------------------------------------------------------------------------------
# IPv4


def build_ipv4(
    src_mac: Mac,
    dst_mac: Mac,
    src_ip: str | bytes,
    dst_ip: str | bytes,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
) -> bytes:
    """An Ethernet frame carrying one unfragmented IPv4 packet (DF set, header checksum)."""
    src = src_ip if isinstance(src_ip, bytes) else ip_bytes(src_ip)
    dst = dst_ip if isinstance(dst_ip, bytes) else ip_bytes(dst_ip)
    total = 20 + len(payload)
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet too long ({total} bytes)")
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst
    )
    csum = inet_checksum(header)
    header = header[:10] + csum.to_bytes(2, "big") + header[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + _IPV4 + header + payload


def parse_ipv4(frame: bytes) -> tuple[bytes, bytes, int, bytes] | None:
    """(source ip, destination ip, protocol, payload) of an unfragmented IPv4 frame, else None.

    Addresses stay 4 raw bytes (cheap to compare); the payload is cut to the IP total length
    (short frames are padded to 60 bytes on the wire).
    """
    if len(frame) < 34 or frame[12:14] != _IPV4:
        return None
    vihl = frame[14]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20:
        return None
    total = int.from_bytes(frame[16:18], "big")
    if total < ihl or ETH_HLEN + total > len(frame):
        return None
    if frame[20] & 0x3F or frame[21]:  # MF set or a fragment offset: not a whole packet
        return None
    return frame[26:30], frame[30:34], frame[23], frame[ETH_HLEN + ihl : ETH_HLEN + total]


def build_udp_ipv4(
    src_mac: Mac,
    dst_mac: Mac,
    src_ip: str,
    dst_ip: str,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    checksum: bool = True,
) -> bytes:
    """An Ethernet + IPv4 + UDP frame. The UDP checksum is computed unless ``checksum=False``
    (then 0, which IPv4 allows: "no checksum")."""
    src, dst = ip_bytes(src_ip), ip_bytes(dst_ip)
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if checksum:
        pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)
        csum = inet_checksum(pseudo + udp) or 0xFFFF  # 0 means "none": send all ones instead
        udp = udp[:6] + csum.to_bytes(2, "big") + udp[8:]
    return build_ipv4(src_mac, dst_mac, src, dst, IPPROTO_UDP, udp)


def parse_ipv4_udp(frame: bytes) -> tuple[str, str, int, int, bytes] | None:
    """(source ip, destination ip, source port, destination port, payload) of an IPv4 UDP
    frame, else None. The UDP checksum is not verified (virtio peers may leave it partial)."""
    if len(frame) < 42 or frame[12:14] != _IPV4 or frame[23] != IPPROTO_UDP:
        return None
    vihl = frame[14]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or frame[20] & 0x3F or frame[21]:
        return None  # not IPv4, bad header length, or a fragment
    end = ETH_HLEN + int.from_bytes(frame[16:18], "big")  # the IP total length
    start = ETH_HLEN + ihl
    if end > len(frame) or end < start + 8:
        return None
    sport, dport, length = struct.unpack_from("!HHH", frame, start)
    if length < 8 or start + length > end:
        return None
    payload = frame[start + 8 : start + length]
    return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), sport, dport, payload


# --------------------------------------------------------------------------------------------
# ARP and ICMP echo (answering for an address the switch owns, e.g. a segment's gateway)


@dataclass(frozen=True)
class ArpPacket:
    """An Ethernet/IPv4 ARP packet: op 1 = request (who-has), 2 = reply (is-at)."""

    op: int
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str


def build_arp(
    op: int, sender_mac: Mac, sender_ip: str, target_mac: Mac, target_ip: str, *, dst: Mac = b""
) -> bytes:
    """An ARP frame; ``dst`` defaults to broadcast for requests and ``target_mac`` for replies."""
    smac, tmac = mac_bytes(sender_mac), mac_bytes(target_mac)
    eth_dst = mac_bytes(dst) if dst else (BROADCAST if op == 1 else tmac)
    body = struct.pack(
        "!HHBBH6s4s6s4s", 1, ETHERTYPE_IPV4, 6, 4, op, smac, ip_bytes(sender_ip), tmac,
        ip_bytes(target_ip),
    )
    return eth_dst + smac + _ARP + body


def parse_arp(frame: bytes) -> ArpPacket | None:
    """The ARP packet of an Ethernet/IPv4 ARP frame, else None."""
    if len(frame) < 42 or frame[12:14] != _ARP or frame[14:20] != b"\x00\x01\x08\x00\x06\x04":
        return None
    return ArpPacket(
        op=int.from_bytes(frame[20:22], "big"),
        sender_mac=frame[22:28],
        sender_ip=socket.inet_ntoa(frame[28:32]),
        target_mac=frame[32:38],
        target_ip=socket.inet_ntoa(frame[38:42]),
    )


def arp_reply(frame: bytes, ip: str, mac: Mac) -> bytes | None:
    """The reply to ``frame`` if it asks who has ``ip`` (answered as ``mac``), else None."""
    if len(frame) < 42 or frame[12:14] != _ARP or frame[20:22] != b"\x00\x01":
        return None
    arp = parse_arp(frame)
    if arp is None or arp.target_ip != ip:
        return None
    return build_arp(2, mac, ip, arp.sender_mac, arp.sender_ip)


def icmp_echo_reply(frame: bytes, ip: str, mac: Mac) -> bytes | None:
    """The echo reply to an ICMP echo request for ``ip`` in ``frame`` (sent from ``mac`` to the
    frame's source MAC), else None. Identifier, sequence and data are echoed."""
    if len(frame) < 42 or frame[12:14] != _IPV4 or frame[23] != IPPROTO_ICMP:
        return None
    packet = parse_ipv4(frame)
    if packet is None:
        return None
    src, dst, _proto, icmp = packet
    if len(icmp) < 8 or icmp[0] != 8 or icmp[1] != 0 or dst != ip_bytes(ip):
        return None
    reply = b"\0\0\0\0" + icmp[4:]
    reply = reply[:2] + inet_checksum(reply).to_bytes(2, "big") + reply[4:]
    return build_ipv4(mac, frame[6:12], dst, src, IPPROTO_ICMP, reply)


# --------------------------------------------------------------------------------------------
# describe


def _describe_ipv4(frame: bytes) -> str:
    packet = parse_ipv4(frame)
    if packet is None:
        return "IPv4 (malformed or fragment)"
    src_b, dst_b, proto, body = packet
    src, dst = socket.inet_ntoa(src_b), socket.inet_ntoa(dst_b)
    if proto == IPPROTO_ICMP and len(body) >= 8:
        kind, code = body[0], body[1]
        ident, seq = struct.unpack_from("!HH", body, 4)
        if kind in (0, 8):
            name = "echo-request" if kind == 8 else "echo-reply"
            return f"IPv4 {src} > {dst} ICMP {name} id={ident} seq={seq} len={len(body) - 8}"
        return f"IPv4 {src} > {dst} ICMP type={kind} code={code}"
    if proto == IPPROTO_UDP and len(body) >= 8:
        sport, dport, length = struct.unpack_from("!HHH", body)
        return f"IPv4 {src}:{sport} > {dst}:{dport} UDP len={max(length - 8, 0)}"
    if proto == IPPROTO_TCP and len(body) >= 20:
        sport, dport, seq, ack = struct.unpack_from("!HHII", body)
        offset = (body[12] >> 4) * 4
        flags = "".join(c for i, c in enumerate(_TCP_FLAGS) if body[13] & (1 << i)) or "."
        data = max(len(body) - offset, 0)
        return f"IPv4 {src}:{sport} > {dst}:{dport} TCP [{flags}] seq={seq} ack={ack} len={data}"
    return f"IPv4 {src} > {dst} proto={proto} len={len(body)}"


def describe(frame: bytes) -> str:
    """A one-line summary: ``"<src> > <dst> <what>"`` (ARP who-has/is-at, IPv4 ICMP/UDP/TCP
    with ports and flags, IPv6, other ethertypes)."""
    if len(frame) < ETH_HLEN:
        return f"runt frame ({len(frame)} bytes)"
    head = f"{mac_str(frame[6:12])} > {mac_str(frame[0:6])}"
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETHERTYPE_VLAN and len(frame) >= 18:
        vid = int.from_bytes(frame[14:16], "big") & 0x0FFF
        inner = describe(frame[:12] + frame[16:]).split(" ", 3)[-1]
        return f"{head} vlan {vid} {inner}"
    if ethertype == ETHERTYPE_ARP:
        arp = parse_arp(frame)
        if arp is None:
            what = "ARP (not Ethernet/IPv4)"
        elif arp.op == 1:
            what = f"ARP who-has {arp.target_ip} tell {arp.sender_ip}"
        elif arp.op == 2:
            what = f"ARP {arp.sender_ip} is-at {mac_str(arp.sender_mac)}"
        else:
            what = f"ARP op={arp.op}"
    elif ethertype == ETHERTYPE_IPV4:
        what = _describe_ipv4(frame)
    elif ethertype == ETHERTYPE_IPV6 and len(frame) >= 54:
        src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
        dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
        what = f"IPv6 {src} > {dst} next={frame[20]}"
    elif ethertype <= 1500:
        what = f"802.3 len={ethertype}"
    else:
        what = f"ethertype 0x{ethertype:04x}"
    return f"{head} {what} ({len(frame)} bytes)"
