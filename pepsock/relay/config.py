"""The relay's settings: one dataclass, every default with the reason for it.

docs/relay.md repeats the table for users; keep the two in step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..policy import AddressRule

#: Seconds a client has to deliver its Convert message.  The message rides in
#: the SYN (0-RTT), so a real client needs at most one RTT more (1-RTT
#: fallback); 5 s covers a geostationary hop several times over while bounding
#: what a slowloris client can pin.
DEFAULT_HEADER_TIMEOUT = 5.0
#: Seconds for the onward connect().  Linux's own limit is ~127 s of SYN
#: retries; 10 s allows three SYN retransmissions (1+2+4 s) and then answers
#: Error 65 so the client is not left hanging.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds a tunnel may sit with data to move and none moving (a peer that
#: neither reads nor acknowledges) before it is reset: what a client that
#: never reads can hold is bounded in time as well as in bytes.
DEFAULT_STALL_TIMEOUT = 120.0
#: Seconds tunnels get to finish after SIGTERM/SIGINT before they are reset.
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Socket buffers (SO_RCVBUF/SO_SNDBUF values; the kernel doubles them for
#: its bookkeeping, and the budget charges the doubled size).  Fixed sizes,
#: not autotuning, so what one tunnel can pin is known (budget.py).
#: Client side: 4 MiB fills a geostationary satellite hop (50 Mbit/s x 650 ms
#: RTT = 4.1 MB) and a 5G mmWave cell (1 Gbit/s x 30 ms = 3.75 MB).
#: Server side (the short, terrestrial side of a PEP): 2 MiB fills 1 Gbit/s
#: at 16 ms or 330 Mbit/s at 50 ms.  0 = kernel autotuning, charged at the
#: most it may grow to (net.ipv4.tcp_rmem/tcp_wmem maximum).
DEFAULT_CLIENT_BUFFER = 4 << 20
DEFAULT_SERVER_BUFFER = 2 << 20
#: Kernel memory one client (IPv4 address / IPv6 prefix) may have committed
#: in its tunnels' socket buffers and pipes (worst case: every buffer full);
#: past it, Error 64.  64 MiB: two tunnels at full depth plus hundreds of
#: small ones.
DEFAULT_MEMORY_PER_CLIENT = 64 << 20
#: Seconds transmitted data may stay unacknowledged before the kernel drops
#: the connection (TCP_USER_TIMEOUT, both sides; also ends keepalive sooner).
#: A vanished client otherwise holds its tunnel ~15 min (tcp_retries2).
DEFAULT_USER_TIMEOUT = 120.0
#: One pipe per direction while bytes are in flight.  1 MiB (the default
#: fs.pipe-max-size) lets one splice() move a whole socket buffer's worth, so
#: the per-byte Python cost stays low; pipes go back to a pool once empty, so
#: idle tunnels hold none.
DEFAULT_PIPE_SIZE = 1 << 20
#: Open tunnels per process: ~2 sockets each, pipes only while busy.
DEFAULT_MAX_TUNNELS = 20000
#: Tunnels per client address in the whole relay (with --workers N each
#: worker allows 1/N: server.worker_share); 0 = unlimited.  Bounds what one
#: host can take.
DEFAULT_MAX_PER_CLIENT = 1024
#: IPv6 clients are counted by this prefix for every per-client limit
#: (a host or home gets a /64 and may use any address in it).
DEFAULT_IPV6_PREFIX = 64
#: Onward connects in progress, in the whole relay and per client (each of
#: --workers N gets 1/N, as of the two below).  Each may send
#: up to 1 + --syn-retries SYNs at a destination that does not answer, so
#: these bound how hard the relay can be made to knock on a stranger's door;
#: a client opening tunnels to live destinations holds a slot for one RTT.
DEFAULT_MAX_PENDING = 2048
DEFAULT_MAX_PENDING_PER_CLIENT = 64
#: New tunnels a client may open per second, and the burst it may save up.
#: A browser opening a page's worth of connections at once stays far below;
#: a flood of refused or black-holed requests is cut to this rate.
DEFAULT_TUNNEL_RATE = 100.0
DEFAULT_TUNNEL_BURST = 500
#: TCP_SYNCNT of onward sockets: SYN retransmissions before connect() gives
#: up (the kernel default is 6, about 127 s).  2 = at most 3 SYNs per request
#: at a destination that never answers (RFC 8803 section 9.3 asks a
#: converter not to add SYN retransmissions of its own).
DEFAULT_SYN_RETRIES = 2
#: Listen backlog and TFO queue (capped by net.core.somaxconn).
DEFAULT_BACKLOG = 4096
DEFAULT_TFO_QUEUE = 4096
#: Pipes kept open in the pool for reuse; beyond this an emptied pipe is closed.
DEFAULT_PIPE_POOL = 256


def worker_share(limit: int, workers: int) -> int:
    """A worker's part of a relay-wide limit (0: unlimited) with --workers N:
    1/N, rounded down so the workers together never exceed it, at least 1."""
    return limit and max(1, limit // max(1, workers))


@dataclass
class SideOptions:
    """Per-side TCP tuning (the client side faces the long/lossy link in a PEP)."""

    cc: str | None = None        # TCP_CONGESTION; None leaves the kernel default
    rcvbuf: int = 0              # SO_RCVBUF; 0 keeps kernel autotuning
    sndbuf: int = 0              # SO_SNDBUF; 0 keeps kernel autotuning


def _side(size: int):
    return field(default_factory=lambda: SideOptions(rcvbuf=size, sndbuf=size))


@dataclass
class Config:
    listen: list[tuple[str, int]] = field(default_factory=list)
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    user_timeout: float = DEFAULT_USER_TIMEOUT
    memory_per_client: int = DEFAULT_MEMORY_PER_CLIENT
    #: Kernel memory all tunnels of the relay may have committed; None = three
    #: quarters of net.ipv4.tcp_mem's hard limit.  Both budgets are per
    #: process: with --workers N each worker gets 1/N (SO_REUSEPORT spreads a
    #: client's connections evenly).
    memory_budget: int | None = None
    client: SideOptions = _side(DEFAULT_CLIENT_BUFFER)
    server: SideOptions = _side(DEFAULT_SERVER_BUFFER)
    nodelay: bool = True
    #: TCP keepalive idle seconds on both sides; 0 keeps the kernel's
    #: net.ipv4.tcp_keepalive_* (2 h by default).  Keepalive is always on.
    keepalive: int = 0
    pipe_size: int = DEFAULT_PIPE_SIZE
    pipe_pool: int = DEFAULT_PIPE_POOL
    #: (allow?, rule) in command-line order; first match wins, then the built-in
    #: deny list, then allow.
    dest_rules: list[tuple[bool, AddressRule]] = field(default_factory=list)
    allow_clients: list[AddressRule] = field(default_factory=list)
    max_tunnels: int = DEFAULT_MAX_TUNNELS
    max_per_client: int = DEFAULT_MAX_PER_CLIENT
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_per_client: int = DEFAULT_MAX_PENDING_PER_CLIENT
    tunnel_rate: float = DEFAULT_TUNNEL_RATE
    tunnel_burst: int = DEFAULT_TUNNEL_BURST
    syn_retries: int = DEFAULT_SYN_RETRIES
    #: NAT64 prefixes (RFC 6052 lengths) besides 64:ff9b::/96 and 64:ff9b:1::/48
    #: whose embedded IPv4 is judged as IPv4.
    nat64_prefixes: list = field(default_factory=list)
    backlog: int = DEFAULT_BACKLOG
    tfo_queue: int = DEFAULT_TFO_QUEUE
    workers: int = 1
    stats: tuple[str, int] | None = None
    log_tunnels: bool = True
    log_level: str = "info"
    log_file: str | None = None
    #: Listener with TCP_FASTOPEN_NO_COOKIE: 0-RTT from a client's first SYN,
    #: but a forged source reaches accept() (pepsock/relay/routability.py).
    no_cookie: bool = False
    #: Onward TCP Fast Open: a verified client's early data rides in the
    #: relay's SYN toward destinations that gave the kernel a TFO cookie
    #: (tunnel.py, _connect); --no-onward-tfo turns it off.
    onward_tfo: bool = True
    #: --cookie-secret: every secret, the current one first (cookies.py); empty:
    #: no Cookie TLV required.
    cookie_secrets: list[bytes] = field(default_factory=list)
    #: The tunnel engine: "c" (librelaycore.so, relaycore/: the mechanics in
    #: C, every decision here in Python) or "python" (tunnel.py); see
    #: docs/relay.md, "Engines".
    engine: str = "c"
    #: --tfo-key: 16 bytes (primary) or 32 (primary + backup) for TCP_FASTOPEN_KEY.
    tfo_key: bytes | None = None
