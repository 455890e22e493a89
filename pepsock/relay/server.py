"""The relay process: epoll loop, TFO listeners, timers, signals, drain,
the stats endpoint, and --workers N processes sharing a port (SO_REUSEPORT).

One thread, one epoll set per process.  Handlers are plain callables looked up
by fd; timers live in a heap with lazy cancellation.  Signals reach the loop
through signal.set_wakeup_fd, so SIGTERM is seen at once, not after the next
socket event.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import resource
import select
import signal
import socket
import sys
import time

from .. import tfo
from ..policy import normalize_ip
from ..protocol import ErrorCode, error_reply
from . import routability
from . import stats as S
from .admission import Admission
from .budget import make_budget
from .clients import client_key
from .cookies import TCP_FASTOPEN_KEY, Cookies
from .ratelimit import LogLimiter, TokenBuckets
from .config import DEFAULT_MAX_TUNNELS, Config, worker_share
from .context import TunnelContext
from .pipes import PipePool
from .reactor import ACCEPT_PAUSE, Reactor
from .sockopts import apply_side, keepalive_limit
from .tunnel import Closer, Tunnel, fmt_addr
from .workers import Supervisor

log = logging.getLogger("pepsock.relay")

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
#: accept() calls per listener wakeup: bounded so one busy listener cannot
#: starve the tunnels already open.
ACCEPT_BATCH = 64
#: How long an Error reply's connection may linger waiting for the client's FIN.
LINGER_TIMEOUT = 2.0
STATS_FLUSH = 1.0
#: fds one tunnel needs: its two sockets.  Pipes come on top while a direction
#: is busy; when none can be had (EMFILE) the direction copies through user
#: space instead (Tunnel._copy), so running out of fds never wedges a tunnel.
FDS_PER_TUNNEL = 2
#: fds kept for listeners, epoll, stats, signals, logs, pipes and Error
#: replies in flight (at most a quarter of the limit).
FD_RESERVE = 256


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit (and the hard one if we may) to `want`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
        except (ValueError, OSError):
            pass
    new = want if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def make_listener(host: str, port: int, cfg: Config, reuseport: bool, listen: bool = True):
    """A TFO listening socket (or, with listen=False, just bound: used by the
    master to resolve port 0 before the workers bind the same port)."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit buffers, congestion control and TCP_NODELAY;
        # buffers must be in place before listen() for the SYN-ACK's window scale.
        apply_side(sock, cfg.client, cfg.nodelay, cfg.keepalive, cfg.user_timeout)
        sock.bind(sockaddr)
        if listen:
            sock.setsockopt(socket.IPPROTO_TCP, tfo.TCP_FASTOPEN, cfg.tfo_queue)
            if cfg.tfo_key:
                # Its own key instead of the namespace's random one: relays that
                # share it accept each other's TFO cookies (behind ECMP).
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_KEY, cfg.tfo_key)
            # By default the kernel takes SYN data only with a TFO cookie it gave
            # that address: return routability before any onward action
            # (routability.py).  --no-cookie waives it; the tunnel then waits
            # for the client's handshake instead.
            if cfg.no_cookie:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, tfo.TCP_FASTOPEN_NO_COOKIE, 1)
                except OSError:
                    log.warning("kernel lacks TCP_FASTOPEN_NO_COOKIE: --no-cookie has no "
                                "effect, clients need a TFO cookie")
            sock.listen(cfg.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


#: Renders of the stats text: one a second, a burst of 5; requests beyond
#: get the last text (cached).  Issue 16 measured ~6,000 stats requests/s
#: taking the relay's CPU from 40 to 85 % and bulk from 1,600 to 650 MB/s;
#: a scraper every few seconds always gets fresh numbers.
STATS_RENDERS = (1.0, 5)
#: Stats connections served at once; more are closed at accept.
MAX_STATS_CLIENTS = 8
#: Stats connections accepted per second (burst as many): past it the stats
#: listener is not polled for ACCEPT_PAUSE, so a flood waits in (and then
#: overflows) its backlog at no cost to the relay.  Each request costs ~70 us
#: of relay CPU, rendering or not (accept, read, write, close).
STATS_ACCEPTS = (20.0, 20)


class StatsServer:
    """HTTP/1.0 on one port: any GET answers the Prometheus text."""

    def __init__(self, loop, addr, render):
        self.loop = loop
        self._render = render
        self._cached = None
        self._renders = TokenBuckets(*STATS_RENDERS)
        self._accepts = TokenBuckets(*STATS_ACCEPTS)
        self.clients = 0
        self.sock = make_plain_listener(*addr)
        self.address = self.sock.getsockname()
        loop.register(self.sock.fileno(), self.on_accept, select.EPOLLIN)

    def render(self) -> str:
        if self._cached is None or self._renders.allow("render", time.monotonic()):
            self._cached = self._render()
        return self._cached

    def on_accept(self, ev):
        while True:
            if not self._accepts.allow("accept", time.monotonic()):
                self.loop.pause_listener(self.sock.fileno())
                return
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.loop.pause_listener(self.sock.fileno())
                return
            if self.clients >= MAX_STATS_CLIENTS:
                sock.close()
                continue
            _StatsClient(self.loop, sock, self)

    def close(self):
        self.loop.forget(self.sock.fileno())
        self.sock.close()


#: How long a stats connection may take, request and answer, before it is closed.
STATS_CLIENT_TIMEOUT = 2.0


class _StatsClient:
    """One stats request.  Never blocks the loop: the answer is written as
    the socket takes it (EPOLLOUT), and a client that reads too slowly is
    closed after STATS_CLIENT_TIMEOUT like one that never asks."""

    def __init__(self, loop, sock, server):
        self.loop, self.sock, self.server = loop, sock, server
        self.render = server.render
        server.clients += 1
        self.buf = b""
        self.out = None         # the answer not yet written, once rendered
        sock.setblocking(False)
        self.fd = sock.fileno()
        loop.register(self.fd, self.on_event, select.EPOLLIN)
        self.timer = loop.call_later(STATS_CLIENT_TIMEOUT, self.close)

    def on_event(self, ev):
        if self.out is not None:
            return self._write()
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            return self.close()
        self.buf += data
        if data and b"\r\n\r\n" not in self.buf and b"\n\n" not in self.buf \
                and len(self.buf) < 8192:
            return
        body = self.render().encode()
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.out = memoryview(head + body)
        self._write()

    def _write(self):
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            n = 0
        except OSError:
            return self.close()
        self.out = self.out[n:]
        if not self.out:
            return self.close()
        self.loop.rebind(self.fd, self.on_event, select.EPOLLOUT)

    def close(self):
        if self.fd >= 0:
            self.timer.cancel()
            self.loop.forget(self.fd)
            self.sock.close()
            self.fd = -1
            self.server.clients -= 1


def make_plain_listener(host, port):
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    sock.listen(64)
    return sock


class Loop(Reactor):
    """One process's relay: listeners, accept, the tunnels, signals, drain.
    Tunnels get `ctx` (context.TunnelContext), not the loop."""

    def __init__(self, cfg: Config, stats: S.Stats | None = None):
        super().__init__()
        self.cfg = cfg
        self.stats = stats or S.Stats()
        self.pipes = PipePool(cfg.pipe_size, cfg.pipe_pool)
        self.tunnels: set[Tunnel] = set()
        self.ctx = TunnelContext(
            cfg, self.stats, self.pipes, self, self.tunnel_done,
            cookies=Cookies(cfg.cookie_secrets) if cfg.cookie_secrets else None,
            linger_timeout=LINGER_TIMEOUT)
        self.listeners: list[socket.socket] = []
        self._accept_warned = False
        self.stopping = False
        self.drain_deadline = None
        self.log_limit = LogLimiter()
        self.on_signal = None
        self._sig_r = self._sig_w = None

    @property
    def admission(self) -> Admission | None:
        return self.ctx.admission

    @admission.setter
    def admission(self, adm: Admission) -> None:
        self.ctx.admission = adm

    @property
    def clients_unverified(self) -> bool:
        return self.ctx.clients_unverified

    @clients_unverified.setter
    def clients_unverified(self, value: bool) -> None:
        self.ctx.clients_unverified = value

    # -- listeners and accept ------------------------------------------------------------
    def add_listener(self, sock: socket.socket) -> None:
        self.listeners.append(sock)
        self.register(sock.fileno(), lambda ev, s=sock: self.on_accept(s), select.EPOLLIN)

    def on_accept(self, lsock: socket.socket) -> None:
        adm = self.admission
        st = self.stats.v
        family = lsock.family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = lsock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._accept_warned:
                        self._accept_warned = True
                        log.warning("accept: %s (pausing the listener %.1fs at a time)",
                                    e.strerror, ACCEPT_PAUSE)
                    self.pause_listener(lsock.fileno())
                return
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            now = time.monotonic()
            st[S.TUNNELS_TOTAL] += 1
            try:
                handshaking, syn_data, syn_payload = routability.accept_facts(sock)
            except OSError:
                handshaking, syn_data, syn_payload = False, False, 0
            if syn_data:
                st[S.SYN_DATA] += 1
            ip = str(normalize_ip(addr[0])) if ":" in addr[0] else addr[0]
            key, exempt, sizes, refusal = adm.admit(ip, now, self.cfg.ipv6_prefix)
            if refusal is not None:
                code, value, why = refusal
                self._refuse(sock, addr, code, why, value)
                continue
            st[S.TUNNELS_OPEN] += 1
            t = Tunnel(self.ctx, sock, (ip, addr[1]), now, key, exempt, sizes,
                       handshaking=handshaking, syn_payload=syn_payload)
            # In the set before start(): a tunnel may end inside start().
            self.tunnels.add(t)
            t.start()

    def _refuse(self, sock, addr, code: ErrorCode, why: str, value: bytes = b""):
        # Counted when sent: an unverified client gets it after its handshake, or never.
        Closer(self.ctx, sock, error_reply(code, value), registered=False, code=code)
        if self.cfg.log_tunnels and self._log_allowed(addr[0]):
            log.info("tunnel client=%s dest=- up=0 down=0 duration=0.000s outcome=error %d (%s)",
                     fmt_addr(addr), int(code), why)

    def _log_allowed(self, ip: str) -> bool:
        """Refusals are logged within LogLimiter's rates, per client."""
        return self.log_limit.allow(client_key(ip, self.cfg.ipv6_prefix), time.monotonic())

    def tunnel_done(self, t: Tunnel) -> None:
        if t in self.tunnels:
            self.tunnels.discard(t)
            self.admission.release(t.client_key)
            self.admission.budget.release(t.client_key, t.sizes)
            self.stats.v[S.TUNNELS_OPEN] -= 1
        if self.cfg.log_tunnels and (not t.outcome.startswith("error")
                                     or self._log_allowed(t.client_ip)):
            log.info("%s", t.log_line(time.monotonic()))

    # -- signals and drain ------------------------------------------------------------------
    def install_signals(self, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda n, f: None)
        self.register(self._sig_r.fileno(), self._on_wakeup, select.EPOLLIN)

    def _on_wakeup(self, ev) -> None:
        try:
            data = self._sig_r.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            if self.on_signal is not None:
                self.on_signal(signum)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.drain()

    def drain(self) -> None:
        """Stop accepting; let open tunnels finish until --drain-timeout."""
        if self.stopping:
            log.warning("second signal: resetting %d tunnels now", len(self.tunnels))
            self.abort_all()
            return
        self.stopping = True
        for sock in self.listeners:
            self.forget(sock.fileno())
            sock.close()
        self.listeners.clear()
        log.info("draining %d tunnels (up to %.1fs)", len(self.tunnels), self.cfg.drain_timeout)
        self.call_later(self.cfg.drain_timeout, self.abort_all)

    def start_timers(self) -> None:
        """The periodic jobs: the stall sweep and the log limiter's summary."""
        self.log_limit.since = time.monotonic()

        def summary():
            line = self.log_limit.summary(time.monotonic())
            if line:
                log.warning("%s", line)
            self.call_later(self.log_limit.every, summary)
        self.call_later(self.log_limit.every, summary)
        self.start_stall_sweep()

    def start_stall_sweep(self) -> None:
        """Every quarter of --stall-timeout (at most every 0.25 s), look for
        tunnels that hold bytes and move none (Tunnel.check_stall)."""
        timeout = self.cfg.stall_timeout
        if not timeout:
            return
        every = max(0.25, timeout / 4)

        def sweep():
            now = time.monotonic()
            for t in list(self.tunnels):
                t.check_stall(now, timeout)
            self.call_later(every, sweep)
        self.call_later(every, sweep)

    def abort_all(self) -> None:
        for t in list(self.tunnels):
            t.abort("drain timeout")
        self.running = False

    def gauges(self) -> None:
        """Refresh the gauges kept outside the hot path."""
        v = self.stats.v
        v[S.PIPES] = self.pipes.open
        v[S.MEMORY_COMMITTED] = self.admission.budget.committed
        v[S.PIPE_BYTES] = sum(d.held for t in self.tunnels for d in (t.up, t.down)
                              if d is not None)

    # -- run ----------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self.stopping and not self.tunnels and not self.ctx.closers

    def close(self) -> None:
        super().close()
        self.pipes.close_all()


# ------------------------------------------------------------------------------------------
# Process level: one loop, or a master and N workers.


def _warnings(cfg: Config, bound, warnings) -> None:
    for text in [*warnings, *_shares_warnings(cfg)]:
        log.warning("%s", text)
    if not cfg.allow_clients:
        for addr in bound:
            ip = ipaddress.ip_address(addr[0])
            if not ip.is_loopback:
                log.warning("listening on %s with no --allow-client: anyone who can reach "
                            "it may relay through this host", fmt_addr(addr))
                break


def _shares_warnings(cfg: Config) -> list[str]:
    """Relay-wide limits too small to split between the workers."""
    n = cfg.workers
    return [f"{flag} {limit} with --workers {n}: each worker allows 1, so the relay allows "
            f"up to {n}" for flag, limit in (("--max-per-client", cfg.max_per_client),
                                            ("--max-pending-per-client",
                                             cfg.max_pending_per_client),
                                            ("--max-pending", cfg.max_pending))
            if n > 1 and 0 < limit < n]


def _admission(cfg: Config, bound) -> Admission:
    """This process's admission.  The limits on one client (tunnels, new
    tunnels a second, onward connects in progress) and the relay's total of
    onward connects hold for the relay: with --workers N each worker gets
    1/N of them, as of the memory budgets (budget.make_budget).  SO_REUSEPORT
    spreads a client's connections over the workers by their ports, so a
    client may meet a limit a little before its full count (docs/relay.md).
    --max-tunnels stays per process: it follows the process's fd limit."""
    n = max(1, cfg.workers)
    extra = []
    public = False
    for addr in bound:
        ip = ipaddress.ip_address(addr[0])
        public = public or not ip.is_loopback
        if not ip.is_unspecified:
            extra.append(ip)
    adm = Admission(cfg.dest_rules, cfg.allow_clients, cfg.max_tunnels,
                    worker_share(cfg.max_per_client, n),
                    extra_local=extra, max_pending=worker_share(cfg.max_pending, n),
                    max_pending_per_client=worker_share(cfg.max_pending_per_client, n),
                    rate=cfg.tunnel_rate / n, burst=max(1.0, cfg.tunnel_burst / n),
                    public=public, nat64=cfg.nat64_prefixes)
    adm.listen_ports = {addr[1] for addr in bound}
    adm.budget = make_budget(cfg)
    return adm


def _announce(bound, stats_addr, out=None) -> None:
    out = out or sys.stdout
    for addr in bound:
        out.write(f"listening on {fmt_addr(addr)}\n")
    if stats_addr is not None:
        out.write(f"stats on {fmt_addr(stats_addr)}\n")
    out.flush()


def make_loop(cfg: Config, unverified: bool) -> Loop:
    """One process's loop on the engine asked for (--engine); the Python
    engine when the C one cannot load (no cffi, no library), said at startup."""
    if cfg.engine == "c":
        from .engine import CoreLoop, available
        why = available()
        if why is None:
            loop = CoreLoop(cfg, clients_unverified=unverified)
            log.debug("engine: c (%s)", loop.library)
            return loop
        log.info("engine: python (%s)", why)
    loop = Loop(cfg)
    loop.clients_unverified = unverified
    return loop


def run(cfg: Config) -> int:
    if cfg.user_timeout:
        cfg.user_timeout = min(cfg.user_timeout, keepalive_limit(cfg.keepalive))
    want = cfg.max_tunnels * 2 + cfg.pipe_pool * 2 + 4096
    soft, hard = raise_nofile(want)
    if soft < want:
        # Cap the tunnels to what the fds fit, so the excess gets Error 64
        # instead of failing accept() or socket() (tests/test_reliability_relay.py).
        fit = max(1, (soft - min(FD_RESERVE, soft // 4)) // FDS_PER_TUNNEL)
        # Only a limit the user asked for deserves a warning; the default just adapts.
        level = logging.INFO if cfg.max_tunnels == DEFAULT_MAX_TUNNELS else logging.WARNING
        log.log(level, "RLIMIT_NOFILE is %d, below the %d that --max-tunnels %d needs; "
                    "serving at most %d tunnels", soft, want, cfg.max_tunnels,
                    min(fit, cfg.max_tunnels))
        cfg.max_tunnels = min(fit, cfg.max_tunnels)
    if cfg.workers > 1:
        return _run_master(cfg)
    warnings, unverified = routability.startup_warnings(cfg.no_cookie)
    loop = make_loop(cfg, unverified)
    listeners = [make_listener(h, p, cfg, reuseport=False) for h, p in cfg.listen]
    bound = [s.getsockname() for s in listeners]
    loop.admission = _admission(cfg, bound)
    for s in listeners:
        loop.add_listener(s)
    loop.start_timers()
    loop.install_signals()
    stats_addr = None
    if cfg.stats:
        stats_addr = StatsServer(loop, cfg.stats, lambda: S.render(_live(loop))).address
    _warnings(cfg, bound, warnings)
    _announce(bound, stats_addr)
    try:
        loop.run()
    finally:
        loop.close()
    log.info("stopped")
    return 0


def _gauges(loop: Loop) -> None:
    """Refresh the gauges kept outside the hot path."""
    loop.gauges()


def _live(loop: Loop) -> list[int]:
    _gauges(loop)
    return list(loop.stats.v)


def _worker(cfg: Config, bound, slot: int, shared: S.SharedSlots, ready_fd: int,
            unverified: bool) -> int:
    loop = make_loop(cfg, unverified)
    listeners = [make_listener(a[0], a[1], cfg, reuseport=True) for a in bound]
    loop.admission = _admission(cfg, bound)
    for s in listeners:
        loop.add_listener(s)
    loop.start_timers()
    # Ctrl-C reaches the whole process group; the master turns it into one
    # SIGTERM per worker, so a worker ignores SIGINT (else one Ctrl-C would
    # count as two signals and reset every tunnel instead of draining).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.install_signals((signal.SIGTERM,))

    def flush():
        _gauges(loop)
        shared.store(slot, loop.stats)
        loop.call_later(STATS_FLUSH, flush)

    flush()
    try:
        os.write(ready_fd, b"r")
    except BrokenPipeError:
        # A worker restarted after a crash: the master closed its end of the
        # pipe at once (nobody waits). Dying here made every restart fail and
        # restart again, forever (tests/test_reliability_relay.py).
        pass
    os.close(ready_fd)
    try:
        loop.run()
    finally:
        loop.stats.v[S.PIPES] = loop.stats.v[S.PIPE_BYTES] = 0
        loop.stats.v[S.MEMORY_COMMITTED] = 0
        shared.store(slot, loop.stats)
        loop.close()
    return 0


def _run_master(cfg: Config) -> int:
    # Resolve port 0 once: bind (no listen) with SO_REUSEPORT, keep it bound so
    # the port stays ours, and let every worker bind+listen on the same address.
    warnings, unverified = routability.startup_warnings(cfg.no_cookie)
    holders = [make_listener(h, p, cfg, reuseport=True, listen=False) for h, p in cfg.listen]
    bound = [s.getsockname() for s in holders]
    shared = S.SharedSlots(cfg.workers)

    def work(slot: int, ready_fd: int) -> int:
        for s in holders:
            s.close()
        return _worker(cfg, bound, slot, shared, ready_fd, unverified)

    sup = Supervisor(cfg.workers, cfg.drain_timeout, work)
    sup.start()
    loop = Loop(cfg)
    loop.admission = _admission(cfg, bound)
    sup.attach(loop)
    loop.install_signals()
    signal.signal(signal.SIGCHLD, lambda n, f: None)
    stats_addr = None
    if cfg.stats:
        stats_addr = StatsServer(loop, cfg.stats,
                                 lambda: S.render(shared.total(), cfg.workers)).address
    _warnings(cfg, bound, warnings)
    _announce(bound, stats_addr)
    sup.reap()
    try:
        loop.run()
    finally:
        loop.close()
        for s in holders:
            s.close()
    return 0
