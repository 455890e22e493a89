"""open_connection(): asyncio streams through an RFC 8803 PEP in 0-RTT.

The asyncio mirror of client.create_connection: the same route.plan() and
session.ClientSession decide, and the connection is the same PepSocket,
handed to the loop's own socket transport.  The transport reads through
PepSocket.recv, so the PEP's reply never reaches a protocol (StreamReader,
or TLS after start_tls, which therefore starts before the reply is in), an
Error TLV becomes the reader's exception (a ConvertError) with the connection
reset, and get_extra_info("peername") is the destination.  A reply later than
PEP_REPLY_TIMEOUT (or the `timeout` given) fails the connection with
ETIMEDOUT.  `connect()` is the first half (a PepSocket for sock=, used by
aiosock.dial and the patched loop.create_connection); this module needs the
selector event loops (their transports read through the socket object).

A retry that happens after open_connection returned (Error 3 or 64/65 in the
reply) reconnects on the same socket without blocking the loop when the whole
Convert message (+ replayed bytes) fits in the SYN, which is the case with TFO
on; a timer (PepSocket.next_deadline / check_deadlines) moves on from a PEP
that does not answer.  Otherwise the retry waits for its handshake in the
loop's thread (at most the PEP connect timeout).
"""
from __future__ import annotations

import asyncio
import errno
import socket
import ssl as _ssl
import time

from . import route as _route
from .client import PepSocket, connected, handshake_error, start_deferred, start_dial
from .session import ClientSession, Dial

_DEFAULT_LIMIT = 2 ** 16


async def _writable(loop, sock: socket.socket) -> None:
    done = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_writer(sock.fileno())


async def _connect(loop, session: ClientSession, dial: Dial, deadline: float | None,
                   local_addr=None, defer: bool = False):
    """Dial PEPs until one completes the handshake: (sock, None, None), or (None, direct
    Dial, None); defer: a PEP whose SYN can wait for the first write (the request in
    the SYN, client.start_deferred) gives (sock, None, the Convert message to send)."""
    while dial.pep is not None:
        # proto IPPROTO_TCP, as getaddrinfo gives: asyncio sets TCP_NODELAY only then
        sock = PepSocket(dial.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            if local_addr is not None:
                sock.bind(local_addr)
            started = time.monotonic()
            how = start_deferred(sock, dial) if defer else "no"
            if how == "deferred":
                return sock, None, dial.payload
            if isinstance(how, OSError):
                sock.close()
                dial = session.connect_failed(how)
                continue
            taken = 0 if how == "plain" else start_dial(sock, dial)
            limit = dial.connect_timeout
            caller_first = deadline is not None and (limit is None or deadline <= started + limit)
            wait = deadline - started if caller_first else limit
            try:
                await asyncio.wait_for(_writable(loop, sock), wait)
                err = handshake_error(sock, dial)
            except asyncio.TimeoutError:
                if caller_first:
                    raise TimeoutError(errno.ETIMEDOUT, f"timed out connecting to {dial.pep}") \
                        from None
                err = TimeoutError(errno.ETIMEDOUT, f"the PEP at {dial.pep} did not answer")
            if err is None:
                connected(sock, session, dial, taken, started)
                if taken < len(dial.payload):
                    await loop.sock_sendall(sock, dial.payload[taken:])
                return sock, None, None
        except BaseException:
            sock.close()
            raise
        sock.close()
        dial = session.connect_failed(err, timed_out=isinstance(err, TimeoutError))
    return None, dial, None


async def connect(host: str, port: int, *, pep=None, timeout: float | None = None,
                  local_addr=None) -> tuple[PepSocket | None, tuple | None]:
    """Through the PEP to host:port, as far as the TCP handshake with the PEP:
    (a non-blocking PepSocket that carried the Convert message, None), or (None,
    the (host, port) to connect to directly) when the rules or PEP_FALLBACK say so.

    The PEP's reply has not been waited for: the socket strips it from what is
    read, and a timer on the running loop enforces the reply deadline (see
    watch_reply).  Given to loop.create_connection(sock=..., ssl=...), TLS
    starts before the reply is in."""
    sock, direct, _ = await _dial(host, port, pep, timeout, local_addr)
    return sock, direct


async def _dial(host, port, pep, timeout, local_addr):
    """connect(), plus the future of the PEP's reply."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else time.monotonic() + timeout
    conf = _route.settings()
    route = await asyncio.wait_for(_route.plan_async(host, port, conf, pep), timeout)
    if route.direct is not None:
        return None, route.direct, None
    session = ClientSession(route, conf)
    # No timeout and no PEP_CONFIRM: the request in the SYN (docs/python.md), as the
    # blocking create_connection does; the transport's first write sends the SYN.
    defer = timeout is None and not conf.confirms(session.destination)
    sock, fallback, prefix = await _connect(loop, session, session.first_dial(), deadline,
                                            local_addr, defer)
    if sock is None:
        return None, fallback.sockaddr[:2], None
    reply = watch_reply(loop, sock, session, conf, deadline)
    if prefix is not None:
        sock.defer_syn(prefix)
    if not conf.confirms(session.destination):
        reply = None
    return sock, None, reply


def watch_reply(loop, sock: PepSocket, session: ClientSession, conf, deadline: float | None):
    """Make `sock` the application's end of `session` and arm a timer on `loop` for a
    retry's connect timeout and the reply deadline (PEP_REPLY_TIMEOUT, or `deadline`
    if sooner).  Returns a future done when the reply is in (or failed)."""
    reply_deadline = time.monotonic() + conf.reply_timeout
    if deadline is not None:
        reply_deadline = min(reply_deadline, deadline)
    sock.attach(session, conf.reply_timeout, reply_deadline)
    return arm_deadlines(loop, sock)


def arm_deadlines(loop, sock: PepSocket):
    """The timer of watch_reply for an attached PepSocket; the reply future."""
    reply = loop.create_future()
    sock.add_reply_callback(lambda exc: reply.done() or (
        reply.set_result(None) if exc is None else reply.set_exception(exc)))
    timer = None

    def arm():          # at a retry's connect timeout or the reply deadline
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        when = sock.next_deadline()
        if when is not None:
            timer = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), fire)

    def fire():
        sock.check_deadlines()
        arm()

    def done(future):
        if timer is not None:
            timer.cancel()
        if not future.cancelled():
            future.exception()      # retrieved: a failed reply is the reader's to raise

    arm()
    sock.on_deadlines_changed(arm)
    reply.add_done_callback(done)
    return reply


async def open_connection(host: str, port: int, *, pep=None, limit: int = _DEFAULT_LIMIT,
                          ssl=None, server_hostname=None, timeout: float | None = None,
                          **kwargs):
    """Like asyncio.open_connection, through an RFC 8803 PEP in 0-RTT.

    pep=(host, port) forces that PEP; otherwise PEP_PROXY/PEP_NO_PROXY decide
    and no PEP means a plain asyncio.open_connection.  With ssl, the TLS
    handshake starts right after the TCP handshake with the PEP, before its
    reply: the transport reads through PepSocket.recv, which strips the reply
    beneath asyncio's TLS.  `timeout` bounds reaching the PEP and counts until
    its reply, as for create_connection.  Without a timeout (and PEP_CONFIRM),
    it returns before any packet: the first write goes in the SYN with the
    Convert message (docs/python.md, "The request in the SYN").
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else time.monotonic() + timeout
    sock, direct, confirm = await _dial(host, port, pep, timeout, None)
    if ssl and server_hostname is None:
        server_hostname = host
    if sock is None:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await asyncio.wait_for(asyncio.open_connection(
            *direct, limit=limit, ssl=ssl, server_hostname=server_hostname, **kwargs), left)
    try:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    if confirm is not None:
        try:
            await confirm   # PEP_CONFIRM: the verdict before open_connection returns
        except BaseException:
            writer.close()
            raise
    if ssl:
        context = _ssl.create_default_context() if ssl is True else ssl
        await writer.start_tls(context, server_hostname=server_hostname)
    return reader, writer
