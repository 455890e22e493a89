"""Which PEP to use and which destinations bypass it (PEP_PROXY, PEP_NO_PROXY).

No I/O: strings in, decisions out.  The rules are written once, in
docs/protocol.md ("PEP selection and bypass rules"); `preload/config.c`
follows the same text.  `AddressRule` is also what the relay's
--allow-dest/--deny-dest/--allow-client options are made of.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: What goes direct when PEP_NO_PROXY is unset.
DEFAULT_NO_PROXY = "localhost,127.0.0.0/8,::1,169.254.0.0/16,fe80::/10"


class ConfigError(ValueError):
    """A PEP_PROXY / PEP_NO_PROXY / option value that does not parse."""


def normalize_ip(addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv4-mapped IPv6 addresses count as the IPv4 address they carry."""
    if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = ipaddress.ip_address(addr)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


#: NAT64 prefixes judged by default (RFC 6052 well-known; RFC 8215 local-use,
#: read with the /48 layout: a translator using a longer prefix inside it is
#: named with the relay's --nat64-prefix).
NAT64_DEFAULT = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
NAT64_LENGTHS = (32, 40, 48, 56, 64, 96)
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")     # IPv4-translated (RFC 2765)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def rfc6052_ipv4(addr: ipaddress.IPv6Address, prefix_len: int) -> ipaddress.IPv4Address:
    """The IPv4 address in an IPv4-embedded IPv6 address (RFC 6052 section
    2.2): 32 bits right after the prefix, skipping bits 64-71 (the u octet)."""
    if prefix_len not in NAT64_LENGTHS:
        raise ValueError(f"RFC 6052 prefixes are /32, /40, /48, /56, /64 or /96, not /{prefix_len}")
    b = addr.packed
    rest = b[prefix_len // 8:8] + b[9:] if prefix_len < 64 else b[prefix_len // 8 + (prefix_len == 64):]
    return ipaddress.IPv4Address(rest[:4])


def embedded_ipv4(addr, nat64=()) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 destination may reach by translation or
    tunnelling: IPv4-mapped and SIIT IPv4-translated, NAT64 (64:ff9b::/96,
    64:ff9b:1::/48 and the `nat64` networks given, each of an RFC 6052
    length), 6to4 (2002::/16) and Teredo
    (2001::/32: its server, and its client's obfuscated public address).
    A destination is judged as each of these as well as itself."""
    if addr.version != 6:
        return []
    b = addr.packed
    found = []
    if addr in _MAPPED or addr in _SIIT:
        found.append(ipaddress.IPv4Address(b[12:]))
    for net in (*NAT64_DEFAULT, *nat64):
        if addr in net:
            found.append(rfc6052_ipv4(addr, net.prefixlen))
    if addr in _6TO4:
        found.append(ipaddress.IPv4Address(b[2:6]))
    if addr in _TEREDO:
        found.append(ipaddress.IPv4Address(b[4:8]))
        found.append(ipaddress.IPv4Address(bytes(x ^ 0xFF for x in b[12:])))
    return list(dict.fromkeys(found))


def parse_hostport(text: str, what: str = "PEP_PROXY", *, listening: bool = False) -> tuple[str, int]:
    """'host:port' or '[v6addr]:port' -> (host, port); port 0 only when `listening`."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{what}={text!r}: expected [IPv6-address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}={text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{what}={text!r}: expected host:port or [IPv6-address]:port")
        if ":" in host:
            raise ConfigError(f"{what}={text!r}: write an IPv6 address in brackets, [addr]:port")
    return host, _port(port, what, text, lowest=0 if listening else 1)


def _port(port: str, what: str, text: str, lowest: int = 1) -> int:
    if not port.isdigit() or not lowest <= int(port) < 65536:
        raise ConfigError(f"{what}={text!r}: port must be {lowest}-65535, not {port!r}")
    return int(port)


def _ports(spec: str, what: str, text: str) -> tuple[tuple[int, int], ...]:
    """'443', '80,443' is not allowed here (comma separates entries); '1000-2000' is."""
    low, dash, high = spec.partition("-")
    if dash:
        a, b = _port(low, what, text), _port(high, what, text)
        if a > b:
            raise ConfigError(f"{what}={text!r}: port range {spec} is backwards")
        return ((a, b),)
    p = _port(spec, what, text)
    return ((p, p),)


@dataclass(frozen=True)
class AddressRule:
    """A network and an optional port range: '192.0.2.0/24', '[2001:db8::/32]:443'."""

    network: Network
    ports: tuple[tuple[int, int], ...] = ()

    def matches(self, addr, port: int | None = None) -> bool:
        """Is addr (IPv4-mapped counts as IPv4) in the network, and port (if
        given) in the ranges (if any)?"""
        addr = normalize_ip(addr)
        return match_compiled(self.compiled(), addr.version, int(addr), port)

    def compiled(self) -> tuple:
        """(version, network int, mask int, port ranges): what match_compiled
        takes, for matching on integers on a per-connection path."""
        net = self.network
        return net.version, int(net.network_address), int(net.netmask), self.ports

    @classmethod
    def parse(cls, text: str, what: str = "rule") -> "AddressRule":
        net, ports = _split_port(text.strip(), what)
        try:
            network = ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{what}={text!r}: {net!r} is not an address or CIDR") from None
        if network.version == 6 and network.network_address.ipv4_mapped is not None \
                and network.prefixlen >= 96:
            network = ipaddress.ip_network(
                f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
        return cls(network, _ports(ports, what, text) if ports else ())


def match_compiled(compiled: tuple, version: int, ip: int, port: int | None) -> bool:
    """CIDR and port matching, the one copy: `compiled` from
    AddressRule.compiled(), `ip` an already normalized address as an int;
    port None matches any ranges."""
    v, net, mask, ports = compiled
    if v != version or ip & mask != net:
        return False
    return not ports or port is None or any(a <= port <= b for a, b in ports)


def _split_port(text: str, what: str) -> tuple[str, str]:
    """Separate an optional ':port' from an address/CIDR/name entry."""
    if text.startswith("["):
        inner, sep, after = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"{what}={text!r}: missing ']'")
        if after.startswith("/"):  # [2001:db8::]/32:443
            prefix, _, port = after[1:].partition(":")
            return f"{inner}/{prefix}", port
        if after and not after.startswith(":"):
            raise ConfigError(f"{what}={text!r}: expected ':port' after ']'")
        return inner, after[1:]
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, ""  # a bare IPv6 address or CIDR, or a name without port


@dataclass(frozen=True)
class NameRule:
    """curl's suffix rule: 'example.com' matches it and every name below it."""

    suffix: str
    ports: tuple[tuple[int, int], ...] = ()

    def matches(self, name: str, port: int | None = None) -> bool:
        name = name.lower().rstrip(".")
        if not (name == self.suffix or name.endswith("." + self.suffix)):
            return False
        return not self.ports or port is None or any(a <= port <= b for a, b in self.ports)


@dataclass(frozen=True)
class Bypass:
    """The parsed PEP_NO_PROXY list."""

    everything: bool = False
    addresses: tuple[AddressRule, ...] = ()
    names: tuple[NameRule, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "Bypass":
        if text is None:
            text = DEFAULT_NO_PROXY
        addresses, names = [], []
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            host, ports = _split_port(entry, "PEP_NO_PROXY")
            if _looks_like_address(host):
                addresses.append(AddressRule.parse(entry, "PEP_NO_PROXY"))
            else:
                name = host.lower().strip().lstrip(".").rstrip(".")
                if not name or not all(c.isalnum() or c in "-._" for c in name):
                    raise ConfigError(f"PEP_NO_PROXY entry {entry!r} is not a name, address or CIDR")
                names.append(NameRule(name, _ports(ports, "PEP_NO_PROXY", entry) if ports else ()))
        return cls(False, tuple(addresses), tuple(names))

    def matches(self, *, name: str | None = None, address=None, port: int | None = None) -> bool:
        if self.everything:
            return True
        if name is not None and any(r.matches(name, port) for r in self.names):
            return True
        if address is not None and any(r.matches(address, port) for r in self.addresses):
            return True
        return False


def _looks_like_address(host: str) -> bool:
    try:
        ipaddress.ip_network(host, strict=False)
        return True
    except ValueError:
        return False


def parse_proxy_list(text: str) -> tuple[tuple[str, int], ...]:
    """PEP_PROXY: comma-separated host:port / [v6]:port entries, tried in order."""
    entries = [e for e in (part.strip() for part in text.split(",")) if e]
    if text.strip() and not entries:
        raise ConfigError(f"PEP_PROXY={text!r}: expected host:port[,host:port...]")
    return tuple(parse_hostport(e) for e in entries)


@dataclass(frozen=True)
class ProxyConfig:
    """PEP selection read from the environment (or given explicitly)."""

    peps: tuple[tuple[str, int], ...]
    bypass: Bypass

    @property
    def pep(self) -> tuple[str, int] | None:
        """The first PEP of the list (None: no PEP)."""
        return self.peps[0] if self.peps else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ProxyConfig":
        env = os.environ if env is None else env
        return cls(parse_proxy_list(env.get("PEP_PROXY", "")), Bypass.parse(env.get("PEP_NO_PROXY")))

    def pep_for(self, name: str | None, address=None, port: int | None = None):
        """The PEP to use for this destination, or None to go direct."""
        if self.pep is None or self.bypass.matches(name=name, address=address, port=port):
            return None
        return self.pep
