#!/usr/bin/env python3
"""The C engine's Python side alone: what deciding one tunnel costs.

    python3 benchmarks/bench_relay_decide.py [-n 100000] [--rounds 5] [--baseline-root DIR]

`pep relay --engine c` hands Python three records per tunnel (NEW with its
Connect, CONNECTED, ENDED); Python applies admission, the memory budget and
the route rules and answers with rc_connect.  Here CoreLoop._records runs on
synthetic records of a loopback client asking for 127.0.0.1:8080 (the
conn/s benchmark's tunnels), with the core's calls (rc_connect, rc_count)
stubbed: no socket is made, so the time is Python's and cffi's alone.
Filling the records is timed apart and subtracted.

--baseline-root runs the same against another checkout (before/after in one
run, rounds interleaved); the ratio is this checkout's over the baseline's.
The machine is noisy: compare the medians' ratio, not absolute times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child with the checkout under test first on sys.path.
CHILD = r"""
import socket, sys, time
from pepsock.relay.cli import parse_config
from pepsock.relay.engine import CoreLoop, RC_NEW, RC_CONNECTED, RC_ENDED, HDR_CONNECT
from pepsock.relay.server import _admission

cfg = parse_config(["--listen", "127.0.0.1:0", "--allow-dest", "127.0.0.0/8",
                    "--no-tunnel-log", "--max-per-client", "0"])
loop = CoreLoop(cfg)
loop.admission = _admission(cfg, [("127.0.0.1", 9)])
ffi = loop.ffi
recs = ffi.new("struct rc_record[3]")


class Core:
    # The core's calls a tunnel's records lead to; everything else is real.
    def __init__(self, real):
        self.real = real

    def rc_count(self, core):
        return 3

    def rc_connect(self, core, tid, c):
        return 0

    def __getattr__(self, name):
        return getattr(self.real, name)


loop.lib = Core(loop.lib)
loop.recs = recs


def fill(tid):
    r = recs[0]
    r.kind, r.id, r.hdr, r.family = RC_NEW, tid, HDR_CONNECT, socket.AF_INET
    r.client_addr[0:4] = [127, 0, 0, 1]
    r.client_port, r.dest_port = 40000, 8080
    r.dest_addr[0:16] = [0] * 10 + [255, 255, 127, 0, 0, 1]
    r.syn_data, r.syn_payload, r.early = 1, 84, 60
    r = recs[1]
    r.kind, r.id, r.elapsed_ns = RC_CONNECTED, tid, 50000
    r = recs[2]
    r.kind, r.id, r.up, r.down, r.elapsed_ns = RC_ENDED, tid, 60, 145, 400000


n = int(sys.argv[1])
t0 = time.perf_counter()
for i in range(n):
    fill(i % 1000)
t1 = time.perf_counter()
for i in range(n):
    fill(i % 1000)
    loop._records(3)
t2 = time.perf_counter()
print((t2 - t1 - (t1 - t0)) / n * 1e6)
"""


def one(root: str, n: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], cwd=root, check=True,
                         capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root))
    return float(out.stdout.split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100000, help="tunnels per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline-root", help="another checkout, run interleaved")
    args = ap.parse_args(argv)
    ways = [("this", ROOT)] + ([("base", os.path.abspath(args.baseline_root))]
                               if args.baseline_root else [])
    got = {name: [] for name, _ in ways}
    for _ in range(args.rounds):
        for name, root in ways:
            got[name].append(one(root, args.n))
    print(f"# bench_relay_decide  n={args.n} rounds={args.rounds}  load={os.getloadavg()[0]:.2f}")
    print("Python per tunnel (C engine, core stubbed), median [range]:")
    for name, root in ways:
        xs = got[name]
        print(f"  {name:5s} {statistics.median(xs):6.2f} us  [{min(xs):.2f}-{max(xs):.2f}]  {root}")
    if args.baseline_root:
        print(f"  this/base = {statistics.median(got['this']) / statistics.median(got['base']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
