"""Return routability: has a client shown that it receives what we send?

A relay acts on a client's SYN at once (TCP Fast Open), so a forged source
address is the whole attack: one SYN makes the relay connect, and send, to
whatever the Connect TLV names.  Two ways to know the source is real:

* the kernel's TFO cookie (the default): the listener does *not* set
  TCP_FASTOPEN_NO_COOKIE, so the kernel accepts data in a SYN only with a
  cookie it handed to that address earlier.  A forged SYN never reaches
  accept(): the data is discarded, the SYN-ACK goes to the forged address,
  nobody answers it.
* the client's handshake (--no-cookie, or a host whose settings make the
  kernel accept cookie-less data anyway): the accepted TFO child stays in
  SYN_RECV until the client's ACK, which only a real client can send (it
  echoes our ISN).  While it is unverified the tunnel (pepsock/relay/tunnel.py)
  sends nothing to the client and no client byte to the destination, sends
  the onward SYN only if it is no larger than the client's, and never
  retransmits it (UNVERIFIED_SYN_WINDOW).

This module holds the kernel facts; no I/O beyond getsockopt and reading the
host's settings once at start.
"""
from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys

from .. import tfo

#: net.ipv4.tcp_fastopen bits (include/net/tcp.h).
TFO_SERVER_ENABLE = 0x2
#: "Accept SYN data w/o any cookie option", for every listener on the host.
TFO_SERVER_COOKIE_NOT_REQD = 0x200
#: TFO on every listener without the TCP_FASTOPEN socket option.  It does not
#: waive cookies (the test measures it: tests/test_relay_spoofing.py).
TFO_SERVER_WO_SOCKOPT1 = 0x400

TCP_SYN_RECV = 3
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
#: Seconds an unverified client's onward SYN may wait for its SYN-ACK: the
#: kernel retransmits a SYN one initial RTO (1 s, TCP_TIMEOUT_INIT) after it
#: sent it, so the tunnel closes the attempt before that (closing a SYN_SENT
#: socket sends nothing) and connects again if the client proves itself.
#: No socket option can do it alone (measured on Linux 6.18 with
#: tests/rawsyn.py's counter): TCP_SYNCNT's minimum, 1, retransmits once, and
#: TCP_USER_TIMEOUT is only checked from the first retransmission on (the
#: connect fails at 1.0 s, right after a second SYN).
UNVERIFIED_SYN_WINDOW = 0.7
#: The onward socket's TCP_USER_TIMEOUT while the client is unverified: the
#: kernel's own bound if the event loop were stalled past the window above
#: (then at most one retransmission, and the connect fails).  Back to
#: --user-timeout once the client is verified.
UNVERIFIED_USER_TIMEOUT_MS = 500

#: Largest SYN Linux sends for an onward connect: IP header + 20 bytes of TCP
#: header + at most 20 bytes of options (MSS 4, SACK-permitted + timestamps
#: 12, NOP + window scale 4); no data (the relay's connect() carries none).
_TCP_HEADER, _MAX_SYN_OPTIONS = 20, 20
_IP_HEADER = {socket.AF_INET: 20, socket.AF_INET6: 40}


def in_syn_recv(sock: socket.socket) -> bool:
    """True while an accepted TFO child still waits for the client's ACK."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_SYN_RECV


#: tcp_info: tcpi_options (u8 at 5), tcpi_bytes_received (u64 at 128),
#: tcpi_data_segs_in (u32 at 152); 160 bytes cover them (Linux >= 4.6).
_TCP_INFO_LEN = 160
_INFO_FIELDS = struct.Struct("=Q")
_TCPI_OPT_SYN_DATA = 0x20


def accept_facts(sock: socket.socket) -> tuple[bool, bool, int]:
    """One TCP_INFO read at accept: (still in SYN_RECV, the SYN's data was
    acknowledged, how many bytes the SYN carried if that is known: the data
    received so far came in one segment, the SYN; else 0)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    syn_data = bool(info[5] & _TCPI_OPT_SYN_DATA)
    payload = 0
    if syn_data and len(info) >= 156 and int.from_bytes(info[152:156], sys.byteorder) == 1:
        payload = _INFO_FIELDS.unpack_from(info, 128)[0]
    return info[0] == TCP_SYN_RECV, syn_data, payload


#: What the relay's SYN may carry beyond a client's: its TFO cookie option may
#: be longer than the client's (a 16-byte cookie against 8: 8 bytes), or the
#: client's SYN had none at all (a cookie-less listener: 20 bytes, the most a
#: cookie option takes with padding).
COOKIE_OPTION_SLACK = {True: 8, False: 20}


def onward_syn_room(client_family: int, dest_family: int, syn_payload: int,
                    client_had_cookie: bool) -> int:
    """How many early-data bytes the relay's SYN may carry without being
    larger than the client's SYN, which carried `syn_payload` bytes (the
    Convert message and the early data behind it).  RFC 8803 section 9.3: no
    amplification by the SYN the relay sends.  The relay's SYN leaves the
    Convert message out (at least 12 bytes, 24 for a Connect) and may add a
    longer cookie option (COOKIE_OPTION_SLACK) and a longer IP header, so
    usually all early data fits."""
    room = (syn_payload + _IP_HEADER[client_family] - _IP_HEADER[dest_family]
            - COOKIE_OPTION_SLACK[client_had_cookie])
    return max(0, room)


def onward_syn_fits(client_family: int, dest_family: int, syn_data: int) -> bool:
    """Is the onward SYN no larger than the client's SYN, which carried at
    least `syn_data` payload bytes (everything read while unverified came in
    the SYN) and at least a bare TCP header?  RFC 8803 section 9: no
    amplification by the SYN a forged request makes the relay send."""
    onward = _IP_HEADER[dest_family] + _TCP_HEADER + _MAX_SYN_OPTIONS
    client = _IP_HEADER[client_family] + _TCP_HEADER + syn_data
    return onward <= client


def set_unverified(sock: socket.socket, unverified: bool, user_timeout: float = 0.0) -> None:
    """Forbid (or allow again) the onward SYN's retransmission.  Allowing it
    restores the socket's own TCP_USER_TIMEOUT: `user_timeout` seconds
    (--user-timeout; 0 is the kernel default)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT,
                    UNVERIFIED_USER_TIMEOUT_MS if unverified else int(user_timeout * 1000))


def _routes_without_cookie() -> list[str]:
    """Routes carrying the `fastopen_no_cookie` metric (ip-route(8)): the
    kernel accepts cookie-less SYN data from clients behind them."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    found = []
    for fam in ("-4", "-6"):
        try:
            out = subprocess.run([ip, fam, "route", "show", "table", "all"], capture_output=True,
                                 text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found += [ln.strip() for ln in out.splitlines() if "fastopen_no_cookie 1" in ln]
    return found


def cookieless_reasons() -> list[str]:
    """Why the kernel would hand the relay SYN data from unproven sources even
    though the listener asks for cookies (empty: it will not)."""
    reasons = []
    value = tfo.sysctl_value()
    if value is not None and value & TFO_SERVER_COOKIE_NOT_REQD:
        reasons.append(f"net.ipv4.tcp_fastopen={value} ({value:#x}) has the 0x200 bit (accept "
                       f"SYN data without a cookie). Fix: sysctl -w net.ipv4.tcp_fastopen="
                       f"{value & ~TFO_SERVER_COOKIE_NOT_REQD | 3}")
    for route in _routes_without_cookie():
        reasons.append(f"route '{route}' has fastopen_no_cookie 1. Fix: ip route change "
                       f"{route.replace('fastopen_no_cookie 1', '').strip()}")
    return reasons


def startup_warnings(no_cookie: bool) -> tuple[list[str], bool]:
    """(warnings to log at start, whether clients may arrive unverified)."""
    warnings = []
    value = tfo.sysctl_value()
    if value is not None and not value & TFO_SERVER_ENABLE:
        warnings.append(f"net.ipv4.tcp_fastopen={value} lacks the server bit (2): clients "
                        f"get 1-RTT, not 0-RTT. Fix: sysctl -w net.ipv4.tcp_fastopen={value | 3}")
    if no_cookie:
        warnings.append("--no-cookie: the kernel accepts data in a SYN from any source address, "
                        "so a forged SYN costs this relay a pending tunnel and one onward SYN "
                        "(never a byte) to the address it names; use it only where ingress "
                        "filtering stops spoofed sources (RFC 8803 sections 9.1-9.2)")
        return warnings, True
    reasons = cookieless_reasons()
    for why in reasons:
        warnings.append("TFO cookies cannot protect this relay: " + why + ". Until fixed, the "
                        "relay holds every client's bytes until its handshake completes.")
    return warnings, bool(reasons)
