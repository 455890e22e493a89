"""Who may use the relay, where to, and how much: no I/O beyond reading /proc
and asking the kernel's routing (routes.py).

A destination is judged as itself and as every IPv4 address embedded in it
(policy.embedded_ipv4: NAT64, SIIT, 6to4, Teredo); it goes ahead only if
every form does.  Each form, in order:
1. the --allow-dest / --deny-dest rules in the order given: first match wins;
2. the built-in deny list: loopback, link-local, multicast, broadcast,
   unspecified;
3. when the relay listens beyond loopback: private, CGNAT, unique-local,
   site-local and known cloud metadata addresses (PUBLIC_DENY);
4. the kernel's route to it: local, broadcast, anycast or multicast (every
   address of this host, however new, NAT'd or IPv6-routed) is refused
   (Error 32); unreachable, prohibit and blackhole routes get the error a
   connect() would (97 unreachable, 32 prohibited or black-holed), and no
   packet leaves;
5. otherwise allowed.
So `--allow-dest 127.0.0.0/8` opens loopback, and `--allow-dest 192.0.2.0/24:443
--deny-dest 0.0.0.0/0 --deny-dest ::/0` turns the relay into an allow-list.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import time

from ..policy import AddressRule, embedded_ipv4, match_compiled, normalize_ip
from ..protocol import ErrorCode
from .clients import client_key, is_loopback
from .ratelimit import TokenBuckets
from .routes import CACHE_TTL as ROUTE_TTL, DROP_TYPES, RTN_LOCAL, SELF_TYPES, Routes

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

#: Denied by default on a relay listening beyond loopback (a stranger must
#: not reach the operator's own networks or a cloud's metadata service
#: through it); --allow-dest opens them.
PUBLIC_DENY = tuple(AddressRule.parse(t) for t in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918
    "100.64.0.0/10",      # CGNAT (RFC 6598); Alibaba metadata 100.100.100.200 is in it
    "fc00::/7",           # unique-local; AWS metadata fd00:ec2::254 is in it
    "fec0::/10",          # site-local (deprecated, still routed by some)
    "168.63.129.16/32",   # Azure wire server / metadata
    "169.254.169.254/32",  # AWS/GCP/Azure metadata (link-local: already denied above)
))

#: What a route lookup's errno makes the relay answer, as (code, value, why).
_ROUTE_ERRORS = {
    errno.EHOSTUNREACH: (ErrorCode.DESTINATION_UNREACHABLE, b"\x01", "unreachable route"),
    errno.ENETUNREACH: (ErrorCode.DESTINATION_UNREACHABLE, b"\x00", "no route"),
    errno.EACCES: (ErrorCode.NOT_AUTHORIZED, b"", "prohibit route"),
    errno.EPERM: (ErrorCode.NOT_AUTHORIZED, b"", "prohibit route"),
    errno.EINVAL: (ErrorCode.NOT_AUTHORIZED, b"", "blackhole route"),
}

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
    return rule.compiled()


_match = match_compiled


_BUILTIN = tuple((_compile(r), r) for r in BUILTIN_DENY)


#: Error 64's Value when a limit refuses a client: retry after 1 s (RFC 8803
#: 6.2.8; an empty Value would mean 30 s, too long for a rate limit).
RETRY_AFTER = b"\x01"


class Admission:
    """Destination policy, client policy and tunnel limits.

    Matching runs on integers (this is on the per-connection path)."""

    def __init__(self, dest_rules, allow_clients, max_tunnels: int, max_per_client: int,
                 extra_local=(), *, max_pending: int = 0, max_pending_per_client: int = 0,
                 rate: float = 0.0, burst: float = 0.0, public: bool = False,
                 nat64=(), routes: Routes | None = None):
        self.dest_rules = [(allow, _compile(rule)) for allow, rule in dest_rules]
        self.public_deny = tuple((_compile(r), r) for r in PUBLIC_DENY) if public else ()
        self.nat64 = tuple(nat64)
        self.routes = routes if routes is not None else Routes()
        self.budget = None      # budget.Budget, set by the server
        self.listen_ports: set = set()
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

    def judge_dest(self, addr, port: int):
        """None if the relay may connect to addr:port, else (Error code,
        Value, why).  `addr` is an ipaddress object."""
        addr = normalize_ip(addr)
        if port in self.listen_ports and (addr.is_loopback or self._is_self(addr)):
            # Whatever --allow-dest says: a tunnel into the relay itself nests.
            return ErrorCode.NOT_AUTHORIZED, b"", f"{addr}:{port} is this relay's own listener"
        refusal = self._judge(addr, port)
        if refusal is None:
            for v4 in embedded_ipv4(addr, self.nat64):
                refusal = self._judge(v4, port)
                if refusal is not None:
                    code, value, why = refusal
                    return code, value, f"{why} (IPv4 embedded in {addr})"
        if refusal is None:
            # Only the address packets really go to: does its route drop them?
            rtype, err = self.routes.route_of(addr)
            err = DROP_TYPES.get(rtype, err)
            if err in _ROUTE_ERRORS:
                code, value, what = _ROUTE_ERRORS[err]
                return code, value, f"{addr}: {what} on this host, no packet sent"
        return refusal

    def _judge(self, addr, port: int):
        """One form of a destination: the rules, then whether it is this host."""
        version, ip = addr.version, int(addr)
        for allow, rule in self.dest_rules:
            if _match(rule, version, ip, port):
                return None if allow else (ErrorCode.NOT_AUTHORIZED, b"",
                                           f"{addr} denied by --deny-dest")
        for table, why in ((_BUILTIN, "denied by default"),
                           (self.public_deny, "denied on a relay listening beyond loopback "
                                              "(--allow-dest opens it)")):
            for compiled, rule in table:
                if _match(compiled, version, ip, port):
                    return ErrorCode.NOT_AUTHORIZED, b"", f"{addr} is in {rule.network}, {why}"
        if (version, ip) in self.extra_local:
            return ErrorCode.NOT_AUTHORIZED, b"", f"{addr} is a listen address of this relay"
        rtype, _ = self.routes.route_of(addr)
        if rtype in SELF_TYPES:
            return (ErrorCode.NOT_AUTHORIZED, b"",
                    f"{addr} is an address of this host (kernel route: {SELF_TYPES[rtype]}), "
                    "denied")
        if not self.routes.usable and self.is_local(version, ip):
            return ErrorCode.NOT_AUTHORIZED, b"", f"{addr} is an address of this host, denied"
        return None

    def judge_connect(self, client_ip: str, exempt: bool, address, port: int):
        """A Connect from `client_ip` to address:port, as both engines judge it
        before connecting: None, or (Error code, Value, why)."""
        if not exempt and self.client_is_self(client_ip):
            # The relay reaching itself (a hairpin DNAT, an address it did not
            # know was its own): one request could nest tunnels without end.
            return ErrorCode.NOT_AUTHORIZED, b"", "client is this host itself"
        return self.judge_dest(address, port)

    def client_is_self(self, ip: str) -> bool:
        """A client whose source address is one of this host's own (a
        connection the relay made to itself, e.g. through a hairpin DNAT)."""
        return self._is_self(ipaddress.ip_address(ip))

    def _is_self(self, addr) -> bool:
        if (addr.version, int(addr)) in self.extra_local:
            return True
        rtype, _ = self.routes.route_of(addr)
        if rtype == 0 and not self.routes.usable:
            return self.is_local(addr.version, int(addr))
        return rtype == RTN_LOCAL

    # -- clients ---------------------------------------------------------------
    def client_allowed(self, addr) -> bool:
        if not self.allow_clients:
            return True
        return any(r.matches(addr) for r in self.allow_clients)

    def admit(self, ip: str, now: float, ipv6_prefix: int):
        """A new client connection from `ip` (IPv4-mapped already normalised),
        as both engines judge it at accept: (key, exempt, sizes, refusal).
        Admitted: refusal is None, and the tunnel slot (take) and the memory
        grant (budget.reserve, `sizes`) are held until release() and
        budget.release(). Refused: nothing is held and refusal is the
        (Error code, its Value, why) to reply with."""
        if not self.client_allowed(ip):
            return None, False, None, (ErrorCode.NOT_AUTHORIZED, b"",
                                       "client not in --allow-client")
        key = client_key(ip, ipv6_prefix)
        exempt = is_loopback(ip)
        why = self.take(key, now, exempt)
        sizes = None
        if why is None:
            sizes = self.budget.reserve(key, exempt)
            if sizes is None:
                self.release(key)
                why = "memory budget reached"
        if why is not None:
            # Value: the delay (s) RFC 8803 lets us suggest before the next try.
            return key, exempt, None, (ErrorCode.RESOURCE_EXCEEDED, RETRY_AFTER, why)
        return key, exempt, sizes, None

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


class ConnectVerdicts:
    """Admission.judge_connect for the C engine, remembered per (client,
    destination, port) for as long as every kernel route answer it rested on
    is trusted (Routes.valid_until, at most routes.CACHE_TTL), and, without
    netlink, the /proc view of this host's addresses (LOCAL_REFRESH): the
    verdict is what judge_connect would say at that moment, without building
    address objects and walking the rules for every tunnel.  The rules and
    listen ports are fixed while the relay runs.  A destination arrives as
    its 16 Connect bytes (IPv4 as ::ffff:a.b.c.d); an exempt (loopback)
    client is not judged as a client, so all of them share one entry.
    At most CACHE_MAX entries: a flood of distinct destinations empties it."""

    CACHE_MAX = 4096

    def __init__(self, admission: Admission):
        self.admission = admission
        self.cache: dict = {}

    def judge(self, client_ip: str, exempt: bool, raw: bytes, port: int, now: float):
        """(refusal or None, family, packed address, its text) for a Connect
        to raw:port."""
        key = (None if exempt else client_ip, raw, port)
        hit = self.cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        if raw[:12] == _V4_MAPPED:
            address = ipaddress.IPv4Address(raw[12:])
        else:
            address = ipaddress.IPv6Address(raw)
        adm = self.admission
        routes = adm.routes
        routes.valid_until = now + ROUTE_TTL
        refusal = adm.judge_connect(client_ip, exempt, address, port)
        until = routes.valid_until
        if not routes.usable:
            until = min(until, adm._local_at + LOCAL_REFRESH)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        verdict = (refusal, family, address.packed, str(address))
        if len(self.cache) >= self.CACHE_MAX:
            self.cache.clear()
        self.cache[key] = (until, verdict)
        return verdict


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _dec(counts: dict, key) -> None:
    n = counts.get(key, 1) - 1
    if n <= 0:
        counts.pop(key, None)
    else:
        counts[key] = n
