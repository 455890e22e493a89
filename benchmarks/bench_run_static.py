#!/usr/bin/env python3
"""The seccomp supervisor's cost against libpep.so, on the same program.

`pep run --mode seccomp` forces the supervisor's path (the one static and Go
programs take) on curl, a dynamic program libpep.so also serves, so the two
paths move the same bytes with the same program, through the same `pep
relay`, in one network namespace (loopback, TFO on; root needed):

  throughput   one curl download of --size MiB from a sendfile() server
               (MB/s, best of --rounds)
  set-up       --connections sequential HTTP/1.0 requests of a 1-byte file
               in one curl (Connection: close: a new connection each), wall
               time per request without process start-up: (T(N) - T(1)) / (N-1),
               each T the best of --rounds (ms)

A direct run (no PEP) is printed as the floor.  Loopback has no RTT, so
set-up shows each path's own cost per connection; on a real path both add it
to the same RTTs.

    sudo python3 benchmarks/bench_run_static.py [--size 256] [--connections 200] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from pepsock.testbed.netns import Topology, have_netns  # noqa: E402
from relay_helpers import Relay, Server  # noqa: E402


class SendfileServer:
    """HTTP/1.0 on 127.0.0.1: GET /big -> `path` by sendfile(); anything else -> 1 byte."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        self.server = Server(self._one)
        self.port = self.server.addr[1]

    def _one(self, conn):
        conn.settimeout(None)       # blocking: sendfile() without a poll() per chunk
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = conn.recv(4096)
            if not chunk:
                return
            req += chunk
        big = req.startswith(b"GET /big ")
        size = self.size if big else 1
        conn.sendall(b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                     % size)
        if big:
            with open(self.path, "rb") as f:
                conn.sendfile(f)
        else:
            conn.sendall(b"x")

    def close(self):
        self.server.close()


def pep_run(host, mode: str | None, pep, argv: list[str]) -> float:
    """Run argv (under pep run --mode mode, or bare if mode is None); wall seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEP_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = REPO
    env["PEP_NO_PROXY"] = ""
    if mode is not None:
        argv = [sys.executable, "-m", "pepsock.cli", "run", "--mode", mode, "--pep",
                f"{pep[0]}:{pep[1]}", "--", *argv]
    t0 = time.monotonic()
    p = subprocess.run(host.cmd(*argv), env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed ({p.returncode}): {p.stderr[-1000:]}")
    return elapsed, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="MiB to download (default 256)")
    ap.add_argument("--connections", type=int, default=200, help="set-up requests (default 200)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ok, why = have_netns()
    if not ok:
        print(f"skipped: {why}")
        return 0
    curl = "/usr/bin/curl"
    with tempfile.TemporaryDirectory() as tmp, Topology(prefix="brs") as topo:
        big = os.path.join(tmp, "big")
        with open(big, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        host = topo.host("b", tfo=3)
        with host.enter():
            server = SendfileServer(big)
        relay = Relay("--listen", "127.0.0.1:0", "--allow-dest", "127.0.0.0/8", prefix=host.cmd())
        try:
            url = f"http://127.0.0.1:{server.port}"
            modes = [("direct", None), ("libpep.so", "preload"), ("seccomp", "seccomp")]
            tput = {name: 0.0 for name, _ in modes}
            t_one = {name: float("inf") for name, _ in modes}
            t_many = {name: float("inf") for name, _ in modes}
            many = [curl, "-s", "-o", "/dev/null", "-H", "Connection: close"]
            for u in range(args.connections):
                many += [f"{url}/small{u}"]
            for _ in range(args.rounds):
                for name, mode in modes:
                    _, out = pep_run(host, mode, relay.addr,
                                     [curl, "-s", "-o", "/dev/null", "-w", "%{speed_download}",
                                      f"{url}/big"])
                    tput[name] = max(tput[name], float(out) / 1e6)
                    t_one[name] = min(t_one[name], pep_run(host, mode, relay.addr, many[:7])[0])
                    t_many[name] = min(t_many[name], pep_run(host, mode, relay.addr, many)[0])
        finally:
            relay.stop()
            server.close()
    # Per connection, without process start-up: (T(N) - T(1)) / (N - 1), each T the best round.
    setup = {name: (t_many[name] - t_one[name]) / (args.connections - 1) * 1000 for name in t_one}
    print(f"curl through pep relay on loopback; {args.size} MiB download, "
          f"{args.connections} sequential connections; best of {args.rounds}")
    print(f"{'path':<12}{'MB/s':>10}{'x libpep':>10}{'ms/conn':>10}{'x libpep':>10}")
    for name, _ in modes:
        print(f"{name:<12}{tput[name]:>10.0f}{tput[name] / tput['libpep.so']:>10.2f}"
              f"{setup[name]:>10.2f}{setup[name] / setup['libpep.so']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
