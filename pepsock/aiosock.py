"""PepSockets under asyncio's own transports: TLS and libraries with no wait.

asyncio's selector transports read through the socket object's recv()/
recv_into() and write through its send(): given a PepSocket (sock=), they get
the PEP's reply stripped with no extra layer, and `peername` is the
destination. TLS over such a transport (create_connection(ssl=...), start_tls,
anyio's and aiohttp's TLS) is driven through memory BIOs, so the ClientHello
leaves right after the TCP handshake, before the PEP's reply.

Nothing here decides a route or speaks RFC 8803: `dial` is aio.connect (route
planner, ClientSession, the reply-deadline timer), and `DialSocket` is a
PepSocket whose connect() makes the ClientSession's first dial on its own fd,
which is what lets a library that creates and connects sockets itself
(aiohttp's `socket_factory`) use the PEP. Only the selector event loops read
through the socket object; uvloop and other loops read the descriptor
directly (`strips_in_transport()`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import math
import socket
import time

from . import aio
from . import route as _route
from . import tfo
from .client import PepSocket, connected, handshake_error, restart_dial
from .session import ClientSession


def strips_in_transport(loop) -> bool:
    """Whether `loop`'s socket transports read through the socket object."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


async def dial(host: str, port: int, *, pep=None, local_addr=None,
               timeout: float | None = None) -> PepSocket | None:
    """A non-blocking PepSocket connected to the PEP for host:port, or None when
    the rules (PEP_PROXY, PEP_NO_PROXY, a connection to the PEP itself,
    PEP_FALLBACK=direct) say direct. The header was in the SYN; the PEP's reply
    has not been waited for (a timer on the running loop bounds it)."""
    sock, _ = await aio.connect(host, port, pep=pep, timeout=timeout, local_addr=local_addr)
    return sock


class DialSocket(PepSocket):
    """A PepSocket for one planned route; connect() dials the route's PEPs.

    connect(any address) makes the ClientSession's first dial on this fd (the
    Convert message in the SYN, TFO). Blocking: waits for the handshake, trying
    the next PEPs as create_connection does. Non-blocking, as asyncio's
    sock_connect uses it: raises BlockingIOError(EINPROGRESS); the loop then
    reads SO_ERROR when the fd is writable, and that read (getsockopt) is where
    the handshake is judged: a refused PEP starts the next dial on the same fd
    and answers BlockingIOError (asyncio waits on), the last failure is raised,
    success arms the reply deadline. A PEP that does not answer within its
    connect timeout is left for the next by a timer on the running loop.
    """

    _first = None
    _dialing = None     # the Dial whose TCP handshake is in progress (non-blocking connect)
    _timer = None
    _connect_error = None

    @classmethod
    def for_route(cls, route: _route.Route, conf: _route.Settings) -> "DialSocket":
        session = ClientSession(route, conf)
        first = session.first_dial()
        sock = cls(first.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.attach(session, conf.reply_timeout, math.inf)
        sock._first = first
        return sock

    def connect(self, address=None) -> None:
        first, self._first = self._first, None
        if first is None:
            raise OSError(errno.EISCONN, "DialSocket: already connected")
        if self.gettimeout() != 0.0:
            self._retry(self._link, first, fresh=True)   # waits, fails over
            return
        self._start(first, fresh=True)
        raise BlockingIOError(errno.EINPROGRESS, "connecting to the PEP")

    def connect_ex(self, address=None) -> int:
        try:
            self.connect(address)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _start(self, dial, fresh: bool = False) -> None:
        self._dialing = dial
        self._started, self._taken = restart_dial(self, self._link.session, dial, fresh)
        if dial.connect_timeout:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(dial.connect_timeout, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        """The PEP did not answer in time: on to the next dial. The writer callback
        asyncio waits with stays registered and fires for that one (or, once every
        PEP failed, for the reset socket, and getsockopt raises the error)."""
        self._timer = None
        dial = self._dialing
        if dial is None or self._closed:
            return
        try:
            self._start(self._link.session.connect_failed(
                TimeoutError(errno.ETIMEDOUT, f"the PEP at {dial.pep} did not answer"),
                timed_out=True))
        except OSError as exc:
            self._connect_error = exc
            tfo.reset(self)         # writable now: asyncio's callback comes and reads it

    def getsockopt(self, level, option, *args):
        if self._dialing is None or args or (level, option) != (socket.SOL_SOCKET,
                                                                socket.SO_ERROR):
            return super().getsockopt(level, option, *args)
        return self._judge_handshake()

    def _judge_handshake(self) -> int:
        """asyncio's sock_connect asks for SO_ERROR: 0 once connected through a PEP
        (or straight, PEP_FALLBACK); BlockingIOError while a next dial runs."""
        if self._connect_error is not None:
            self._dialing = None
            raise self._connect_error
        dial, session = self._dialing, self._link.session
        err = handshake_error(self, dial)
        if err is not None:
            self._stop_timer()
            try:
                self._start(session.connect_failed(err))
            except OSError:
                self._dialing = None
                raise
            raise BlockingIOError(errno.EINPROGRESS, "trying the next PEP")
        while self._taken < len(dial.payload):          # the header a plain SYN did not carry
            self._taken += socket.socket.send(self, dial.payload[self._taken:])
        self._stop_timer()
        self._dialing = None
        connected(self, session, dial, self._taken, self._started)
        link = self._link
        link.reply_deadline = time.monotonic() + link.reply_timeout
        try:
            aio.arm_deadlines(asyncio.get_running_loop(), self)
        except RuntimeError:
            pass
        return 0

    def close(self) -> None:
        self._stop_timer()
        super().close()


def aiohttp_socket_factory(addr_info) -> socket.socket:
    """For `aiohttp.TCPConnector(socket_factory=...)`: a DialSocket when the rules
    send addr_info's destination to a PEP, else a plain socket.

    aiohttp has resolved the name already, so PEP_NO_PROXY name entries do not
    apply (address entries do), as in libpep.so. aiohttp connects with the
    destination's address family, so only the PEPs' addresses of that family
    are used (EAFNOSUPPORT if there is none). PEP_PROXY names are resolved
    here, in the loop's thread (literal addresses need no resolver).
    """
    family, type_, proto, _, sockaddr = addr_info
    conf = _route.settings()
    route = _route.plan_sync(sockaddr[0], sockaddr[1], conf)
    if route.direct is not None:
        return socket.socket(family, type_, proto)
    peps = tuple(p for p in route.peps if p.family == family)
    if not peps:
        raise OSError(errno.EAFNOSUPPORT,
                      f"no PEP of PEP_PROXY has an {socket.AddressFamily(family).name} address "
                      f"for {route.destination} (aiohttp connects in the destination's family)")
    return DialSocket.for_route(dataclasses.replace(route, peps=peps), conf)
