"""`pep check`: can this machine do 0-RTT, and does the configured PEP answer RFC 8803?

Prints one line per finding, with the command that fixes what is missing.
Returns 0 when everything needed works, 1 otherwise.
"""
from __future__ import annotations

import socket
import time

from . import protocol, tfo
from .client import _resolve, _send_rest, _wait_connected
from .policy import ConfigError, ProxyConfig


def _kernel_has(option: int) -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, option, 1)
            return True
        except OSError:
            return False


def check_machine(say) -> bool:
    ok = True
    value = tfo.sysctl_value()
    if value is None:
        say("FAIL  net.ipv4.tcp_fastopen is unreadable: this kernel has no TCP Fast Open")
        return False
    if value & tfo.CLIENT_ENABLE:
        say(f"ok    net.ipv4.tcp_fastopen={value:#x}: clients may send data in the SYN")
    else:
        ok = False
        say(f"FAIL  net.ipv4.tcp_fastopen={value:#x} lacks the client bit (1): "
            f"fix with `sysctl -w net.ipv4.tcp_fastopen={value | 1}`")
    if value & tfo.SERVER_ENABLE:
        say("ok    the server bit (2) is set: a relay here accepts data in the SYN")
    else:
        say(f"note  no server bit (2): a `pep relay` on this machine would answer in 1-RTT; "
            f"fix with `sysctl -w net.ipv4.tcp_fastopen={value | 3}`")
    for name, opt, why in (("TCP_FASTOPEN_NO_COOKIE", tfo.TCP_FASTOPEN_NO_COOKIE,
                            "the first connection to a PEP is 0-RTT too"),
                           ("TCP_FASTOPEN_CONNECT", tfo.TCP_FASTOPEN_CONNECT,
                            "connect() can defer the SYN to the first write")):
        if _kernel_has(opt):
            say(f"ok    kernel supports {name}: {why}")
        else:
            say(f"warn  kernel lacks {name} (Linux >= 4.11/4.15): without it {why} does not hold")
    return ok


def check_pep(pep, say, timeout: float = 5.0) -> bool:
    """Ask the PEP for its supported extensions (Info TLV), via a Connect to itself if not."""
    host, port = pep
    try:
        info = _resolve(host, port, "PEP")[0]
    except OSError as exc:
        say(f"FAIL  {exc}")
        return False
    started = time.monotonic()
    with socket.socket(info[0], socket.SOCK_STREAM) as sock:
        tfo.allow_data_without_cookie(sock)
        try:
            # The same path as a client's connection: request in the SYN where TFO allows.
            sock.setblocking(False)
            request = protocol.info_request()
            taken = tfo.send_in_syn(sock, request, info[4])
            _wait_connected(sock, started + timeout, info[4][:2])
            _send_rest(sock, request[taken:], started + timeout)
            sock.settimeout(timeout)
            reader = protocol.MessageReader()
            while not reader.done:
                chunk = sock.recv(1024)
                if not chunk:
                    reader.eof()
                reader.feed(chunk)
        except protocol.ProtocolError as exc:
            say(f"FAIL  the PEP at {host}:{port} does not speak RFC 8803: {exc}")
            return False
        except OSError as exc:
            say(f"FAIL  cannot reach the PEP at {host}:{port}: {exc}")
            return False
        elapsed = (time.monotonic() - started) * 1000
        in_syn = tfo.syn_data_acked(sock)
    say(f"ok    the PEP at {host}:{port} answers RFC 8803 in {elapsed:.1f} ms: "
        f"{', '.join(map(repr, reader.message.tlvs)) or 'empty reply'}")
    if in_syn:
        say("ok    the header rode in the SYN and the PEP accepted it (0-RTT)")
    else:
        say("warn  the header did not ride in the SYN (no TFO on the PEP, or a middlebox "
            "strips SYN data): connections work but cost one more round trip")
    return True


def main(pep=None, print_=print) -> int:
    ok = check_machine(print_)
    try:
        config = ProxyConfig.from_env()
    except ConfigError as exc:
        print_(f"FAIL  {exc}")
        return 1
    pep = pep or config.pep
    if pep is None:
        print_("note  PEP_PROXY is not set: connections go direct (set PEP_PROXY=host:port)")
    else:
        ok = check_pep(pep, print_) and ok
    return 0 if ok else 1


