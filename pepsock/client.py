"""create_connection(): a TCP connection through an RFC 8803 PEP in 0-RTT.

The Convert header + Connect TLV ride in the SYN (TCP Fast Open), so reaching
the PEP costs no round trip more than reaching the server would.  The socket
returned is a real `socket.socket` whose reads drop the PEP's reply before the
application's first byte; an Error TLV in that reply surfaces as an OSError
(ConvertError) on the first read, and on every read or write after it.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time

from . import protocol, tfo
from .policy import ProxyConfig, normalize_ip, parse_hostport

_GLOBAL_DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT  # the stdlib's sentinel


class PepSocket(socket.socket):
    """A socket connected to a PEP that reads like one connected to the destination.

    Reads (recv, recv_into, recvfrom, recvfrom_into, recvmsg and makefile())
    first consume the PEP's Convert reply; writes fail once that reply said
    Error.  `destination` and `pep` hold the two ends; getpeername() returns
    the destination, as the application asked for it.
    """

    def _pep_init(self, destination, pep) -> None:
        self.destination = destination
        self.pep = pep
        self._reply = protocol.MessageReader()
        self._pending = b""  # application bytes that came in with the reply
        self._error: OSError | None = None

    # -- the reply ------------------------------------------------------------

    @property
    def reply_received(self) -> bool:
        return self._reply.done

    def _fail(self, exc: OSError) -> OSError:
        self._error = exc
        tfo.reset(self)
        return exc

    def _consume_reply(self) -> None:
        """Read until the PEP's reply is complete; raise if it is an error.

        Honours the socket's timeout; on a non-blocking socket a missing
        reply raises BlockingIOError with what was read kept for later.
        """
        if self._error is not None:
            raise self._error
        while not self._reply.done:
            chunk = super().recv(max(self._reply.needed(), 4))
            if not chunk:
                raise self._fail(ConnectionResetError(
                    errno.ECONNRESET, "the PEP closed the connection before its RFC 8803 reply"))
            try:
                msg = self._reply.feed(chunk)
                if msg is not None:
                    protocol.check_reply(msg)
            except protocol.ProtocolError as exc:
                raise self._fail(OSError(errno.EPROTO, f"bad reply from the PEP: {exc}")) from None
            except protocol.ConvertError as exc:
                raise self._fail(exc) from None
        self._pending = self._reply.rest
        self._reply.rest = b""

    def _take_pending(self, n: int, flags: int) -> bytes:
        data = self._pending[:n] if n else self._pending
        if not flags & socket.MSG_PEEK:
            self._pending = self._pending[len(data):]
        return data

    # -- reads ----------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._consume_reply()
        if self._pending:
            return self._take_pending(bufsize, flags)
        return super().recv(bufsize, flags)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        self._consume_reply()
        if self._pending:
            view = memoryview(buffer).cast("B")
            data = self._take_pending(nbytes or len(view), flags)
            view[:len(data)] = data
            return len(data)
        return super().recv_into(buffer, nbytes, flags)

    def recvfrom(self, bufsize: int, flags: int = 0):
        return self.recv(bufsize, flags), None

    def recvfrom_into(self, buffer, nbytes: int = 0, flags: int = 0):
        return self.recv_into(buffer, nbytes, flags), None

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0):
        self._consume_reply()
        if self._pending:
            return self._take_pending(bufsize, flags), [], 0, None
        return super().recvmsg(bufsize, ancbufsize, flags)

    # -- writes: pass through, unless the PEP already said no ----------------------

    def send(self, data, flags: int = 0) -> int:
        if self._error is not None:
            raise self._error
        return super().send(data, flags)

    def sendall(self, data, flags: int = 0) -> None:
        if self._error is not None:
            raise self._error
        return super().sendall(data, flags)

    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address=None):
        if self._error is not None:
            raise self._error
        return super().sendmsg(buffers, ancdata, flags, *(() if address is None else (address,)))

    # -- identity -------------------------------------------------------------

    def getpeername(self):
        return self.destination

    def detach(self) -> int:
        """Hand the fd over (ssl.wrap_socket does this): the reply must be gone first.

        TLS then reads the fd itself, so the reply is consumed here, waiting
        for it within the socket's timeout.
        """
        if not self._closed:
            self._consume_reply()
            if self._pending:
                raise OSError(errno.EPROTO, "cannot hand over a PEP socket holding unread "
                                            "data; read it before wrapping")
        return super().detach()

    def __repr__(self) -> str:
        return f"<PepSocket fd={self.fileno()} destination={self.destination} pep={self.pep}>"


def _deadline(timeout) -> float | None:
    if timeout is None or timeout is _GLOBAL_DEFAULT_TIMEOUT:
        timeout = socket.getdefaulttimeout()
    return None if timeout is None else time.monotonic() + timeout


def _wait_connected(sock: socket.socket, deadline: float | None, where) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if poller.poll(None if left is None else left * 1000):
            break
        if left == 0:
            raise TimeoutError(errno.ETIMEDOUT, f"timed out connecting to the PEP at {where}")
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"{errno.errorcode.get(err, err)} connecting to the PEP at {where}: "
                           f"{os.strerror(err)}")


def _send_rest(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    while data:
        try:
            data = data[sock.send(data):]
        except BlockingIOError:
            _wait_connected(sock, deadline, sock.getpeername())


def connect_via_pep(dest_ip: str, dest_port: int, pep_addrinfo, timeout=_GLOBAL_DEFAULT_TIMEOUT,
                    source_address=None) -> PepSocket:
    """Connect to one PEP address (a getaddrinfo 5-tuple) for dest_ip:dest_port."""
    family, type_, proto, _, pep_sockaddr = pep_addrinfo
    header = protocol.connect_request(dest_ip, dest_port)
    deadline = _deadline(timeout)
    ip = normalize_ip(dest_ip)
    sock = PepSocket(family, socket.SOCK_STREAM, proto)
    sock._pep_init((str(ip), dest_port) if ip.version == 4 else (str(ip), dest_port, 0, 0),
                   pep_sockaddr[:2])
    try:
        if source_address:
            sock.bind(source_address)
        tfo.allow_data_without_cookie(sock)
        sock.setblocking(False)
        taken = tfo.send_in_syn(sock, header, pep_sockaddr)
        _wait_connected(sock, deadline, pep_sockaddr[:2])
        _send_rest(sock, header[taken:], deadline)
        sock.settimeout(socket.getdefaulttimeout() if timeout is _GLOBAL_DEFAULT_TIMEOUT
                        else timeout)
        return sock
    except BaseException:
        sock.close()
        raise


def _resolve(host: str, port: int, what: str):
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise socket.gaierror(exc.errno, f"cannot resolve {what} {host!r}: {exc.strerror}") from None


def choose_pep(host: str, port: int, pep=None, env=None):
    """(pep, bypass): the PEP for host:port, None to go direct, and the bypass
    rules still to apply to the resolved address (None when pep= was given)."""
    if pep is not None:
        if isinstance(pep, str):
            pep = parse_hostport(pep, "pep")
        return tuple(pep), None
    config = ProxyConfig.from_env(env)
    try:
        address = normalize_ip(host)
    except ValueError:
        address = None
    return config.pep_for(None if address else host, address, port), config.bypass


def create_connection(address, timeout=_GLOBAL_DEFAULT_TIMEOUT, source_address=None, *, pep=None):
    """Like socket.create_connection, through an RFC 8803 PEP in 0-RTT.

    pep=(host, port) forces that PEP; otherwise PEP_PROXY and PEP_NO_PROXY
    decide (docs/protocol.md), and no PEP means socket.create_connection.
    The destination name is resolved here; its first address goes to the PEP,
    and each of the PEP's addresses is tried in turn until one answers.
    """
    host, port = address[0], int(address[1])
    chosen, bypass = choose_pep(host, port, pep)
    if chosen is None:
        return socket.create_connection((host, port), timeout, source_address)
    dest_ip = _resolve(host, port, "destination")[0][4][0]
    if bypass is not None and bypass.matches(address=dest_ip, port=port):
        return socket.create_connection((dest_ip, port), timeout, source_address)
    errors = []
    for info in _resolve(chosen[0], chosen[1], "PEP"):
        if normalize_ip(info[4][0]) == normalize_ip(dest_ip) and info[4][1] == port:
            # Never wrap a connection to the PEP itself.
            return socket.create_connection((dest_ip, port), timeout, source_address)
        try:
            return connect_via_pep(dest_ip, port, info, timeout, source_address)
        except OSError as exc:
            errors.append(exc)
    raise errors[0]  # as socket.create_connection does
