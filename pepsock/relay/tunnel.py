"""One tunnel: a client connection, its Convert header, the onward connection,
and the splice() data path between the two.

Life of a tunnel::

    HEADER ---> CONNECTING ---> OPEN ---> (both directions drained, closed)
       |             |            |
       +--> Error TLV, clean close (Closer)      +--> reset carried across
                                  |
                                  +--> FLUSHING: the destination reset; the
                                       client gets what the relay holds, then
                                       the reset

Every socket has SO_LINGER {1, 0} while its tunnel lives, so a dying relay
resets both sides; a clean close and an Error reply disarm it first.

A client accepted before its handshake completed (--no-cookie) is
*unverified* (routability.py): whatever would send it a byte, or send one of
its bytes onward, waits in HELD (`held_action`) until its ACK arrives, and the
tunnel is reset if that does not happen within --header-timeout.

The data path (`_pump`) follows PEPsal's lesson: each direction owns a pipe
while it has bytes in flight and counts the bytes the pipe holds (`held`).
It reads from the source only while the pipe has room and writes to the
destination only while the pipe holds bytes, so a full pipe or a slow
receiver never spins the loop.  Sockets are registered once, edge-triggered;
readiness is remembered in `End.readable`/`End.writable` and cleared only by
EAGAIN, so the steady state makes no epoll_ctl calls.  An EAGAIN from the
source while the pipe still holds bytes is ambiguous (the pipe may be out of
slots), so the source stays "readable" and is tried again once the pipe
drains.  An emptied pipe goes back to the pool: an idle tunnel holds two
sockets and no pipe.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import time
from enum import IntEnum

from ..protocol import (
    MAX_MESSAGE_SIZE, ErrorCode, Info, MessageReader, ProtocolError, SupportedTCPExtensions, TLVType,
    check_request, error_for_connect_failure, error_reply, success_reply,
)
from .. import tfo
from . import routability
from . import stats as S
from .admission import RETRY_AFTER
from .onward import connect_limit
from .sockopts import (
    TCP_CLOSE, TCP_SYNCNT, apply_side, disarm as _disarm,
    reset_close as _reset_close, tcp_state as _tcp_state, unacked as _unacked,
)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLET = select.EPOLLET
#: Registration mask for tunnel sockets: everything, edge-triggered, once.
ET_MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_READ_EV = EPOLLIN | EPOLLRDHUP | EPOLLHUP

SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
_SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
_splice = os.splice

SUCCESS = success_reply()
#: TCP options the onward connection carries because the kernel negotiates
#: them itself: MSS, window scale, SACK-permitted, timestamps.  A Connect
#: asking for any other (TCP-MD5 19, TCP-AO 29, MPTCP 30 -- the onward
#: socket is plain TCP --, anything unknown) gets Error 33 listing them
#: (RFC 8803 6.2.8; for TCP-AO a MUST): connecting without them would
#: silently give the client less than it asked for, e.g. no authentication.
HONOURED_OPTIONS = frozenset((2, 3, 4, 8))


def options_refusal(kinds) -> tuple | None:
    """The Connect's TCP option kinds, in order: None if all are honoured,
    else (Error 33, the refused kinds once each, why)."""
    refused = bytes(dict.fromkeys(k for k in kinds if k not in HONOURED_OPTIONS))
    if not refused:
        return None
    return (ErrorCode.UNSUPPORTED_TCP_OPTION, refused,
            f"TCP options {', '.join(map(str, refused))} cannot be honoured")


#: What an Info request is answered with: those options.
INFO_REPLY = success_reply((SupportedTCPExtensions(tuple(sorted(HONOURED_OPTIONS))),))
#: How often a tunnel whose destination reset checks that the client has
#: acknowledged what the relay still held for it.
FLUSH_POLL = 0.02

#: States.  HELD: an unverified client's tunnel parks what would next send
#: it a byte (or send one of its bytes onward) until its handshake completes.
class State(IntEnum):
    HEADER = 0
    CONNECTING = 1
    OPEN = 2
    FLUSHING = 3
    DONE = 4
    HELD = 5


HEADER, CONNECTING, OPEN, FLUSHING, DONE, HELD = State
#: Error replies lingering for the client's FIN at once; beyond, close at once.
MAX_CLOSERS = 1024


class End:
    """One socket of a tunnel and its remembered readiness."""

    __slots__ = ("sock", "fd", "readable", "writable")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.readable = True
        self.writable = True


class Direction:
    """Bytes flowing src -> dst through a (pooled) pipe."""

    __slots__ = ("src", "dst", "pipe", "held", "eof", "shut", "bytes", "stat", "peer", "buf",
                 "limit")

    def __init__(self, src: End, dst: End, stat: int, limit: int = 1 << 30):
        self.src = src
        self.dst = dst
        self.pipe = None    # (read fd, write fd, capacity) while bytes are in flight
        self.held = 0
        self.eof = False
        self.shut = False
        self.bytes = 0
        self.stat = stat
        self.peer: Direction | None = None
        self.buf = b""      # bytes held in user space (copy fallback, no pipe)
        self.limit = limit  # the most the pipe may hold for this tunnel (budget)


def fmt_addr(addr) -> str:
    if addr is None:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _in_handshake(sock: socket.socket) -> bool:
    """Still waiting for the client's ACK (an unverified client)?"""
    try:
        return routability.in_syn_recv(sock)
    except OSError:
        return False


class Closer:
    """Send a final reply, shut down, discard what the client still sends until
    its FIN (or a short timeout), then close: a clean close, not an RST that
    could overtake the Error TLV.

    A client still in its handshake (unverified, routability.py: a refusal at
    accept under --no-cookie) gets no byte until its ACK arrives; one that
    never completes it within --header-timeout is reset, having been sent
    nothing.  `code`: the Error code to count when the reply is sent."""

    __slots__ = ("ctx", "sock", "fd", "timer", "reply", "code")

    def __init__(self, ctx, sock: socket.socket, reply: bytes, registered: bool = True,
                 code: int | None = None):
        self.ctx = ctx
        self.sock = sock
        self.fd = sock.fileno()
        self.timer = None
        self.reply = reply
        self.code = code
        if ctx.clients_unverified and _in_handshake(sock):
            if ctx.closers >= MAX_CLOSERS:
                if registered:
                    ctx.forget(self.fd)
                _reset_close(sock)
                return
            ctx.closers += 1
            mask = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            if registered:
                ctx.rebind(self.fd, self.on_handshake, mask)
            else:
                ctx.register(self.fd, self.on_handshake, mask)
            self.timer = ctx.call_later(ctx.cfg.header_timeout, self._expire)
            return
        if self._send(registered):
            self.timer = ctx.call_later(ctx.linger_timeout, self.close)

    def _send(self, registered: bool) -> bool:
        """Reply and shut down; True if now lingering for the client's FIN
        (counted in ctx.closers)."""
        ctx, sock = self.ctx, self.sock
        _disarm(sock)   # a reset could overtake the reply
        try:
            sock.send(self.reply)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            ctx.forget(self.fd)
            sock.close()
            return False
        finally:
            if self.code is not None:
                ctx.stats.error(self.code)
            self.reply = None
        if ctx.closers >= MAX_CLOSERS:
            # A flood of refused clients must not pin fds for the linger time:
            # past this many, close at once (a reset if the client's bytes are
            # unread, but the reply has been sent).
            ctx.forget(self.fd)
            sock.close()
            return False
        ctx.closers += 1
        if registered:
            ctx.rebind(self.fd, self.on_event, EPOLLIN | EPOLLRDHUP)
        else:
            ctx.register(self.fd, self.on_event, EPOLLIN | EPOLLRDHUP)
        return True

    def on_handshake(self, events: int) -> None:
        if _in_handshake(self.sock):
            return
        self.timer.cancel()
        self.ctx.closers -= 1
        if self._send(registered=True):
            self.timer = self.ctx.call_later(self.ctx.linger_timeout, self.close)

    def _expire(self) -> None:
        """The handshake never completed (a forged source): reset, nothing sent."""
        self.ctx.forget(self.fd)
        _reset_close(self.sock)
        self.ctx.closers -= 1

    def on_event(self, events: int) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.timer.cancel()
        self.ctx.forget(self.fd)
        self.sock.close()
        self.ctx.closers -= 1


class Tunnel:
    __slots__ = ("ctx", "c", "s", "up", "down", "state", "reader", "client_addr", "client_ip",
                 "dest", "t0", "timer", "outcome", "early", "why", "flush_mark", "flush_at",
                 "client_key", "exempt", "pending_slot", "sizes", "stall_mark", "stall_at",
                 "unverified", "held_action", "vtimer", "syn_room")

    def __init__(self, ctx, sock: socket.socket, addr, now: float, key: str | None = None,
                 exempt: bool = False, sizes=None, *, handshaking: bool | None = None,
                 syn_payload: int = 0):
        """`handshaking`: the client's socket is still in SYN_RECV (None: ask
        the kernel); `syn_payload`: bytes the client's SYN carried, if known
        (routability.accept_facts).  Nothing happens until start()."""
        self.ctx = ctx
        self.sizes = sizes          # budget.Sizes granted (None: unbudgeted)
        self.stall_mark = None
        self.stall_at = now
        if sizes is not None:
            full = ctx.admission.budget.full
            # The listener's sizes (inherited) are the full ones: shrink if granted less.
            try:
                if sizes.client_rcv < full.client_rcv:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sizes.client_rcv // 2)
                if sizes.client_snd < full.client_snd:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sizes.client_snd // 2)
            except OSError:
                pass        # a socket already dead: the header read below finds out
        self.client_key = addr[0] if key is None else key
        self.exempt = exempt        # a loopback client: no per-client rate/pending/budget
        self.pending_slot = False   # holds an onward-connect slot (admission.take_pending)
        self.c = End(sock)
        self.s: End | None = None
        self.up: Direction | None = None
        self.down: Direction | None = None
        self.state = HEADER
        self.reader = MessageReader()
        self.client_addr = addr
        self.client_ip = addr[0]
        self.dest = None
        self.t0 = now
        self.outcome = ""
        self.early = b""
        self.timer = None
        self.why = ""
        self.held_action = None     # what waits for the client's handshake (HELD)
        self.vtimer = None
        self.unverified = False
        #: Onward TFO: until the header is read, the bytes the client's SYN
        #: carried; then how many early-data bytes the onward SYN may carry
        #: (one slot for both: idle tunnels are many).
        self.syn_room = syn_payload
        if ctx.clients_unverified:
            if handshaking is None:
                try:
                    handshaking = routability.in_syn_recv(sock)
                except OSError:
                    handshaking = False     # a dead socket: the header read reports it
            self.unverified = handshaking

    def start(self) -> None:
        """Register the client socket and read the header (usually in the SYN)."""
        ctx = self.ctx
        if self.unverified:
            ctx.stats.v[S.UNVERIFIED] += 1
            self.vtimer = ctx.call_later(ctx.cfg.header_timeout, self._unverified_timeout)
        ctx.register(self.c.fd, self.on_client, ET_MASK)
        # The header usually came in the SYN and is read right here; the
        # header timer is only armed when it has not (see _read_header).
        self._read_header()

    # -- events ------------------------------------------------------------------
    def on_client(self, ev: int) -> None:
        c = self.c
        if ev & EPOLLERR:
            return self._on_error(c, "client")
        if ev & _READ_EV:
            c.readable = True
        if ev & EPOLLOUT:
            c.writable = True
        # The client's ACK raises an edge (EPOLLOUT at least): the moment to look.
        if self.unverified and (not self._verified_now() or self.state != HEADER):
            return
        state = self.state
        if state == OPEN:
            self._run()
        elif state == FLUSHING:
            self._flush()
        elif state == HEADER and c.readable:
            # Not on a bare EPOLLOUT: the client's first event after a 1-RTT
            # handshake is usually just that, and recv() would only EAGAIN.
            self._read_header()

    def on_server(self, ev: int) -> None:
        s = self.s
        if self.state == CONNECTING:
            return self._connected(ev)
        if self.state == FLUSHING:
            return      # the server is gone; its last bytes are read by _flush
        if ev & EPOLLERR:
            return self._on_error(s, "server")
        if ev & _READ_EV:
            s.readable = True
        if ev & EPOLLOUT:
            s.writable = True
        if self.state == OPEN:
            self._run()

    # -- header --------------------------------------------------------------------
    def _read_header(self) -> None:
        reader = self.reader
        recv = self.c.sock.recv
        msg = None
        got = 0
        try:
            while msg is None:
                # One recv() takes the header (at most 1020 bytes) and usually
                # the early data behind it; those bytes are sent onward first,
                # before anything is spliced (`early`, then Direction.buf).
                data = recv(MAX_MESSAGE_SIZE)
                if not data:
                    reader.eof()
                got += len(data)
                msg = reader.feed(data)
            req = check_request(msg)
        except BlockingIOError:
            self.c.readable = False
            if self.timer is None:
                self.timer = self.ctx.call_later(self.ctx.cfg.header_timeout,
                                                  self._header_timeout)
            return
        except ProtocolError as e:
            return self._fail(e.code, b"", e.detail)
        except OSError as e:
            return self.abort(f"client error in header: {e.strerror}")
        self.reader = None
        self.early = reader.rest
        # A FIN may already sit behind the bytes read: keep trying to read.
        self.c.readable = True
        if isinstance(req, Info):
            return self._reply_and_close(INFO_REPLY, "info")
        if self.ctx.cookies is not None and not self._cookie_accepted(msg):
            return
        refusal = options_refusal(o.kind for o in req.options)
        if refusal is not None:
            self.dest = (str(req.address), req.port)
            return self._fail(*refusal)
        dest_family = socket.AF_INET if req.address.version == 4 else socket.AF_INET6
        syn_payload, self.syn_room = self.syn_room, 0
        if syn_payload and self.early and self.ctx.cfg.onward_tfo:
            # Onward TFO: the relay's SYN may carry this much of the early data.
            self.syn_room = routability.onward_syn_room(
                self.c.sock.family, dest_family, syn_payload,
                not self.ctx.clients_unverified)
        # Unverified, everything read so far came in the client's SYN: the
        # onward SYN may not be larger (RFC 8803 section 9.3).
        if self.unverified and not routability.onward_syn_fits(
                self.c.sock.family, socket.AF_INET if req.address.version == 4
                else socket.AF_INET6, got):
            return self._hold(lambda: self._connect(req.address, req.port))
        self._connect(req.address, req.port)

    def _cookie_accepted(self, msg) -> bool:
        """--cookie-secret: a Connect needs a valid Cookie TLV (Cookies.judge)."""
        tlv = msg.get(TLVType.COOKIE)
        refusal, who = self.ctx.cookies.judge(None if tlv is None else tlv.data, self.client_ip,
                                              self.ctx.stats.v)
        if refusal is not None:
            self._fail(*refusal)
            return False
        if self.unverified and who == "address":
            self._verified_by_cookie()
        return True

    def _header_timeout(self) -> None:
        if self.state == HEADER:
            self._fail(ErrorCode.MALFORMED_MESSAGE, b"", "header timeout")

    # -- onward connect --------------------------------------------------------------
    def _connect(self, address, port: int) -> None:
        ctx = self.ctx
        self.dest = (str(address), port)
        refusal = ctx.admission.judge_connect(self.client_ip, self.exempt, address, port)
        if refusal is not None:
            return self._fail(*refusal)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        if not self.pending_slot:   # an unverified client's retry kept its slot
            busy = ctx.admission.take_pending(self.client_key, self.exempt)
            if busy is not None:
                return self._fail(ErrorCode.RESOURCE_EXCEEDED, RETRY_AFTER, busy)
            self.pending_slot = True
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            return self._fail(ErrorCode.RESOURCE_EXCEEDED, b"", f"socket(): {e.strerror}")
        try:
            sizes = self.sizes
            cfg = ctx.cfg
            if sizes is None or sizes is ctx.admission.budget.levels[0]:
                apply_side(sock, cfg.server, cfg.nodelay, cfg.keepalive, cfg.user_timeout)
            else:
                apply_side(sock, cfg.server, cfg.nodelay, cfg.keepalive, cfg.user_timeout,
                           sizes.server_rcv // 2, sizes.server_snd // 2)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_SYNCNT, cfg.syn_retries)
            if self.unverified:
                routability.set_unverified(sock, True)
                err = sock.connect_ex(self.dest)
            elif self.syn_room and self.early:
                # Onward TCP Fast Open (standard cookie TFO, the kernel's cookie
                # cache): with a cookie from this destination the SYN carries
                # the early data, so it gets the request one round trip
                # sooner; without one the kernel sends a plain SYN asking for
                # a cookie and the bytes follow the handshake as usual.
                # Never for an unverified client, never more than fits
                # (syn_room, RFC 8803 section 9.3).
                n = tfo.send_in_syn(sock, self.early[:self.syn_room], self.dest)
                if n:
                    self.early = self.early[n:]
                    ctx.stats.v[S.ONWARD_SYN_DATA] += 1
                err = 0
            else:
                err = sock.connect_ex(self.dest)
        except OSError as e:
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            code, value = error_for_connect_failure(err)
            return self._fail(code, value, f"connect: {os.strerror(err)}")
        self.s = End(sock)
        self.state = CONNECTING
        if self.timer is not None:
            self.timer.cancel()
        # Unverified, the onward SYN gets no retransmission: the attempt is
        # dropped just before the kernel's first one (routability.py); else
        # --connect-timeout or the --syn-retries deadline, whichever is sooner.
        self.timer = ctx.call_later(routability.UNVERIFIED_SYN_WINDOW if self.unverified
                                     else self._connect_limit(), self._connect_timeout)
        ctx.register(self.s.fd, self.on_server, ET_MASK)

    def _connect_limit(self) -> float:
        cfg = self.ctx.cfg
        return connect_limit(cfg.syn_retries, cfg.connect_timeout)

    def _connect_timeout(self) -> None:
        if self.state == CONNECTING:
            if self.unverified:
                return self._retry_when_verified()
            self._fail(ErrorCode.NETWORK_FAILURE, b"", "connect timeout")

    def _connected(self, ev: int) -> None:
        s = self.s
        # A clean EPOLLOUT is a completed connect(); SO_ERROR is only worth a
        # syscall when the kernel flagged an error or this is no EPOLLOUT.
        if ev & (EPOLLERR | EPOLLHUP) or not ev & EPOLLOUT:
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == errno.ETIMEDOUT and self.unverified:
                return self._retry_when_verified()
            if err:
                code, value = error_for_connect_failure(err)
                return self._fail(code, value, f"connect: {os.strerror(err)}")
            if not ev & EPOLLOUT:
                return
        self.timer.cancel()
        self.timer = None
        self._connect_over()
        # Edge-triggered: bytes the server sends after this poll raise a new edge.
        s.readable = bool(ev & _READ_EV)
        if self.unverified:
            return self._hold(self._open)
        self._open()

    def _open(self) -> None:
        """Onward connection up, client verified: reply and start the data path."""
        ctx = self.ctx
        s = self.s
        try:
            self.c.sock.send(SUCCESS)
        except OSError as e:
            return self.abort(f"client gone before reply: {e.strerror}")
        self.state = OPEN
        st = ctx.stats.v
        st[S.ESTABLISHED] += 1
        ctx.stats.setup(time.monotonic() - self.t0)
        s.writable = True
        limit = self.sizes.pipe if self.sizes is not None else 1 << 30
        self.up = up = Direction(self.c, s, S.BYTES_UP, limit)
        self.down = down = Direction(s, self.c, S.BYTES_DOWN, limit)
        up.peer, down.peer = down, up
        up.buf, self.early = self.early, b""
        self._run()

    # -- unverified clients (routability.py) ------------------------------------------
    def _hold(self, action) -> None:
        """Park `action` until the client's handshake completes."""
        self.state = HELD
        self.held_action = action

    def _verified_now(self) -> bool:
        """Has the client's ACK arrived?  Then run what was held."""
        try:
            if routability.in_syn_recv(self.c.sock):
                return False
            if self.s is not None:
                routability.set_unverified(self.s.sock, False, self.ctx.cfg.user_timeout)
                if self.state == CONNECTING:    # from now on the normal connect limit
                    self.timer.cancel()
                    self.timer = self.ctx.call_later(self._connect_limit(),
                                                      self._connect_timeout)
        except OSError as e:
            self.abort(f"client error before its handshake completed: {e.strerror}")
            return False
        self.unverified = False
        self.vtimer.cancel()
        self.vtimer = None
        action, self.held_action = self.held_action, None
        if action is not None:
            action()
        return True

    def _verified_by_cookie(self) -> None:
        self.unverified = False
        self.vtimer.cancel()
        self.vtimer = None
        self.ctx.stats.v[S.UNVERIFIED_BY_COOKIE] += 1

    def _retry_when_verified(self) -> None:
        """The onward SYN went unanswered and may not be retransmitted (the
        client is unverified): connect again once the client is.  The
        onward-connect slot stays taken meanwhile (the connect is not over),
        so a forged source's slots bound its onward SYNs per --header-timeout."""
        self.ctx.forget(self.s.fd)
        self.s.sock.close()
        self.s = None
        self.timer.cancel()
        self.timer = None
        address = ipaddress.ip_address(self.dest[0])
        self._hold(lambda: self._connect(address, self.dest[1]))

    def _unverified_timeout(self) -> None:
        self.vtimer = None
        if self.unverified and self.state != DONE:
            self.ctx.stats.v[S.UNVERIFIED_EXPIRED] += 1
            self.abort("client never completed its handshake")

    # -- data path ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            up, down = self.up, self.down
            self._pump(up)
            self._pump(down)
            if up.shut and down.shut:
                self._finish_clean()
        except OSError as e:
            self._broken(f"{e.strerror}")

    def _pump(self, d: Direction) -> None:
        src, dst = d.src, d.dst
        pipe = d.pipe
        if pipe is None:
            if d.buf:
                # Bytes in user space (early data read with the header, or a
                # copy-mode leftover) go first; then back to splicing.
                self._copy(d, more=False)
                if d.buf:
                    return
            if d.eof or not src.readable:
                return
            pipe = self.ctx.pipes.get()
            if pipe is None:
                return self._copy(d)
            d.pipe = pipe
        pr, pw, cap = pipe
        if cap > d.limit:
            cap = d.limit
        held = d.held
        moved = 0
        splice = _splice
        while True:
            progress = False
            if src.readable and held < cap and not d.eof:
                try:
                    n = splice(src.fd, pw, cap - held, None, None, _SPLICE_FLAGS)
                except BlockingIOError:
                    if held == 0:
                        src.readable = False
                except OSError:
                    d.held = held
                    raise
                else:
                    if n:
                        held += n
                        progress = True
                    else:
                        d.eof = True
            if held and dst.writable:
                try:
                    n = splice(pr, dst.fd, held, None, None, _SPLICE_FLAGS)
                except BlockingIOError:
                    dst.writable = False
                except OSError:
                    d.held = held
                    raise
                else:
                    held -= n
                    moved += n
                    progress = True
            if not progress:
                break
        d.held = held
        if moved:
            d.bytes += moved
            self.ctx.stats.v[d.stat] += moved
        if held == 0:
            self.ctx.pipes.put(pipe)
            d.pipe = None
            if d.eof and not d.shut:
                self._shut(d)

    def _shut(self, d: Direction) -> None:
        """Half-close: the source's EOF becomes the destination's EOF.  If the
        other direction is already shut the tunnel is done, and the close()
        that follows sends the FIN."""
        d.shut = True
        if not d.peer.shut:
            d.dst.sock.shutdown(socket.SHUT_WR)

    def _copy(self, d: Direction, more: bool = True) -> None:
        """Send what `d.buf` holds; with `more`, keep moving bytes through user
        space, 64 KiB at a time, until the direction is idle again.  That is
        the fallback when no pipe can be had (out of fds): slower, but a
        tunnel never waits on another one's pipe."""
        src, dst = d.src, d.dst
        buf = d.buf
        moved = 0
        while True:
            if not buf:
                if not more or d.eof or not src.readable:
                    break
                try:
                    buf = src.sock.recv(65536)
                except BlockingIOError:
                    src.readable = False
                    break
                if not buf:
                    d.eof = True
                    break
            if not dst.writable:
                break
            try:
                n = dst.sock.send(buf)
            except BlockingIOError:
                dst.writable = False
                break
            except OSError:
                d.buf = buf
                raise
            buf = buf[n:]
            moved += n
        d.buf = buf
        if moved:
            d.bytes += moved
            self.ctx.stats.v[d.stat] += moved
        if not buf and d.eof and not d.shut:
            self._shut(d)

    def _on_error(self, end: End, who: str) -> None:
        err = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._broken(f"{who} {os.strerror(err) if err else 'error'}")

    def _broken(self, why: str) -> None:
        """One side failed.  If the destination reset while the client is
        fine, the client first gets every byte the relay already holds for it
        (what the dead socket still has queued, the pipe, the client socket's
        own send queue) and only then the reset: the destination had sent
        those bytes and they were acknowledged, so dropping them would lose
        data a direct connection delivers.  Anything else: reset both now."""
        if self.state == OPEN and not self.down.shut \
                and _tcp_state(self.s.sock) == TCP_CLOSE \
                and _tcp_state(self.c.sock) != TCP_CLOSE:
            return self._start_flush(why if why.startswith("server") else f"server {why}")
        self.abort(why)

    # -- a destination reset: deliver, then reset ------------------------------------
    def _start_flush(self, why: str) -> None:
        self.state = FLUSHING
        self.why = why
        up, down = self.up, self.down
        if up.pipe is not None:     # the client's bytes cannot reach the server any more
            if up.held:
                self.ctx.pipes.close(up.pipe)
            else:
                self.ctx.pipes.put(up.pipe)
            up.pipe, up.held, up.buf = None, 0, b""
        # No FIN for this direction: its end is a reset, sent once all is delivered.
        down.shut = True
        self.s.readable = True
        self.flush_mark = None
        self.flush_at = time.monotonic()
        self._flush()
        if self.state == FLUSHING:
            self.timer = self.ctx.call_later(FLUSH_POLL, self._flush_poll)

    def _flush(self) -> None:
        d = self.down
        for _ in range(3):
            try:
                self._pump(d)
                return
            except OSError as e:
                if _tcp_state(self.c.sock) == TCP_CLOSE:
                    return self.abort(f"{self.why}; then client {e.strerror}")
                d.eof = True    # the dead server's queue is read to its end

    def _flush_poll(self) -> None:
        """Until the client has acknowledged everything: then the reset.  A
        client that stops acknowledging for --stall-timeout is reset anyway."""
        self.timer = None
        self._flush()
        if self.state != FLUSHING:
            return
        d = self.down
        left = _unacked(self.c.fd)
        if d.eof and not d.held and not d.buf and left == 0:
            return self.abort(f"{self.why}; {d.bytes} bytes delivered in all")
        if _tcp_state(self.c.sock) == TCP_CLOSE:
            return self.abort(f"{self.why}; then the client's connection ended")
        now = time.monotonic()
        mark = (d.bytes, left)
        stall = self.ctx.cfg.stall_timeout
        if mark != self.flush_mark:
            self.flush_mark, self.flush_at = mark, now
        elif stall and now - self.flush_at > stall:
            return self.abort(f"{self.why}; client stalled, {left + d.held} bytes undelivered")
        self.timer = self.ctx.call_later(FLUSH_POLL, self._flush_poll)

    # -- endings -----------------------------------------------------------------------
    def _fail(self, code: int, value: bytes, why: str) -> None:
        """Answer with an Error TLV and close cleanly (counted when sent: an
        unverified client gets it once its handshake completes, or never)."""
        self._connect_over()
        if self.s is not None:
            self.ctx.forget(self.s.fd)
            self.s.sock.close()
            self.s = None
        if self.unverified:
            return self._hold(lambda: self._fail(code, value, why))
        self.ctx.stats.error(code)
        self._reply_and_close(error_reply(code, value), f"error {int(code)} ({why})")

    def _reply_and_close(self, reply: bytes, outcome: str) -> None:
        if self.unverified:     # not a byte to an address that has not proved itself
            return self._hold(lambda: self._reply_and_close(reply, outcome))
        Closer(self.ctx, self.c.sock, reply)
        self._done(outcome)

    def _release_pipes(self) -> None:
        for d in (self.up, self.down):
            if d is not None and d.pipe is not None:
                if d.held == 0:
                    self.ctx.pipes.put(d.pipe)
                else:
                    self.ctx.pipes.close(d.pipe)
                d.pipe = None

    def _finish_clean(self) -> None:
        ctx = self.ctx
        ctx.forget(self.c.fd)
        ctx.forget(self.s.fd)
        _disarm(self.c.sock)
        _disarm(self.s.sock)
        self.c.sock.close()
        self.s.sock.close()
        self._release_pipes()
        self._done("ok")

    def abort(self, why: str) -> None:
        """Reset both sides (SO_LINGER 0): a reset on one side becomes a reset on
        the other, and a tunnel cut short is never mistaken for a finished one."""
        if self.state == DONE:
            return
        ctx = self.ctx
        ctx.forget(self.c.fd)
        _reset_close(self.c.sock)
        if self.s is not None:
            ctx.forget(self.s.fd)
            _reset_close(self.s.sock)
        self._release_pipes()
        ctx.stats.v[S.RESETS] += 1
        self._done(f"reset ({why})")

    def check_stall(self, now: float, timeout: float) -> None:
        """Called every few seconds: a tunnel that holds bytes it cannot
        deliver (a pipe, or a socket's unacknowledged send queue) while
        nothing moves and nothing is acknowledged for `timeout` is reset, so
        a peer that stops reading (or a FIN queued behind bytes nobody will
        read) cannot pin its buffers forever.  An idle tunnel is left alone."""
        if self.state != OPEN:
            return
        up, down = self.up, self.down
        moved = (up.bytes, down.bytes)
        if self.stall_mark is not None and self.stall_mark[:2] == moved:
            held = up.held + down.held + len(up.buf) + len(down.buf)
            queued = (_unacked(self.c.fd), _unacked(self.s.fd))
            if not held and queued == (0, 0):
                self.stall_mark = None      # idle, nothing owed: fine
                return
            mark = moved + queued
            if mark != self.stall_mark:
                self.stall_mark, self.stall_at = mark, now
            elif now - self.stall_at >= timeout:
                self.abort(f"stalled {now - self.stall_at:.0f}s with {held} bytes in the relay "
                           f"and {sum(queued)} unacknowledged")
            return
        self.stall_mark, self.stall_at = moved + (-1, -1), now

    def _connect_over(self) -> None:
        if self.pending_slot:
            self.pending_slot = False
            self.ctx.admission.release_pending(self.client_key)

    def _done(self, outcome: str) -> None:
        if self.state == DONE:
            return
        self._connect_over()
        self.state = DONE
        if self.up is not None:
            self.up.peer = self.down.peer = None   # no cycles: refcounting frees us
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.vtimer is not None:
            self.vtimer.cancel()
            self.vtimer = None
        self.held_action = None
        self.outcome = outcome
        self.ctx.tunnel_done(self)

    def log_line(self, now: float) -> str:
        up = self.up.bytes if self.up else 0
        down = self.down.bytes if self.down else 0
        return (f"tunnel client={fmt_addr(self.client_addr)} dest={fmt_addr(self.dest)} "
                f"up={up} down={down} duration={now - self.t0:.3f}s outcome={self.outcome}")

