"""Socket options of the relay's sockets, in one place: per-side TCP tuning
(buffers, congestion control, Nagle, keepalive, user timeout), the reset
semantics armed while a tunnel lives, and the small kernel queries a tunnel
makes (its TCP state, its unacknowledged bytes).

Listeners get the client side's options before listen() and accepted sockets
inherit them, so a tunnel's set-up makes no setsockopt() on the client side
unless its memory grant is smaller than the full size (budget.py).  The
onward socket gets the server side's before connect(): buffers must be in
place before the SYN for its window scale.
"""
from __future__ import annotations

import fcntl
import logging
import socket
import struct
import sys

from . import routability

TCP_SYNCNT = 7
TCP_USER_TIMEOUT = routability.TCP_USER_TIMEOUT
TCP_CLOSE = 7

#: SO_LINGER {1, 0}: close() resets instead of sending a FIN.  Armed on the
#: listener (accepted sockets inherit it) and on every onward socket, so if
#: the relay dies (kill -9, OOM, a crashed worker) the kernel's close of its
#: fds resets both sides of every tunnel: a cut transfer never looks finished.
LINGER_RESET = struct.pack("ii", 1, 0)
#: Disarmed right before a clean, propagated close (and before Error replies).
LINGER_OFF = struct.pack("ii", 0, 0)
#: ioctl: bytes in a socket's send queue not yet acknowledged by the peer.
SIOCOUTQ = 0x5411

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
_buf_warned: set = set()


def _set_buffer(sock: socket.socket, opt: int, force: int, size: int) -> None:
    """SO_RCVBUF/SO_SNDBUF are capped by net.core.rmem_max/wmem_max; with
    CAP_NET_ADMIN the FORCE variants set the size asked for."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
        return
    except PermissionError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, opt, size)
    got = sock.getsockopt(socket.SOL_SOCKET, opt) // 2     # the kernel doubles it
    if got < size and opt not in _buf_warned:
        _buf_warned.add(opt)
        name = "rmem_max" if opt == socket.SO_RCVBUF else "wmem_max"
        logging.getLogger("pepsock.relay").warning(
            "asked for a %d-byte socket buffer, got %d: capped by net.core.%s "
            "(raise it, or run with CAP_NET_ADMIN)", size, got, name)


def apply_side(sock: socket.socket, side, nodelay: bool, keepalive: int = 0,
               user_timeout: float = 0.0, rcvbuf: int | None = None,
               sndbuf: int | None = None) -> None:
    """Per-side TCP tuning; buffers must be set before connect()/listen() for
    the window scale in the SYN to match them.  `rcvbuf`/`sndbuf` override
    the side's sizes (a tunnel granted less by the budget)."""
    rcvbuf = side.rcvbuf if rcvbuf is None else rcvbuf
    sndbuf = side.sndbuf if sndbuf is None else sndbuf
    if rcvbuf:
        _set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
    if sndbuf:
        _set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
    if user_timeout:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(user_timeout * 1000))
    if side.cc:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, side.cc.encode())
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer that vanishes without FIN or RST (a client out of coverage) must
    # not hold an idle tunnel forever: TCP keepalive, timed by the kernel's
    # net.ipv4.tcp_keepalive_* (accepted sockets inherit it from the listener).
    # tests/test_reliability_vanish.py
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Reset semantics while the socket lives (see LINGER_RESET).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    if keepalive:
        # --keepalive S: first probe after S idle seconds, then every S/3
        # (at least 1 s), 3 unanswered probes end the tunnel with a reset.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, keepalive // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def keepalive_limit(keepalive: int) -> float:
    """Seconds after which keepalive gives up on a silent peer: --keepalive S
    (S + 3 probes S/3 apart), else the namespace's net.ipv4.tcp_keepalive_*.
    TCP_USER_TIMEOUT replaces keepalive's probe count when set, so the relay
    caps --user-timeout at this: it must never keep a dead peer longer."""
    if keepalive:
        return keepalive + 3 * max(1, keepalive // 3)
    values = []
    for name in ("tcp_keepalive_time", "tcp_keepalive_intvl", "tcp_keepalive_probes"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                values.append(int(f.read()))
        except (OSError, ValueError):
            return float("inf")
    idle, intvl, probes = values
    return idle + intvl * probes


def disarm(sock: socket.socket) -> None:
    """Back to a normal close (FIN after the queued bytes)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
    except OSError:
        pass


def tcp_state(sock: socket.socket) -> int:
    """tcpi_state: TCP_CLOSE (7) once a reset (or error) has killed the connection."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return TCP_CLOSE


def unacked(fd: int) -> int:
    """Bytes in fd's send queue the peer has not acknowledged yet."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, SIOCOUTQ, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder)


def reset_close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()
