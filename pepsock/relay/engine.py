"""The C engine (`pep relay --engine c`): librelaycore.so moves the bytes,
this module decides.

The core (relaycore/, see relaycore.h) accepts on the listeners, reads and
parses the Convert header, connects onward, sends the Success reply, runs the
data path and the Error replies' clean close, with its own timers.  It hands
back records in batches; here each one meets the same policy the Python
engine (tunnel.py) applies: --allow-client, admission (tunnel limits, rates,
pending connects), the memory budget, the Cookie TLV check, the route rules,
the TCP options a Connect may ask for.  Python answers each new tunnel with
one call: rc_connect() or rc_refuse().

Unverified clients (--no-cookie) are held in the core (T_HELD) until their
handshake completes; Python learns of it when a held reply goes out
(RC_REPLIED), the tunnel opens (RC_CONNECTED) or expires (RC_ENDED, expired).

One loop turn is one wait in the core (run(): rc_wait, with this reactor's
own epoll set as one fd of the core's); the core's timers live in C.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from socket import AF_INET, AF_INET6, inet_ntop

from ..policy import normalize_ip
from ..protocol import ErrorCode, error_for_connect_failure, error_reply
from . import routability
from . import stats as S
from .admission import RETRY_AFTER, ConnectVerdicts
from .core import load, loaded_path
from .onward import connect_limit
from .server import LINGER_TIMEOUT, Loop
from .tunnel import INFO_REPLY, MAX_CLOSERS, fmt_addr, options_refusal

log = logging.getLogger("pepsock.relay")

# enum rc_record_kind / rc_header_state (relaycore.h)
RC_NEW, RC_HEADER, RC_CONNECTED, RC_CONNECT_FAILED, RC_ENDED, RC_ACCEPT_ERROR, RC_REPLIED = \
    range(1, 8)
HDR_NONE, HDR_CONNECT, HDR_INFO, HDR_BAD, HDR_TIMEOUT, HDR_GONE = range(6)


class CTunnel:
    """What Python keeps of a tunnel the core runs: its policy state."""

    __slots__ = ("id", "client_addr", "client_ip", "client_key", "exempt", "sizes", "dest",
                 "t0", "pending_slot", "family", "syn_payload", "held_outcome")

    def __init__(self, tid, client_addr, key, exempt, sizes, now, family, syn_payload):
        self.id = tid
        self.client_addr = client_addr
        self.client_ip = client_addr[0]
        self.client_key = key
        self.exempt = exempt
        self.sizes = sizes
        self.dest = None
        self.t0 = now
        self.pending_slot = False
        self.family = family
        self.syn_payload = syn_payload
        #: The log outcome of a reply the core holds until the client's
        #: handshake completes (an unverified client); None: none held.
        self.held_outcome = None


def _sysctl_int(name: str) -> int | None:
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def available() -> str | None:
    """None if the C engine can run here, else why not."""
    try:
        load()
    except (ImportError, OSError) as e:
        return str(e)
    return None


class CoreLoop(Loop):
    """A relay process whose tunnels run in librelaycore.so."""

    def __init__(self, cfg, stats=None, clients_unverified: bool = False):
        super().__init__(cfg, stats)
        self.clients_unverified = clients_unverified
        self.ffi, self.lib = load()
        self.library = loaded_path()
        ffi = self.ffi
        c = ffi.new("struct rc_config *")
        c.header_timeout = cfg.header_timeout
        c.connect_limit = connect_limit(cfg.syn_retries, cfg.connect_timeout)
        c.linger_timeout = LINGER_TIMEOUT
        c.stall_timeout = cfg.stall_timeout or 0.0
        c.pipe_size = cfg.pipe_size
        c.pipe_pool = cfg.pipe_pool
        c.max_closers = MAX_CLOSERS
        c.server_rcvbuf = cfg.server.rcvbuf or 0
        c.server_sndbuf = cfg.server.sndbuf or 0
        c.nodelay = int(cfg.nodelay)
        c.keepalive = cfg.keepalive
        c.user_timeout_ms = int(cfg.user_timeout * 1000)
        # TCP_SYNCNT only when it differs from the namespace's default: one
        # setsockopt less per tunnel.
        c.syn_retries = -1 if cfg.syn_retries == _sysctl_int("tcp_syn_retries") \
            else cfg.syn_retries
        cc = (cfg.server.cc or "").encode()[:15]
        c.server_cc = cc
        c.clients_unverified = int(clients_unverified)
        c.unverified_syn_window = routability.UNVERIFIED_SYN_WINDOW
        c.unverified_user_timeout_ms = routability.UNVERIFIED_USER_TIMEOUT_MS
        recs = ffi.new("struct rc_record **")
        self.core = ffi.gc(self.lib.rc_new(c, recs), self.lib.rc_free)
        if self.core == ffi.NULL:
            raise OSError(errno.ENOMEM, "librelaycore: rc_new failed")
        self.recs = recs[0]
        self.counters = self.lib.rc_counters(self.core)
        self.conn = ffi.new("struct rc_connect *")
        self.ctunnels: dict[int, CTunnel] = {}
        self.verdicts: ConnectVerdicts | None = None
        self._adm = None
        self._pipe_warned = False

    @Loop.admission.setter
    def admission(self, adm) -> None:
        self.ctx.admission = adm
        self._adm = adm         # the per-tunnel paths read it without the property
        self.verdicts = ConnectVerdicts(adm)

    # -- listeners ---------------------------------------------------------------------
    def add_listener(self, sock: socket.socket) -> None:
        self.listeners.append(sock)
        err = self.lib.rc_add_listener(self.core, sock.fileno())
        if err:
            raise OSError(-err, os.strerror(-err))

    # -- the core's turns ---------------------------------------------------------------
    def run(self) -> None:
        """The reactor's loop, with one wait per turn: the core's epoll set
        holds this reactor's own set as one fd (signals, the stats server),
        so a turn is one epoll_wait in C, not one here and one in C."""
        self.quiet_gc()
        ffi, lib, core = self.ffi, self.lib, self.core
        err = lib.rc_set_external(core, self.ep.fileno())
        if err:
            raise OSError(-err, os.strerror(-err))
        external = ffi.new("int *")
        rc_wait = lib.rc_wait
        poll = self.ep.poll
        counters = self.counters
        while self.running:
            timeout = self.next_timeout()
            if self.should_stop():
                break
            n = rc_wait(core, -1 if timeout is None else math.ceil(timeout * 1000), external)
            if n:
                self._records(n)
            if external[0]:
                self.closed.clear()
                self.dispatch(poll(0, 64))
            self.run_due_timers()
            if not self._pipe_warned and counters.pipe_refused:
                self._warn_pipe()

    def _warn_pipe(self) -> None:
        self._pipe_warned = True
        log.warning("F_SETPIPE_SZ %d refused, pipes are %d bytes (fs.pipe-max-size, "
                    "fs.pipe-user-pages-soft)", self.cfg.pipe_size, self.counters.pipe_cap)

    def _records(self, n: int) -> None:
        recs = self.recs
        i = 0
        while True:
            while i < n:
                r = recs[i]
                i += 1
                kind = r.kind
                if kind == RC_ENDED:
                    self._ended(r)
                elif kind == RC_NEW:
                    self._new(r)
                elif kind == RC_CONNECTED:
                    self._connected(r)
                elif kind == RC_HEADER:
                    t = self.ctunnels.get(r.id)
                    if t is not None:
                        self._header(t, r)
                elif kind == RC_CONNECT_FAILED:
                    self._connect_failed(r)
                elif kind == RC_REPLIED:
                    self._replied(r)
                elif kind == RC_ACCEPT_ERROR:
                    if not self._accept_warned:
                        self._accept_warned = True
                        log.warning("accept: %s (pausing the listener 0.1s at a time)",
                                    os.strerror(r.err))
            # rc_connect() may have added records (a destination that answered
            # inside connect()).
            n = self.lib.rc_count(self.core)
            if i >= n:
                return

    # -- a new tunnel: the accept-time policy (server.Loop.on_accept) --------------------
    def _new(self, r) -> None:
        st = self.stats.v
        st[S.TUNNELS_TOTAL] += 1
        if r.syn_data:
            st[S.SYN_DATA] += 1
        ffi = self.ffi
        if r.family == AF_INET:
            ip = inet_ntop(AF_INET, ffi.buffer(r.client_addr, 4))
        else:
            ip = str(normalize_ip(inet_ntop(AF_INET6, ffi.buffer(r.client_addr, 16))))
        addr = (ip, r.client_port)
        if r.hdr == HDR_GONE:   # failed before a byte; the core closed it
            if self.cfg.log_tunnels and self._log_allowed(ip):
                log.info("tunnel client=%s dest=- up=0 down=0 duration=0.000s "
                         "outcome=reset (client error in header)", fmt_addr(addr))
            return
        adm = self._adm
        now = time.monotonic()
        key, exempt, sizes, refusal = adm.admit(ip, now, self.cfg.ipv6_prefix)
        if refusal is not None:
            code, value, why = refusal
            return self._refuse(r.id, addr, code, why, value)
        st[S.TUNNELS_OPEN] += 1
        if r.unverified:
            st[S.UNVERIFIED] += 1
        t = CTunnel(r.id, addr, key, exempt, sizes, now, r.family, r.syn_payload)
        self.ctunnels[r.id] = t
        if sizes is not None:
            full = adm.budget.full
            rcv = sizes.client_rcv // 2 if sizes.client_rcv < full.client_rcv else 0
            snd = sizes.client_snd // 2 if sizes.client_snd < full.client_snd else 0
            if rcv or snd:
                self.lib.rc_client_buffers(self.core, r.id, rcv, snd)
        self._header(t, r)

    def _refuse(self, tid, addr, code, why, value=b""):
        """A refusal at accept: the reply, logged within the log limiter.
        Counted when sent: an unverified client gets it after its handshake,
        or never (RC_REPLIED)."""
        reply = error_reply(code, value)
        if not self.lib.rc_refuse(self.core, tid, reply, len(reply), int(code), 0):
            self.stats.error(code)
        if self.cfg.log_tunnels and self._log_allowed(addr[0]):
            log.info("tunnel client=%s dest=- up=0 down=0 duration=0.000s outcome=error %d (%s)",
                     fmt_addr(addr), int(code), why)

    # -- the header: Connect policy (tunnel.Tunnel._read_header, _connect) -----------------
    def _header(self, t: CTunnel, r) -> None:
        hdr = r.hdr
        if hdr == HDR_CONNECT:
            return self._connect(t, r, bool(r.unverified))
        if hdr == HDR_NONE:
            self.lib.rc_wait_header(self.core, t.id)
        elif hdr == HDR_INFO:
            self._reply(t, INFO_REPLY, "info")
        elif hdr == HDR_BAD:
            code = ErrorCode(r.err)
            self._fail(t, code, b"", f"bad header: {code.name}")
        elif hdr == HDR_TIMEOUT:
            self._fail(t, ErrorCode.MALFORMED_MESSAGE, b"", "header timeout")

    def _connect(self, t: CTunnel, r, unverified: bool) -> None:
        ffi = self.ffi
        port = r.dest_port
        # Admission.judge_connect, remembered while its route answers hold.
        refusal, family, packed, text = self.verdicts.judge(
            t.client_ip, t.exempt, bytes(ffi.buffer(r.dest_addr, 16)), port, time.monotonic())
        t.dest = (text, port)
        if self.ctx.cookies is not None and not self._cookie_accepted(t, r, unverified):
            return
        if r.nkinds:
            refused = options_refusal(bytes(ffi.buffer(r.kinds, r.nkinds)))
            if refused is not None:
                return self._fail(t, *refused)
        if refusal is not None:
            return self._fail(t, *refusal)
        adm = self._adm
        busy = adm.take_pending(t.client_key, t.exempt)
        if busy is not None:
            return self._fail(t, ErrorCode.RESOURCE_EXCEEDED, RETRY_AFTER, busy)
        t.pending_slot = True
        c = self.conn
        cfg = self.cfg
        c.family = family
        ffi.memmove(c.addr, packed, len(packed))
        c.port = port
        c.syn_room = 0
        if t.syn_payload and r.early and cfg.onward_tfo:
            # Onward TFO: the relay's SYN may carry this much of the early data
            # (never more than the client's SYN: RFC 8803 section 9.3; never
            # for an unverified client, the core sees to that).
            c.syn_room = routability.onward_syn_room(t.family, c.family, t.syn_payload,
                                                     not self.clients_unverified)
        # Unverified, everything read so far came in the client's SYN: the
        # onward SYN may not be larger (RFC 8803 section 9.3); else it waits.
        c.hold = unverified and not routability.onward_syn_fits(t.family, c.family, r.got)
        sizes = t.sizes
        if sizes is None or sizes is adm.budget.levels[0]:
            c.pipe_limit = sizes.pipe if sizes is not None else 0
            c.server_rcvbuf = c.server_sndbuf = 0
        else:
            c.pipe_limit = sizes.pipe
            c.server_rcvbuf = sizes.server_rcv // 2
            c.server_sndbuf = sizes.server_snd // 2
        err = self.lib.rc_connect(self.core, t.id, c)
        if err:
            code, value = error_for_connect_failure(err)
            self._fail(t, code, value, f"connect: {os.strerror(err)}")

    def _cookie_accepted(self, t: CTunnel, r, unverified: bool) -> bool:
        """--cookie-secret: a Connect needs a valid Cookie TLV (Cookies.judge)."""
        value = None if r.cookie == self.ffi.NULL else bytes(self.ffi.buffer(r.cookie,
                                                                            r.cookie_len))
        refusal, who = self.ctx.cookies.judge(value, t.client_ip, self.stats.v)
        if refusal is not None:
            self._fail(t, *refusal)
            return False
        if unverified and who == "address":
            self.lib.rc_verified(self.core, t.id)
            self.stats.v[S.UNVERIFIED_BY_COOKIE] += 1
        return True

    # -- results of the core ------------------------------------------------------------------
    def _connected(self, r) -> None:
        t = self.ctunnels.get(r.id)
        if t is None:
            return
        self._connect_over(t)
        st = self.stats.v
        st[S.ESTABLISHED] += 1
        self.stats.setup(r.elapsed_ns / 1e9)

    def _connect_failed(self, r) -> None:
        t = self.ctunnels.get(r.id)
        if t is None:
            return
        if r.timeout:
            return self._fail(t, ErrorCode.NETWORK_FAILURE, b"", "connect timeout")
        code, value = error_for_connect_failure(r.err)
        self._fail(t, code, value, f"connect: {os.strerror(r.err)}")

    def _replied(self, r) -> None:
        """A reply the core held for an unverified client went out."""
        if r.err >= 0:
            self.stats.error(r.err)
        t = self.ctunnels.get(r.id)
        if t is not None and t.held_outcome is not None:
            self._done(t, t.held_outcome, 0, 0, time.monotonic() - t.t0)

    def _ended(self, r) -> None:
        t = self.ctunnels.get(r.id)
        if t is None:
            return
        if r.expired:
            self.stats.v[S.UNVERIFIED_EXPIRED] += 1
        # The outcome's text is only ever logged.
        outcome = self.ffi.string(r.why).decode(errors="replace") if self.cfg.log_tunnels else ""
        self._done(t, outcome, r.up, r.down, r.elapsed_ns / 1e9)

    # -- endings -------------------------------------------------------------------------------
    def _fail(self, t: CTunnel, code, value: bytes, why: str) -> None:
        self._reply(t, error_reply(code, value), f"error {int(code)} ({why})", int(code))

    def _reply(self, t: CTunnel, reply: bytes, outcome: str, code: int = -1) -> None:
        """Answer and close cleanly.  An unverified client's reply waits for
        its handshake (the tunnel ends then, RC_REPLIED, or is reset)."""
        if self.lib.rc_refuse(self.core, t.id, reply, len(reply), code, 1):
            t.held_outcome = outcome
            return
        if code >= 0:
            self.stats.error(code)
        self._done(t, outcome, 0, 0, time.monotonic() - t.t0)

    def _connect_over(self, t: CTunnel) -> None:
        if t.pending_slot:
            t.pending_slot = False
            self._adm.release_pending(t.client_key)

    def _done(self, t: CTunnel, outcome: str, up: int, down: int, duration: float) -> None:
        if self.ctunnels.pop(t.id, None) is None:
            return
        self._connect_over(t)
        adm = self._adm
        adm.release(t.client_key)
        adm.budget.release(t.client_key, t.sizes)
        self.stats.v[S.TUNNELS_OPEN] -= 1
        if self.cfg.log_tunnels and (not outcome.startswith("error")
                                     or self._log_allowed(t.client_ip)):
            log.info("tunnel client=%s dest=%s up=%d down=%d duration=%.3fs outcome=%s",
                     fmt_addr(t.client_addr), fmt_addr(t.dest), up, down, duration, outcome)

    # -- stats, drain ------------------------------------------------------------------------
    def gauges(self) -> None:
        """The core's counters into stats.v (the C engine's bytes, resets,
        onward SYN data, coalesced replies and pipes are counted in C)."""
        v = self.stats.v
        n = self.counters
        v[S.BYTES_UP] = n.bytes_up
        v[S.BYTES_DOWN] = n.bytes_down
        v[S.RESETS] = n.resets
        v[S.ONWARD_SYN_DATA] = n.onward_syn_data
        v[S.REPLIES_COALESCED] = n.replies_coalesced
        v[S.PIPES] = n.pipes_open
        v[S.PIPE_BYTES] = self.lib.rc_pipe_bytes(self.core)
        v[S.MEMORY_COMMITTED] = self.admission.budget.committed

    def start_stall_sweep(self) -> None:
        """The core sweeps for stalled tunnels itself."""

    def drain(self) -> None:
        if self.stopping:
            log.warning("second signal: resetting %d tunnels now", len(self.ctunnels))
            self.abort_all()
            return
        self.stopping = True
        self.lib.rc_stop_accepting(self.core)
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()
        log.info("draining %d tunnels (up to %.1fs)", len(self.ctunnels), self.cfg.drain_timeout)
        self.call_later(self.cfg.drain_timeout, self.abort_all)

    def abort_all(self) -> None:
        # A batch of records at a time (the core's record array is bounded).
        while n := self.lib.rc_abort_all(self.core, b"drain timeout"):
            self._records(n)
        self.running = False

    def should_stop(self) -> bool:
        return self.stopping and not self.ctunnels and not self.counters.closers \
            and not self.counters.held_replies

    def close(self) -> None:
        super().close()
        self.core = None    # rc_free (ffi.gc) closes whatever the core still holds
