#!/usr/bin/env python3
"""Benchmark `pep relay` against direct and haproxy, side by side in one run.

    python3 benchmarks/bench_relay.py [--duration 5] [--rounds 3] [--idle 10000]
        [--baseline-root DIR] [--relay-way NAME=ARGS ...] [--only bulk|conns|idle]

Prints ratios, not just absolute numbers: on a shared machine only numbers
taken in the same run, interleaved, are comparable.

1. bulk: one iperf3 flow on loopback: direct; through haproxy (mode tcp,
   option splice-auto); through each relay with the client under
   LD_PRELOAD=preload/libpep.so (PEP_PROXY=relay, PEP_NO_PROXY= so loopback is
   not bypassed).  The relays: this checkout's (--relay-args), one per
   --relay-way NAME=ARGS (e.g. other buffer sizes), and 'base' (the relay of
   --baseline-root), all running at once.  Every proxy run sits between two
   direct runs and is compared with their mean; medians and spread over the
   rounds, plus each proxy's CPU seconds per GB.
   Targets (issue 12): relay >= 0.95x direct and >= 1.5x haproxy.
2. conn/s: wrk -c64 with `Connection: close` to nginx, through haproxy and
   through libpep.so + each relay (as in bulk).  The proxies get the same number of cores
   (--proxy-cpus: haproxy nbthread N, relay --workers N).  Target >= 1.0x.
3. idle: N connections held through each way in turn (direct, haproxy, each
   relay as in bulk; tunnels through the relays): per connection, the
   proxy's user-space RSS growth and the kernel slab objects in use, minus
   what the direct way's two sockets take (so: the proxy's own two sockets).

Needs iperf3, haproxy, nginx, wrk; libpep.so is built with `make -C preload`
if missing.  Nothing is changed on the host (no sysctls).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pepsock.protocol import MessageReader, connect_request  # noqa: E402
from pepsock.tfo import MSG_FASTOPEN, TCP_FASTOPEN_NO_COOKIE  # noqa: E402

LIBPEP = os.path.join(ROOT, "preload", "libpep.so")
#: The network namespace everything runs in (None: the host).  With root the
#: benchmark makes one with net.ipv4.tcp_fastopen=3 set inside it, so the
#: relay serves 0-RTT as deployed; the host's sysctls are never touched.
NS = None
#: Congestion control pinned per socket (TCP_CONGESTION) on iperf3 and the relay;
#: a namespace's default can only be what the host allows, and the host is not ours.
CC: str | None = None


def cmd(argv: list[str]) -> list[str]:
    return NS.cmd(*argv) if NS is not None else list(argv)


def enter():
    import contextlib
    return NS.enter() if NS is not None else contextlib.nullcontext()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with enter():
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Procs:
    """Background processes, all stopped at exit."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(cmd(argv), **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


#: --baseline-root: another checkout whose relay runs beside this one (conn/s).
BASELINE_ROOT: str | None = None


_relay_help: dict[str, str] = {}


def relay_knows(option: str, root: str = ROOT) -> bool:
    """Whether the relay of checkout `root` has `option` (an older baseline may not)."""
    if root not in _relay_help:
        _relay_help[root] = subprocess.run(
            [sys.executable, "-m", "pepsock.relay", "--help"], capture_output=True, text=True,
            cwd=root, env=dict(os.environ, PYTHONPATH=root)).stdout
    return option in _relay_help[root]


def start_relay(procs: Procs, *args: str, root: str = ROOT,
                no_cookie: bool = True) -> tuple[subprocess.Popen, int]:
    """A relay of checkout `root` on 127.0.0.1:0 (loopback destinations allowed,
    warnings only): (process, port); with --stats, p.stats_port too."""
    cc = ["--client-cc", CC, "--server-cc", CC] if CC else []
    # --no-cookie: the clients here send their headers in the SYN without a TFO
    # cookie (a private namespace; the relay's default would make them 1-RTT).
    # Relays from before --no-cookie existed took cookie-less SYN data anyway.
    no_cookie = ["--no-cookie"] if no_cookie and relay_knows("--no-cookie", root) else []
    p = procs.start([sys.executable, "-m", "pepsock.relay", "--listen", "127.0.0.1:0",
                     "--allow-dest", "127.0.0.0/8", *no_cookie, "--log-level", "warning",
                     *cc, *args],
                    stdout=subprocess.PIPE, cwd=root, env=dict(os.environ, PYTHONPATH=root))
    r, _, _ = select.select([p.stdout], [], [], 15)
    if not r:
        raise RuntimeError("relay did not start")
    line = p.stdout.readline().decode()
    m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        raise RuntimeError(f"relay said {line!r}")
    if "--stats" in args:
        sm = re.match(r"stats on 127\.0\.0\.1:(\d+)", p.stdout.readline().decode())
        p.stats_port = int(sm.group(1))
    return p, int(m.group(1))


def relay_bytes_up(p: subprocess.Popen) -> float:
    """The relay's own count of client->server bytes (proof the flow went through it)."""
    import urllib.request
    with enter():
        with urllib.request.urlopen(f"http://127.0.0.1:{p.stats_port}/", timeout=5) as r:
            text = r.read().decode()
    m = re.search(r'pep_relay_bytes_total\{direction="up"\} (\S+)', text)
    return float(m.group(1))


def start_haproxy(procs: Procs, tmp: str, backend_port: int, threads: int,
                  maxconn: int = 4000) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = os.path.join(tmp, f"haproxy-{port}.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
  maxconn {maxconn}
  nbthread {threads}
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
  server s1 127.0.0.1:{backend_port}
""")
    p = procs.start(["haproxy", "-f", cfg, "-db"])
    wait_port(port)
    return p, port


def pep_env(relay_port: int) -> dict:
    env = dict(os.environ)
    env.update(LD_PRELOAD=LIBPEP, PEP_PROXY=f"127.0.0.1:{relay_port}", PEP_NO_PROXY="")
    return env


# ------------------------------------------------------------------------------------
# 1. bulk


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(port: int, seconds: float, env=None) -> float:
    """One iperf3 run against a one-shot server; Gbit/s received."""
    cc = ["-C", CC] if CC else []  # iperf3 pins it on both ends of its data connection
    out = subprocess.run(cmd(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                              "-J", *cc]), capture_output=True, text=True, env=env,
                         timeout=seconds + 30)
    try:
        data = json.loads(out.stdout)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        raise RuntimeError(f"iperf3 failed: {out.stdout[-500:]} {out.stderr[-500:]}")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (a relay's workers)."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for k in kids:
        try:
            total += cpu_seconds(k)
        except OSError:
            pass        # a worker that just ended
    return total


def relay_ways(relay_args: list[str], extra: list[str],
               baseline_root: str | None = None) -> list[tuple[str, list[str], str]]:
    """(name, relay options, checkout) for every relay a test runs side by side:
    this checkout's relay with --relay-args, each --relay-way NAME=ARGS (this
    checkout, its own options), and 'base' (--baseline-root) with --relay-args.
    Shared with bench_setup.py: one more way is one more list entry."""
    ways = [("relay", list(relay_args), ROOT)]
    for spec in extra:
        name, sep, opts = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--relay-way wants NAME=ARGS, got {spec!r}")
        ways.append((name, opts.split(), ROOT))
    baseline_root = baseline_root or BASELINE_ROOT
    if baseline_root:
        ways.append(("base", list(relay_args), baseline_root))
    return ways


def bench_bulk(procs: Procs, tmp: str, seconds: float, rounds: int,
               ways: list[tuple[str, list[str], str]]) -> dict:
    """Gbit/s per round for direct, haproxy and each relay way (interleaved,
    the order rotated each round so no way always follows the same one), the
    proxies' CPU seconds per GB moved, and for each relay the fraction of
    iperf3's bytes it counted itself (proof the flow went through it)."""
    iperf_port = free_port()
    server = procs.start(["iperf3", "-s", "-p", str(iperf_port)])
    wait_port(iperf_port)
    time.sleep(0.3)
    haproxy, hport = start_haproxy(procs, tmp, iperf_port, threads=1)
    runs = [("direct", iperf_port, None, None), ("haproxy", hport, None, haproxy)]
    relays = []
    for name, args, root in ways:
        relay, rport = start_relay(procs, "--stats", "127.0.0.1:0", *args, root=root)
        relays.append(relay)
        runs.append((name, iperf_port, pep_env(rport), relay))
    results = {name: [] for name, _, _, _ in runs}
    ratio = {name: [] for name, _, _, _ in runs[1:]}
    cpu = {name: [] for name, _, _, p in runs if p is not None}
    relayed = {name: [] for name, _, _, _ in runs[2:]}

    def one(name, port, env, proc) -> float:
        c0 = cpu_seconds(proc.pid) if proc is not None else 0
        b0 = relay_bytes_up(proc) if name in relayed else 0
        gbps = iperf(port, seconds, env=env)
        results[name].append(gbps)
        gb = gbps * seconds / 8
        if proc is not None:
            cpu[name].append((cpu_seconds(proc.pid) - c0) / gb)
        if name in relayed:
            relayed[name].append((relay_bytes_up(proc) - b0) / (gb * 1e9))
        return gbps

    try:
        proxies = runs[1:]
        for r in range(rounds):
            # Every proxy run is bracketed by direct runs and compared with
            # their mean: the machine's load changes on the scale of seconds,
            # so only neighbours are comparable.  The order rotates per round.
            k = r % len(proxies)
            before = one(*runs[0])
            for way in proxies[k:] + proxies[:k]:
                gbps = one(*way)
                after = one(*runs[0])
                ratio[way[0]].append(gbps / ((before + after) / 2))
                before = after
    finally:
        for p in relays:
            procs.stop(p)
        procs.stop(haproxy)
        procs.stop(server)
    return {"gbps": results, "vs_direct": ratio, "cpu_per_gb": cpu, "relayed_fraction": relayed}


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """median [min-max] of a few noisy repeats."""
    import statistics
    return (fmt.format(statistics.median(xs)) + " [" + fmt.format(min(xs)) + "-"
            + fmt.format(max(xs)) + "]")


def print_bulk(r: dict, ways, rounds: int, seconds: float) -> None:
    import statistics
    g, vs, cpu, relayed = r["gbps"], r["vs_direct"], r["cpu_per_gb"], r["relayed_fraction"]
    print(f"\n## bulk: one iperf3 flow on loopback, Gbit/s, median [min-max] of {rounds} "
          f"rounds of {seconds:g}s; each proxy run sits between two direct runs and /direct "
          f"is its ratio to their mean (median [min-max] over the rounds)")
    hap = statistics.median(vs["haproxy"])
    for name, args, root in [("direct", [], ""), ("haproxy", [], "")] + list(ways):
        what = ""
        if name not in ("direct", "haproxy"):
            what = " ".join(args) or "(defaults)"
            if root != ROOT:
                what += f"  [{root}]"
        line = f"  {name:10s} {_spread(g[name]):>20s}"
        if name != "direct":
            line += f"   /direct {_spread(vs[name])}"
        if name not in ("direct", "haproxy"):
            line += f"  /haproxy {statistics.median(vs[name]) / hap:.2f}"
        if name in cpu:
            line += f"   CPU {_spread(cpu[name], '{:.3f}')} s/GB"
        if name in relayed:
            line += f"   relayed {statistics.median(relayed[name]):.2f}"
        print(line + (f"   {what}" if what else ""))
    print("  targets (issue 12): relay/direct >= 0.95, relay/haproxy >= 1.5 (the ratio of the "
          "two /direct medians); 'relayed': bytes the relay counted / bytes iperf3 reported "
          "(1.00: the flow went through it); CPU: the proxy process's user+system seconds per "
          "GB moved")


# ------------------------------------------------------------------------------------
# 2. connections per second


def start_nginx(procs: Procs, tmp: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = os.path.join(tmp, f"nginx-{port}.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off;
worker_processes 1;
pid {tmp}/nginx-{port}.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp};
  proxy_temp_path {tmp};
  fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp};
  scgi_temp_path {tmp};
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
    p = procs.start(["nginx", "-c", conf, "-p", tmp])
    wait_port(port)
    return p, port


def children_cpu_seconds() -> float:
    """User + system seconds of this process's waited-for children (wrk)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wrk(port: int, seconds: float, env=None) -> tuple[float, str]:
    out = subprocess.run(cmd(["wrk", "-t2", "-c64", f"-d{int(seconds)}s", "-H",
                              "Connection: close", f"http://127.0.0.1:{port}/"]),
                         capture_output=True, text=True,
                         env=env, timeout=seconds + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    errors = re.search(r"Socket errors:.*", out.stdout)
    non2xx = re.search(r"Non-2xx.*", out.stdout)
    note = " ".join(x.group(0) for x in (errors, non2xx) if x) or "no socket errors"
    return float(m.group(1)), note


def bench_conns(procs: Procs, tmp: str, seconds: float, rounds: int, cpus: int,
                relays) -> dict:
    """wrk rates per round: direct, haproxy, and each relay way (relay_ways)."""
    nginx, nport = start_nginx(procs, tmp)
    haproxy, hport = start_haproxy(procs, tmp, nport, threads=cpus)
    ways = [("direct", nport, None), ("haproxy", hport, None)]
    started = []
    #: the process (tree) each way's proxy CPU is read from
    pids = {"haproxy": haproxy.pid}
    # The relays run as deployed (TFO cookies required): libpep.so's first
    # connections learn that (PEP_TFO_MODE=auto, in a state directory of
    # this run's), the rest are 0-RTT.
    for name, args, root in relays:
        p, port = start_relay(procs, "--workers", str(cpus), "--max-per-client", "0",
                              "--no-tunnel-log", *args, root=root, no_cookie=False)
        started.append(p)
        pids[name] = p.pid
        env = pep_env(port)
        env["PEP_STATE_DIR"] = os.path.join(tmp, f"pepstate-{name}")
        os.makedirs(env["PEP_STATE_DIR"], mode=0o700, exist_ok=True)
        wrk(nport, 1, env)      # warm-up: the TFO cookie and the PEP's mode learnt
        ways.append((name, nport, env))
    results = {name: [] for name, _, _ in ways}
    results["notes"] = {}
    results["cpu_us"] = {name: [] for name in pids}
    # Where a connection's CPU goes besides the proxy: the client (wrk, with
    # libpep.so in the relays' rows) and the server, each way.
    results["client_us"] = {name: [] for name, _, _ in ways}
    results["server_us"] = {name: [] for name, _, _ in ways}
    try:
        for _ in range(rounds):
            for name, port, env in ways:
                c0 = tree_cpu_seconds(pids[name]) if name in pids else 0.0
                w0, n0 = children_cpu_seconds(), tree_cpu_seconds(nginx.pid)
                rate, note = wrk(port, seconds, env)
                results[name].append(rate)
                results["notes"].setdefault(name, []).append(note)
                if rate > 0:
                    conns = rate * seconds
                    results["client_us"][name].append((children_cpu_seconds() - w0) * 1e6 / conns)
                    results["server_us"][name].append(
                        (tree_cpu_seconds(nginx.pid) - n0) * 1e6 / conns)
                if name in pids and rate > 0:
                    used = tree_cpu_seconds(pids[name]) - c0
                    results["cpu_us"][name].append(used * 1e6 / (rate * seconds))
    finally:
        for p in started:
            procs.stop(p)
        procs.stop(haproxy)
        procs.stop(nginx)
    return results


# ------------------------------------------------------------------------------------
# 3. idle tunnels: helpers run as subprocesses of this script (fd limits are
# per process, so the load is split over several).


#: SO_LINGER {1, 0}: the idle test's helpers end their connections with a
#: reset, so no TIME_WAIT sockets are left to expire (and shrink the machine's
#: slab) while the next way is measured.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _hold_server(port: int) -> None:
    """Accept and hold connections on 127.0.0.1:port (SO_REUSEPORT group)."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    held = []
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        held.append(c)


def _tunnel(s: socket.socket, relay_port: int, header: bytes):
    """Send the Convert header in the SYN of `s`; the relay's reply Message."""
    s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    s.sendto(header, MSG_FASTOPEN, ("127.0.0.1", relay_port))
    reader = MessageReader()
    while not reader.done:
        data = s.recv(64)
        if not data:
            reader.eof()
        reader.feed(data)
    return reader.message


def _clients(port: int, dest_port: int, n: int) -> None:
    """Open n connections to 127.0.0.1:port and hold them until stdin closes:
    tunnels (Convert header in the SYN, reply read) when dest_port is given,
    plain connections (direct, haproxy) when it is 0."""
    socks = []
    header = connect_request("127.0.0.1", dest_port) if dest_port else None
    failed = 0
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        try:
            if header is None:
                s.connect(("127.0.0.1", port))
            elif _tunnel(s, port, header).error is not None:
                failed += 1
                s.close()
                continue
        except OSError:
            failed += 1
            s.close()
            continue
        socks.append(s)
    print(f"open {len(socks)} failed {failed}", flush=True)
    sys.stdin.read()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _meminfo_kb(key: str = "MemAvailable") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _slab_in_use() -> int:
    """Bytes of kernel slab objects in use, machine-wide (/proc/slabinfo, root
    only; else the Slab line of /proc/meminfo in bytes).  In-use objects, not
    slab pages: freed sockets of a way measured before leave pages behind that
    the next way reuses, which page counts would hide."""
    try:
        total = 0
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1].isdigit():
                    total += int(parts[1]) * int(parts[3])
        return total
    except OSError:
        return _meminfo_kb("Slab") * 1024


def _tree_rss_kb(pid: int) -> int:
    return sum(_rss_kb(p) for p in [pid, *_children(pid)])


def _hold_connections(procs: Procs, port: int, dest: int, n: int, parts: int):
    """n connections to `port` (tunnels to `dest` if dest, else plain), opened by
    `parts` client processes: (clients, opened, failed, seconds)."""
    t0 = time.monotonic()
    clients = [procs.start([sys.executable, __file__, "_clients", str(port), str(dest),
                            str(n // parts + (1 if i < n % parts else 0))],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
               for i in range(parts)]
    opened = failed = 0
    for c in clients:
        m = re.match(r"open (\d+) failed (\d+)", c.stdout.readline().decode())
        if m:
            opened += int(m.group(1))
            failed += int(m.group(2))
    return clients, opened, failed, time.monotonic() - t0


def bench_idle(procs: Procs, tmp: str, n: int, ways) -> dict:
    """N idle connections held through each way in turn (one at a time, so the
    machine-wide Slab growth is that way's): direct (client and server sockets
    only: subtracted from the others to leave the proxy's own two sockets),
    haproxy (plain connections), and each relay way (tunnels).  Per way: the
    proxy's user-space RSS growth and the kernel Slab growth, per connection."""
    # Per-process fd limits (20000 here, and no CAP_SYS_RESOURCE) decide the
    # split: ~2 fds per tunnel in the relay, 1 per socket in the helpers.
    per_proc = 4000
    parts = max(2, -(-n // per_proc))
    workers = max(2, -(-n * 2 // 15000))
    dest = free_port()
    out = {"workers": workers, "ways": {}}

    def measure(name: str, proxy, port: int, tunnel_dest: int, n: int = n) -> None:
        # Fresh destination processes per way; they and the clients end every
        # connection with a reset (destinations first, so the proxy's onward
        # sides are reset too), leaving no TIME_WAIT behind.
        holders = [procs.start([sys.executable, __file__, "_hold", str(dest)],
                               stdout=subprocess.PIPE) for _ in range(parts)]
        for h in holders:
            h.stdout.readline()
        time.sleep(0.5)
        rss0 = _tree_rss_kb(proxy.pid) if proxy else 0
        slab0 = _slab_in_use()
        clients, opened, failed, took = _hold_connections(procs, port, tunnel_dest, n, parts)
        time.sleep(1.0)
        rss1 = _tree_rss_kb(proxy.pid) if proxy else 0
        slab1 = _slab_in_use()
        row = {"open": opened, "failed": failed, "seconds": took,
               "rss_b": (rss1 - rss0) * 1024 / max(1, opened),
               "slab_b": (slab1 - slab0) / max(1, opened)}
        if tunnel_dest:
            row["alive"] = proxy.poll() is None and all(_rss_kb(p) for p in _children(proxy.pid))
            row["probe"] = _probe(port, tunnel_dest)     # still usable with all held?
        for h in holders:
            procs.stop(h)
        for c in clients:
            c.stdin.close()
            procs.stop(c)
        out["ways"][name] = row

    measure("direct", None, dest, 0)
    # haproxy (one process) wants 2 fds per maxconn, 2 per pipe (splice-auto:
    # maxconn/4 pipes) and ~220 of its own within the hard fd limit, or it
    # refuses to start.
    hn = min(n, int((resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 600) / 2.5) - 100)
    haproxy, hport = start_haproxy(procs, tmp, dest, threads=1, maxconn=hn + 100)
    measure("haproxy", haproxy, hport, 0, hn)
    procs.stop(haproxy)
    for name, args, root in ways:
        relay, rport = start_relay(procs, "--workers", str(workers), "--max-per-client",
                                   "0", "--no-tunnel-log", "--max-tunnels", str(n), *args,
                                   root=root)
        measure(name, relay, rport, dest)
        procs.stop(relay)
    return out


def print_idle(r: dict, n: int) -> None:
    ways = r["ways"]
    direct = ways.get("direct", {}).get("slab_b", 0.0)
    print(f"\n## idle connections: {n} held through each way in turn (relays: "
          f"{r['workers']} workers), bytes per connection")
    print(f"  {'way':10s} {'open':>6s} {'failed':>6s} {'user RSS':>9s} {'Slab':>7s} "
          f"{'Slab - direct':>13s}  notes")
    for name, w in ways.items():
        extra = "" if name == "direct" else f"{w['slab_b'] - direct:13.0f}"
        notes = f"opened in {w['seconds']:.1f}s"
        if "alive" in w:
            notes += f", relay alive: {w['alive']}, a new tunnel while held: {w['probe']}"
        rss = "" if name == "direct" else f"{w['rss_b']:9.0f}"
        print(f"  {name:10s} {w['open']:6d} {w['failed']:6d} {rss:>9s} {w['slab_b']:7.0f} "
              f"{extra:>13s}  {notes}")
    print("  user RSS: the proxy's processes' resident memory growth; Slab: growth of the "
          "machine's kernel slab objects in use (every socket of the path, both ends); "
          "Slab - direct: what the proxy's own two sockets and its epoll entries add "
          "(machine-wide: other load shows up as noise)")


def _probe(rport: int, dest: int) -> str:
    """One more tunnel while the others are held: 'ok' or what went wrong."""
    try:
        with enter():
            s = socket.socket()
        s.settimeout(5)
        err = _tunnel(s, rport, connect_request("127.0.0.1", dest)).error
        s.close()
        return "ok" if err is None else f"Error {err.code}"
    except (OSError, ValueError) as e:
        return f"failed: {e}"


# ------------------------------------------------------------------------------------


def have_libpep() -> bool:
    if not os.path.exists(LIBPEP) and shutil.which("make"):
        subprocess.run(["make", "-C", os.path.join(ROOT, "preload")], capture_output=True)
    return os.path.exists(LIBPEP)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=int, default=10000, help="idle tunnels to hold (0: skip)")
    ap.add_argument("--proxy-cpus", type=int, default=2,
                    help="haproxy threads = relay workers for conn/s")
    ap.add_argument("--relay-args", default="",
                    help="extra options for the relay (and the baseline's) in every test, "
                         "e.g. '--pipe-size 256k'")
    ap.add_argument("--relay-way", action="append", metavar="NAME=ARGS",
                    help="one more relay of this checkout, run side by side with its "
                         "own options, e.g. 'auto=--client-rcvbuf 0 --client-sndbuf 0' "
                         "(repeatable)")
    ap.add_argument("--no-netns", action="store_true",
                    help="run on the host's loopback even as root (TFO server bit as the "
                         "host has it)")
    ap.add_argument("--cc", default="cubic",
                    help="congestion control for everything inside the benchmark's netns "
                         "(default cubic: bbr without an fq qdisc paces in TCP itself, which "
                         "costs a relay path of two connections far more than a direct flow; "
                         "'' keeps the kernel's default)")
    ap.add_argument("--only", choices=["bulk", "conns", "idle"], action="append")
    ap.add_argument("--baseline-root",
                    help="conn/s: also through the relay of this other checkout (before/after "
                         "in one run)")
    args = ap.parse_args(argv)
    only = set(args.only or ["bulk", "conns", "idle"])
    global BASELINE_ROOT
    BASELINE_ROOT = args.baseline_root and os.path.abspath(args.baseline_root)
    for tool in ("iperf3", "haproxy", "nginx", "wrk"):
        if not shutil.which(tool):
            print(f"missing {tool}: apt-get install {tool}")
            return 2
    libpep = have_libpep()
    global NS, CC
    topo = None
    where = "host loopback (net.ipv4.tcp_fastopen as the host has it)"
    if os.geteuid() == 0 and not args.no_netns and shutil.which("ip"):
        from pepsock.testbed.netns import Topology
        topo = Topology(prefix="rb")
        try:
            NS = topo.host("bench", tfo=3)
        except BaseException:
            topo.cleanup()
            raise
        if args.cc:
            # A netns may only pick from the host's tcp_allowed_congestion_control.
            if NS.run("sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={args.cc}",
                      check=False).returncode != 0:
                CC = args.cc
                print(f"# note: {args.cc} is not in the host's tcp_allowed_congestion_control, so "
                      f"it cannot be the netns default: iperf3 (-C) and the relay (--client-cc/"
                      f"--server-cc) pin it per socket; haproxy's and wrk's sockets keep the "
                      f"default")
        cc = NS.run("sysctl", "-n", "net.ipv4.tcp_congestion_control").stdout.strip()
        pinned = f"; {CC} pinned on iperf3's and the relay's sockets" if CC else " for every program"
        where = (f"loopback of netns {NS.name} (inside it: net.ipv4.tcp_fastopen=3, "
                 f"tcp_congestion_control={cc}{pinned})")
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="bench-relay-")
    print(f"# bench_relay  {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus={os.cpu_count()}  "
          f"load={os.getloadavg()[0]:.2f}  kernel={os.uname().release}")
    print(f"# on {where}; libpep.so: {'yes' if libpep else 'MISSING'}")
    try:
        if "bulk" in only:
            if not libpep:
                print("bulk: SKIPPED, preload/libpep.so missing (make -C preload failed)")
            else:
                ways = relay_ways(args.relay_args.split(), args.relay_way or [])
                r = bench_bulk(procs, tmp, args.duration, args.rounds, ways)
                print_bulk(r, ways, args.rounds, args.duration)
        if "conns" in only:
            if not libpep:
                print("conns: SKIPPED, preload/libpep.so missing")
            else:
                ways = relay_ways(args.relay_args.split(), args.relay_way or [])
                r = bench_conns(procs, tmp, args.duration, args.rounds, args.proxy_cpus, ways)
                names = ["direct", "haproxy"] + [name for name, _, _ in ways]
                best = {k: max(r[k]) for k in names}
                print(f"\n## new connections/s: wrk -t2 -c64 'Connection: close' to nginx "
                      f"(proxies on {args.proxy_cpus} cpus; best of {args.rounds}"
                      + (f"; base: the relay of {BASELINE_ROOT}" if BASELINE_ROOT else "") + ")")
                for k in names:
                    print(f"  {k:8s} {best[k]:9.0f}/s   rounds: "
                          + " ".join(f"{x:.0f}" for x in r[k])
                          + "   " + "; ".join(sorted(set(r["notes"][k]))))
                for k in names[2:]:
                    print(f"  {k}/haproxy = {best[k] / best['haproxy']:.2f}"
                          + ("  (target >= 1.0)" if k == "relay" else ""))
                for what, key in (("proxy", "cpu_us"), ("client (wrk; + libpep.so for relays)",
                                                         "client_us"), ("server (nginx)", "server_us")):
                    print(f"  {what} CPU per connection (us, per round): "
                          + "  ".join(f"{k} " + " ".join(f"{x:.0f}" for x in v)
                                      for k, v in r[key].items() if v))
        if "idle" in only and args.idle:
            ways = relay_ways(args.relay_args.split(), args.relay_way or [])
            print_idle(bench_idle(procs, tmp, args.idle, ways), args.idle)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if topo is not None:
            topo.cleanup()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_hold":
        _hold_server(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_clients":
        _clients(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
