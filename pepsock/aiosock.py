"""PepSockets under asyncio's own transports: TLS and libraries with no wait.

asyncio's selector transports read through the socket object's recv()/
recv_into() and write through its send(): given a PepSocket (sock=), they get
the PEP's reply stripped with no extra layer, and `peername` is the
destination. TLS over such a transport (create_connection(ssl=...), start_tls,
anyio's and aiohttp's TLS) is driven through memory BIOs, so the ClientHello
leaves right after the TCP handshake, before the PEP's reply.

`DialSocket` is a PepSocket whose connect() goes to the PEP with the Convert
header in the SYN, whatever address it is given: that is what lets a library
that creates and connects sockets itself (aiohttp's `socket_factory`) use the
PEP. Only the selector event loops read through the socket object; uvloop
and other loops read the descriptor directly (`strips_in_transport()`).
"""
from __future__ import annotations

import asyncio
import errno
import select
import socket
import ssl as _ssl

from . import protocol, tfo
from .client import PepSocket, choose_pep
from .policy import normalize_ip


def strips_in_transport(loop) -> bool:
    """Whether `loop`'s socket transports read through the socket object."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


def _destination(dest_ip: str, port: int) -> tuple:
    ip = normalize_ip(dest_ip)
    return (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0)


class DialSocket(PepSocket):
    """A PepSocket for one destination and PEP; connect() dials the PEP.

    connect(any address) starts a TFO connect to the PEP carrying the Convert
    header for `destination` (non-blocking: raises BlockingIOError EINPROGRESS,
    as connect() on a non-blocking socket does; blocking: waits within the
    timeout). Header bytes a plain SYN could not carry are sent first by the
    next send()/sendall()/sendmsg(), or by send_header().
    """

    @classmethod
    def for_route(cls, dest_ip: str, port: int, pep_addrinfo) -> "DialSocket":
        family, _, proto, _, pep_sockaddr = pep_addrinfo
        sock = cls(family, socket.SOCK_STREAM, proto)
        # (PepSocket's initialiser; adapt here when PepSocket gets a real constructor)
        sock._pep_init(_destination(dest_ip, port), pep_sockaddr[:2])
        sock._pep_sockaddr = pep_sockaddr
        sock._header_rest = protocol.connect_request(dest_ip, port)
        sock._dialed = False
        return sock

    def connect(self, address=None) -> None:
        if self._dialed:
            raise OSError(errno.EISCONN, "DialSocket: already connected to the PEP")
        self._dialed = True
        timeout = self.gettimeout()
        tfo.allow_data_without_cookie(self)
        self.setblocking(False)
        try:
            taken = tfo.send_in_syn(self, self._header_rest, self._pep_sockaddr)
        finally:
            self.settimeout(timeout)
        self._header_rest = self._header_rest[taken:]
        if timeout == 0.0:
            raise BlockingIOError(errno.EINPROGRESS, "connecting to the PEP")
        _, writable, _ = select.select([], [self], [], timeout)
        err = self.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not writable:
            raise TimeoutError(errno.ETIMEDOUT, f"timed out connecting to the PEP at {self.pep}")
        if err:
            raise OSError(err, f"connecting to the PEP at {self.pep}: {errno.errorcode.get(err)}")
        self.send_header()

    def connect_ex(self, address=None) -> int:
        try:
            self.connect(address)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def send_header(self) -> None:
        """Send what is left of the Convert header (BlockingIOError if it cannot)."""
        while self._header_rest:
            self._header_rest = self._header_rest[socket.socket.send(self, self._header_rest):]

    def send(self, data, flags: int = 0) -> int:
        self.send_header()
        return super().send(data, flags)

    def sendall(self, data, flags: int = 0) -> None:
        self.send_header()
        return super().sendall(data, flags)

    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address=None):
        self.send_header()
        return super().sendmsg(buffers, ancdata, flags, address)


def _same_endpoint(a, b) -> bool:
    return normalize_ip(a[0]) == normalize_ip(b[0]) and a[1] == b[1]


async def dial(host: str, port: int, *, pep=None, local_addr=None) -> DialSocket | None:
    """A non-blocking PepSocket connected to the PEP for host:port, or None when
    the rules (PEP_PROXY, PEP_NO_PROXY, a connection to the PEP itself) say direct.
    The header is in the SYN; the PEP's reply has not been waited for."""
    chosen, bypass = choose_pep(host, port, pep)
    if chosen is None:
        return None
    loop = asyncio.get_running_loop()
    dest_ip = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0][4][0]
    if bypass is not None and bypass.matches(address=dest_ip, port=port):
        return None
    errors = []
    for info in await loop.getaddrinfo(chosen[0], chosen[1], type=socket.SOCK_STREAM):
        if _same_endpoint(info[4], (dest_ip, port)):
            return None   # never wrap a connection to the PEP itself
        sock = DialSocket.for_route(dest_ip, port, info)
        try:
            sock.setblocking(False)
            if local_addr is not None:
                sock.bind(local_addr)
            await loop.sock_connect(sock, info[4])
            sock.send_header()
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    raise errors[0]


async def open_tls_streams(dest_ip: str, port: int, pep, limit: int, ssl, server_hostname):
    """(reader, writer) over TLS through the PEP, the handshake started at once."""
    loop = asyncio.get_running_loop()
    sock = await dial(dest_ip, port, pep=pep)
    if sock is None:   # the PEP itself: direct, as the rules say
        return await asyncio.open_connection(dest_ip, port, limit=limit, ssl=ssl,
                                             server_hostname=server_hostname)
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    stream_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    context = _ssl.create_default_context() if ssl is True else ssl
    try:
        transport, _ = await loop.create_connection(lambda: stream_protocol, sock=sock,
                                                    ssl=context, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    writer = asyncio.StreamWriter(transport, stream_protocol, reader, loop)
    writer.destination = sock.destination
    return reader, writer


def aiohttp_socket_factory(addr_info) -> socket.socket:
    """For `aiohttp.TCPConnector(socket_factory=...)`: a DialSocket when the rules
    send addr_info's destination to a PEP, else a plain socket.

    aiohttp has resolved the name already, so PEP_NO_PROXY name entries do not
    apply (address entries do), as in libpep.so. The PEP's address must be of
    the destination's family (aiohttp connects with the destination's family).
    """
    family, type_, proto, _, sockaddr = addr_info
    dest_ip, port = sockaddr[0], sockaddr[1]
    chosen, _ = choose_pep(dest_ip, port)
    if chosen is not None:
        infos = [i for i in socket.getaddrinfo(chosen[0], chosen[1], 0, socket.SOCK_STREAM)
                 if i[0] == family]
        if not infos:
            raise OSError(errno.EAFNOSUPPORT, f"the PEP {chosen[0]}:{chosen[1]} has no "
                                              f"{family.name} address for {dest_ip}")
        if not _same_endpoint(infos[0][4], (dest_ip, port)):
            return DialSocket.for_route(dest_ip, port, infos[0])
    return socket.socket(family, type_, proto)
