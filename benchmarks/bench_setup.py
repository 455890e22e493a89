#!/usr/bin/env python3
"""Connection set-up latency through `pep relay`, against direct and haproxy.

    sudo python3 benchmarks/bench_setup.py [-n 2000] [--rounds 4] [--baseline-root DIR]
        [--relay-args ARGS] [--relay-way NAME=ARGS ...] [--strace N]

Sequential connections on loopback, each: connect, 1 byte each way, close.
Medians of N per way, the ways interleaved in --rounds chunks, all in one run:

  direct     plain connect() to the echo server
  haproxy    through haproxy (mode tcp, nbthread 1)
  relay raw  a minimal client: Convert header + the byte in the SYN (MSG_FASTOPEN,
             the kernel's TFO cookie cache), reads the 4-byte reply and the echo
  relay py   pepsock.create_connection (PEP_PROXY = the relay), send, recv
  base raw / base py   the same through a relay run from --baseline-root (an
             older checkout), so before/after numbers come from one run
  NAME raw / NAME py   the same through a relay of this checkout started with
             --relay-way NAME=ARGS (e.g. another engine), one pair per way

"added" is the way's median minus direct's: what the proxy adds to a connection.
Each proxy's process CPU per connection (haproxy's and each relay's) follows.
The proxies are started with bench_relay.py's helpers (the same haproxy
configuration, the same relay command line).
As root everything runs in a private network namespace with net.ipv4.tcp_fastopen=3
set inside it (the relay serves 0-RTT as deployed); the host is not touched.
The echo server runs in its own process with TCP_FASTOPEN on its listener.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# (bench_relay also puts this checkout first on sys.path, for pepsock.)
from bench_relay import Procs, cpu_seconds, relay_ways, start_haproxy, start_relay

MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN = 23


def echo_server(port_out) -> None:
    """Sequential: accept, echo one byte, wait for the client's close."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 256)
    ls.listen(1024)
    print(ls.getsockname()[1], file=port_out, flush=True)
    while True:
        c, _ = ls.accept()
        try:
            c.settimeout(5)
            if c.recv(1):
                c.send(b"y")
                while c.recv(64):
                    pass
        except OSError:
            pass
        c.close()


def strace_relay(pid: int, fn, n: int) -> None:
    """Syscalls the relay makes per tunnel (strace -c while n tunnels run)."""
    out = tempfile.mktemp(prefix="bench-setup-strace-")
    st = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                          stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    for _ in range(n):
        fn()
    time.sleep(0.2)
    st.send_signal(signal.SIGINT)
    st.wait(10)
    with open(out) as f:
        text = f.read()
    os.unlink(out)
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] != "total" and parts[3].isdigit():
            rows.append((int(parts[3]), parts[-1]))
    total = sum(c for c, _ in rows)
    print(f"  syscalls per tunnel ({n} raw tunnels, strace -c): {total / n:.1f}: "
          + ", ".join(f"{name} {c / n:.1f}" for c, name in sorted(rows, reverse=True)
                      if c / n >= 0.05))


def one_direct(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.send(b"x")
    if s.recv(1) != b"y":
        raise RuntimeError("no echo")
    s.close()


def make_raw(relay: int, dest: int):
    from pepsock.protocol import connect_request
    first = connect_request("127.0.0.1", dest) + b"x"
    addr = ("127.0.0.1", relay)

    def one() -> None:
        s = socket.socket()
        s.sendto(first, MSG_FASTOPEN, addr)
        got = b""
        while len(got) < 5:         # the 4-byte success reply, then the echo
            data = s.recv(64)
            if not data:
                raise RuntimeError(f"relay closed after {got!r}")
            got += data
        if got[:2] != b"\x01\x01" or got[4:] != b"y":   # version 1, a 4-byte message
            raise RuntimeError(f"unexpected {got!r}")
        s.close()
    return one


def make_py(relay: int, dest: int):
    import pepsock
    os.environ["PEP_PROXY"] = f"127.0.0.1:{relay}"

    def one() -> None:
        s = pepsock.create_connection(("127.0.0.1", dest))
        s.send(b"x")
        if s.recv(1) != b"y":
            raise RuntimeError("no echo")
        s.close()
    return one


def inside(args) -> int:
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="bench-setup-")
    os.environ.update(PEP_NO_PROXY="", PEP_STATE_DIR=tmp, PEP_FALLBACK="fail")
    try:
        r, w = os.pipe()
        procs.start([sys.executable, os.path.abspath(__file__), "_echo"], stdout=w)
        os.close(w)
        with os.fdopen(r) as f:
            dest = int(f.readline())
        haproxy, hport = start_haproxy(procs, tmp, dest, threads=1)
        ways = {"direct": lambda: one_direct(dest), "haproxy": lambda: one_direct(hport)}
        #: process whose CPU each way's connections are charged to
        pids = {"haproxy": haproxy.pid}
        #: relay port a "NAME py" way's PEP_PROXY names
        py_port: dict[str, int] = {}
        # One relay per way (--relay-args for this checkout's and the baseline's,
        # each --relay-way NAME=ARGS its own): two client ways through each.
        # The default TFO mode (cookie): the clients use the kernel's cookie cache.
        for name, extra, root in relay_ways(args.relay_args.split(), args.relay_way or [],
                                            args.baseline_root):
            p, port = start_relay(procs, "--no-tunnel-log", "--max-per-client", "0", *extra,
                                  root=root, no_cookie=False)
            pids[name] = p.pid
            ways[f"{name} raw"] = make_raw(port, dest)
            ways[f"{name} py"] = make_py(port, dest)
            py_port[f"{name} py"] = port

        def select_way(name: str) -> None:
            if name in py_port:
                os.environ["PEP_PROXY"] = f"127.0.0.1:{py_port[name]}"
        # Warm-up: TFO cookies, the PEP state file, caches.
        for name, fn in ways.items():
            select_way(name)
            for _ in range(20):
                fn()
        if args.strace and shutil.which("strace"):
            for who, pid in pids.items():
                if f"{who} raw" in ways:
                    print(f"# {who}:")
                    strace_relay(pid, ways[f"{who} raw"], args.strace)
        times: dict[str, list[int]] = {k: [] for k in ways}
        chunk = max(1, args.n // args.rounds)
        cpu = {k: 0.0 for k in pids}
        conns = {k: 0 for k in pids}
        clock = time.perf_counter_ns
        for _ in range(args.rounds):
            for name, fn in ways.items():
                select_way(name)
                out = times[name]
                who = name.split()[0]
                c0 = cpu_seconds(pids[who]) if who in pids else 0
                for _ in range(chunk):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
                if who in pids:
                    cpu[who] += cpu_seconds(pids[who]) - c0
                    conns[who] += chunk
        med = {k: statistics.median(v) / 1000 for k, v in times.items()}
        print(f"# bench_setup  {time.strftime('%Y-%m-%d %H:%M:%S')}  n={chunk * args.rounds} "
              f"per way in {args.rounds} interleaved rounds  load={os.getloadavg()[0]:.2f}  "
              f"relay args: {args.relay_args or '(defaults)'}")
        print(f"  {'way':10s} {'median us':>10s} {'added us':>9s} {'p90 us':>8s}  added/haproxy's")
        h_added = med["haproxy"] - med["direct"]
        for k, v in times.items():
            added = med[k] - med["direct"]
            p90 = statistics.quantiles(v, n=10)[-1] / 1000
            ratio = f"{added / h_added:.2f}" if k not in ("direct", "haproxy") else ""
            print(f"  {k:10s} {med[k]:10.0f} {added:9.0f} {p90:8.0f}  {ratio}")
        for who, total in cpu.items():
            over = "its raw and py tunnels" if who != "haproxy" else "its connections"
            print(f"  {who} process CPU per connection: {total * 1e6 / conns[who]:.0f} us "
                  f"(user+system, /proc, over {over})")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="connections per way")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--baseline-root", help="another checkout whose relay runs beside this one")
    ap.add_argument("--relay-args", default="", help="extra options for both relays")
    ap.add_argument("--relay-way", action="append", metavar="NAME=ARGS",
                    help="one more relay of this checkout with its own options, measured "
                         "as 'NAME raw' and 'NAME py' (repeatable)")
    ap.add_argument("--strace", type=int, default=0, metavar="N",
                    help="first count the relay's syscalls over N raw tunnels (strace -c)")
    ap.add_argument("--no-netns", action="store_true")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not shutil.which("haproxy"):
        print("missing haproxy")
        return 2
    if args.inside or args.no_netns or os.geteuid() != 0:
        return inside(args)
    from pepsock.testbed.netns import Topology
    with Topology(prefix="rs") as topo:
        ns = topo.host("bench", tfo=3)
        ns.run("ip", "link", "set", "lo", "up", check=False)
        argv = [sys.executable, os.path.abspath(__file__), "--inside", "-n", str(args.n),
                "--rounds", str(args.rounds), "--relay-args", args.relay_args,
                "--strace", str(args.strace)]
        if args.baseline_root:
            argv += ["--baseline-root", os.path.abspath(args.baseline_root)]
        for way in args.relay_way or []:
            argv += ["--relay-way", way]
        return subprocess.run(ns.cmd(*argv)).returncode


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_echo":
        echo_server(sys.stdout)
    else:
        sys.exit(main())
