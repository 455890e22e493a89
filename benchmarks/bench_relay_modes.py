#!/usr/bin/env python3
"""Time to first byte of connections 1, 2 and 3 through `pep relay` in each of
its proof-of-address modes (docs/relay.md, threat model), side by side with a
direct connection, in the evaluation testbed's namespaces with real delays.

    sudo python3 benchmarks/bench_relay_modes.py [--r1 40] [--r2 40] [--rounds 3]

    client --R1-- pep (relay) --R2-- server          (pepsock.testbed.topology)

The client is a raw TFO socket in the client namespace: a Convert header (plus
the Cookie TLV once it has one) and a 1-line request in the SYN, the
destination answers as soon as the request arrives.  TTFB = sendto() to the
first response byte; for a connection that gets Error 3 it includes the retry.
Before each round the client's TFO cookie cache is flushed (`ip tcp_metrics
flush`) and its Cookie TLV forgotten: connection 1 is a first contact.

Modes (relay flags / client TFO):
* default          (no flag)                       / standard TFO (cookie)
* no-cookie        --no-cookie                     / TCP_FASTOPEN_NO_COOKIE
* cookie-tlv       --cookie-secret F               / standard TFO + Cookie TLV
* no-cookie+tlv    --no-cookie --cookie-secret F   / NO_COOKIE + Cookie TLV
Prints medians in ms and the ratio to the direct connection's TTFB.
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from pepsock.protocol import Connect, Cookie, ErrorCode, Message, MessageReader  # noqa: E402
from pepsock.testbed.topology import ADDR, Settings, Testbed  # noqa: E402
from pepsock.tfo import MSG_FASTOPEN, TCP_FASTOPEN_NO_COOKIE  # noqa: E402
from relay_helpers import Relay  # noqa: E402
from testbed_bench import answer_one_request  # noqa: E402

PORT, DEST_PORT = 5124, 8080
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
RESPONSE = b"HTTP/1.0 200 OK\r\n\r\nhi"
MODES = {
    "default": ([], False, False),
    "no-cookie": (["--no-cookie"], True, False),
    "cookie-tlv": (["--cookie-secret", "{secret}"], False, True),
    "no-cookie+tlv": (["--no-cookie", "--cookie-secret", "{secret}"], True, True),
}


def responder(host, addr):
    """The destination: answers each connection once its request line is in."""
    with host.enter():
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(addr)
        ls.listen(64)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            answer_one_request(c, RESPONSE, 5)
    threading.Thread(target=serve, daemon=True).start()
    return ls


def _tfo_send(s, payload, addr):
    try:
        sent = s.sendto(payload, MSG_FASTOPEN, addr)
    except BlockingIOError:
        select.select([], [s], [], 5)
        sent = 0
    if sent < len(payload):
        s.sendall(payload[sent:])


def _first_byte(s, convert: bool):
    """(reply Message or None, first response byte time)."""
    reader = MessageReader() if convert else None
    while True:
        data = s.recv(4096)
        if not data:
            raise RuntimeError("connection closed before the response")
        if reader is None:
            return None, time.perf_counter()
        msg = reader.feed(data)
        if msg is not None:
            if msg.error is not None:
                return msg, None
            if reader.rest:
                return msg, time.perf_counter()
            reader = None       # reply complete: the response follows


def attempt(relay, dest, no_cookie: bool, cookie: bytes | None):
    """One connection: (TTFB end time or None, Error TLV or None)."""
    s = socket.socket()
    s.settimeout(10)
    if no_cookie:
        s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    tlvs = (Connect(*dest),) + ((Cookie(cookie),) if cookie else ())
    try:
        _tfo_send(s, Message(tlvs).encode() + REQUEST, relay)
        msg, t = _first_byte(s, True)
    finally:
        s.close()
    return t, (msg.error if msg is not None else None)


def through_relay(relay, dest, no_cookie, state):
    """TTFB of one logical connection, Error 3 retry included (ms)."""
    t0 = time.perf_counter()
    for _ in range(2):
        t, err = attempt(relay, dest, no_cookie, state.get("cookie"))
        if err is None:
            return (t - t0) * 1000
        if err.code != ErrorCode.MISSING_COOKIE:
            raise RuntimeError(f"relay answered Error {err.code}")
        state["cookie"] = err.value[1:]
    raise RuntimeError("Error 3 twice")


def direct(dest):
    t0 = time.perf_counter()
    s = socket.create_connection(dest, timeout=10)
    s.sendall(REQUEST)
    s.recv(1)
    t = time.perf_counter()
    s.close()
    return (t - t0) * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--r1", type=float, default=40, help="client-PEP RTT, ms")
    ap.add_argument("--r2", type=float, default=40, help="PEP-server RTT, ms")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    secret = tempfile.NamedTemporaryFile(prefix="pep-bench-secret-", delete=False)
    secret.write(os.urandom(24).hex().encode() + b"\n")
    secret.close()
    dest = (ADDR["server"], DEST_PORT)
    relay_addr = (ADDR["pep_w"], PORT)
    results: dict[str, list[list[float]]] = {}
    try:
        with Testbed(Settings(r1_ms=args.r1, r2_ms=args.r2), prefix="bm") as tb:
            listener = responder(tb.server, ("0.0.0.0", DEST_PORT))
            with tb.client.enter():
                results["direct"] = [[direct(dest) for _ in range(3)] for _ in range(args.rounds)]
            for mode, (flags, no_cookie, _) in MODES.items():
                argv = [f.format(secret=secret.name) for f in flags]
                relay = Relay("--listen", f"{relay_addr[0]}:{PORT}", "--log-level", "warning",
                              *argv, prefix=tb.pep.cmd())
                try:
                    rows = []
                    for _ in range(args.rounds):
                        tb.client.run("ip", "tcp_metrics", "flush", "all", check=False)
                        state: dict = {}
                        with tb.client.enter():
                            rows.append([through_relay(relay_addr, dest, no_cookie, state)
                                         for _ in range(3)])
                    results[mode] = rows
                finally:
                    relay.stop()
            listener.close()
    finally:
        os.unlink(secret.name)
    base = statistics.median(x for row in results["direct"] for x in row)
    print(f"TTFB, ms (median of {args.rounds} rounds); R1 client-PEP {args.r1:g} ms, "
          f"R2 PEP-server {args.r2:g} ms; ratio = TTFB / direct TTFB ({base:.1f} ms)")
    print(f"{'mode':<15}{'conn 1':>16}{'conn 2':>16}{'conn 3':>16}")
    for mode, rows in results.items():
        cells = []
        for i in range(3):
            med = statistics.median(row[i] for row in rows)
            cells.append(f"{med:7.1f} ({med / base:4.2f}x)")
        print(f"{mode:<15}" + "".join(f"{c:>16}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
