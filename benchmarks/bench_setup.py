#!/usr/bin/env python3
"""Connection set-up latency through `pep relay`, against direct and haproxy.

    sudo python3 benchmarks/bench_setup.py [-n 2000] [--rounds 4] [--baseline-root DIR]

Sequential connections on loopback, each: connect, 1 byte each way, close.
Medians of N per way, the ways interleaved in --rounds chunks, all in one run:

  direct     plain connect() to the echo server
  haproxy    through haproxy (mode tcp, nbthread 1)
  relay-c raw / relay-python raw
             a minimal client through the relay on each engine (--engines):
             Convert header + the byte in the SYN (MSG_FASTOPEN, the kernel's
             TFO cookie cache), reads the 4-byte reply and the echo
  relay-c py / relay-python py
             pepsock.create_connection (PEP_PROXY = the relay), send, recv
  base raw / base py   the same through a relay run from --baseline-root (an
             older checkout), so before/after numbers come from one run

"added" is the way's median minus direct's: what the proxy adds to a connection.
CPU per tunnel is each proxy process's user+system time over its own ways.
As root everything runs in a private network namespace with net.ipv4.tcp_fastopen=3
set inside it (the relay serves 0-RTT as deployed); the host is not touched.
The echo server runs in its own process with TCP_FASTOPEN on its listener.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
    """Syscalls a proxy makes per tunnel (strace -c while n tunnels run)."""
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


def cpu_us(pid: int) -> float:
    """user + system CPU of a process, microseconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e6 / os.sysconf("SC_CLK_TCK")


def start_relay(procs, root: str, *args: str) -> int:
    p = subprocess.Popen([sys.executable, "-m", "pepsock.relay", "--listen", "127.0.0.1:0",
                          "--allow-dest", "127.0.0.0/8", "--log-level", "warning",
                          "--no-tunnel-log", "--max-per-client", "0", *args],
                         stdout=subprocess.PIPE, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root))
    procs.append(p)
    r, _, _ = select.select([p.stdout], [], [], 15)
    line = p.stdout.readline().decode() if r else ""
    m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        raise RuntimeError(f"relay in {root} said {line!r}")
    return int(m.group(1))


def start_haproxy(procs, tmp: str, backend: int) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
  maxconn 4000
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option splice-auto
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
""")
    procs.append(subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("haproxy did not start")


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
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="bench-setup-")
    os.environ.update(PEP_NO_PROXY="", PEP_STATE_DIR=tmp, PEP_FALLBACK="fail")
    try:
        r, w = os.pipe()
        srv = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_echo"],
                               stdout=w)
        procs.append(srv)
        os.close(w)
        with os.fdopen(r) as f:
            dest = int(f.readline())
        extra = args.relay_args.split()
        hport = start_haproxy(procs, tmp, dest)
        haproxy_pid = procs[-1].pid
        ways = {"direct": lambda: one_direct(dest),
                "haproxy": lambda: one_direct(hport)}
        # One relay per engine (and the baseline's): ways "<relay> raw" / "<relay> py".
        relays: dict[str, tuple[int, int]] = {}     # name -> (port, pid)
        for engine in args.engines.split(","):
            port = start_relay(procs, ROOT, "--engine", engine, *extra)
            relays[f"relay-{engine}"] = (port, procs[-1].pid)
        if args.baseline_root:
            relays["base"] = (start_relay(procs, args.baseline_root, *extra), procs[-1].pid)
        for name, (port, _) in relays.items():
            ways[f"{name} raw"] = make_raw(port, dest)
            if not args.no_py:
                ways[f"{name} py"] = make_py(port, dest)

        def select_proxy(way: str) -> None:
            if way.endswith(" py"):
                os.environ["PEP_PROXY"] = f"127.0.0.1:{relays[way.split()[0]][0]}"
        # Warm-up: TFO cookies, the PEP state file, caches.
        for name, fn in ways.items():
            select_proxy(name)
            for _ in range(20):
                fn()
        if args.strace and shutil.which("strace"):
            for name, (_, pid) in relays.items():
                print(f"# {name}:")
                strace_relay(pid, ways[f"{name} raw"], args.strace)
            print("# haproxy:")
            strace_relay(haproxy_pid, ways["haproxy"], args.strace)
        times: dict[str, list[int]] = {k: [] for k in ways}
        chunk = max(1, args.n // args.rounds)
        pids = {name: pid for name, (_, pid) in relays.items()}
        pids["haproxy"] = haproxy_pid
        cpu = {k: 0.0 for k in pids}
        count = {k: 0 for k in pids}
        clock = time.perf_counter_ns
        for _ in range(args.rounds):
            for name, fn in ways.items():
                select_proxy(name)
                out = times[name]
                who = name.split()[0]
                c0 = cpu_us(pids[who]) if who in pids else 0
                for _ in range(chunk):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
                if who in pids:
                    cpu[who] += cpu_us(pids[who]) - c0
                    count[who] += chunk
        med = {k: statistics.median(v) / 1000 for k, v in times.items()}
        print(f"# bench_setup  {time.strftime('%Y-%m-%d %H:%M:%S')}  n={chunk * args.rounds} "
              f"per way in {args.rounds} interleaved rounds  load={os.getloadavg()[0]:.2f}  "
              f"relay args: {args.relay_args or '(defaults)'}")
        print(f"  {'way':16s} {'median us':>10s} {'added us':>9s} {'p90 us':>8s}  added/haproxy's")
        h_added = med["haproxy"] - med["direct"]
        for k, v in times.items():
            added = med[k] - med["direct"]
            p90 = statistics.quantiles(v, n=10)[-1] / 1000
            ratio = f"{added / h_added:.2f}" if k not in ("direct", "haproxy") else ""
            print(f"  {k:16s} {med[k]:10.0f} {added:9.0f} {p90:8.0f}  {ratio}")
        h_cpu = cpu["haproxy"] / max(1, count["haproxy"])
        for who, total in cpu.items():
            per = total / max(1, count[who])
            ratio = f"  ({per / h_cpu:.2f}x haproxy's)" if who != "haproxy" and h_cpu else ""
            print(f"  {who} process CPU per tunnel: {per:.0f} us (user+system, /proc){ratio}")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="connections per way")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--engines", default="c,python",
                    help="relay engines to run side by side (pep relay --engine)")
    ap.add_argument("--no-py", action="store_true",
                    help="only the raw client through each relay (no pepsock client rows)")
    ap.add_argument("--baseline-root", help="another checkout whose relay runs beside this one")
    ap.add_argument("--relay-args", default="", help="extra options for both relays")
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
                "--strace", str(args.strace), "--engines", args.engines]
        if args.no_py:
            argv.append("--no-py")
        if args.baseline_root:
            argv += ["--baseline-root", os.path.abspath(args.baseline_root)]
        return subprocess.run(ns.cmd(*argv)).returncode


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_echo":
        echo_server(sys.stdout)
    else:
        sys.exit(main())
