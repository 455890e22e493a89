#!/usr/bin/env python3
"""What pepsock.create_connection adds over socket.create_connection, per connection.

In a fresh network namespace (net.ipv4.tcp_fastopen=3 there), a listener in a
separate process accepts TFO connections (cookie-less), reads the header, answers the RFC 8803
success reply and closes. In one client process, alternating blocks time:

  socket   socket.create_connection() to the listener (no TFO, no header)
  rawtfo   a hand-rolled TFO connect: socket(), TCP_FASTOPEN_NO_COOKIE,
           sendto(header, MSG_FASTOPEN), wait until connected
  pepsock  pepsock.create_connection(dest, pep=listener): planner, state,
           header in the SYN, PepSocket

  base     with --baseline REV: pepsock.create_connection of git revision REV
           (its pepsock/ extracted to a temp dir, imported as another package)

Each connection is closed with SO_LINGER 0 (no TIME_WAIT pile-up). Prints the
median microseconds per connection of each variant and the median over rounds
of the paired differences against rawtfo (the machine is shared: the rounds
of one variant vary; the differences within a round vary less). Needs root.

    python3 benchmarks/bench_client.py [--rounds 9] [--block 300] [--baseline aeea6fc]
"""
from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pepsock.testbed.netns import Topology, have_netns  # noqa: E402

SERVER = r"""
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_TCP, 23, 4096)          # TCP_FASTOPEN
l.setsockopt(socket.IPPROTO_TCP, 34, 1)             # TCP_FASTOPEN_NO_COOKIE
l.bind(("127.0.0.1", 0)); l.listen(4096)
print(l.getsockname()[1], flush=True)
reply = bytes.fromhex("01012263")
while True:
    c, _ = l.accept()
    try:
        c.recv(64)          # the header (closing with it unread would send a RST)
        c.send(reply)
    except OSError:
        pass
    c.close()
"""

LINGER0 = struct.pack("ii", 1, 0)


def close_now(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    s.close()


def run_socket(addr, n):
    for _ in range(n):
        close_now(socket.create_connection(addr, 5))


def run_rawtfo(addr, n, header):
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, 34, 1)
        s.setblocking(False)
        try:
            s.sendto(header, 0x20000000, addr)
        except BlockingIOError:
            pass
        select.select([], [s], [], 5)
        close_now(s)


def run_pepsock(addr, n, dest, module=None):
    if module is None:
        import pepsock as module
    connect = module.create_connection
    for _ in range(n):
        close_now(connect(dest, 5, pep=addr))


def load_revision(rev: str):
    """pepsock as of git revision `rev`, imported as the package pepsock_base."""
    import importlib.util
    tmp = tempfile.mkdtemp(prefix="bench-client-base-")
    subprocess.run(f"git -C {REPO} archive {rev} pepsock | tar -x -C {tmp}", shell=True,
                   check=True)
    init = os.path.join(tmp, "pepsock", "__init__.py")
    spec = importlib.util.spec_from_file_location("pepsock_base", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pepsock_base"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--baseline", metavar="REV", help="also time pepsock as of this git revision")
    ap.add_argument("--block", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="cProfile the pepsock variant instead")
    args = ap.parse_args()
    ok, why = have_netns()
    if not ok:
        print(f"skipped: {why}")
        return 0
    os.environ["PEP_STATE_DIR"] = tempfile.mkdtemp(prefix="bench-client-state-")
    os.environ.pop("PEP_PROXY", None)
    from pepsock import protocol
    with Topology(prefix="bc") as topo:
        host = topo.host("cli", tfo=3)
        server = host.popen(sys.executable, "-c", SERVER, stdout=-1, text=True)
        try:
            port = int(server.stdout.readline())
            with host.enter():
                addr = ("127.0.0.1", port)
                dest = ("192.0.2.80", 80)
                header = protocol.connect_request(*dest)
                variants = {
                    "socket": lambda n: run_socket(addr, n),
                    "rawtfo": lambda n: run_rawtfo(addr, n, header),
                    "pepsock": lambda n: run_pepsock(addr, n, dest),
                }
                if args.baseline:
                    base = load_revision(args.baseline)
                    variants["base"] = lambda n: run_pepsock(addr, n, dest, base)
                for run in variants.values():  # warm up
                    run(50)
                if args.profile:
                    import cProfile
                    import pstats
                    prof = cProfile.Profile()
                    prof.runcall(run_pepsock, addr, args.block * 3, dest)
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                    return 0
                times = {k: [] for k in variants}
                for _ in range(args.rounds):
                    for name, run in variants.items():
                        t0 = time.perf_counter()
                        run(args.block)
                        times[name].append((time.perf_counter() - t0) / args.block * 1e6)
        finally:
            server.kill()
            server.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, us in med.items():
        print(f"{name:8s} {us:8.1f} us/connection  (rounds: {', '.join(f'{t:.0f}' for t in times[name])})")
    for name in [k for k in ("pepsock", "base") if k in times]:
        for ref in ("socket", "rawtfo"):
            diffs = [a - b for a, b in zip(times[name], times[ref])]
            ratios = [a / b for a, b in zip(times[name], times[ref])]
            print(f"{name} - {ref:7s} {statistics.median(diffs):+8.1f} us  "
                  f"(median ratio {statistics.median(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
