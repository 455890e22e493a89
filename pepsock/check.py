"""`pep check`: can this machine do 0-RTT, and does each configured PEP answer RFC 8803?

Prints one line per finding, with the command that fixes what is missing.
For every PEP of PEP_PROXY (or --pep): what the shared state says (up or
held down until when, TFO cookie mode, Cookie TLV), then a probe (an Info
request in the SYN, as a client's Connect would go) whose Error reply is a
FAIL with the code's name and meaning.  Returns 0 when everything needed
works, 1 otherwise.
"""
from __future__ import annotations

import os
import socket
import time

from . import pepstate, protocol, tfo
from . import route as _route
from .client import connect_blocking
from .policy import ConfigError
from .session import Dial, ReplyParser, learn

#: What each Error code means for the person running `pep check`.
MEANING = {
    0: "the PEP does not speak this Convert version",
    1: "the PEP found the request malformed",
    2: "the PEP does not support this request",
    3: "the PEP requires a Cookie TLV (RFC 8803 6.2.7); clients learn it from this Error and "
       "retry, or take one from PEP_COOKIE (`pep cookie` on the PEP's side)",
    32: "the PEP does not authorize this client (address not allowed, or a wrong cookie)",
    33: "the PEP does not support a requested TCP option",
    64: "the PEP is out of resources; clients hold it down for the delay it gives",
    65: "the PEP has a network failure; clients hold it down",
    96: "the destination refused the connection",
    97: "the destination is unreachable from the PEP",
}


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


def describe_state(pep: _route.Pep, conf: _route.Settings, say) -> dict:
    """One line: what this client's shared state says about `pep`."""
    fields = pepstate.load(conf.state_dir, pep.state_name)
    until = pepstate.down_until(fields)
    up = "up" if until is None else (
        f"held down until {time.strftime('%H:%M:%S', time.localtime(until))} "
        f"({fields.get('reason', '?')})")
    tfo_mode = {"nocookie": "cookie-less TFO (0-RTT from the first connection)",
                "cookie": "TFO cookie (0-RTT once the kernel holds the PEP's cookie)"}.get(
        fields.get("tfo"), "TFO mode not learnt yet")
    if fields.get("cookie"):
        cookie = "Cookie TLV: this client holds the PEP's cookie"
    elif conf.cookie is not None:
        cookie = "Cookie TLV: PEP_COOKIE set"
    else:
        cookie = "no Cookie TLV held"
    rtt = f", handshake {int(fields['rtt_us']) / 1000:.1f} ms" if fields.get("rtt_us", "").isdigit() \
        else ""
    say(f"note  PEP {pep}: {up}; {tfo_mode}; {cookie}{rtt}"
        + ("" if conf.state_dir else " (no shared state directory)"))
    return fields


def probe(pep: _route.Pep, conf: _route.Settings, say, fields: dict, timeout: float = 5.0) -> bool:
    """Ask the PEP for its supported extensions (Info TLV), the request in the SYN."""
    cookie = bytes.fromhex(fields["cookie"]) if fields.get("cookie") else conf.cookie
    tlvs = (protocol.Info(),) + (() if cookie is None else (protocol.Cookie(cookie),))
    no_cookie = conf.tfo_mode == "nocookie" or (conf.tfo_mode == "auto"
                                                 and fields.get("tfo") != "cookie")
    dial = Dial(pep, pep.family, pep.sockaddr, protocol.Message(tlvs).encode(), no_cookie, timeout)
    client_tfo = bool((tfo.sysctl_value() or 0) & tfo.CLIENT_ENABLE)
    started = time.monotonic()
    parser = ReplyParser(pep)
    with socket.socket(pep.family, socket.SOCK_STREAM) as sock:
        try:
            sock.setblocking(False)
            err = connect_blocking(sock, dial, started + timeout)
            if err is not None:
                raise err
            handshake = time.monotonic() - started
            in_syn = tfo.syn_data_acked(sock)
            learn(conf, dial, client_tfo, in_syn, handshake)
            sock.settimeout(timeout)
            msg = None
            while msg is None:
                chunk = sock.recv(1024)
                if not chunk:
                    parser.eof()
                msg, _ = parser.feed(chunk)
        except OSError as exc:
            say(f"FAIL  cannot reach the PEP at {pep}: {exc}")
            return False
    elapsed = (time.monotonic() - started) * 1000
    _say_tfo(pep, say, in_syn, no_cookie, client_tfo)
    if msg.error is not None:
        code = msg.error.code
        try:
            name = protocol.ErrorCode(code).name
        except ValueError:
            name = "UNKNOWN"
        say(f"FAIL  the PEP at {pep} answered Error {code} ({name}): "
            f"{MEANING.get(code, 'an error code RFC 8803 does not define')}")
        if code == protocol.ErrorCode.MISSING_COOKIE:
            value = msg.error.value
            if len(value) > 1 and value[0] == 0:
                pepstate.update(conf.state_dir, pep.state_name, cookie=value[1:].hex())
                say(f"note  Cookie TLV mode: stored the cookie it sent ({len(value) - 1} bytes); "
                    f"this client's next connections carry it")
        return False
    say(f"ok    the PEP at {pep} answers RFC 8803 in {elapsed:.1f} ms: "
        f"{', '.join(map(repr, msg.tlvs)) or 'empty reply'}")
    if cookie is not None:
        say("ok    Cookie TLV: the PEP accepted the cookie this client sent")
    return True


def _say_tfo(pep, say, in_syn: bool, no_cookie: bool, client_tfo: bool) -> None:
    if in_syn and no_cookie:
        say(f"ok    {pep} is a cookie-less TFO PEP: the header rode in the SYN (0-RTT from the "
            f"first connection)")
    elif in_syn:
        say(f"ok    {pep} wants TFO cookies and this client holds one: the header rode in the "
            f"SYN (0-RTT)")
    elif no_cookie and client_tfo:
        say(f"warn  {pep}: the header did not ride in the SYN: the PEP requires TFO cookies (or "
            f"a middlebox strips SYN data); clients now ask for a cookie and are 0-RTT from the "
            f"connection after next")
    else:
        say(f"warn  {pep}: the header did not ride in the SYN (no TFO cookie yet, no TFO on the "
            f"PEP or here, or a middlebox strips SYN data): connections work but cost one more "
            f"round trip")


def check_peps(peps, conf: _route.Settings, say) -> bool:
    ok = True
    for host, port in peps:
        try:
            infos = _route.resolve_sync(_route.Resolve(host, port, "PEP"))
        except OSError as exc:
            say(f"FAIL  {exc}")
            ok = False
            continue
        for info in infos[:4]:
            pep = _route.pep_from_addrinfo(host, port, info)
            fields = describe_state(pep, conf, say)
            ok = probe(pep, conf, say, fields) and ok
    return ok


def check_pep(pep, say, timeout: float = 5.0) -> bool:
    """Probe one PEP (host, port) with the environment's settings."""
    return check_peps([tuple(pep)], _route.settings(), say)


def main(pep=None, print_=print) -> int:
    ok = check_machine(print_)
    try:
        conf = _route.parse_settings(os.environ)   # the error itself, not "unproxied"
    except ConfigError as exc:
        print_(f"FAIL  {exc}")
        return 1
    peps = [pep] if pep else list(conf.peps)
    if not peps:
        print_("note  PEP_PROXY is not set: connections go direct (set PEP_PROXY=host:port)")
        return 0 if ok else 1
    print_(f"note  {len(peps)} PEP(s), tried in this order; PEP_FALLBACK={conf.fallback}")
    ok = check_peps(peps, conf, print_) and ok
    return 0 if ok else 1
