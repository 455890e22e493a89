"""TCP Fast Open: the kernel knobs and the one routine that puts bytes in a SYN.

Shared by the sync client, the asyncio client and `pep check`.  Linux only.
"""
from __future__ import annotations

import ctypes
import errno
import socket
import struct

# Python 3.11's socket module lacks these two; the values are Linux's.
TCP_FASTOPEN = getattr(socket, "TCP_FASTOPEN", 23)
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)
TCP_FASTOPEN_NO_COOKIE = getattr(socket, "TCP_FASTOPEN_NO_COOKIE", 34)
MSG_FASTOPEN = getattr(socket, "MSG_FASTOPEN", 0x20000000)

#: tcp_info.tcpi_options bit: the SYN's data was acknowledged by the SYN-ACK.
TCPI_OPT_SYN_DATA = 0x20

SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
CLIENT_ENABLE = 0x1
SERVER_ENABLE = 0x2


def sysctl_value() -> int | None:
    """net.ipv4.tcp_fastopen of the calling process's network namespace."""
    try:
        with open(SYSCTL) as f:
            return int(f.read().strip(), 0)
    except (OSError, ValueError):
        return None


def syn_data_acked(sock: socket.socket) -> bool:
    """True if the SYN of this connected socket carried data that the peer accepted."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return bool(info[5] & TCPI_OPT_SYN_DATA)


def established(sock: socket.socket) -> bool:
    """The TCP handshake of this socket completed (tcpi_state past SYN_SENT)."""
    try:
        info = socket.socket.getsockopt(sock, socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return info[0] not in (2, 7)    # TCP_SYN_SENT, TCP_CLOSE (never connected / failed)


def rtt_seconds(sock: socket.socket) -> float:
    """The kernel's smoothed RTT of this connected socket (tcpi_rtt)."""
    info = socket.socket.getsockopt(sock, socket.IPPROTO_TCP, socket.TCP_INFO, 72)
    return struct.unpack_from("I", info, 68)[0] / 1e6


def allow_data_without_cookie(sock: socket.socket) -> bool:
    """Ask the kernel to send SYN data even before it holds a cookie for the peer."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        return True
    except OSError:
        return False


def defer_connect(sock: socket.socket, on: bool) -> bool:
    """TCP_FASTOPEN_CONNECT: connect() returns at once and the SYN leaves with the
    first write, carrying it (when the kernel may send SYN data to that peer)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1 if on else 0)
        return True
    except OSError:
        return False


def send_in_syn(sock: socket.socket, data: bytes, address) -> int:
    """Start connecting a non-blocking socket to `address` with `data` in the SYN.

    Returns how many bytes of `data` the kernel took (put in the SYN or queued
    behind it); 0 if it sent a plain SYN (TFO off, no cookie, unsupported),
    in which case the caller writes `data` once the handshake completes.
    The connection is still in progress: wait for writability.
    """
    try:
        return sock.sendto(data, MSG_FASTOPEN, address)
    except BlockingIOError:
        return 0  # EINPROGRESS: a SYN without data is on its way
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOPROTOOPT):
            raise
    # No TFO at all here: a classic non-blocking connect.
    err = sock.connect_ex(address)
    if err not in (0, errno.EINPROGRESS):
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {errno.errorcode.get(err, err)}")
    return 0


_libc = None


def reset(sock: socket.socket) -> None:
    """Abort a connection with RST, keeping the fd (and the app's socket object) valid.

    connect() with AF_UNSPEC disconnects a TCP socket; Python's connect()
    cannot express that address, so libc is called directly.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    unspec = struct.pack("H14x", socket.AF_UNSPEC)
    buf = ctypes.create_string_buffer(unspec, len(unspec))
    try:
        own_linger = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        own_linger = None
    _libc.connect(sock.fileno(), buf, len(unspec))
    # The disconnect above sent the RST; a linger of {1, 0} left in place would
    # make the app's later close() of a retried, healthy connection reset it too
    # and drop its unsent bytes: the app's own setting comes back.
    if own_linger is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, own_linger)
        except OSError:
            pass
