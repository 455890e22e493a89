"""Forged packets and packet counting for the relay's anti-spoofing tests.

No scapy here (not installed, and not needed): an IPv4 + TCP header is 40
bytes of struct packing and two checksums.

* `syn_packet()` builds one IPv4 SYN with any source address, TCP options and
  payload (a Convert message rides as SYN data, as TCP Fast Open carries it).
* `send_ipv4()` sends such a packet through a raw socket (IP_HDRINCL), so the
  kernel puts it on the wire exactly as built: the source is whatever we say.
* `PacketCounter` watches an interface with an AF_PACKET socket and counts TCP
  segments (SYNs, payload bytes) towards a port: what a destination really saw.
"""
from __future__ import annotations

import socket
import struct
import time

ETH_P_IP = 0x0800
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tfo_cookie_request() -> bytes:
    """TCP option 34 (RFC 7413) with no cookie: 'send me a cookie'."""
    return bytes((34, 2))


def syn_packet(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *,
               seq: int = 0x1000, options: bytes = b"", ttl: int = 64, ident: int = 1) -> bytes:
    """One IPv4 packet: a TCP SYN from src:sport to dst:dport carrying `payload`.

    `options` are raw TCP option bytes (padded here to a 4-byte multiple); by
    default the SYN has none but an MSS (what a minimal real stack sends)."""
    opts = options or struct.pack("!BBH", 2, 4, 1460)
    opts += b"\x00" * (-len(opts) % 4)
    doff = (20 + len(opts)) // 4
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, doff << 4, TCP_SYN, 65535, 0, 0) + opts
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp) + len(payload))
    csum = checksum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0, ttl, socket.IPPROTO_TCP, 0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp + payload


def send_ipv4(packet: bytes) -> None:
    """Put a complete IPv4 packet (header included) on the wire, as built."""
    dst = socket.inet_ntoa(packet[16:20])
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        s.sendto(packet, (dst, 0))


class PacketCounter:
    """TCP segments to `port` seen on interface `ifname` (open it inside the
    namespace that owns the interface; it counts from the moment it is made).

    `syns` counts segments with SYN and no ACK (connection attempts, each
    retransmission too; `syn_times` holds their capture times, wall clock); `payload` sums the TCP payload bytes of all segments,
    `wire_bytes` their IP lengths."""

    def __init__(self, ifname: str, port: int):
        self.port = port
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        self.sock.bind((ifname, ETH_P_IP))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setblocking(False)
        self.syns = 0
        self.payload = 0
        self.segments = 0
        self.wire_bytes = 0     # IP packet lengths, all segments
        self.syn_times: list[float] = []

    def poll(self) -> "PacketCounter":
        """Read every packet captured so far and update the counts."""
        while True:
            try:
                pkt, anc, _, addr = self.sock.recvmsg(65535, 64)
            except BlockingIOError:
                return self
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            stamp = time.time()
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", data[:16])
                    stamp = sec + nsec / 1e9
            self._count(pkt, stamp)

    def _count(self, pkt: bytes, stamp: float) -> None:
        if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != socket.IPPROTO_TCP:
            return
        ihl = (pkt[0] & 0x0F) * 4
        total = struct.unpack("!H", pkt[2:4])[0]
        tcp = pkt[ihl:total]
        if len(tcp) < 20 or struct.unpack("!H", tcp[2:4])[0] != self.port:
            return
        self.segments += 1
        self.wire_bytes += total
        flags = tcp[13]
        if flags & TCP_SYN and not flags & TCP_ACK:
            self.syns += 1
            self.syn_times.append(stamp)
        self.payload += len(tcp) - (tcp[12] >> 4) * 4

    def close(self) -> None:
        self.sock.close()
