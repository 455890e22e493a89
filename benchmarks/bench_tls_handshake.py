"""HTTPS-style handshake through the PEP: direct, libpep.so, pepsock sync and asyncio.

Topology: the evaluation testbed (pepsock/testbed/topology.py: five namespaces,
user-space delay lines) with R1 = 40 ms client-PEP RTT and R2 = 80 ms PEP-server
RTT; `pep relay` in the PEP namespace; a TLS 1.3 server (Python ssl, a
certificate made here with the openssl command) in the server namespace that
answers one line per connection. For each mode, one connection after another:

  handshake  connect() called -> TLS handshake complete (the client's view)
  ttfb       connect() called -> first byte of the answer to a one-line request

Modes: direct (no PEP); libpep.so (the same stdlib client under LD_PRELOAD);
pepsock-wait (pepsock.create_connection + the stdlib's wrap_socket, which has to
wait for the PEP's reply: the behaviour before pepsock.tls); pepsock
(pepsock.create_tls_connection(timeout=10): the header in the SYN, the ClientHello
after the handshake); pepsock-syn (create_tls_connection() without a timeout: the
ClientHello in the SYN with the header); asyncio-wait (open_connection(ssl=) under
PEP_CONFIRM=1, which awaits the reply before start_tls: the behaviour before
pepsock.tls); asyncio (open_connection(ssl=), no wait);
patched (the stdlib's socket.create_connection + SSLContext.wrap_socket, as
http.client calls them, under pepsock.patch()).
Prints medians and ratios against direct and libpep.so, side by side in one run.

    sudo python benchmarks/bench_tls_handshake.py [--reps 10] [--r1 40] [--r2 80]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

import testbed_bench as tb_bench

SERVER_PORT, PEP_PORT = 8443, 5124
MODES = ["direct", "libpep.so", "pepsock-wait", "pepsock", "pepsock-syn", "patched",
         "asyncio-wait", "asyncio"]


# -- inside the namespaces ----------------------------------------------------------------

def serve(args) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    listener = socket.create_server(("0.0.0.0", SERVER_PORT), backlog=64)
    print("ready", flush=True)
    import threading

    def one(conn):
        try:
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                line = tls.recv(100)
                tls.sendall(line.upper())
        except OSError:
            pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def _sync_once(mode, server, pep, ctx):
    import pepsock
    t0 = time.perf_counter()
    if mode in ("direct", "libpep.so", "patched"):   # the stdlib's calls, as http.client makes them
        tls = ctx.wrap_socket(socket.create_connection(server, timeout=10),
                              server_hostname=server[0])
    elif mode == "pepsock-syn":     # no timeout: the ClientHello rides in the SYN
        tls = pepsock.create_tls_connection(server, ctx, pep=pep)
    elif mode == "pepsock-wait":
        tls = ctx.wrap_socket(pepsock.create_connection(server, timeout=10, pep=pep),
                              server_hostname=server[0])
    else:
        tls = pepsock.create_tls_connection(server, ctx, timeout=10, pep=pep)
    t_hs = time.perf_counter()
    tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as HTTP clients do
    tls.sendall(b"ping\n")
    assert tls.recv(10) == b"PING\n"
    t_fb = time.perf_counter()
    tls.close()
    return t_hs - t0, t_fb - t0


async def _async_once(mode, server, pep, ctx):
    import pepsock
    if mode == "asyncio-wait":   # the reply before start_tls, as open_connection(ssl=) did
        os.environ["PEP_CONFIRM"] = "1"
    t0 = time.perf_counter()
    reader, writer = await pepsock.open_connection(*server, pep=pep, ssl=ctx,
                                                   server_hostname=server[0])
    t_hs = time.perf_counter()
    writer.write(b"ping\n")
    assert await reader.readline() == b"PING\n"
    t_fb = time.perf_counter()
    writer.close()
    return t_hs - t0, t_fb - t0


def client(args) -> None:
    server = (args.server.rsplit(":", 1)[0], int(args.server.rsplit(":", 1)[1]))
    pep = (args.pep.rsplit(":", 1)[0], int(args.pep.rsplit(":", 1)[1]))
    ctx = ssl.create_default_context(cafile=args.cert)
    if args.mode == "patched":   # http.client passes no timeout: the ClientHello in the SYN
        import pepsock
        os.environ["PEP_PROXY"] = args.pep
        pepsock.patch()
    out = []
    for i in range(args.warmup + args.reps):
        if args.mode.startswith("asyncio"):
            hs, fb = asyncio.run(_async_once(args.mode, server, pep, ctx))
        else:
            hs, fb = _sync_once(args.mode, server, pep, ctx)
        if i >= args.warmup:
            out.append({"handshake_ms": hs * 1000, "ttfb_ms": fb * 1000})
        time.sleep(0.05)
    print(json.dumps({"mode": args.mode, "results": out}), flush=True)


# -- the driver ------------------------------------------------------------------------------

def run(args) -> int:
    from pepsock.testbed.topology import ADDR
    libpep, why = tb_bench.libpep()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="pepsock-bench-tls-") as keys:
        cert, key = os.path.join(keys, "cert.pem"), os.path.join(keys, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", f"/CN={ADDR['server']}",
                        "-addext", f"subjectAltName=IP:{ADDR['server']}"],
                       check=True, capture_output=True)
        with tb_bench.testbed(args, "bt", __file__, PEP_PORT,
                              ["--cert", cert, "--key", key]) as (tb, pep_addr, tmp):
            for mode in MODES:
                extra = {"PEP_STATE_DIR": os.path.join(tmp, "state")}
                if mode == "libpep.so":
                    if libpep is None:
                        print(f"libpep.so: skipped ({why})")
                        continue
                    extra.update(LD_PRELOAD=libpep, PEP_PROXY=pep_addr)
                p = tb.client.popen(sys.executable, __file__, "--client", "--mode", mode,
                                    "--server", f"{ADDR['server']}:{SERVER_PORT}",
                                    "--pep", pep_addr, "--cert", cert,
                                    "--reps", str(args.reps), "--warmup", "2",
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=tb_bench.env(extra))
                o, e = p.communicate(timeout=60 + args.reps * 5)
                lines = [ln for ln in o.splitlines() if ln.startswith("{")]
                if not lines:
                    print(f"{mode}: failed: {e[-800:]}")
                    continue
                rows[mode] = json.loads(lines[-1])["results"]
    _report(rows, args)
    return 0


def _report(rows, args) -> None:
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("handshake_ms", "ttfb_ms")}
           for m, rs in rows.items()}
    print(f"\nTLS 1.3 through pep relay, R1 (client-PEP) {args.r1:g} ms, R2 (PEP-server) "
          f"{args.r2:g} ms, {args.reps} connections per mode, medians:")
    print(f"{'mode':<14}{'handshake ms':>14}{'ttfb ms':>10}{'vs direct':>11}{'vs libpep.so':>14}")
    for mode in MODES:
        if mode not in med:
            continue
        hs, fb = med[mode]["handshake_ms"], med[mode]["ttfb_ms"]
        vs_d = hs / med["direct"]["handshake_ms"] if "direct" in med else float("nan")
        vs_l = hs / med["libpep.so"]["handshake_ms"] if "libpep.so" in med else float("nan")
        print(f"{mode:<14}{hs:>14.1f}{fb:>10.1f}{vs_d:>11.2f}{vs_l:>14.2f}")


def main(argv=None) -> int:
    ap = tb_bench.parser(__doc__.splitlines()[0])
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    return tb_bench.dispatch(ap.parse_args(argv), serve, client, run)


if __name__ == "__main__":
    sys.exit(main())
