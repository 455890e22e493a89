"""Who a client is, for every per-client limit.

An IPv4 client is its address.  An IPv6 client is the prefix its address is
in (default /64, `--ipv6-prefix`): a host or home network gets a whole /64
and picks addresses in it at will, so counting each /128 would let one
client multiply every per-client limit by the number of addresses it cares
to use (issue 16: 12 addresses of one /64 held 9,852 pending connects).
IPv4-mapped IPv6 clients arrive normalised to IPv4 (pepsock.policy).
"""
from __future__ import annotations

import ipaddress

DEFAULT_IPV6_PREFIX = 64


def client_key(ip: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """'198.51.100.7' -> itself; '2001:db8::7' -> '2001:db8::/64'."""
    if ":" not in ip:
        return ip
    host = 128 - ipv6_prefix
    net = int(ipaddress.IPv6Address(ip)) >> host << host
    return f"{ipaddress.IPv6Address(net)}/{ipv6_prefix}"


def is_loopback(ip: str) -> bool:
    """Clients on loopback are processes of the relay host itself."""
    return ip.startswith("127.") or ip == "::1"
