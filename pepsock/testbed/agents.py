"""The programs that run inside the testbed's namespaces (one process each).

    python -m pepsock.testbed.agents <command> [options]    -> one JSON object on stdout

Servers print {"ready": true} first and then run until killed.  Every client
command is bounded by a deadline.  Times are CLOCK_MONOTONIC, which all network
namespaces share, so one-way delays between namespaces are exact; `--start-at`
takes an absolute monotonic time so that flows start in step with the rate
schedule.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time

from pepsock.policy import parse_hostport
from pepsock.tfo import MSG_FASTOPEN, TCP_FASTOPEN

TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
BIN = 0.1          # goodput bins (s)
CHUNK = 1 << 20


def out(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def set_cc(sock: socket.socket, cc: str | None) -> None:
    if cc:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, cc.encode())


# ---------------------------------------------------------------------------
# Server: "<n>\n" asks for n bytes; the server sends them and closes.
# "U<n>\n" announces an upload of n bytes: the server reads them and answers one JSON
# line: when (CLOCK_MONOTONIC) the first and last bytes came and bytes per 100 ms bin.

def _listener(bind: str, port: int, cc: str | None) -> socket.socket:
    """A TFO listener; "::" takes IPv4 too (dual stack)."""
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    set_cc(ls, cc)
    ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 256)
    ls.bind((bind, port))
    ls.listen(512)
    return ls


def cmd_server(a) -> None:
    ls = _listener(a.bind, a.port, a.cc)
    tls = None
    if a.tls_port:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        tls = (_listener(a.bind, a.tls_port, a.cc), ctx)
    payload = memoryview(b"x" * CHUNK)
    out({"ready": True})

    def serve(c: socket.socket, ctx=None) -> None:
        try:
            c.settimeout(60)
            if ctx is not None:
                c = ctx.wrap_socket(c, server_side=True)
            buf = b""
            while b"\n" not in buf:
                d = c.recv(4096)
                if not d:
                    return
                buf += d
            head, rest = buf.split(b"\n", 1)
            if head.startswith(b"GET "):      # curl: a minimal HTTP/1.1 answer, 100 bytes
                while b"\r\n\r\n" not in buf:
                    d = c.recv(4096)
                    if not d:
                        return
                    buf += d
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n" + b"x" * 100)
                return
            if head.startswith(b"U"):
                _receive_upload(c, int(head[1:]), rest)
                return
            n = int(head)
            while n > 0:
                k = c.send(payload[:min(n, CHUNK)])
                n -= k
            c.shutdown(socket.SHUT_WR)
            c.settimeout(5)
            while c.recv(4096):
                pass
        except (OSError, ValueError):
            pass
        finally:
            c.close()

    def accept_loop(lsock, ctx=None) -> None:
        while True:
            c, _ = lsock.accept()
            threading.Thread(target=serve, args=(c, ctx), daemon=True).start()

    if tls is not None:
        threading.Thread(target=accept_loop, args=tls, daemon=True).start()
    accept_loop(ls)


def _receive_upload(c: socket.socket, n: int, got_already: bytes) -> None:
    bins: dict[int, int] = {}
    first = last = time.monotonic()
    got = len(got_already)
    if got:
        bins[int(first / BIN)] = got
    buf = bytearray(CHUNK)
    while got < n:
        k = c.recv_into(buf)
        if not k:
            break
        last = time.monotonic()
        if got == 0:
            first = last
        got += k
        b = int(last / BIN)
        bins[b] = bins.get(b, 0) + k
    c.sendall((json.dumps({"bytes": got, "first": first, "last": last,
                           "bins": sorted(bins.items())}) + "\n").encode())
    c.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------
# Bulk client: K flows of N bytes, end to end or through the PEP.

def open_flow(mode: str, server: tuple[str, int], pep: tuple[str, int] | None,
              cc: str | None, timeout: float, request: bytes) -> socket.socket:
    """A connected socket with `request` sent, by the given method."""
    if mode in ("e2e", "direct"):
        s = socket.create_connection(server, timeout=timeout)
        set_cc(s, cc)
        s.sendall(request)
        return s
    if mode == "tfo":
        s = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_STREAM)
        set_cc(s, cc)
        s.sendto(request, MSG_FASTOPEN, server)   # blocking: SYN carries the request
        s.settimeout(timeout)
        return s
    if mode in ("pep", "pep-notfo", "pep-hs"):
        # pep: the request in the SYN with the Convert header (docs/python.md "The request in
        # the SYN"; request_in_syn because a timeout alone would keep the old way); pep-hs: the
        # old way, create_connection returns after the TCP handshake with the PEP
        import pepsock
        s = pepsock.create_connection(server, timeout=timeout, pep=pep, request_in_syn=mode != "pep-hs")
        set_cc(s, cc)
        s.sendall(request)
        return s
    if mode == "connect":
        s = socket.create_connection(pep, timeout=timeout)
        set_cc(s, cc)
        host = f"[{server[0]}]" if ":" in server[0] else server[0]
        s.sendall(f"CONNECT {host}:{server[1]} HTTP/1.1\r\nHost: {host}:{server[1]}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(4096)
            if not d:
                raise ConnectionError("proxy closed during CONNECT")
            buf += d
        status = buf.split(b"\r\n", 1)[0]
        if b" 200" not in status:
            raise ConnectionError(f"CONNECT refused: {status!r}")
        s.sendall(request)
        return s
    if mode == "socks5":
        s = socket.create_connection(pep, timeout=timeout)
        set_cc(s, cc)
        s.sendall(b"\x05\x01\x00")
        if _recvn(s, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 greeting refused")
        if ":" in server[0]:
            req = b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, server[0])
        else:
            req = b"\x05\x01\x00\x01" + socket.inet_aton(server[0])
        s.sendall(req + struct.pack("!H", server[1]))
        rep = _recvn(s, 4)
        if rep[1] != 0:
            raise ConnectionError(f"SOCKS5 connect failed: {rep[1]}")
        _recvn(s, {1: 4, 4: 16}.get(rep[3], 0) + 2)
        s.sendall(request)
        return s
    raise ValueError(mode)


def _recvn(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise ConnectionError("closed early")
        buf += d
    return buf


def cmd_bulk(a) -> None:
    server = parse_hostport(a.server, "--server")
    pep = parse_hostport(a.pep, "--pep") if a.pep else None
    start = a.start_at or time.monotonic()
    deadline = start + a.timeout
    results: list[dict] = [{} for _ in range(a.flows)]

    def flow(i: int) -> None:
        r = results[i]
        bins: dict[int, int] = {}
        sleep_until(start + i * a.stagger)
        t0 = time.monotonic()
        r["t_start"] = t0 - start
        got = 0
        try:
            if a.upload:
                _upload(a, server, pep, start, deadline, r, bins)
                return
            s = open_flow(a.mode, server, pep, a.cc, a.timeout, f"{a.bytes}\n".encode())
            buf = bytearray(CHUNK)
            while got < a.bytes:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                n = s.recv_into(buf)
                now = time.monotonic()
                if n == 0:
                    break
                if got == 0:
                    r["t_first"] = now - start
                got += n
                b = int((now - start) / BIN)
                bins[b] = bins.get(b, 0) + n
            r["t_end"] = time.monotonic() - start
            s.close()
        except Exception as e:  # reported, not raised: the run records the failure
            r["error"] = repr(e)
        r["bytes"] = got
        r["complete"] = got >= a.bytes
        r["fct"] = r.get("t_end", float("nan")) - r["t_start"]
        r["bins"] = sorted(bins.items())

    def _upload(a, server, pep, start, deadline, r, bins) -> None:
        """Send a.bytes; the server's answer says when they arrived (its bins, its clock,
        which all namespaces share)."""
        try:
            s = open_flow(a.mode, server, pep, a.cc, a.timeout, f"U{a.bytes}\n".encode())
            payload = memoryview(b"x" * CHUNK)
            left = a.bytes
            while left > 0:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                left -= s.send(payload[:min(left, CHUNK)])
            s.settimeout(max(0.1, deadline - time.monotonic()))
            answer = b""
            while not answer.endswith(b"\n"):
                d = s.recv(65536)
                if not d:
                    break
                answer += d
            s.close()
            rep = json.loads(answer)
            for b, n in rep["bins"]:
                rb = int((b * BIN - start) / BIN)
                bins[rb] = bins.get(rb, 0) + n
            r["t_first"] = rep["first"] - start
            r["t_end"] = rep["last"] - start
            got = rep["bytes"]
        except Exception as e:
            r["error"] = repr(e)
            got = 0
        r["bytes"] = got
        r["complete"] = got >= a.bytes
        r["fct"] = r.get("t_end", float("nan")) - r["t_start"]
        r["bins"] = sorted(bins.items())

    threads = [threading.Thread(target=flow, args=(i,), daemon=True) for i in range(a.flows)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic() + 1))
    out({"start": start, "bin": BIN, "flows": results})


# ---------------------------------------------------------------------------
# Interactive flow: 100-byte UDP datagrams every 50 ms carrying seq + send time.

def cmd_udp_send(a) -> None:
    dst = parse_hostport(a.dst, "--dst")
    s = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_DGRAM)
    start = a.start_at or time.monotonic()
    pad = b"\0" * max(0, a.size - 12)
    seq = 0
    while True:
        t = start + seq * a.interval
        if t - start > a.duration:
            break
        sleep_until(t)
        s.sendto(struct.pack("!Iq", seq, time.time_ns()) + pad, dst)
        seq += 1
    out({"sent": seq})


def cmd_udp_recv(a) -> None:
    fam = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((a.bind, a.port))
    # Kernel receive timestamps (CLOCK_REALTIME, as the sender's stamps), so the
    # receiver's own scheduling delay does not count as network delay.
    SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    mono_minus_real = time.monotonic() - time.time()
    stop = []
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    out({"ready": True})
    end = time.monotonic() + a.duration
    recs = []
    while not stop:
        left = end - time.monotonic()
        if left <= 0:
            break
        try:
            r, _, _ = select.select([s], [], [], min(left, 0.2))
        except InterruptedError:
            continue
        if not r:
            continue
        d, anc, _, _ = s.recvmsg(2048, 64)
        now = time.time()
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("qq", data[:16])
                now = sec + nsec / 1e9
        if len(d) >= 12:
            seq, sent = struct.unpack("!Iq", d[:12])
            # reported on the monotonic time line the other agents use
            recs.append((seq, sent / 1e9 + mono_minus_real, now + mono_minus_real))
    out({"records": recs})


# ---------------------------------------------------------------------------
# Time to first byte: connect, ask for a few bytes, time the first one.

def _tls_context():
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE          # a self-signed test certificate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _ttfb_tls_once(a, server, proxy, ctx) -> float:
    """One HTTPS-like exchange (TLS 1.3 handshake, then "<size>\\n"), by a.mode:
    direct, pep (pepsock sync: the context made pepsock.tls.pep_aware, so wrap_socket of
    the PepSocket sends the ClientHello in the SYN, behind the Convert header), pep-hs (the
    same with create_connection returning after the TCP handshake, the ClientHello right
    after it: the old way), pep-wait (the stdlib's wrap_socket of the PepSocket, which
    waits for the reply), connect, socks5 (TLS inside the tunnel), aio
    (pepsock.open_connection(ssl=...) without a timeout: the ClientHello in the SYN),
    curl / curl-libpep (curl, the latter with LD_PRELOAD=libpep.so)."""
    req = f"{a.size}\n".encode()
    if a.mode.startswith("curl"):
        import subprocess
        env = dict(os.environ)
        host = f"[{server[0]}]" if ":" in server[0] else server[0]
        if a.mode == "curl-libpep":
            env.update(LD_PRELOAD=a.libpep, PEP_PROXY=a.proxy)
        p = subprocess.run(["curl", "-sk", "--tlsv1.3", "-o", "/dev/null", "-w", "%{time_starttransfer}",
                            "--max-time", str(a.timeout), f"https://{host}:{server[1]}/"],
                           capture_output=True, text=True, env=env, timeout=a.timeout + 5)
        if p.returncode != 0:
            raise RuntimeError(f"curl rc {p.returncode}: {p.stderr[-300:]}")
        return float(p.stdout) * 1000
    if a.mode == "aio":
        import asyncio
        import pepsock

        async def once():
            t0 = time.monotonic()
            # no timeout, so the ClientHello goes in the SYN; bounded from outside instead
            r, w = await asyncio.wait_for(pepsock.open_connection(
                server[0], server[1], pep=proxy, ssl=ctx, server_hostname="server"), a.timeout)
            w.write(req)
            d = await asyncio.wait_for(r.read(16), a.timeout)
            t1 = time.monotonic()
            w.close()
            return (t1 - t0) * 1000 if d else None
        return asyncio.run(once())
    if a.mode in ("pep", "pep-hs"):
        import pepsock.tls
        ctx = pepsock.tls.pep_aware(ctx)   # idempotent; the waiting row is pep-wait
    t0 = time.monotonic()
    # pep-wait: the stdlib's SSLSocket takes the descriptor, so the old way underneath too
    s = open_flow("pep-hs" if a.mode == "pep-wait" else a.mode, server, proxy, a.cc, a.timeout, b"")
    # as curl and asyncio do: without it, Nagle holds the request behind the unacked
    # client Finished, one more round trip
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = ctx.wrap_socket(s, server_hostname="server")
    t.sendall(req)
    d = t.recv(16)
    t1 = time.monotonic()
    t.close()
    return (t1 - t0) * 1000 if d else None


def _aio_first_bytes(server, pep, timeout: float, request: bytes) -> bytes:
    """pepsock.open_connection without a timeout (bounded from outside): the first write
    goes in the SYN with the Convert header.  The first bytes of the answer."""
    import asyncio
    import pepsock

    async def once():
        r, w = await asyncio.wait_for(pepsock.open_connection(server[0], server[1], pep=pep), timeout)
        try:
            w.write(request)
            return await asyncio.wait_for(r.read(16), timeout)
        finally:
            w.close()
    return asyncio.run(once())


def cmd_ttfb(a) -> None:
    server = parse_hostport(a.server, "--server")
    proxy = parse_hostport(a.proxy, "--proxy") if a.proxy else None
    if a.mode == "aio" and not a.tls:
        res = []
        for i in range(a.warmup + a.reps):
            t0 = time.monotonic()
            try:
                d = _aio_first_bytes(server, proxy, a.timeout, f"{a.size}\n".encode())
                if i >= a.warmup:
                    res.append({"ttfb_ms": (time.monotonic() - t0) * 1000 if d else None})
            except Exception as e:
                if i >= a.warmup:
                    res.append({"ttfb_ms": None, "error": repr(e)})
            time.sleep(a.gap)
        out({"mode": a.mode, "results": res})
        return
    if a.tls:
        ctx = _tls_context()
        res = []
        for i in range(a.warmup + a.reps):
            try:
                x = _ttfb_tls_once(a, server, proxy, ctx)
                if i >= a.warmup:
                    res.append({"ttfb_ms": x})
            except Exception as e:
                if i >= a.warmup:
                    res.append({"ttfb_ms": None, "error": repr(e)})
            time.sleep(a.gap)
        out({"mode": a.mode, "results": res})
        return
    res = []
    for _ in range(a.warmup):      # TFO cookies, ARP/ND, page cache
        try:
            s = open_flow(a.mode, server, proxy, a.cc, a.timeout, b"1\n")
            s.recv(16)
            s.close()
        except Exception:
            pass
        time.sleep(a.gap)
    for _ in range(a.reps):
        t0 = time.monotonic()
        try:
            s = open_flow(a.mode, server, proxy, a.cc, a.timeout, f"{a.size}\n".encode())
            d = s.recv(16)
            t1 = time.monotonic()
            s.close()
            res.append({"ttfb_ms": (t1 - t0) * 1000 if d else None})
        except Exception as e:
            res.append({"ttfb_ms": None, "error": repr(e)})
        time.sleep(a.gap)
    out({"mode": a.mode, "results": res})


# ---------------------------------------------------------------------------
# ICMP echo (the image has no ping): median RTT to a destination.

def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def cmd_ping(a) -> None:
    v6 = ":" in a.dst
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts = []
    for seq in range(a.count):
        body = struct.pack("!d", time.monotonic()) + b"p" * 48
        typ = 128 if v6 else 8
        hdr = struct.pack("!BBHHH", typ, 0, 0, ident, seq)
        pkt = hdr + body
        if not v6:  # the kernel fills the ICMPv6 checksum
            pkt = struct.pack("!BBHHH", typ, 0, _csum(pkt), ident, seq) + body
        t0 = time.monotonic()
        s.sendto(pkt, (a.dst, 0))
        end = t0 + a.wait
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                break
            d = s.recv(2048)
            now = time.monotonic()
            icmp = d if v6 else d[(d[0] & 0xF) * 4:]
            if len(icmp) >= 8:
                t, _, _, i, q = struct.unpack("!BBHHH", icmp[:8])
                if t == (129 if v6 else 0) and i == ident and q == seq:
                    rtts.append((now - t0) * 1000)
                    break
        time.sleep(a.interval)
    out({"rtts_ms": rtts, "sent": a.count})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pepsock.testbed.agents")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("server")
    sp.add_argument("--bind", default="::")
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--tls-port", type=int, help="also serve TLS here (--cert, --key)")
    sp.add_argument("--cert")
    sp.add_argument("--key")
    sp.add_argument("--cc")
    sp.set_defaults(fn=cmd_server)
    sp = sub.add_parser("bulk")
    sp.add_argument("--server", required=True)
    sp.add_argument("--pep")
    sp.add_argument("--mode", default="e2e")
    sp.add_argument("--bytes", type=int, required=True)
    sp.add_argument("--flows", type=int, default=1)
    sp.add_argument("--stagger", type=float, default=0.0)
    sp.add_argument("--upload", action="store_true", help="the client sends the bytes")
    sp.add_argument("--start-at", type=float)
    sp.add_argument("--timeout", type=float, default=60)
    sp.add_argument("--cc")
    sp.set_defaults(fn=cmd_bulk)
    sp = sub.add_parser("udp-send")
    sp.add_argument("--dst", required=True)
    sp.add_argument("--interval", type=float, default=0.05)
    sp.add_argument("--size", type=int, default=100)
    sp.add_argument("--duration", type=float, required=True)
    sp.add_argument("--start-at", type=float)
    sp.set_defaults(fn=cmd_udp_send)
    sp = sub.add_parser("udp-recv")
    sp.add_argument("--bind", default="0.0.0.0")
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--duration", type=float, required=True)
    sp.set_defaults(fn=cmd_udp_recv)
    sp = sub.add_parser("ttfb")
    sp.add_argument("--server", required=True)
    sp.add_argument("--proxy")
    sp.add_argument("--mode", required=True)
    sp.add_argument("--reps", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--gap", type=float, default=0.05)
    sp.add_argument("--size", type=int, default=100)
    sp.add_argument("--cc")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--tls", action="store_true", help="a TLS 1.3 handshake before the request")
    sp.add_argument("--libpep", help="path of libpep.so (mode curl-libpep)")
    sp.set_defaults(fn=cmd_ttfb)
    sp = sub.add_parser("ping")
    sp.add_argument("dst")
    sp.add_argument("--count", type=int, default=5)
    sp.add_argument("--interval", type=float, default=0.1)
    sp.add_argument("--wait", type=float, default=2.0)
    sp.set_defaults(fn=cmd_ping)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
