"""A DHCP server for segment networks, answering inside the switch (RFC 2131/2132).

The switch knows every NIC's MAC and the address the orchestrator assigned to it before the
guest boots, so leases are static: :class:`DhcpResponder` asks ``lease_for(mac)`` and answers
from that alone, with no lease database and no address pool. Frames in, frames out (pure): the
switch passes a client's frame to :meth:`DhcpResponder.handle` and delivers the returned reply
itself. Clients it does not know get no answer, so another DHCP server on the segment (a guest
running one) still works for them.

Protocol coverage is what busybox ``udhcpc`` and ISC ``dhclient`` need: DISCOVER -> OFFER;
REQUEST in the SELECTING (server id + requested address), INIT-REBOOT (requested address) and
RENEWING/REBINDING (ciaddr) states -> ACK for the client's address, NAK for any other address;
INFORM -> ACK with the configuration but no lease; DECLINE/RELEASE and REQUESTs that select
another server are ignored. Option overload (52) in requests is honoured.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .frames import (
    BROADCAST,
    IPPROTO_UDP,
    build_udp_ipv4,
    ip_bytes,
    mac_bytes,
    mac_str,
    parse_ipv4_udp,
)

__all__ = [
    "ACK",
    "DECLINE",
    "DISCOVER",
    "INFORM",
    "MESSAGE_NAMES",
    "NAK",
    "OFFER",
    "RELEASE",
    "REQUEST",
    "DhcpMessage",
    "DhcpResponder",
    "Lease",
    "build_dhcp",
    "is_dhcp_client_frame",
    "parse_dhcp",
]

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {
    DISCOVER: "DISCOVER",
    OFFER: "OFFER",
    REQUEST: "REQUEST",
    DECLINE: "DECLINE",
    ACK: "ACK",
    NAK: "NAK",
    RELEASE: "RELEASE",
    INFORM: "INFORM",
}

SERVER_PORT = 67
CLIENT_PORT = 68
MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTREQUEST, BOOTREPLY = 1, 2
FLAG_BROADCAST = 0x8000
# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
BOOTP_LEN = _BOOTP.size  # 236, then the magic cookie and the options
MIN_REPLY = 300  # BOOTP's minimum message size; some clients drop shorter replies

OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMS = 55
OPT_MESSAGE = 56
OPT_RENEWAL = 58
OPT_REBINDING = 59

_ZERO = b"\0\0\0\0"
_ALL_ONES_IP = "255.255.255.255"
# Frame offsets of the cheap client check: ethertype, IPv4 protocol byte.
_IPV4 = b"\x08\x00"
_CLIENT_PORTS = b"\x00\x44\x00\x43"  # UDP 68 -> 67


@dataclass(frozen=True)
class Lease:
    """What one client gets. ``dns`` may list several servers (comma or space separated)."""

    ip: str
    prefix: int
    router: str = ""
    dns: str = ""
    lease_s: int = 86400
    hostname: str = ""

    def __post_init__(self) -> None:
        # Checked here, not per request: a bad lease must not raise inside the switch.
        ip_bytes(self.ip)
        if not 0 <= self.prefix <= 32:
            raise ValueError(f"prefix {self.prefix} is not 0..32")
        _ips(self.router)
        _ips(self.dns)
        if self.lease_s < 1:
            raise ValueError(f"lease time {self.lease_s} s is not positive")


@dataclass(frozen=True)
class DhcpMessage:
    """The fields of a BOOTP/DHCP message the responder uses (addresses as dotted quads)."""

    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    giaddr: str
    chaddr: bytes  # the client's hardware address (hlen bytes)
    msg_type: int  # 0 when option 53 is missing (plain BOOTP)
    options: dict[int, bytes]

    def ip_option(self, code: int) -> str:
        value = self.options.get(code, b"")
        return ".".join(str(b) for b in value) if len(value) == 4 else ""


def is_dhcp_client_frame(frame: bytes) -> bool:
    """True when ``frame`` is IPv4 UDP from port 68 to port 67 (a DHCP/BOOTP client message).

    Cheap enough for every frame: length, ethertype, protocol byte and the port bytes.
    """
    if len(frame) < 42 or frame[12:14] != _IPV4 or frame[23] != IPPROTO_UDP:
        return False
    udp = 14 + (frame[14] & 0x0F) * 4
    return frame[udp : udp + 4] == _CLIENT_PORTS


def _parse_options(data: bytes, into: dict[int, bytes]) -> None:
    """RFC 2132 TLVs; repeated options are concatenated (RFC 3396). Stops at END or a
    truncated option."""
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= n:
            return
        length = data[i + 1]
        value = data[i + 2 : i + 2 + length]
        if len(value) < length:
            return
        into[code] = into.get(code, b"") + value
        i += 2 + length


def parse_dhcp(payload: bytes) -> DhcpMessage | None:
    """A BOOTP/DHCP message (the UDP payload), else None (short, not Ethernet, no cookie)."""
    if len(payload) < BOOTP_LEN + 4 or payload[BOOTP_LEN : BOOTP_LEN + 4] != MAGIC_COOKIE:
        return None
    (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, yiaddr, _siaddr, giaddr, chaddr,
     sname, file) = _BOOTP.unpack_from(payload)
    if htype != 1 or hlen != 6:
        return None
    options: dict[int, bytes] = {}
    _parse_options(payload[BOOTP_LEN + 4 :], options)
    overload = options.get(OPT_OVERLOAD, b"\0")[0]
    if overload & 1:
        _parse_options(file, options)
    if overload & 2:
        _parse_options(sname, options)
    msg_type = options.get(OPT_MESSAGE_TYPE, b"\0")[0]

    def dotted(raw: bytes) -> str:
        return ".".join(str(b) for b in raw)

    return DhcpMessage(
        op=op,
        xid=xid,
        flags=flags,
        ciaddr=dotted(ciaddr),
        yiaddr=dotted(yiaddr),
        giaddr=dotted(giaddr),
        chaddr=chaddr[:hlen],
        msg_type=msg_type,
        options=options,
    )


def _option(code: int, value: bytes) -> bytes:
    """One option; values over 255 bytes are split into several (RFC 3396)."""
    out = b""
    for start in range(0, max(len(value), 1), 255):
        chunk = value[start : start + 255]
        out += bytes((code, len(chunk))) + chunk
    return out


def build_dhcp(
    *,
    op: int,
    xid: int,
    chaddr: bytes,
    options: Iterable[tuple[int, bytes]],
    flags: int = 0,
    ciaddr: str = "0.0.0.0",
    yiaddr: str = "0.0.0.0",
    siaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    secs: int = 0,
) -> bytes:
    """A BOOTP/DHCP message: the fixed header, the magic cookie, ``options`` in order, END,
    zero padding to 300 bytes. Used for replies, and by tests to play the client."""
    header = _BOOTP.pack(
        op, 1, 6, 0, xid, secs, flags, ip_bytes(ciaddr), ip_bytes(yiaddr), ip_bytes(siaddr),
        ip_bytes(giaddr), chaddr.ljust(16, b"\0"), b"", b"",
    )
    body = header + MAGIC_COOKIE + b"".join(_option(c, v) for c, v in options) + b"\xff"
    return body.ljust(MIN_REPLY, b"\0")


def _ips(text: str) -> bytes:
    return b"".join(ip_bytes(p) for p in text.replace(",", " ").split())


class DhcpResponder:
    """Answers DHCP client frames for the clients ``lease_for`` knows (by MAC, ``52:54:..``).

    ``server_ip``/``server_mac`` are the switch's own identity on the segment (the server id,
    and the source of replies). Stateless: the same request always gets the same answer.
    """

    def __init__(
        self, server_ip: str, server_mac: str, lease_for: Callable[[str], Lease | None]
    ) -> None:
        self.server_ip = server_ip
        self.server_mac = mac_bytes(server_mac)
        self.lease_for = lease_for
        self._server_id = ip_bytes(server_ip)

    def handle(self, frame: bytes) -> bytes | None:
        """The reply frame to a client's DHCP frame, or None (not DHCP, unknown client, or a
        message that gets no answer)."""
        if not is_dhcp_client_frame(frame):
            return None
        udp = parse_ipv4_udp(frame)
        if udp is None:
            return None
        msg = parse_dhcp(udp[4])
        if msg is None or msg.op != BOOTREQUEST:
            return None
        lease = self.lease_for(mac_str(msg.chaddr))
        if lease is None:
            return None
        if msg.msg_type == DISCOVER:
            return self._reply(msg, OFFER, lease)
        if msg.msg_type == INFORM:
            return self._reply(msg, ACK, lease, inform=True)
        if msg.msg_type != REQUEST:
            return None  # DECLINE, RELEASE, plain BOOTP, server messages: nothing to say
        server_id = msg.options.get(OPT_SERVER_ID)
        requested = msg.ip_option(OPT_REQUESTED_IP)
        if server_id is not None:  # SELECTING: the client picked one server's offer
            if server_id != self._server_id:
                return None
            wanted = requested or msg.ciaddr
        elif requested:  # INIT-REBOOT: verifying a remembered address
            wanted = requested
        else:  # RENEWING / REBINDING: ciaddr is the address in use
            wanted = msg.ciaddr
        if wanted != lease.ip:
            return self._nak(msg, f"address {wanted} is not yours; yours is {lease.ip}")
        return self._reply(msg, ACK, lease)

    # ----------------------------------------------------------------------------------------

    def _reply(self, msg: DhcpMessage, kind: int, lease: Lease, *, inform: bool = False) -> bytes:
        net = ipaddress.IPv4Network(f"{lease.ip}/{lease.prefix}", strict=False)
        options: list[tuple[int, bytes]] = [
            (OPT_MESSAGE_TYPE, bytes((kind,))),
            (OPT_SERVER_ID, self._server_id),
        ]
        if not inform:  # RFC 2131 4.3.5: no lease time in the answer to an INFORM
            lease_s = max(int(lease.lease_s), 1)
            options += [
                (OPT_LEASE_TIME, lease_s.to_bytes(4, "big")),
                (OPT_RENEWAL, (lease_s // 2).to_bytes(4, "big")),
                (OPT_REBINDING, (lease_s * 7 // 8).to_bytes(4, "big")),
            ]
        options += [
            (OPT_SUBNET_MASK, net.netmask.packed),
            (OPT_BROADCAST, net.broadcast_address.packed),
        ]
        if lease.router:
            options.append((OPT_ROUTER, _ips(lease.router)))
        if lease.dns:
            options.append((OPT_DNS, _ips(lease.dns)))
        if lease.hostname:
            options.append((OPT_HOSTNAME, lease.hostname.encode()))
        # ciaddr is echoed for a client that has its address (RENEW, INFORM); 0 in an OFFER.
        ciaddr = msg.ciaddr if kind == ACK else "0.0.0.0"
        payload = build_dhcp(
            op=BOOTREPLY,
            xid=msg.xid,
            chaddr=msg.chaddr,
            options=options,
            flags=msg.flags,
            ciaddr=ciaddr,
            yiaddr="0.0.0.0" if inform else lease.ip,
            giaddr=msg.giaddr,
        )
        return self._send(msg, payload)

    def _nak(self, msg: DhcpMessage, why: str) -> bytes:
        options = [
            (OPT_MESSAGE_TYPE, bytes((NAK,))),
            (OPT_SERVER_ID, self._server_id),
            (OPT_MESSAGE, why.encode()),
        ]
        payload = build_dhcp(
            op=BOOTREPLY, xid=msg.xid, chaddr=msg.chaddr, options=options,
            flags=msg.flags | FLAG_BROADCAST, giaddr=msg.giaddr,
        )
        return self._send(msg, payload, broadcast=True)

    def _send(self, msg: DhcpMessage, payload: bytes, *, broadcast: bool = False) -> bytes:
        """RFC 2131 4.1: to a relay agent when there is one; unicast to a client that has an
        address (ciaddr) unless it is a NAK; else broadcast (clients without an address read
        replies from a packet socket and accept broadcasts, whatever their flags say)."""
        if msg.giaddr != "0.0.0.0":
            # The relay's MAC is not known here: the switch floods the broadcast frame and the
            # relay accepts the unicast IP destination on port 67.
            return build_udp_ipv4(
                self.server_mac, BROADCAST, self.server_ip, msg.giaddr, SERVER_PORT,
                SERVER_PORT, payload,
            )
        if msg.ciaddr != "0.0.0.0" and not broadcast:
            return build_udp_ipv4(
                self.server_mac, msg.chaddr, self.server_ip, msg.ciaddr, SERVER_PORT,
                CLIENT_PORT, payload,
            )
        return build_udp_ipv4(
            self.server_mac, BROADCAST, self.server_ip, _ALL_ONES_IP, SERVER_PORT, CLIENT_PORT,
            payload,
        )
