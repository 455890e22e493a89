"""What the kernel's routing makes of an address: one RTM_GETROUTE query on
a NETLINK_ROUTE socket, written by hand (no dependency), cached briefly.

The relay asks the same question its connect() would: where does a packet
to this address go?  "Local" (any address of this host, including ones added
a moment ago, NAT'd ones and IPv6 local routes), "broadcast", "anycast",
"multicast", or an error for unreachable / prohibit / blackhole routes.  That
is what /proc snapshots refreshed every few seconds could not tell.
"""
from __future__ import annotations

import errno
import itertools
import socket
import struct
import time

NETLINK_ROUTE = 0
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
RTA_DST = 1

# rtm_type values (linux/rtnetlink.h)
RTN_UNICAST, RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST, RTN_MULTICAST = 1, 2, 3, 4, 5
RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW = 6, 7, 8, 9
#: Route types that mean "this host itself": never a destination, never a client.
SELF_TYPES = {RTN_LOCAL: "local", RTN_BROADCAST: "broadcast", RTN_ANYCAST: "anycast",
              RTN_MULTICAST: "multicast"}
#: Route types (or, as the kernel usually answers, errnos) that drop the packet.
DROP_TYPES = {RTN_BLACKHOLE: errno.EINVAL, RTN_UNREACHABLE: errno.EHOSTUNREACH,
              RTN_PROHIBIT: errno.EACCES}

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")

#: Seconds an answer is trusted: short, so an address added or a route
#: changed counts almost at once, yet a flood of requests to one destination
#: costs one query a second.
CACHE_TTL = 1.0
CACHE_MAX = 4096


def request(addr, seq: int) -> bytes:
    """The RTM_GETROUTE message asking for the route to `addr`."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    packed = addr.packed
    body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) \
        + _RTATTR.pack(_RTATTR.size + len(packed), RTA_DST) + packed
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def parse_reply(data: bytes, seq: int) -> tuple[int, int] | None:
    """(rtm_type, 0) or (0, errno) from the kernel's answer to request
    number `seq`; None if `data` holds no complete answer to it (other
    messages, truncated ones and garbage are skipped, never trusted)."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _, rseq, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            return None
        if rseq == seq:
            body = off + _NLMSGHDR.size
            if mtype == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
                code = struct.unpack_from("=i", data, body)[0]
                return 0, max(0, -code)
            if mtype == RTM_NEWROUTE and length >= _NLMSGHDR.size + _RTMSG.size:
                return _RTMSG.unpack_from(data, body)[7], 0
        off += (length + 3) & ~3
    return None


class Routes:
    """route_of(ip) -> (rtm_type, errno): (type, 0) when a route was found,
    (0, errno) when the kernel refused (e.g. EHOSTUNREACH, ENETUNREACH), and
    (0, 0) when the question could not be asked (no netlink: callers fall
    back to what they knew before)."""

    def __init__(self):
        self.sock = None
        self.usable = True
        self.cache: dict = {}
        self.seq = itertools.count(1)
        #: Lowered to the expiry of every answer route_of hands out: a caller
        #: that sets it (to the longest it would trust a judgement) before a
        #: judgement and reads it after knows how long that judgement rests
        #: on answers still trusted (admission.ConnectVerdicts).
        self.valid_until = float("inf")
        try:    # opened now: one fd for the process's life, not one that appears later
            self.sock = self._open()
        except OSError:
            self.usable = False

    def _open(self):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        s.bind((0, 0))
        s.settimeout(0.5)
        return s

    def route_of(self, addr) -> tuple[int, int]:
        key = (addr.version, int(addr))
        now = time.monotonic()
        hit = self.cache.get(key)
        if hit is not None and hit[0] > now:
            if hit[0] < self.valid_until:
                self.valid_until = hit[0]
            return hit[1]
        answer = self._query(addr)
        if len(self.cache) >= CACHE_MAX:
            self.cache.clear()
        self.cache[key] = (now + CACHE_TTL, answer)
        if now + CACHE_TTL < self.valid_until:
            self.valid_until = now + CACHE_TTL
        return answer

    def _query(self, addr) -> tuple[int, int]:
        if not self.usable:
            return 0, 0
        try:
            if self.sock is None:
                self.sock = self._open()
            seq = next(self.seq) & 0xFFFFFFFF
            self.sock.send(request(addr, seq))
            while True:
                answer = parse_reply(self.sock.recv(65536), seq)
                if answer is not None:
                    return answer
        except OSError:
            # No netlink here (seccomp, an odd sandbox): say so by answering
            # (0, 0) from now on; the caller keeps its /proc-based view.
            self.usable = False
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            return 0, 0
