"""Command line of `pep relay` (also `python -m pepsock.relay`).

At start the relay prints one line per bound address on stdout, flushed,
after the sockets listen (and, with --workers, after every worker listens):

    listening on 127.0.0.1:40123
    stats on 127.0.0.1:9100          (only with --stats)

so a caller that asked for port 0 learns the port.  Logs go to stderr (or
--log-file).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ..policy import NAT64_LENGTHS, AddressRule, ConfigError, parse_hostport
from . import config as C
from .config import Config, SideOptions
from .cookies import SecretError, load_secrets, load_tfo_key

log = logging.getLogger("pepsock.relay")


def _hostport(text: str, what: str) -> tuple[str, int]:
    return parse_hostport(text, what, listening=True)  # port 0: an ephemeral port


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 262144, 256k, 4m)")
    if v < 0:
        raise argparse.ArgumentTypeError("sizes are >= 0")
    return v


class _DestRule(argparse.Action):
    """--allow-dest/--deny-dest share one ordered list: first match wins."""

    def __call__(self, parser, ns, value, option_string=None):
        allow = self.const
        try:
            rule = AddressRule.parse(value, option_string)
        except ConfigError as e:
            parser.error(str(e))
        rules = getattr(ns, "dest_rules", None) or []
        rules.append((allow, rule))
        ns.dest_rules = rules


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pep relay",
        description="RFC 8803 Transport Converter: accepts 0-RTT Convert requests over TCP "
                    "Fast Open, connects onward and splices the bytes between the two.",
        epilog="Prints 'listening on ADDR:PORT' per listener on stdout once ready. "
               "See docs/relay.md.")
    g = p.add_argument_group("listening")
    g.add_argument("--listen", action="append", metavar="ADDR:PORT", default=[],
                   help="address to listen on, repeatable; [v6addr]:port for IPv6; port 0 "
                        "picks one (default 127.0.0.1:1080)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes sharing the port through SO_REUSEPORT (default 1)")
    g.add_argument("--backlog", type=int, default=C.DEFAULT_BACKLOG, help="listen() backlog")
    g.add_argument("--tfo-queue", type=int, default=C.DEFAULT_TFO_QUEUE,
                   help="TCP_FASTOPEN queue length (pending 0-RTT handshakes)")

    g = p.add_argument_group("timeouts (seconds)")
    g.add_argument("--header-timeout", type=float, default=C.DEFAULT_HEADER_TIMEOUT,
                   help="time a client has to send its Convert message (default %(default)s)")
    g.add_argument("--connect-timeout", type=float, default=C.DEFAULT_CONNECT_TIMEOUT,
                   help="onward connect() limit, then Error 65 (default %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=C.DEFAULT_DRAIN_TIMEOUT,
                   help="after SIGTERM/SIGINT, time tunnels get to finish (default %(default)s)")
    g.add_argument("--stall-timeout", type=float, default=C.DEFAULT_STALL_TIMEOUT,
                   help="reset a tunnel holding bytes it cannot deliver, with nothing moving "
                        "or acknowledged, after this long; 0 = never (default %(default)s)")
    g.add_argument("--user-timeout", type=float, default=C.DEFAULT_USER_TIMEOUT,
                   help="TCP_USER_TIMEOUT on both sides: unacknowledged data older than this "
                        "ends the tunnel; 0 = kernel default (default %(default)s)")

    g = p.add_argument_group("TCP tuning per side (client side = toward the RFC 8803 clients)")
    g.add_argument("--client-cc", metavar="ALGO", help="TCP_CONGESTION toward clients "
                   "(default: kernel default)")
    g.add_argument("--server-cc", metavar="ALGO", help="TCP_CONGESTION toward destinations")
    for side, default in (("client", "4m"), ("server", "2m")):
        for kind in ("rcvbuf", "sndbuf"):
            g.add_argument(f"--{side}-{kind}", type=_size, default=default, metavar="BYTES",
                           help=f"SO_{kind.upper()} on the {side} side (the most a tunnel gets; "
                                f"a client's later tunnels get less, see --memory-per-client); "
                                f"0 = kernel autotuning (default {default})")
    g.add_argument("--nodelay", action=argparse.BooleanOptionalAction, default=True,
                   help="TCP_NODELAY on both sides (default on)")
    g.add_argument("--keepalive", type=int, default=0, metavar="SECONDS",
                   help="TCP keepalive probes after this many idle seconds (then every S/3, "
                        "3 unanswered end the tunnel); 0 = the kernel's "
                        "net.ipv4.tcp_keepalive_* (default)")
    g.add_argument("--pipe-size", type=_size, default=C.DEFAULT_PIPE_SIZE,
                   help="pipe size per busy direction, F_SETPIPE_SZ (default 1m)")
    g.add_argument("--pipe-pool", type=int, default=C.DEFAULT_PIPE_POOL,
                   help="idle pipes kept for reuse (default %(default)s)")

    g.add_argument("--engine", choices=("c", "python"),
                   default=os.environ.get("PEP_RELAY_ENGINE") or "c",
                   help="tunnel engine: c (librelaycore.so: accept, header, connect and data "
                        "path in C, every decision in Python) or python (all in Python) "
                        "(default: $PEP_RELAY_ENGINE, else c)")
    g = p.add_argument_group("proof of the client's address (docs/relay.md, threat model)")
    g.add_argument("--no-cookie", action="store_true",
                   help="accept data in a client's first SYN without a TFO cookie (0-RTT from "
                        "the first connection); only where ingress filtering stops forged "
                        "source addresses. Even then no client byte reaches a destination "
                        "before the client's handshake completes.")
    g.add_argument("--no-onward-tfo", dest="onward_tfo", action="store_false",
                   help="never put a client's early data in the onward SYN (by default a "
                        "verified client's early data rides in it, standard cookie TCP Fast "
                        "Open, toward destinations that support it; never a SYN larger than "
                        "the client's)")
    g.add_argument("--cookie-secret", action="append", default=[], metavar="FILE",
                   help="require an RFC 8803 Cookie TLV in every Connect: none gets Error 3 "
                        "with a cookie bound to the client's address, a wrong one Error 32. "
                        "FILE holds one secret a line (>= 16 bytes); repeat the option (or add "
                        "lines) to accept retiring secrets; new cookies come from the first.")
    g.add_argument("--tfo-key", metavar="FILE",
                   help="TCP Fast Open key for the listeners (TCP_FASTOPEN_KEY): 32 hex digits, "
                        "or 64 for a primary and a backup key. Relays behind one address "
                        "(ECMP, anycast) that share it accept each other's TFO cookies.")

    g = p.add_argument_group("access and limits")
    g.add_argument("--allow-dest", action=_DestRule, const=True, metavar="CIDR[:PORTS]",
                   help="allow destinations (also ones denied by default, e.g. 127.0.0.0/8); "
                        "with --deny-dest, first match in command-line order wins")
    g.add_argument("--deny-dest", action=_DestRule, const=False, metavar="CIDR[:PORTS]",
                   help="deny destinations (Error 32)")
    g.add_argument("--memory-per-client", type=_size, default=C.DEFAULT_MEMORY_PER_CLIENT,
                   metavar="BYTES", help="kernel memory (socket buffers + pipes, worst case) "
                   "one client's tunnels may commit, then Error 64; 0 = no limit (default 64m)")
    g.add_argument("--memory-budget", type=_size, default=None, metavar="BYTES",
                   help="the same for all tunnels together; 0 = no limit (default: 3/4 of "
                        "net.ipv4.tcp_mem's hard limit)")
    g.add_argument("--nat64-prefix", action="append", default=[], metavar="PREFIX",
                   help="a NAT64 prefix (/32, /40, /48, /56, /64 or /96) in use beside "
                        "64:ff9b::/96 and 64:ff9b:1::/48: destinations in it are also judged "
                        "as the IPv4 address they embed; repeatable")
    g.add_argument("--allow-client", action="append", default=[], metavar="CIDR",
                   help="only these clients may use the relay (others get Error 32); "
                        "repeatable")
    g.add_argument("--max-tunnels", type=int, default=C.DEFAULT_MAX_TUNNELS,
                   help="open tunnels per process, then Error 64 (default %(default)s)")
    g.add_argument("--max-per-client", type=int, default=C.DEFAULT_MAX_PER_CLIENT,
                   help="open tunnels per client (IPv4 address or IPv6 prefix) in the whole "
                        "relay (each of --workers N gets 1/N), 0 = unlimited, then Error 64 "
                        "(default %(default)s)")
    g.add_argument("--ipv6-prefix", type=int, default=C.DEFAULT_IPV6_PREFIX, metavar="BITS",
                   help="IPv6 clients are one client per prefix of this length for every "
                        "per-client limit (default %(default)s)")
    g.add_argument("--max-pending", type=int, default=C.DEFAULT_MAX_PENDING, metavar="N",
                   help="onward connects in progress in the whole relay (each of --workers N "
                        "gets 1/N), 0 = unlimited, then Error 64 (default %(default)s)")
    g.add_argument("--max-pending-per-client", type=int,
                   default=C.DEFAULT_MAX_PENDING_PER_CLIENT, metavar="N",
                   help="onward connects in progress per client (each of --workers N gets "
                        "1/N), 0 = unlimited (default %(default)s)")
    g.add_argument("--tunnel-rate", type=float, default=C.DEFAULT_TUNNEL_RATE, metavar="PER_S",
                   help="new tunnels a client may open per second (each of --workers N allows "
                        "1/N), 0 = unlimited, then Error 64 (default %(default)s; loopback "
                        "clients are exempt)")
    g.add_argument("--tunnel-burst", type=int, default=C.DEFAULT_TUNNEL_BURST, metavar="N",
                   help="new tunnels a client may open at once before --tunnel-rate applies "
                        "(default %(default)s)")
    g.add_argument("--syn-retries", type=int, default=C.DEFAULT_SYN_RETRIES, metavar="N",
                   help="TCP_SYNCNT of onward connects: SYN retransmissions before Error 65, "
                        "1-127 (default %(default)s)")

    g = p.add_argument_group("observability")
    g.add_argument("--stats", metavar="ADDR:PORT",
                   help="serve Prometheus text (any HTTP GET) on this address")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="info logs one line per tunnel (default info)")
    g.add_argument("--log-file", metavar="PATH", help="append logs here instead of stderr")
    g.add_argument("--no-tunnel-log", action="store_true",
                   help="no per-tunnel log lines (saves CPU at very high connection rates)")
    return p


def parse_config(argv) -> Config:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        listen = [_hostport(a, "--listen") for a in (ns.listen or ["127.0.0.1:1080"])]
        stats = _hostport(ns.stats, "--stats") if ns.stats else None
        clients = [AddressRule.parse(c, "--allow-client") for c in ns.allow_client]
    except ConfigError as e:
        p.error(str(e))
    nat64 = []
    for text in ns.nat64_prefix:
        try:
            net = ipaddress.IPv6Network(text, strict=True)
        except ValueError:
            p.error(f"--nat64-prefix {text!r}: not an IPv6 prefix")
        if net.prefixlen not in NAT64_LENGTHS:
            p.error(f"--nat64-prefix {text!r}: RFC 6052 prefixes are /32, /40, /48, /56, /64 "
                    "or /96")
        nat64.append(net)
    if ns.workers < 1:
        p.error("--workers must be >= 1")
    for name in ("header_timeout", "connect_timeout", "drain_timeout"):
        if getattr(ns, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if ns.stall_timeout < 0 or ns.user_timeout < 0:
        p.error("--stall-timeout and --user-timeout must be >= 0")
    if ns.max_tunnels < 1 or ns.max_per_client < 0:
        p.error("--max-tunnels must be >= 1 and --max-per-client >= 0")
    if not 0 <= ns.ipv6_prefix <= 128:
        p.error("--ipv6-prefix must be 0-128")
    if ns.max_pending < 0 or ns.max_pending_per_client < 0 or ns.tunnel_rate < 0 \
            or ns.tunnel_burst < 1:
        p.error("--max-pending*, --tunnel-rate must be >= 0 and --tunnel-burst >= 1")
    if not 1 <= ns.syn_retries <= 127:
        p.error("--syn-retries must be 1-127")
    if ns.keepalive < 0:
        p.error("--keepalive must be >= 0")
    if ns.pipe_size < 4096:
        p.error("--pipe-size must be at least 4096")
    try:
        secrets = load_secrets(ns.cookie_secret)
    except SecretError as e:
        p.error(f"--cookie-secret {e}")
    try:
        tfo_key = load_tfo_key(ns.tfo_key) if ns.tfo_key else None
    except SecretError as e:
        p.error(f"--tfo-key {e}")
    return Config(
        listen=listen,
        header_timeout=ns.header_timeout,
        connect_timeout=ns.connect_timeout,
        drain_timeout=ns.drain_timeout,
        stall_timeout=ns.stall_timeout,
        user_timeout=ns.user_timeout,
        memory_per_client=ns.memory_per_client,
        memory_budget=ns.memory_budget,
        client=SideOptions(ns.client_cc, ns.client_rcvbuf, ns.client_sndbuf),
        server=SideOptions(ns.server_cc, ns.server_rcvbuf, ns.server_sndbuf),
        nodelay=ns.nodelay,
        keepalive=ns.keepalive,
        pipe_size=ns.pipe_size,
        pipe_pool=ns.pipe_pool,
        dest_rules=getattr(ns, "dest_rules", None) or [],
        allow_clients=clients,
        max_tunnels=ns.max_tunnels,
        max_per_client=ns.max_per_client,
        ipv6_prefix=ns.ipv6_prefix,
        max_pending=ns.max_pending,
        max_pending_per_client=ns.max_pending_per_client,
        tunnel_rate=ns.tunnel_rate,
        tunnel_burst=ns.tunnel_burst,
        syn_retries=ns.syn_retries,
        nat64_prefixes=nat64,
        backlog=ns.backlog,
        tfo_queue=ns.tfo_queue,
        workers=ns.workers,
        stats=stats,
        log_tunnels=not ns.no_tunnel_log,
        log_level=ns.log_level,
        log_file=ns.log_file,
        no_cookie=ns.no_cookie,
        onward_tfo=ns.onward_tfo,
        cookie_secrets=secrets,
        tfo_key=tfo_key,
        engine=ns.engine,
    )


def _check_cc(cfg: Config) -> None:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            avail = f.read().split()
    except OSError:
        return
    for side, opt in ((cfg.client, "--client-cc"), (cfg.server, "--server-cc")):
        if side.cc and side.cc not in avail:
            raise SystemExit(f"pep relay: {opt} {side.cc}: not available "
                             f"(have: {' '.join(avail)}; try modprobe tcp_{side.cc})")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    cfg = parse_config(argv)
    handler = logging.FileHandler(cfg.log_file) if cfg.log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s pep-relay[%(process)d] %(levelname)s "
                                           "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(getattr(logging, cfg.log_level.upper()))
    log.propagate = False
    _check_cc(cfg)
    from .server import run
    try:
        return run(cfg)
    except OSError as e:
        log.error("%s", e)
        print(f"pep relay: {e}", file=sys.stderr)
        return 1
