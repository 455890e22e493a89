"""TLS over a PEP connection without waiting for the PEP's reply.

The stdlib's `ssl.SSLSocket` lets OpenSSL read the file descriptor itself, so
wrapping a PepSocket has to wait until the PEP's RFC 8803 reply has been read
off the socket: the ClientHello then leaves one client-PEP round trip late.
Here OpenSSL runs over memory BIOs (`ssl.SSLObject`) instead, fed from the
PepSocket's own reads, which drop the reply: the ClientHello is written as
soon as the TCP handshake with the PEP is done, while the PEP is still
connecting to the server, as it is under libpep.so.

`PepTLSSocket` is an `ssl.SSLSocket` subclass (isinstance checks, makefile,
timeouts, non-blocking use, unwrap, getpeercert, ALPN all work as there); its
`_sslobj` is a `_BioEngine` that moves bytes between the SSLObject and the
PepSocket. The SSLSocket's own descriptor is a dup() of the PepSocket's, for
fileno()/select()/setsockopt(); every read goes through the PepSocket.

Entry points: `wrap_tls(sock, context, server_hostname=...)`,
`create_tls_connection(address, context, ...)`, and `pep_aware(context)`, which
makes `context.wrap_socket()` of a PepSocket take this path (pepsock.patch()
does that for every `ssl.SSLContext`).
"""
from __future__ import annotations

import collections
import os
import socket
import ssl
import threading

from .client import PepSocket, create_connection

_GLOBAL_DEFAULT_TIMEOUT = socket._GLOBAL_DEFAULT_TIMEOUT
_RECORD_HEADER = 5          # TLS record: type (1), version (2), length (2)
_MAX_READ = 64 * 1024
_MAX_WRITE = 256 * 1024     # plaintext per send(): the outgoing BIO is memory, keep it bounded


def _want_read() -> ssl.SSLWantReadError:
    return ssl.SSLWantReadError(ssl.SSL_ERROR_WANT_READ, "The operation did not complete (read)")


def _want_write() -> ssl.SSLWantWriteError:
    return ssl.SSLWantWriteError(ssl.SSL_ERROR_WANT_WRITE,
                                 "The operation did not complete (write)")


class _BioEngine:
    """An `ssl.SSLObject` plus the I/O that feeds it from a PepSocket.

    Stands where the stdlib's SSLSocket keeps its `_ssl._SSLSocket`: the
    methods SSLSocket calls (read, write, do_handshake, shutdown, pending,
    getpeercert, version, ...) behave the same, blocking within the socket's
    timeout or raising SSLWantReadError/SSLWantWriteError when non-blocking.

    Incoming bytes are read up to the end of the current TLS record plus the
    next record's header (OpenSSL reading a socket without read-ahead takes the
    header and the body in two reads), so no complete record hides in a buffer
    while the descriptor looks idle: select() on fileno() plus pending() stays
    truthful.
    """

    def __init__(self, raw: PepSocket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO):
        self._raw = raw
        self._sslobj = sslobj
        self._in = incoming
        self._out = outgoing
        # A reader and a writer thread may share the socket (as with the stdlib's).
        # OpenSSL and the memory BIOs are only touched under _ssl_lock (CPU work
        # only); socket I/O happens outside it. Ciphertext is queued in the order
        # OpenSSL produced it and sent, in that order, by one thread at a time.
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._sending: memoryview | None = None   # a chunk a non-blocking send cut short
        self._header = bytearray()      # the part of the next record header read so far
        self._record_left = 0           # body bytes of the current record still to read
        self._eof = False

    # -- moving bytes -----------------------------------------------------------------
    def _flush(self, wait: bool = True) -> bool:
        """Send the queued ciphertext; False if a non-blocking send left some behind.

        A reader (wait=False) never queues behind a writer blocked in send():
        that writer sends what the reader queued too (it looks again after
        letting go of the lock), and waiting could deadlock against a peer that
        is itself blocked sending to us.
        """
        while True:
            if not self._send_lock.acquire(blocking=wait):
                return True
            try:
                blocking = self._raw.gettimeout() != 0.0
                while True:
                    if self._sending is None:
                        if not self._queue:
                            break
                        self._sending = memoryview(self._queue.popleft())
                    if blocking:
                        self._raw.sendall(self._sending)
                        self._sending = None
                        continue
                    try:
                        sent = self._raw.send(self._sending)
                    except BlockingIOError:
                        return False
                    self._sending = self._sending[sent:] or None
            finally:
                self._send_lock.release()
            if not self._queue:   # nothing queued while we let go
                return True

    def _fill(self) -> None:
        """Read from the PepSocket (which consumes the PEP's reply first) into the
        incoming BIO: the rest of the current TLS record and the next record's
        header, never more, so no complete record ever waits here unseen."""
        if self._eof:
            raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")
        if self._record_left:
            want = min(self._record_left + _RECORD_HEADER, _MAX_READ)
        else:
            want = _RECORD_HEADER - len(self._header)
        try:
            data = self._raw.recv(want)
        except BlockingIOError:
            raise _want_read() from None
        with self._ssl_lock:
            if data:
                self._in.write(data)
            else:
                self._eof = True
                self._in.write_eof()
        self._track_records(data)

    def _track_records(self, data: bytes) -> None:
        """Follow the record framing (type 1, version 2, length 2, body) over `data`."""
        at = 0
        while at < len(data):
            if self._record_left:
                step = min(self._record_left, len(data) - at)
                self._record_left -= step
            else:
                step = min(_RECORD_HEADER - len(self._header), len(data) - at)
                self._header += data[at:at + step]
                if len(self._header) == _RECORD_HEADER:
                    self._record_left = int.from_bytes(self._header[3:5], "big")
                    self._header.clear()
            at += step

    def _run(self, op, *args, must_flush: bool = False, reading: bool = False):
        """Call an SSLObject operation, doing the socket I/O it asks for."""
        while True:
            with self._ssl_lock:
                try:
                    result = op(*args)
                    want_read = False
                except ssl.SSLWantReadError:
                    want_read = True
                finally:   # what OpenSSL wrote (alerts too), in order
                    if self._out.pending:
                        self._queue.append(self._out.read())
            flushed = self._flush(wait=not reading)
            if want_read:
                if not flushed:
                    raise _want_write()
                self._fill()
                continue
            if not flushed and must_flush:
                raise _want_write()
            return result

    # -- what SSLSocket calls on its _sslobj --------------------------------------------
    def do_handshake(self) -> None:
        self._run(self._sslobj.do_handshake, must_flush=True)

    def read(self, len=1024, buffer=None):  # noqa: A002 - the stdlib's parameter name
        if buffer is None:
            return self._run(self._sslobj.read, len, reading=True)
        return self._run(self._sslobj.read, len, buffer, reading=True)

    def write(self, data) -> int:
        """Encrypt and send up to _MAX_WRITE bytes of data; returns how many (sendall loops)."""
        if not self._flush():
            raise _want_write()
        with memoryview(data) as view, view.cast("B") as octets:
            return self._run(self._sslobj.write, octets[:_MAX_WRITE])

    def shutdown(self) -> PepSocket:
        """unwrap(): close_notify both ways; returns the PepSocket, now plain."""
        self._run(self._sslobj.unwrap, must_flush=True)
        return self._raw

    @property
    def context(self):
        return self._sslobj.context

    @context.setter
    def context(self, ctx):
        self._sslobj.context = ctx

    def __getattr__(self, name):
        # getpeercert, cipher, version, pending, selected_alpn_protocol, session, ...
        return getattr(self._sslobj, name)


class PepTLSSocket(ssl.SSLSocket):
    """An SSLSocket whose TLS runs over a PepSocket (see the module docstring).

    `raw` is the PepSocket underneath; getpeername() is the destination.
    """

    raw: PepSocket

    @classmethod
    def _create(cls, sock, server_side=False, do_handshake_on_connect=True,
                suppress_ragged_eofs=True, server_hostname=None, context=None, session=None):
        if server_side:
            raise ValueError("TLS over a PEP connection is client side only")
        if context is None:
            context = ssl.create_default_context()
        if context.check_hostname and not server_hostname:
            raise ValueError("check_hostname requires server_hostname")
        timeout = sock.gettimeout()
        fd = os.dup(sock.fileno())
        try:
            self = cls.__new__(cls, sock.family, sock.type, sock.proto, fileno=fd)
            socket.socket.__init__(self, sock.family, sock.type, sock.proto, fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        self.raw = sock
        self.destination, self.pep = sock.getpeername(), sock.pep
        self._context = context
        self._session = session
        self._closed = False
        self._sslobj = None
        self._connected = True
        self.server_side = False
        self.server_hostname = context._encode_hostname(server_hostname)
        self.do_handshake_on_connect = do_handshake_on_connect
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.settimeout(timeout)
        try:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            sslobj = context.wrap_bio(incoming, outgoing, server_side=False,
                                      server_hostname=server_hostname, session=session)
            self._sslobj = _BioEngine(sock, sslobj, incoming, outgoing)
            if do_handshake_on_connect:
                if timeout == 0.0:
                    raise ValueError("do_handshake_on_connect should not be specified for "
                                     "non-blocking sockets")
                self.do_handshake()
        except (OSError, ValueError):
            self.close()
            raise
        return self

    # The two descriptors share one open file: keep their timeouts (and so
    # O_NONBLOCK, which belongs to the open file) the same.
    def settimeout(self, value) -> None:
        super().settimeout(value)
        if self.raw is not None:
            self.raw.settimeout(value)

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getpeername(self):
        return self.destination

    def _check_connected(self) -> None:
        pass   # connected by construction; SSLSocket would ask getpeername()

    def unwrap(self):
        """Shut TLS down and return the PepSocket, on which the connection goes on."""
        if self._sslobj is None:
            raise ValueError("No SSL wrapper around " + str(self))
        raw = self._sslobj.shutdown()
        self._sslobj = None
        self.raw = None   # handed to the caller: closing this object no longer closes it
        return raw

    def _real_close(self) -> None:
        raw, self.raw = self.raw, None
        super()._real_close()
        if raw is not None:
            raw.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<PepTLSSocket [closed]>"
        return f"<PepTLSSocket fd={self.fileno()} destination={self.destination} pep={self.pep}>"


def wrap_tls(sock: PepSocket, context: ssl.SSLContext | None = None, *,
             server_hostname: str | None = None, do_handshake_on_connect: bool = True,
             suppress_ragged_eofs: bool = True, session=None) -> ssl.SSLSocket:
    """`context.wrap_socket(sock, ...)`, but the ClientHello leaves at once.

    A PepSocket gives a PepTLSSocket; any other socket is wrapped by the
    stdlib as usual. `context` defaults to ssl.create_default_context().
    """
    context = context or ssl.create_default_context()
    if isinstance(sock, PepSocket):
        return PepTLSSocket._create(sock, False, do_handshake_on_connect, suppress_ragged_eofs,
                                    server_hostname, context, session)
    return context.wrap_socket(sock, do_handshake_on_connect=do_handshake_on_connect,
                               suppress_ragged_eofs=suppress_ragged_eofs,
                               server_hostname=server_hostname, session=session)


def create_tls_connection(address, context: ssl.SSLContext | None = None, *,
                          server_hostname: str | None = None, timeout=_GLOBAL_DEFAULT_TIMEOUT,
                          source_address=None, pep=None) -> ssl.SSLSocket:
    """pepsock.create_connection + TLS, the handshake started as soon as the
    PEP's TCP handshake is done. server_hostname defaults to address[0]."""
    sock = create_connection(address, timeout, source_address, pep=pep)
    try:
        return wrap_tls(sock, context, server_hostname=server_hostname or address[0])
    except BaseException:
        sock.close()
        raise


class PepAwareSSLSocket(ssl.SSLSocket):
    """An `SSLContext.sslsocket_class` that hands PepSockets to PepTLSSocket.

    Everything else (server side, plain sockets) gets the stdlib's SSLSocket.
    """

    @classmethod
    def _create(cls, sock, server_side=False, do_handshake_on_connect=True,
                suppress_ragged_eofs=True, server_hostname=None, context=None, session=None):
        maker = PepTLSSocket if isinstance(sock, PepSocket) and not server_side else ssl.SSLSocket
        return maker._create(sock=sock, server_side=server_side,
                             do_handshake_on_connect=do_handshake_on_connect,
                             suppress_ragged_eofs=suppress_ragged_eofs,
                             server_hostname=server_hostname, context=context, session=session)


def pep_aware(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make `context.wrap_socket(pep_socket)` use the no-wait TLS; returns context."""
    context.sslsocket_class = PepAwareSSLSocket
    return context
