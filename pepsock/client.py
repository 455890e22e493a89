"""create_connection(): a TCP connection through an RFC 8803 PEP in 0-RTT.

The Convert header + Connect TLV ride in the SYN (TCP Fast Open), so reaching
the PEP costs no round trip more than reaching the server would.  The socket
returned is a real `socket.socket` (PepSocket) whose reads drop the PEP's
reply before the application's first byte; an Error TLV in that reply
surfaces as an OSError (ConvertError) on the first read, and on every read or
write after it.

This module is the blocking shell: the decisions are route.plan() (where to)
and session.ClientSession (what to send, what a reply means, what to try
next); asyncio (aio.py) drives the same two and the same PepSocket.
"""
from __future__ import annotations

import errno
import math
import os
import select
import socket
import time

from . import route as _route
from . import tfo
from .session import ClientSession, Dial

_GLOBAL_DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT  # the stdlib's sentinel


class _Link:
    """Per-connection state of a PepSocket, shared by its dup()s."""

    __slots__ = ("session", "pending", "plain", "reply_deadline", "reply_timeout", "callbacks",
                 "dial_deadline", "on_deadlines")

    def __init__(self, session: ClientSession, reply_timeout: float, reply_deadline: float):
        self.session = session
        self.pending = b""           # application bytes that came in with the reply
        self.plain = False           # reply consumed and nothing pending: pass-through
        self.reply_timeout = reply_timeout
        self.reply_deadline = reply_deadline
        self.callbacks: list = []
        self.dial_deadline: float | None = None  # a retry's handshake still in progress
        self.on_deadlines = None                 # called when next_deadline() moved


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
        try:
            if link.dial_deadline is not None and time.monotonic() >= link.dial_deadline:
                self._dial_failed(link, TimeoutError(
                    errno.ETIMEDOUT, f"the PEP at {session.dial.pep} did not answer"), True)
            elif time.monotonic() >= link.reply_deadline:
                raise session.reply_timed_out(link.reply_timeout)
        except OSError as exc:
            self._failed(link, session.fail(exc))

    check_reply_deadline = check_deadlines

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

    def _dial_failed(self, link: _Link, exc: OSError, timed_out: bool = False) -> None:
        """A non-blocking retry's handshake failed: on to the next PEP (or raise)."""
        link.dial_deadline = None
        self._retry(link, link.session.connect_failed(exc, timed_out=timed_out))

    def _recv_reply_bytes(self, link: _Link, n: int) -> bytes:
        timeout = self.gettimeout()
        left = link.reply_deadline - time.monotonic()
        if timeout == 0.0:
            try:
                data = super().recv(n)
            except BlockingIOError:
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
            link.dial_deadline = None
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
        if link.session.done:
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


def _deadline(timeout) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def create_connection(address, timeout=_GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                      all_errors=False, pep=None):
    """Like socket.create_connection, through an RFC 8803 PEP in 0-RTT.

    pep=(host, port) forces that PEP; otherwise PEP_PROXY and PEP_NO_PROXY
    decide (docs/protocol.md), and no PEP means socket.create_connection.
    The destination name is resolved here; its first address goes to the PEP.
    The PEPs (every address of each) are tried in order, skipping those held
    down; none left means PEP_FALLBACK.  `timeout` counts until the PEP's
    reply (a late reply fails the first read with ETIMEDOUT).  all_errors is
    passed to socket.create_connection for a direct connection; through PEPs the
    error raised is the one that decided (see docs/protocol.md).
    """
    host, port = address[0], int(address[1])
    conf = _route.settings()
    route = _route.plan_sync(host, port, conf, pep)
    if route.direct is not None:
        direct_kw = {"all_errors": True} if all_errors else {}
        return socket.create_connection(route.direct, timeout, source_address, **direct_kw)
    return connect_route(route, conf, timeout, source_address, all_errors=all_errors)


def connect_route(route: _route.Route, conf: _route.Settings, timeout=_GLOBAL_DEFAULT_TIMEOUT,
                  source_address=None, *, all_errors=False, socket_options=()):
    """create_connection() for a route that goes through PEPs (route.direct is None).
    socket_options: (level, name, value) tuples set on each socket before it connects."""
    direct_kw = {"all_errors": True} if all_errors else {}
    if timeout is _GLOBAL_DEFAULT_TIMEOUT:
        timeout = socket.getdefaulttimeout()
    deadline = _deadline(timeout)
    session = ClientSession(route, conf)
    dial = session.first_dial()
    while dial.pep is not None:
        sock = PepSocket(dial.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            for option in socket_options:
                sock.setsockopt(*option)
            if source_address:
                sock.bind(source_address)
            sock.setblocking(False)
            err = connect_blocking(sock, dial, deadline, session)
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
    sock.settimeout(timeout)
    if conf.confirms(session.destination):
        try:
            sock._consume_reply()       # PEP_CONFIRM: the verdict before connect returns
        except BaseException:
            sock.close()
            raise
    return sock
