"""create_connection(): a TCP connection through an RFC 8803 PEP in 0-RTT.

The Convert header + Connect TLV ride in the SYN (TCP Fast Open), so reaching
the PEP costs no round trip more than reaching the server would.  Without a
timeout the SYN waits for the application's first write (TCP_FASTOPEN_CONNECT)
and carries it too (PepSocket.defer_syn; docs/python.md).  The socket
returned is a real `socket.socket` (PepSocket) whose reads drop the PEP's
reply before the application's first byte; an Error TLV in that reply
surfaces as an OSError (ConvertError) on the first read, and on every read or
write after it.

This module is the blocking shell: the decisions are route.plan() (where to)
and session.ClientSession (what to send, what a reply means, what to try
next); asyncio (aio.py) drives the same two and the same PepSocket.
"""
from __future__ import annotations

import dataclasses
import errno
import heapq
import math
import os
import select
import socket
import threading
import time
import weakref

from . import route as _route
from . import tfo
from .session import REPLAY_LIMIT, ClientSession, Dial

_GLOBAL_DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT  # the stdlib's sentinel


class _Link:
    """Per-connection state of a PepSocket, shared by its dup()s."""

    __slots__ = ("session", "pending", "plain", "reply_deadline", "reply_timeout", "callbacks",
                 "dial_deadline", "on_deadlines", "prefix", "syn", "lock", "fd_lock", "nodelay",
                 "learn")

    def __init__(self, session: ClientSession, reply_timeout: float, reply_deadline: float):
        self.session = session
        self.pending = b""           # application bytes that came in with the reply
        self.plain = False           # reply consumed and nothing pending: pass-through
        self.reply_timeout = reply_timeout
        self.reply_deadline = reply_deadline
        self.callbacks: list = []
        self.dial_deadline: float | None = None  # a retry's handshake still in progress
        self.on_deadlines = None                 # called when next_deadline() moved
        # The request in the SYN (connect deferred, TCP_FASTOPEN_CONNECT): the Convert
        # message not sent yet, the SYN not either; it leaves with the first write.
        self.prefix: bytes | None = None
        self.syn = None          # (dial with what the SYN carried, started, taken, error)
        self.lock = threading.Lock()             # the first write vs the flusher thread
        self.fd_lock = threading.Lock()          # the flusher's send vs close()
        self.nodelay: int | None = None          # the app's TCP_NODELAY while pepsock holds it
        self.learn = None        # (dial, taken) of a handshake nobody waited for: learn from it


class PepSocket(socket.socket):
    """A socket connected to a PEP that reads like one connected to the destination.

    Reads (recv, recv_into, recvfrom, recvfrom_into, recvmsg and makefile())
    first consume the PEP's Convert reply; writes fail once that reply said
    Error.  `destination` and `pep` hold the two ends; getpeername() returns
    the destination, as the application asked for it.  A PepSocket made by
    the socket constructor (fromfd, accept, a dup of a plain socket) is a
    plain socket; dup() of a connected one shares its reply state.
    """

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        super().__init__(family, type, proto, fileno)
        self._link: _Link | None = None

    @classmethod
    def fromfd(cls, fd: int, family, type, proto=0) -> "PepSocket":
        """Like socket.fromfd (a dup of fd), as a (plain) PepSocket."""
        return cls(family, type, proto, os.dup(fd))

    def dup(self) -> "PepSocket":
        new = super().dup()
        new._link = self._link
        return new

    # -- the two ends ------------------------------------------------------------------

    @property
    def destination(self):
        link = self._link
        return link.session.destination.sockaddr if link else None

    @property
    def pep(self):
        link = self._link
        if link is None or link.session.dial is None or link.session.dial.pep is None:
            return None
        return link.session.dial.sockaddr[:2]

    def getpeername(self):
        link = self._link
        if link is None:
            return super().getpeername()
        return link.session.destination.sockaddr

    @property
    def reply_received(self) -> bool:
        return self._link is None or self._link.session.done

    def attach(self, session: ClientSession, reply_timeout: float, reply_deadline: float) -> None:
        """Make this connected socket the application's end of `session`: reads strip
        the reply, which must be complete by `reply_deadline` (time.monotonic())."""
        self._link = _Link(session, reply_timeout, reply_deadline)

    def add_reply_callback(self, callback) -> None:
        """callback(exc) once the reply is in (exc None) or has failed (exc the error)."""
        link = self._link
        if link is None or link.session.done:
            callback(None)
        elif link.session.error is not None:
            callback(link.session.error)
        else:
            link.callbacks.append(callback)

    def next_deadline(self) -> float | None:
        """When (time.monotonic()) check_deadlines() has work, None once the reply is in."""
        link = self._link
        if link is None or self._closed or link.session.done or link.session.error is not None:
            return None
        if link.dial_deadline is not None:
            return min(link.dial_deadline, link.reply_deadline)
        return link.reply_deadline

    def on_deadlines_changed(self, callback) -> None:
        """callback() whenever next_deadline() moves (a retry started): re-arm a timer."""
        if self._link is not None:
            self._link.on_deadlines = callback

    def check_deadlines(self) -> None:
        """For event loops (the socket is non-blocking): a retry's handshake past its
        connect timeout moves on to the next PEP; a reply past its deadline fails the
        connection (ETIMEDOUT), which the transport then reads.  Call at next_deadline()."""
        when = self.next_deadline()
        if when is None or time.monotonic() < when:
            return
        link = self._link
        session = link.session
        if link.dial_deadline is not None and tfo.established(self):
            self._handshake_done(link)      # the PEP answered; its reply is what is late
            if link.on_deadlines is not None:
                link.on_deadlines()
            return
        try:
            if link.dial_deadline is not None and time.monotonic() >= link.dial_deadline:
                self._dial_failed(link, TimeoutError(
                    errno.ETIMEDOUT, f"the PEP at {session.dial.pep} did not answer"), True)
            elif time.monotonic() >= link.reply_deadline:
                raise session.reply_timed_out(link.reply_timeout)
        except OSError as exc:
            self._failed(link, session.fail(exc))

    check_reply_deadline = check_deadlines

    # -- the request in the SYN ---------------------------------------------------------

    def defer_syn(self, prefix: bytes) -> None:
        """The connect was deferred (TCP_FASTOPEN_CONNECT): `prefix` (the Convert message)
        goes with the application's first write in one SYN; a read, shutdown, detach or
        FLUSH_AFTER seconds without a write send it alone (server-speaks-first)."""
        self._link.prefix = prefix
        _flusher.add(self)

    def _syn_ready(self, link: _Link, data=b"") -> int:
        """Send the deferred SYN with the prefix and `data` if not sent yet, and see the
        handshake through (as create_connection did before: failover, Error-free
        retries with replay, fallback).  Returns how many bytes of `data` were taken
        (-1: the SYN had left already; write `data` the ordinary way)."""
        with link.lock:
            taken = self._start_syn(link, data) if link.prefix is not None else -1
            if link.syn is not None:
                self._finish_syn(link)
        return taken

    def _start_syn(self, link: _Link, data) -> int:
        """The SYN leaves now (never blocks): prefix + data, as much as the kernel puts
        in it (the rest after the handshake).  Returns the bytes of `data` taken (a
        non-blocking socket: those the kernel took; 0 means try again when writable)."""
        session = link.session
        prefix, link.prefix = link.prefix, None
        data = bytes(memoryview(data).cast("B")[:REPLAY_LIMIT])   # replayable if it fails
        started, error, taken = time.monotonic(), None, 0
        try:
            taken = socket.socket.send(self, prefix + data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass                   # the kernel sent a plain SYN: the payload follows it
        except OSError as exc:
            error = exc
        if error is None and taken >= len(prefix) and self.gettimeout() == 0.0:
            data = data[:taken - len(prefix)]
        session.sent(data)
        link.syn = (dataclasses.replace(session.dial, payload=prefix + data), started, taken,
                    error)
        return len(data)

    def _finish_syn(self, link: _Link) -> None:
        """Wait for the handshake of the SYN _start_syn sent, within the socket's timeout
        and the PEP's connect timeout, and send what the SYN did not carry; a failed
        handshake goes to the next PEP, the payload replayed.  A non-blocking socket
        whose whole payload went in the SYN does not wait (check_deadlines and the
        next read or write see how it ends, as for a retry)."""
        attempt, started, taken, error = link.syn
        link.syn = None
        session = link.session
        timeout = self.gettimeout()
        link.reply_deadline = started + link.reply_timeout
        if error is None and timeout == 0.0 and taken >= len(attempt.payload):
            link.dial_deadline = started + (attempt.connect_timeout or math.inf)
            link.learn = (attempt, taken)
            if link.on_deadlines is not None:
                link.on_deadlines()
            return
        deadline = link.reply_deadline if timeout == 0.0 else _deadline(timeout)
        try:
            if error is None:
                error = connect_blocking(self, attempt, deadline, session, started, taken)
                if error is None and not tfo.syn_data_acked(self):
                    self._hold_nodelay(link)
            if error is not None:
                self._retry(link, session.connect_failed(
                    error, timed_out=isinstance(error, TimeoutError)))
        except OSError as exc:
            raise self._failed(link, session.fail(exc)) from None

    def _hold_nodelay(self, link: _Link) -> None:
        """The Convert message went after the handshake (or the PEP did not take the
        SYN's data): Nagle would hold the application's first write until the PEP acks
        it, one round trip more.  TCP_NODELAY until the reply is in, then the
        application's own setting back."""
        try:
            link.nodelay = super().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            if not link.nodelay:
                super().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            link.nodelay = None

    def _release_nodelay(self, link: _Link) -> None:
        own, link.nodelay = link.nodelay, None
        if own is not None and not own and not self._closed:
            try:
                super().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, own)
            except OSError:
                pass

    def setsockopt(self, level, option, value, *args):
        link = self._link
        if (link is not None and link.nodelay is not None and not args
                and (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY)):
            link.nodelay = int(bool(value)) if isinstance(value, int) else link.nodelay
            if not value:
                return None     # applied when the reply is in
        return super().setsockopt(level, option, value, *args)

    def getsockopt(self, level, option, *args):
        link = self._link
        if (link is not None and link.nodelay is not None and not args
                and (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY)):
            return link.nodelay
        return super().getsockopt(level, option, *args)

    def _flush_from_timer(self) -> None:
        """The flusher thread: the SYN with the Convert message alone (never blocks; the
        application's next read or write sees the handshake through)."""
        link = self._link
        if link is None or link.prefix is None:
            return
        with link.fd_lock:
            if self._closed or not link.lock.acquire(blocking=False):
                return          # closed, or the application is sending it right now
            try:
                if link.prefix is not None:
                    self._start_syn(link, b"")
            finally:
                link.lock.release()

    def _real_close(self, *args):
        link = self._link
        if link is None:
            return super()._real_close(*args)
        with link.fd_lock:      # never while the flusher sends on this fd (a reused number)
            return super()._real_close(*args)

    def shutdown(self, how):
        link = self._link
        if link is not None and (link.prefix is not None or link.syn is not None):
            self._syn_ready(link)
        return super().shutdown(how)

    # -- the reply ---------------------------------------------------------------------

    def _failed(self, link: _Link, exc: OSError) -> OSError:
        if exc is link.session.error and link.callbacks is not None:
            tfo.reset(self)
            callbacks, link.callbacks = link.callbacks, None
            for cb in callbacks:
                cb(exc)
        return exc

    def _consume_reply(self) -> None:
        """Read until the PEP's reply is complete; raise if it is an error.

        Honours the socket's timeout and the reply deadline; on a non-blocking
        socket a missing reply raises BlockingIOError with what was read kept.
        """
        link = self._link
        session = link.session
        if link.prefix is not None or link.syn is not None:
            self._syn_ready(link)
        try:
            while not session.done:
                if session.error is not None:
                    raise session.error
                chunk = self._recv_reply_bytes(link, session.needed())
                if not chunk:
                    session.eof()
                out = session.receive(chunk)
                if isinstance(out, Dial):
                    self._retry(link, out)
                elif out:
                    link.pending += out
        except OSError as exc:
            if exc is session.error:
                raise self._failed(link, exc) from None
            raise
        if link.nodelay is not None:
            self._release_nodelay(link)
        callbacks, link.callbacks = link.callbacks, []
        for cb in callbacks or ():
            cb(None)

    def _retry(self, link: _Link, dial: Dial, fresh: bool = False) -> None:
        """Connect again on this fd per `dial` (fresh: the fd was never connected); a
        non-blocking socket does not wait for the handshake when the whole payload went
        with the SYN (check_deadlines and the next read or write see how it ends)."""
        pending = redial(self, link.session, dial, None, wait=self.gettimeout() != 0.0,
                         fresh=fresh)
        link.dial_deadline = pending
        start = time.monotonic() if pending is None or pending == math.inf else pending
        link.reply_deadline = start + link.reply_timeout
        if link.on_deadlines is not None:
            link.on_deadlines()

    def _handshake_done(self, link: _Link) -> None:
        """A non-blocking dial's handshake is over: no connect deadline any more, and
        learn from it (TFO cookie mode, RTT) when it was the request-in-the-SYN's."""
        link.dial_deadline = None
        if link.learn is not None:
            attempt, taken = link.learn
            link.learn = None
            try:
                acked = bool(taken) and tfo.syn_data_acked(self)
                link.session.connected(attempt, bool(taken), acked, tfo.rtt_seconds(self))
            except OSError:
                pass

    def _dial_failed(self, link: _Link, exc: OSError, timed_out: bool = False) -> None:
        """A non-blocking retry's handshake failed: on to the next PEP (or raise)."""
        link.dial_deadline = None
        link.learn = None
        self._retry(link, link.session.connect_failed(exc, timed_out=timed_out))

    def _recv_reply_bytes(self, link: _Link, n: int) -> bytes:
        timeout = self.gettimeout()
        left = link.reply_deadline - time.monotonic()
        if timeout == 0.0:
            try:
                data = super().recv(n)
            except BlockingIOError:
                if link.dial_deadline is not None and tfo.established(self):
                    self._handshake_done(link)
                if link.dial_deadline is not None and time.monotonic() >= link.dial_deadline:
                    self._dial_failed(link, TimeoutError(
                        errno.ETIMEDOUT, f"the PEP at {link.session.dial.pep} did not answer"), True)
                elif left <= 0:
                    raise link.session.reply_timed_out(link.reply_timeout) from None
                raise
            except OSError as exc:
                if link.dial_deadline is None:
                    raise
                self._dial_failed(link, exc)
                raise BlockingIOError(errno.EAGAIN, "retrying with the next PEP") from None
            if link.dial_deadline is not None:
                self._handshake_done(link)
            return data
        if timeout is not None and timeout < left:
            if not _wait(self, select.POLLIN, timeout):
                raise TimeoutError("timed out")
        elif not _wait(self, select.POLLIN, max(left, 0.0)):
            raise link.session.reply_timed_out(link.reply_timeout)
        return super().recv(n)

    def _app_bytes(self, n: int, flags: int) -> bytes | None:
        """Pending application bytes after the reply (None: read the socket)."""
        link = self._link
        if not link.session.done:
            self._consume_reply()
        pending = link.pending
        if not pending:
            link.plain = True
            return None
        data = pending[:n] if n else pending
        if not flags & socket.MSG_PEEK:
            link.pending = pending[len(data):]
        return data

    # -- reads -------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        link = self._link
        if link is not None and not link.plain:
            data = self._app_bytes(bufsize, flags)
            if data is not None:
                return data
        return super().recv(bufsize, flags)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        link = self._link
        if link is not None and not link.plain:
            view = memoryview(buffer).cast("B")
            data = self._app_bytes(nbytes or len(view), flags)
            if data is not None:
                view[:len(data)] = data
                return len(data)
        return super().recv_into(buffer, nbytes, flags)

    def recvfrom(self, bufsize: int, flags: int = 0):
        return self.recv(bufsize, flags), None

    def recvfrom_into(self, buffer, nbytes: int = 0, flags: int = 0):
        return self.recv_into(buffer, nbytes, flags), None

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0):
        link = self._link
        if link is not None and not link.plain:
            data = self._app_bytes(bufsize, flags)
            if data is not None:
                return data, [], 0, None
        return super().recvmsg(bufsize, ancbufsize, flags)

    # -- writes: pass through, kept for a replay until the reply, refused after an Error --

    def send(self, data, flags: int = 0) -> int:
        link = self._link
        if link is None or link.plain:
            return super().send(data, flags)
        session = link.session
        if session.error is not None:
            raise session.error
        if link.prefix is not None or link.syn is not None:
            taken = self._syn_ready(link, data)
            if taken > 0 or (taken == 0 and not len(data)):
                return taken
            if taken == 0:
                raise BlockingIOError(errno.EAGAIN, "the SYN is on its way")
        try:
            n = super().send(data, flags)
        except BlockingIOError:
            raise
        except OSError as exc:
            if link.dial_deadline is None:
                raise
            try:                                    # a non-blocking retry's handshake failed
                self._dial_failed(link, exc)
            except OSError as final:
                raise self._failed(link, final) if final is session.error else final from None
            raise BlockingIOError(errno.EAGAIN, "retrying with the next PEP") from None
        if not session.done:
            session.sent(memoryview(data).cast("B")[:n])
        return n

    def sendall(self, data, flags: int = 0) -> None:
        link = self._link
        if link is None or link.plain:
            return super().sendall(data, flags)
        if link.session.error is not None:
            raise link.session.error
        if link.session.done and link.prefix is None and link.syn is None:
            return super().sendall(data, flags)
        view = memoryview(data).cast("B")
        while view:
            view = view[self.send(view, flags):]

    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address=None):
        link = self._link
        extra = () if address is None else (address,)
        if link is None or link.plain:
            return super().sendmsg(buffers, ancdata, flags, *extra)
        if link.session.error is not None:
            raise link.session.error
        data = b"".join(buffers)
        if link.prefix is not None or link.syn is not None:
            if ancdata or address is not None:
                self._syn_ready(link)           # the Convert message first, alone
            else:
                taken = self._syn_ready(link, data)
                if taken > 0 or (taken == 0 and not data):
                    return taken
                if taken == 0:
                    raise BlockingIOError(errno.EAGAIN, "the SYN is on its way")
        n = super().sendmsg([data], ancdata, flags, *extra)
        if not link.session.done:
            link.session.sent(data[:n])
        return n

    def sendfile(self, file, offset=0, count=None):
        link = self._link
        if link is not None and not link.session.done:
            return self._sendfile_use_send(file, offset, count)  # kept for a replay
        return super().sendfile(file, offset, count)

    # -- handing over ------------------------------------------------------------------

    def detach(self) -> int:
        """Hand the fd over (ssl.wrap_socket does this): the reply must be gone first.

        TLS then reads the fd itself, so the reply is consumed here, waiting
        for it within the socket's timeout.
        """
        if not self._closed and self._link is not None:
            self._consume_reply()
            if self._link.pending:
                raise OSError(errno.EPROTO, "cannot hand over a PEP socket holding unread "
                                            "data; read it before wrapping")
        return super().detach()

    def __repr__(self) -> str:
        if self._link is None:
            return super().__repr__().replace("<socket.socket", "<PepSocket", 1)
        return (f"<PepSocket fd={self.fileno()} destination={self._link.session.destination} "
                f"pep={self.pep}>")


# ----------------------------------------------------------------------------------
# Dialling: shared by the first connect and by a retry on the application's fd


def _wait(sock: socket.socket, events: int, seconds: float | None) -> bool:
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(None if seconds is None else seconds * 1000))


def start_dial(sock: socket.socket, dial: Dial) -> int:
    """Start connecting a non-blocking socket for `dial`: how many payload bytes the
    kernel took with the SYN (0: send them after the handshake)."""
    if dial.pep is None:
        err = sock.connect_ex(dial.sockaddr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        return 0
    if dial.no_cookie:
        tfo.allow_data_without_cookie(sock)
    return tfo.send_in_syn(sock, dial.payload, dial.sockaddr)


def handshake_error(sock: socket.socket, dial: Dial) -> OSError | None:
    """The connect's outcome once the socket is writable (None: connected)."""
    err = socket.socket.getsockopt(sock, socket.SOL_SOCKET, socket.SO_ERROR)
    if not err:
        return None
    where = f"the PEP at {dial.pep}" if dial.pep else "the destination"
    return OSError(err, f"{errno.errorcode.get(err, err)} connecting to {where}: "
                        f"{os.strerror(err)}")


def connected(sock: socket.socket, session: ClientSession, dial: Dial, taken: int,
              started: float) -> None:
    attempted = taken > 0
    session.connected(dial, attempted, attempted and tfo.syn_data_acked(sock),
                      time.monotonic() - started)


def connect_blocking(sock: socket.socket, dial: Dial, deadline: float | None,
                     session: ClientSession | None = None, started: float | None = None,
                     taken: int | None = None) -> OSError | None:
    """Connect the non-blocking `sock` per `dial` and send the payload; None, or the
    error that session.connect_failed() is to judge (TimeoutError: the PEP's own
    connect timeout). The caller's `deadline` (time.monotonic()) raises TimeoutError.
    `started`/`taken`: the dial was already started (start_dial)."""
    if taken is None:
        started = time.monotonic()
        taken = start_dial(sock, dial)
    limit = started + dial.connect_timeout if dial.connect_timeout else None
    caller_first = deadline is not None and (limit is None or deadline <= limit)
    until = deadline if caller_first else limit
    if not _wait(sock, select.POLLOUT, None if until is None else max(0.0, until - time.monotonic())):
        if caller_first:
            raise TimeoutError(errno.ETIMEDOUT, f"timed out connecting to "
                                                f"{dial.pep or dial.sockaddr[0]}")
        return TimeoutError(errno.ETIMEDOUT, f"the PEP at {dial.pep} did not answer")
    err = handshake_error(sock, dial)
    if err is not None:
        return err
    if session is not None:
        connected(sock, session, dial, taken, started)
    rest = memoryview(dial.payload)[taken:]
    while rest:
        try:
            rest = rest[socket.socket.send(sock, rest):]
        except BlockingIOError:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _wait(sock, select.POLLOUT, left):
                raise TimeoutError(errno.ETIMEDOUT, "timed out sending the Convert header") \
                    from None
    return None


def restart_dial(sock: socket.socket, session: ClientSession, dial: Dial,
                 fresh: bool = False) -> tuple[float, int]:
    """Start `dial` on the application's own non-blocking fd: dissolve its association
    (unless fresh: never connected), check the family, set TFO for this PEP.
    Returns (time.monotonic() at the start, payload bytes the kernel took)."""
    if not fresh:
        tfo.reset(sock)
    if isinstance(sock, PepSocket) and sock._link is not None:
        sock._link.prefix = None         # a retry carries the Convert message itself
    tfo.defer_connect(sock, False)
    if dial.family != sock.family:
        raise session.fail(OSError(errno.EAFNOSUPPORT, f"cannot retry {dial.pep or 'direct'}"
                                                        f" on this socket's address family"))
    if dial.pep is not None and not dial.no_cookie:
        sock.setsockopt(socket.IPPROTO_TCP, tfo.TCP_FASTOPEN_NO_COOKIE, 0)
    return time.monotonic(), start_dial(sock, dial)


def redial(sock: PepSocket, session: ClientSession, dial: Dial, deadline: float | None,
           wait: bool = True, fresh: bool = False) -> float | None:
    """Retry on the application's own fd (Error 3, Error 64/65, the fallback): dissolve
    the association, connect again per `dial` (replaying the early bytes).  Waits for
    the handshake (None: connected), except with wait=False when the whole payload
    went with the SYN: then returns the handshake's deadline (time.monotonic(); inf
    when only the reply deadline bounds it).  fresh: the fd has never been connected
    (aiosock.DialSocket's first dial), nothing to dissolve."""
    timeout = sock.gettimeout()
    try:
        while True:
            socket.socket.setblocking(sock, False)
            started, taken = restart_dial(sock, session, dial, fresh)
            fresh = False
            if not wait and taken >= len(dial.payload):
                if dial.pep is None:
                    return None
                return started + (dial.connect_timeout or math.inf)
            err = connect_blocking(sock, dial, deadline, session, started, taken)
            if err is None:
                return None
            dial = session.connect_failed(err, timed_out=err.errno == errno.ETIMEDOUT
                                          and isinstance(err, TimeoutError))
    finally:
        socket.socket.settimeout(sock, timeout)


#: Seconds a deferred SYN waits for the application's first write before the Convert
#: message goes alone (an application that waits for the server to speak first).
FLUSH_AFTER = 0.02


class _Flusher:
    """One daemon thread that sends the deferred SYN of PepSockets not written to
    within FLUSH_AFTER (libpep.so does the same from its wait hooks)."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """Fresh state (and a fresh lock: a fork may copy it held); the thread starts
        on the next add()."""
        self._cond = threading.Condition()
        self._heap: list = []
        self._seq = 0
        self._thread: threading.Thread | None = None

    def add(self, sock: PepSocket) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + FLUSH_AFTER, self._seq,
                                        weakref.ref(sock)))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pepsock-flush",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, ref = self._heap[0]
                left = when - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
            sock = ref()
            if sock is not None:
                sock._flush_from_timer()


_flusher = _Flusher()


def start_deferred(sock: PepSocket, dial: Dial) -> str | OSError:
    """Connect `sock` (non-blocking) to dial's PEP with the SYN deferred to the first
    write (TCP_FASTOPEN_CONNECT): "deferred"; "plain" when the kernel sent a plain SYN
    at once (no cookie for a PEP that wants one: go on as an ordinary dial); "no" when
    it cannot defer here (the client side of TFO off: a deferred connect's first write
    would fail with EOPNOTSUPP); an OSError when the connect failed."""
    if not (tfo.sysctl_value() or 0) & tfo.CLIENT_ENABLE or not tfo.defer_connect(sock, True):
        return "no"
    if dial.no_cookie:
        tfo.allow_data_without_cookie(sock)
    err = sock.connect_ex(dial.sockaddr)
    tfo.defer_connect(sock, False)
    if err == 0:
        return "deferred"
    if err == errno.EINPROGRESS:
        return "plain"
    return OSError(err, f"{errno.errorcode.get(err, err)} connecting to the PEP at {dial.pep}: "
                        f"{os.strerror(err)}")


def _deadline(timeout) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def create_connection(address, timeout=_GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                      all_errors=False, pep=None, request_in_syn=None):
    """Like socket.create_connection, through an RFC 8803 PEP in 0-RTT.

    pep=(host, port) forces that PEP; otherwise PEP_PROXY and PEP_NO_PROXY
    decide (docs/protocol.md), and no PEP means socket.create_connection.
    The destination name is resolved here; its first address goes to the PEP.
    The PEPs (every address of each) are tried in order, skipping those held
    down; none left means PEP_FALLBACK.  `timeout` counts until the PEP's
    reply (a late reply fails the first read with ETIMEDOUT).  all_errors is
    passed to socket.create_connection for a direct connection; through PEPs the
    error raised is the one that decided (see docs/protocol.md).

    request_in_syn: return at once and send the SYN with the Convert message and
    the application's first write together (RFC 8803's 0-RTT, as libpep.so does);
    the PEP's errors (refused, timeouts, failover, fallback) then surface in that
    first write or read.  None (default): only when `timeout` is None (a caller
    with a timeout expects connect errors from here) and PEP_CONFIRM does not
    name the destination.  See docs/python.md "The request in the SYN".
    """
    host, port = address[0], int(address[1])
    conf = _route.settings()
    route = _route.plan_sync(host, port, conf, pep)
    if route.direct is not None:
        direct_kw = {"all_errors": True} if all_errors else {}
        return socket.create_connection(route.direct, timeout, source_address, **direct_kw)
    return connect_route(route, conf, timeout, source_address, all_errors=all_errors,
                         request_in_syn=request_in_syn)


def connect_route(route: _route.Route, conf: _route.Settings, timeout=_GLOBAL_DEFAULT_TIMEOUT,
                  source_address=None, *, all_errors=False, socket_options=(),
                  request_in_syn=None):
    """create_connection() for a route that goes through PEPs (route.direct is None).
    socket_options: (level, name, value) tuples set on each socket before it connects."""
    direct_kw = {"all_errors": True} if all_errors else {}
    if timeout is _GLOBAL_DEFAULT_TIMEOUT:
        timeout = socket.getdefaulttimeout()
    deadline = _deadline(timeout)
    session = ClientSession(route, conf)
    dial = session.first_dial()
    defer = timeout is None if request_in_syn is None else bool(request_in_syn)
    defer = defer and not conf.confirms(session.destination)
    deferred = False
    while dial.pep is not None:
        sock = PepSocket(dial.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            for option in socket_options:
                sock.setsockopt(*option)
            if source_address:
                sock.bind(source_address)
            sock.setblocking(False)
            how = start_deferred(sock, dial) if defer else "no"
            err = how if isinstance(how, OSError) else None
            deferred = how == "deferred"
            if how == "no":
                err = connect_blocking(sock, dial, deadline, session)
            elif how == "plain":             # the Convert message follows the handshake
                err = connect_blocking(sock, dial, deadline, session, time.monotonic(), 0)
        except BaseException:
            sock.close()
            raise
        if err is None:
            break
        sock.close()
        dial = session.connect_failed(err, timed_out=isinstance(err, TimeoutError))
    else:  # no usable PEP left, PEP_FALLBACK=direct
        sock = socket.create_connection(dial.sockaddr[:2], timeout, source_address, **direct_kw)
        try:
            for option in socket_options:
                sock.setsockopt(*option)
        except BaseException:
            sock.close()
            raise
        return sock
    reply_deadline = time.monotonic() + conf.reply_timeout
    if deadline is not None:
        reply_deadline = min(reply_deadline, deadline)
    sock.attach(session, conf.reply_timeout, reply_deadline)
    if not deferred and not tfo.syn_data_acked(sock):
        sock._hold_nodelay(sock._link)
    sock.settimeout(timeout)
    if deferred:
        sock.defer_syn(dial.payload)
    if conf.confirms(session.destination):
        try:
            sock._consume_reply()       # PEP_CONFIRM: the verdict before connect returns
        except BaseException:
            sock.close()
            raise
    return sock
