"""Bulk TLS through `pep relay` on loopback: what the memory-BIO TLS costs.

pepsock.tls moves every record through Python (an SSLObject over memory BIOs,
fed by the PepSocket); the stdlib's SSLSocket lets OpenSSL read the descriptor.
This measures MB/s down (server -> client) and up for: direct (stdlib TLS, no
PEP), stdlib-wrap (stdlib TLS over a PepSocket, which waits for the reply
first), and pepsock (wrap_tls). One namespace, loopback, the relay and a TLS
server (Python ssl) as subprocesses; ratios against stdlib-wrap.

    sudo python benchmarks/bench_tls_bulk.py [--mbytes 200] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

CHUNK = 256 * 1024


def serve(cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def one(conn):
        with ctx.wrap_socket(conn, server_side=True) as tls:
            f = tls.makefile("rb")
            while line := f.readline():
                what, n = line.split()
                n = int(n)
                if what == b"down":
                    block = b"x" * CHUNK
                    while n > 0:
                        tls.sendall(block[:min(n, CHUNK)])
                        n -= CHUNK
                else:
                    while n > 0:
                        n -= len(f.read1(min(n, CHUNK)))
                    tls.sendall(b"ok\n")

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def measure(tls, nbytes: int) -> tuple[float, float]:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    tls.sendall(b"down %d\n" % nbytes)
    left = nbytes
    while left:
        left -= tls.recv_into(buf, min(left, CHUNK))
    down = nbytes / (time.perf_counter() - t0) / 1e6
    block = b"y" * CHUNK
    t0 = time.perf_counter()
    tls.sendall(b"up %d\n" % nbytes)
    left = nbytes
    while left > 0:
        tls.sendall(block[:min(left, CHUNK)])
        left -= CHUNK
    assert tls.recv(3) == b"ok\n"
    up = nbytes / (time.perf_counter() - t0) / 1e6
    return down, up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbytes", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    import pepsock
    from pepsock.testbed.netns import Topology
    from relay_helpers import Relay

    tmp = tempfile.mkdtemp(prefix="pepsock-bench-bulk-")
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    ctx = ssl.create_default_context(cafile=cert)
    results: dict[str, list[tuple[float, float]]] = {}
    with Topology(prefix="bb") as topo:
        host = topo.host("bulk", tfo=3)
        env = {**os.environ, "PYTHONPATH": ROOT}
        server = host.popen(sys.executable, __file__, "--serve", cert, key,
                            stdout=subprocess.PIPE, text=True, env=env)
        relay = Relay("--listen", "127.0.0.1:0", "--allow-dest", "127.0.0.0/8", prefix=host.cmd())
        try:
            dest = ("127.0.0.1", int(server.stdout.readline()))
            with host.enter():
                for _ in range(args.reps):
                    for mode in ("direct", "stdlib-wrap", "pepsock"):
                        if mode == "direct":
                            raw = socket.create_connection(dest, timeout=30)
                        else:
                            raw = pepsock.create_connection(dest, timeout=30, pep=relay.addr)
                        if mode == "pepsock":
                            tls = pepsock.wrap_tls(raw, ctx, server_hostname="localhost")
                        else:
                            tls = ctx.wrap_socket(raw, server_hostname="localhost")
                        with tls:
                            results.setdefault(mode, []).append(
                                measure(tls, args.mbytes * 1_000_000))
        finally:
            relay.stop()
            server.kill()
            server.wait()
    best = {m: (max(d for d, _ in r), max(u for _, u in r)) for m, r in results.items()}
    base = best["stdlib-wrap"]
    print(f"TLS bulk through pep relay on loopback, {args.mbytes} MB each way, "
          f"best of {args.reps}:")
    print(f"{'mode':<13}{'down MB/s':>11}{'up MB/s':>10}{'down ratio':>12}{'up ratio':>10}")
    for mode, (down, up) in best.items():
        print(f"{mode:<13}{down:>11.0f}{up:>10.0f}{down / base[0]:>12.2f}{up / base[1]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
