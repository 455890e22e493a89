"""open_connection(): asyncio streams through an RFC 8803 PEP in 0-RTT.

Same behaviour as the sync client: the header rides in the SYN, the PEP's
reply is removed before the first byte reaches the StreamReader, and an Error
TLV becomes the reader's exception (a ConvertError) with the connection reset.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import ssl as _ssl

from . import aiosock, protocol, tfo
from .client import _resolve, choose_pep
from .policy import normalize_ip

_DEFAULT_LIMIT = 2 ** 16


class _ReplyStrippingProtocol(asyncio.StreamReaderProtocol):
    """Feeds the PEP's reply to the codec; application bytes go on to the reader."""

    def __init__(self, reader: asyncio.StreamReader, loop):
        super().__init__(reader, loop=loop)
        self._convert = protocol.MessageReader()
        self.reply = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if self._convert.done:
            return super().data_received(data)
        try:
            msg = self._convert.feed(data)
            if msg is None:
                return
            protocol.check_reply(msg)
        except protocol.ProtocolError as exc:
            return self._fail(OSError(errno.EPROTO, f"bad reply from the PEP: {exc}"))
        except protocol.ConvertError as exc:
            return self._fail(exc)
        self.reply.set_result(msg)
        if self._convert.rest:
            super().data_received(self._convert.rest)
            self._convert.rest = b""

    def _fail(self, exc: OSError) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)
            self.reply.exception()  # retrieved: the reader carries it to the app
        self._stream_reader.set_exception(exc)
        transport = self._transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                tfo.reset(sock)
            transport.abort()

    def eof_received(self):
        if not self._convert.done:
            self._fail(ConnectionResetError(
                errno.ECONNRESET, "the PEP closed the connection before its RFC 8803 reply"))
            return False
        return super().eof_received()

    def connection_lost(self, exc):
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionResetError(
                errno.ECONNRESET, "connection to the PEP lost before its reply"))
            self.reply.exception()
        super().connection_lost(exc)


async def _connect_socket(sock: socket.socket, header: bytes, address) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    tfo.allow_data_without_cookie(sock)
    taken = tfo.send_in_syn(sock, header, address)
    done = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_writer(sock.fileno())
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connecting to the PEP at {address[0]}:{address[1]}: "
                           f"{errno.errorcode.get(err, err)}")
    if taken < len(header):
        await loop.sock_sendall(sock, header[taken:])


async def open_connection(host: str, port: int, *, pep=None, limit: int = _DEFAULT_LIMIT,
                          ssl=None, server_hostname=None, timeout: float | None = None,
                          **kwargs):
    """Like asyncio.open_connection, through an RFC 8803 PEP in 0-RTT.

    pep=(host, port) forces that PEP; otherwise PEP_PROXY/PEP_NO_PROXY decide
    and no PEP means a plain asyncio.open_connection.  With ssl, the TLS
    handshake starts right after the TCP handshake with the PEP, before its
    reply (on the selector event loops; others wait for the reply first).
    `timeout` bounds reaching the PEP, as connect would.
    """
    chosen, bypass = choose_pep(host, port, pep)
    if chosen is not None:
        loop = asyncio.get_running_loop()
        dest = await loop.run_in_executor(None, _resolve, host, port, "destination")
        dest_ip = dest[0][4][0]
        if bypass is not None and bypass.matches(address=dest_ip, port=port):
            chosen = None
    if chosen is None:
        return await asyncio.wait_for(asyncio.open_connection(
            host, port, limit=limit, ssl=ssl, server_hostname=server_hostname, **kwargs), timeout)
    return await asyncio.wait_for(
        _open_via_pep(dest_ip, port, chosen, limit, ssl, server_hostname or (host if ssl else None)),
        timeout)


async def _open_via_pep(dest_ip, port, chosen, limit, ssl, server_hostname):
    loop = asyncio.get_running_loop()
    # TLS that starts before the PEP's reply, where the transport reads through
    # the socket object (pepsock/aiosock.py); elsewhere the wait below remains.
    if ssl and aiosock.strips_in_transport(loop):
        return await aiosock.open_tls_streams(dest_ip, port, chosen, limit, ssl, server_hostname)
    header = protocol.connect_request(dest_ip, port)
    errors = []
    infos = await loop.run_in_executor(None, _resolve, chosen[0], chosen[1], "PEP")
    for family, _, proto, _, address in infos:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            await _connect_socket(sock, header, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        stripper = _ReplyStrippingProtocol(reader, loop)
        transport, _ = await loop.create_connection(lambda: stripper, sock=sock)
        writer = asyncio.StreamWriter(transport, stripper, reader, loop)
        if ssl:
            await stripper.reply  # TLS reads the socket itself: the reply must be gone
            context = _ssl.create_default_context() if ssl is True else ssl
            await writer.start_tls(context, server_hostname=server_hostname)
        ip = normalize_ip(dest_ip)
        writer.destination = (str(ip), port)
        return reader, writer
    raise errors[0]
