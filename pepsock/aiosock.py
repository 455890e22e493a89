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

from . import aio
from . import route as _route
from .client import PepSocket
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
    the next PEPs as create_connection does. Non-blocking (asyncio's
    sock_connect): returns at once when the whole message went with the SYN;
    the handshake's outcome, a PEP that does not answer and the reply deadline
    are then handled as for a retry (PepSocket.check_deadlines, on a timer of the
    running loop, and the next read or write). Without TFO it waits for the
    handshake, at most the PEP connect timeout.
    """

    _first = None

    @classmethod
    def for_route(cls, route: _route.Route, conf: _route.Settings) -> "DialSocket":
        session = ClientSession(route, conf)
        first = session.first_dial()
        sock = cls(first.family, socket.SOCK_STREAM)
        sock.attach(session, conf.reply_timeout, math.inf)
        sock._first = first
        return sock

    def connect(self, address=None) -> None:
        first, self._first = self._first, None
        if first is None:
            raise OSError(errno.EISCONN, "DialSocket: already connected")
        self._retry(self._link, first, fresh=True)
        if self.gettimeout() == 0.0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return          # no loop: the caller calls check_deadlines()
            aio.arm_deadlines(loop, self)

    def connect_ex(self, address=None) -> int:
        try:
            self.connect(address)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0


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
