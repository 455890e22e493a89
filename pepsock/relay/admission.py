"""Who may use the relay, where to, and how much: no I/O beyond reading /proc.

Destination decision, in order:
1. the --allow-dest / --deny-dest rules in the order given: first match wins;
2. the built-in deny list: loopback, link-local, multicast, broadcast,
   unspecified, and every address of this host (its interfaces, their
   directed broadcasts) -- no open door into the PEP host or its LAN segment;
3. otherwise allowed.
So `--allow-dest 127.0.0.0/8` opens loopback, and `--allow-dest 192.0.2.0/24:443
--deny-dest 0.0.0.0/0 --deny-dest ::/0` turns the relay into an allow-list.
"""
from __future__ import annotations

import ipaddress
import time

from ..policy import AddressRule, normalize_ip
from .ratelimit import TokenBuckets

BUILTIN_DENY = tuple(AddressRule.parse(t) for t in (
    "0.0.0.0/8",          # "this network"; 0.0.0.0 reaches the host itself on Linux
    "127.0.0.0/8",        # loopback
    "169.254.0.0/16",     # link-local (cloud metadata services live here)
    "224.0.0.0/4",        # multicast
    "255.255.255.255/32",  # limited broadcast
    "::/96",              # unspecified, loopback, IPv4-compatible
    "fe80::/10",          # link-local
    "ff00::/8",           # multicast
))

#: How long the set of local addresses is trusted before /proc is read again.
LOCAL_REFRESH = 5.0


def local_addresses() -> tuple[set, list]:
    """Every address that reaches this host: interface addresses, local
    routes and the directed broadcasts of their subnets (/proc/net/fib_trie),
    IPv6 interface addresses (/proc/net/if_inet6).  Per network namespace.
    Returns (single addresses, networks)."""
    found: set = set()
    nets: list = []
    try:
        with open("/proc/net/fib_trie") as f:
            last = None
            for line in f:
                s = line.strip()
                if s.startswith(("|--", "+--")):
                    last = s[3:].split()[0].split("/")[0]
                    continue
                if last is None or not s.startswith("/"):
                    continue
                prefix, _, kind = s.partition(" ")
                if not (kind.endswith("LOCAL") or kind.endswith("BROADCAST")):
                    continue
                try:
                    if prefix == "/32":
                        found.add(ipaddress.IPv4Address(last))
                    else:
                        nets.append(ipaddress.IPv4Network(last + prefix, strict=False))
                except ValueError:
                    pass
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return found, nets


def _compile(rule: AddressRule):
    """(version, network int, mask int, port ranges) for integer matching."""
    net = rule.network
    return net.version, int(net.network_address), int(net.netmask), rule.ports


def _match(compiled, version: int, ip: int, port: int) -> bool:
    v, net, mask, ports = compiled
    if v != version or ip & mask != net:
        return False
    return not ports or any(a <= port <= b for a, b in ports)


_BUILTIN = tuple((_compile(r), r) for r in BUILTIN_DENY)


class Admission:
    """Destination policy, client policy and tunnel limits.

    Matching runs on integers (this is on the per-connection path)."""

    def __init__(self, dest_rules, allow_clients, max_tunnels: int, max_per_client: int,
                 extra_local=(), *, max_pending: int = 0, max_pending_per_client: int = 0,
                 rate: float = 0.0, burst: float = 0.0):
        self.dest_rules = [(allow, _compile(rule)) for allow, rule in dest_rules]
        self.allow_clients = list(allow_clients)
        self.max_tunnels = max_tunnels
        self.max_per_client = max_per_client
        self.extra_local = {(a.version, int(a)) for a in map(normalize_ip, extra_local)}
        self._local: set = set()
        self._local_nets: list = []
        self._local_at = -1e9
        self.open_total = 0
        self.per_client: dict[str, int] = {}
        # Onward connects in progress (each may retransmit SYNs at a stranger).
        self.max_pending = max_pending
        self.max_pending_per_client = max_pending_per_client
        self.pending_total = 0
        self.pending: dict[str, int] = {}
        self.rate = TokenBuckets(rate, burst) if rate > 0 else None

    # -- destinations ---------------------------------------------------------
    def is_local(self, version: int, ip: int) -> bool:
        now = time.monotonic()
        if now - self._local_at > LOCAL_REFRESH:
            found, nets = local_addresses()
            self._local = {(a.version, int(a)) for a in found} | self.extra_local
            self._local_nets = [(n.version, int(n.network_address), int(n.netmask), ())
                                for n in nets]
            self._local_at = now
        if (version, ip) in self._local:
            return True
        return any(_match(n, version, ip, 0) for n in self._local_nets)

    def dest_allowed(self, addr, port: int) -> tuple[bool, str]:
        """(allowed, reason).  `addr` is an ipaddress object; IPv4-mapped IPv6
        counts as IPv4."""
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        version, ip = addr.version, int(addr)
        for allow, rule in self.dest_rules:
            if _match(rule, version, ip, port):
                return allow, ("allowed by --allow-dest" if allow else "denied by --deny-dest")
        for compiled, rule in _BUILTIN:
            if _match(compiled, version, ip, port):
                return False, f"{addr} is in {rule.network}, denied by default"
        if self.is_local(version, ip):
            return False, f"{addr} is an address of this host, denied by default"
        return True, "allowed"

    # -- clients ---------------------------------------------------------------
    def client_allowed(self, addr) -> bool:
        if not self.allow_clients:
            return True
        return any(r.matches(addr) for r in self.allow_clients)

    def take(self, key: str, now: float = 0.0, exempt: bool = False) -> str | None:
        """Reserve a tunnel slot for client `key` (see clients.client_key);
        None if granted, else why not (Error 64).  `exempt` (loopback
        clients, the relay host's own processes) skips the new-tunnel rate."""
        if self.open_total >= self.max_tunnels:
            return "tunnel limit reached"
        n = self.per_client.get(key, 0)
        if self.max_per_client and n >= self.max_per_client:
            return "per-client tunnel limit reached"
        if self.rate is not None and not exempt and not self.rate.allow(key, now):
            return "per-client new-tunnel rate exceeded"
        self.per_client[key] = n + 1
        self.open_total += 1
        return None

    def release(self, key: str) -> None:
        self.open_total -= 1
        _dec(self.per_client, key)

    def take_pending(self, key: str, exempt: bool = False) -> str | None:
        """Reserve an onward connect; None if granted, else why not."""
        if self.max_pending and self.pending_total >= self.max_pending:
            return "pending connect limit reached"
        n = self.pending.get(key, 0)
        if self.max_pending_per_client and not exempt and n >= self.max_pending_per_client:
            return "per-client pending connect limit reached"
        self.pending[key] = n + 1
        self.pending_total += 1
        return None

    def release_pending(self, key: str) -> None:
        self.pending_total -= 1
        _dec(self.pending, key)


def _dec(counts: dict, key) -> None:
    n = counts.get(key, 1) - 1
    if n <= 0:
        counts.pop(key, None)
    else:
        counts[key] = n
