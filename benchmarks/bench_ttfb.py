"""Time to first byte of a plain HTTP GET through the PEP: direct, libpep.so, pepsock.

Topology: the evaluation testbed (pepsock/testbed/topology.py: five namespaces,
user-space delay lines), R1 = client-PEP RTT, R2 = PEP-server RTT; `pep relay` in
the PEP namespace; a tiny HTTP/1.0 server in the server namespace. For each mode,
one connection after another, ttfb = connect called -> first byte of the answer:

  direct          socket.create_connection + sendall(GET), no PEP       2R1+2R2
  libpep.so       the same Python client under LD_PRELOAD: a blocking    R1+R2+max(R1,R2)
                  connect, so the header alone in the SYN (PEP_SYN_WRITE
                  holds the SYN only for non-blocking sockets)
  curl+libpep.so  curl under LD_PRELOAD (its time_starttransfer): its    R1+2R2
                  request rides the SYN after the header (PEP_SYN_WRITE)
  curl+libpep-0   the same with PEP_SYN_WRITE=0: the header alone in the  R1+R2+max(R1,R2)
                  SYN, the request after the handshake
  pepsock-before  pepsock.create_connection(timeout=10): the header in   R1+R2+max(R1,R2)
                  the SYN, the request after the handshake (the old way)
  pepsock         pepsock.create_connection(): header + request in the   R1+2R2
                  SYN (TCP_FASTOPEN_CONNECT)
  asyncio         pepsock.open_connection() + write(GET): the same      R1+2R2
  pepsock-notfo   pepsock.create_connection() with client TFO off:        2R1+2R2
                  plain SYN, header then request (TCP_NODELAY until the reply;
                  with Nagle in the way: 3R1+R2 or more)

Prints medians, the formula and ratios against direct, side by side in one run.
(TLS: benchmarks/bench_tls_handshake.py.)

    sudo python benchmarks/bench_ttfb.py [--reps 10] [--r1 40] [--r2 80]
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import testbed_bench as tb_bench

SERVER_PORT, PEP_PORT = 8080, 5124
MODES = ["direct", "libpep.so", "curl+libpep.so", "curl+libpep-0", "pepsock-before", "pepsock", "asyncio",
         "pepsock-notfo"]
REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"


def formula(mode: str, r1: float, r2: float) -> float:
    return {"direct": 2 * r1 + 2 * r2, "pepsock-before": r1 + r2 + max(r1, r2),
            "curl+libpep-0": r1 + r2 + max(r1, r2), "libpep.so": r1 + r2 + max(r1, r2),
            "pepsock-notfo": 2 * r1 + 2 * r2}.get(mode, r1 + 2 * r2)


# -- inside the namespaces ----------------------------------------------------------------

def serve(args) -> None:
    listener = socket.create_server(("0.0.0.0", SERVER_PORT), backlog=64)
    print("ready", flush=True)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=tb_bench.answer_one_request, args=(conn, ANSWER, 10),
                         daemon=True).start()


def _once(mode, server, pep) -> float:
    if mode.startswith("curl"):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_starttransfer}",
                              f"http://{server[0]}:{server[1]}/"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return float(out)
    import pepsock
    if mode == "asyncio":
        return asyncio.run(_aio_once(server, pep))
    t0 = time.perf_counter()
    if mode in ("direct", "libpep.so"):
        sock = socket.create_connection(server)
    elif mode == "pepsock-before":
        sock = pepsock.create_connection(server, timeout=10, pep=pep)
    else:
        sock = pepsock.create_connection(server, pep=pep)
    sock.sendall(REQUEST)
    assert sock.recv(100)
    t = time.perf_counter() - t0
    sock.close()
    return t


async def _aio_once(server, pep) -> float:
    import pepsock
    t0 = time.perf_counter()
    reader, writer = await pepsock.open_connection(*server, pep=pep)
    writer.write(REQUEST)
    assert await reader.read(100)
    t = time.perf_counter() - t0
    writer.close()
    return t


def client(args) -> None:
    server = (args.server.rsplit(":", 1)[0], int(args.server.rsplit(":", 1)[1]))
    pep = (args.pep.rsplit(":", 1)[0], int(args.pep.rsplit(":", 1)[1]))
    out = []
    for i in range(args.warmup + args.reps):
        t = _once(args.mode, server, pep)
        if i >= args.warmup:
            out.append(t * 1000)
        time.sleep(0.05)
    print(json.dumps({"mode": args.mode, "ttfb_ms": out}), flush=True)


# -- the driver ------------------------------------------------------------------------------

def run(args) -> int:
    from pepsock.testbed.topology import ADDR
    libpep, why = tb_bench.libpep()
    rows = {}
    with tb_bench.testbed(args, "bf", __file__, PEP_PORT) as (tb, pep_addr, tmp):
        for mode in MODES:
            extra = {"PEP_STATE_DIR": os.path.join(tmp, "state-" + mode)}
            if "libpep" in mode:
                if libpep is None or (mode.startswith("curl") and not shutil.which("curl")):
                    print(f"{mode}: skipped ({why or 'no curl'})")
                    continue
                extra.update(LD_PRELOAD=libpep, PEP_PROXY=pep_addr)
                if mode == "curl+libpep-0":
                    extra["PEP_SYN_WRITE"] = "0"
            if mode == "pepsock-notfo":
                tb.client.sysctl("net.ipv4.tcp_fastopen", 2)
            try:
                p = tb.client.popen(sys.executable, __file__, "--client", "--mode", mode,
                                    "--server", f"{ADDR['server']}:{SERVER_PORT}",
                                    "--pep", pep_addr, "--reps", str(args.reps),
                                    "--warmup", "2", stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=tb_bench.env(extra))
                o, e = p.communicate(timeout=60 + args.reps * 10)
            finally:
                tb.client.sysctl("net.ipv4.tcp_fastopen", 3)
            lines = [ln for ln in o.splitlines() if ln.startswith("{")]
            if not lines:
                print(f"{mode}: failed: {e[-800:]}")
                continue
            rows[mode] = json.loads(lines[-1])["ttfb_ms"]
    med = {m: statistics.median(v) for m, v in rows.items()}
    print(f"\nHTTP GET through pep relay, R1 (client-PEP) {args.r1:g} ms, R2 (PEP-server) "
          f"{args.r2:g} ms, {args.reps} connections per mode, medians:")
    print(f"{'mode':<16}{'ttfb ms':>10}{'formula':>10}{'vs formula':>12}{'vs direct':>11}")
    for mode in MODES:
        if mode in med:
            f = formula(mode, args.r1, args.r2)
            vs_d = med[mode] / med["direct"] if "direct" in med else float("nan")
            print(f"{mode:<16}{med[mode]:>10.1f}{f:>10.1f}{med[mode] / f:>12.3f}{vs_d:>11.3f}")
    return 0


def main(argv=None) -> int:
    args = tb_bench.parser(__doc__.splitlines()[0]).parse_args(argv)
    return tb_bench.dispatch(args, serve, client, run)


if __name__ == "__main__":
    sys.exit(main())
