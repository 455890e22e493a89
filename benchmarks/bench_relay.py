#!/usr/bin/env python3
"""Benchmark `pep relay` against direct and haproxy, side by side in one run.

    python3 benchmarks/bench_relay.py [--duration 5] [--rounds 2] [--idle 10000]

Prints ratios, not just absolute numbers: on a shared machine only numbers
taken in the same run, interleaved, are comparable.

1. bulk: one iperf3 flow on loopback, three ways, interleaved per round:
   direct; through haproxy (mode tcp, option splice-auto); through the relay
   with the client under LD_PRELOAD=preload/libpep.so (PEP_PROXY=relay,
   PEP_NO_PROXY= so loopback is not bypassed).  Best of the rounds.
   Targets: relay >= 0.75x direct and >= 1.0x haproxy.
2. conn/s: wrk -c64 with `Connection: close` to nginx, through haproxy and
   through libpep.so + relay.  Both proxies get the same number of cores
   (--proxy-cpus: haproxy nbthread N, relay --workers N).  Target >= 0.5x.
3. idle: N tunnels opened through the relay (TFO client with the Convert
   header, reply read) to a server that holds them; the relay's RSS per
   tunnel, and the whole machine's memory per tunnel (all three sockets
   ends and both test processes included: an upper bound).

Needs iperf3, haproxy, nginx, wrk; libpep.so is built with `make -C preload`
if missing.  Nothing is changed on the host (no sysctls).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import socket
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
#: Options every relay of this checkout gets: --engine, and --no-cookie if asked.
RELAY_MODE: list[str] = []


def start_relay(procs: Procs, *args: str, root: str = ROOT) -> tuple[subprocess.Popen, int]:
    cc = ["--client-cc", CC, "--server-cc", CC] if CC else []
    # The relay's default (TFO cookies): libpep.so's first connection learns
    # the cookie (PEP_TFO_MODE=auto), the rest are 0-RTT.  --no-cookie (this
    # script's option) runs the relays cookie-less, as before issue 12.
    mode = RELAY_MODE if root == ROOT else [a for a in RELAY_MODE if a == "--no-cookie"]
    p = procs.start([sys.executable, "-m", "pepsock.relay", "--listen", "127.0.0.1:0",
                     "--allow-dest", "127.0.0.0/8", *mode, "--log-level", "warning",
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


#: The clients' shared PEP state (learned TFO modes), this run's own.
STATE_DIR = tempfile.mkdtemp(prefix="bench-relay-state-")


def pep_env(relay_port: int) -> dict:
    env = dict(os.environ)
    env.update(LD_PRELOAD=LIBPEP, PEP_PROXY=f"127.0.0.1:{relay_port}", PEP_NO_PROXY="",
               PEP_STATE_DIR=STATE_DIR)
    return env


# ------------------------------------------------------------------------------------
# 1. bulk


def _cpu_seconds(pid: int) -> float:
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


def bench_bulk(procs: Procs, tmp: str, seconds: float, rounds: int, relay_args=()) -> dict:
    iperf_port = free_port()
    server = procs.start(["iperf3", "-s", "-p", str(iperf_port)])
    wait_port(iperf_port)
    time.sleep(0.3)
    haproxy, hport = start_haproxy(procs, tmp, iperf_port, threads=1)
    relay, rport = start_relay(procs, "--stats", "127.0.0.1:0", *relay_args)
    results = {"direct": [], "haproxy": [], "relay": [], "cpu_per_gb": {"haproxy": [],
                                                                      "relay": []},
               "relayed_fraction": []}
    try:
        for _ in range(rounds):
            results["direct"].append(iperf(iperf_port, seconds))
            c0 = _cpu_seconds(haproxy.pid)
            results["haproxy"].append(iperf(hport, seconds))
            results["cpu_per_gb"]["haproxy"].append(
                (_cpu_seconds(haproxy.pid) - c0) / (results["haproxy"][-1] * seconds / 8))
            c0 = _cpu_seconds(relay.pid)
            b0 = relay_bytes_up(relay)
            results["relay"].append(iperf(iperf_port, seconds, env=pep_env(rport)))
            results["relayed_fraction"].append(
                (relay_bytes_up(relay) - b0) / (results["relay"][-1] * 1e9 * seconds / 8))
            results["cpu_per_gb"]["relay"].append(
                (_cpu_seconds(relay.pid) - c0) / (results["relay"][-1] * seconds / 8))
    finally:
        procs.stop(relay)
        procs.stop(haproxy)
        procs.stop(server)
    return results


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


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the relay's workers)."""
    total = _cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for k in kids:
        try:
            total += _cpu_seconds(k)
        except OSError:
            pass
    return total


def bench_conns(procs: Procs, tmp: str, seconds: float, rounds: int, cpus: int) -> dict:
    nginx, nport = start_nginx(procs, tmp)
    haproxy, hport = start_haproxy(procs, tmp, nport, threads=cpus)
    relay, rport = start_relay(procs, "--workers", str(cpus), "--max-per-client", "0",
                               "--no-tunnel-log")
    ways = [("direct", nport, None), ("haproxy", hport, None), ("relay", nport, pep_env(rport))]
    base = None
    if BASELINE_ROOT:
        base, bport = start_relay(procs, "--workers", str(cpus), "--max-per-client", "0",
                                  "--no-tunnel-log", root=BASELINE_ROOT)
        ways.append(("base", nport, pep_env(bport)))
    results = {name: [] for name, _, _ in ways}
    results["notes"] = {}
    results["cpu_us"] = {}
    pids = {"haproxy": haproxy.pid, "relay": relay.pid}
    if base is not None:
        pids["base"] = base.pid
    try:
        for _ in range(rounds):
            for name, port, env in ways:
                c0 = _tree_cpu(pids[name]) if name in pids else 0.0
                rate, note = wrk(port, seconds, env)
                if name in pids:    # the proxy's CPU per connection, microseconds
                    used = _tree_cpu(pids[name]) - c0
                    results["cpu_us"].setdefault(name, []).append(
                        used * 1e6 / max(1.0, rate * int(seconds)))
                results[name].append(rate)
                results["notes"].setdefault(name, []).append(note)
    finally:
        procs.stop(relay)
        if base is not None:
            procs.stop(base)
        procs.stop(haproxy)
        procs.stop(nginx)
    return results


# ------------------------------------------------------------------------------------
# 3. idle tunnels: helpers run as subprocesses of this script (fd limits are
# per process, so the load is split over several).


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


def _clients(relay_port: int, dest_port: int, n: int) -> None:
    """Open n tunnels through the relay and hold them until stdin closes."""
    socks = []
    header = connect_request("127.0.0.1", dest_port)
    failed = 0
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            if _tunnel(s, relay_port, header).error is not None:
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


def _mem_available_kb() -> int:
    return _meminfo_kb("MemAvailable")


def bench_idle(procs: Procs, n: int) -> dict:
    # Per-process fd limits (20000 here, and no CAP_SYS_RESOURCE) decide the
    # split: ~2 fds per tunnel in the relay, 1 per socket in the helpers.
    per_proc = 4000
    parts = max(2, -(-n // per_proc))
    workers = max(2, -(-n * 2 // 15000))
    dest = free_port()
    holders = [procs.start([sys.executable, __file__, "_hold", str(dest)],
                           stdout=subprocess.PIPE) for _ in range(parts)]
    for h in holders:
        h.stdout.readline()
    relay, rport = start_relay(procs, "--workers", str(workers), "--max-per-client", "0",
                               "--no-tunnel-log", "--max-tunnels", str(n))
    time.sleep(0.5)
    wpids = _children(relay.pid)
    rss0 = sum(_rss_kb(p) for p in [relay.pid, *wpids])
    avail0 = _mem_available_kb()
    slab0 = _meminfo_kb("Slab")
    t0 = time.monotonic()
    clients = [procs.start([sys.executable, __file__, "_clients", str(rport), str(dest),
                            str(n // parts + (1 if i < n % parts else 0))],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
               for i in range(parts)]
    opened = failed = 0
    for c in clients:
        line = c.stdout.readline().decode()
        m = re.match(r"open (\d+) failed (\d+)", line)
        if m:
            opened += int(m.group(1))
            failed += int(m.group(2))
    took = time.monotonic() - t0
    time.sleep(1.0)
    rss1 = sum(_rss_kb(p) for p in [relay.pid, *wpids])
    avail1 = _mem_available_kb()
    slab1 = _meminfo_kb("Slab")
    alive = relay.poll() is None and all(_rss_kb(p) for p in wpids)
    # Still usable with all of them open?
    probe_ok = _probe(rport, dest)
    for c in clients:
        c.stdin.close()
        procs.stop(c)
    procs.stop(relay)
    for h in holders:
        procs.stop(h)
    return {"tunnels": opened, "failed": failed, "seconds": took, "workers": workers,
            "relay_rss_kb": (rss0, rss1), "avail_kb": (avail0, avail1), "slab_kb": (slab0, slab1), "alive": alive,
            "probe_ok": probe_ok}


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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--idle", type=int, default=10000, help="idle tunnels to hold (0: skip)")
    ap.add_argument("--proxy-cpus", type=int, default=2,
                    help="haproxy threads = relay workers for conn/s")
    ap.add_argument("--relay-args", default="",
                    help="extra relay options for the bulk test, e.g. '--pipe-size 256k'")
    ap.add_argument("--no-netns", action="store_true",
                    help="run on the host's loopback even as root (TFO server bit as the "
                         "host has it)")
    ap.add_argument("--cc", default="cubic",
                    help="congestion control for everything inside the benchmark's netns "
                         "(default cubic: bbr without an fq qdisc paces in TCP itself, which "
                         "costs a relay path of two connections far more than a direct flow; "
                         "'' keeps the kernel's default)")
    ap.add_argument("--only", choices=["bulk", "conns", "idle"], action="append")
    ap.add_argument("--engine", choices=["c", "python"], default="c",
                    help="the relay's engine (pep relay --engine; default c)")
    ap.add_argument("--no-cookie", action="store_true",
                    help="run the relays with --no-cookie (cookie-less 0-RTT from the first "
                         "SYN, unverified clients)")
    ap.add_argument("--baseline-root",
                    help="conn/s: also through the relay of this other checkout (before/after "
                         "in one run)")
    args = ap.parse_args(argv)
    only = set(args.only or ["bulk", "conns", "idle"])
    global BASELINE_ROOT
    BASELINE_ROOT = args.baseline_root and os.path.abspath(args.baseline_root)
    RELAY_MODE[:] = ["--engine", args.engine] + (["--no-cookie"] if args.no_cookie else [])
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
    print(f"# on {where}; libpep.so: {'yes' if libpep else 'MISSING'}; relay: "
          f"{' '.join(RELAY_MODE)}")
    try:
        if "bulk" in only:
            if not libpep:
                print("bulk: SKIPPED, preload/libpep.so missing (make -C preload failed)")
            else:
                r = bench_bulk(procs, tmp, args.duration, args.rounds, args.relay_args.split())
                cpu = r.pop("cpu_per_gb")
                relayed = r.pop("relayed_fraction")
                best = {k: max(v) for k, v in r.items()}
                print("\n## bulk: one iperf3 flow on loopback, Gbit/s (best of "
                      f"{args.rounds} interleaved rounds of {args.duration:g}s)")
                for k in ("direct", "haproxy", "relay"):
                    print(f"  {k:8s} {best[k]:7.2f}   rounds: "
                          + " ".join(f"{x:.2f}" for x in r[k]))
                print(f"  relay/direct  = {best['relay'] / best['direct']:.2f}  (target >= 0.75)")
                print(f"  relay/haproxy = {best['relay'] / best['haproxy']:.2f}  (target >= 1.0)")
                per_round = [a / b for a, b in zip(r["relay"], r["haproxy"])]
                print("  relay/haproxy per round: " + " ".join(f"{x:.2f}" for x in per_round))
                print("  bytes the relay counted / bytes iperf3 reported, per round: "
                      + " ".join(f"{x:.2f}" for x in relayed) + "  (1.00: the flow went "
                      "through the relay)")
                print("  proxy CPU per GB moved (s/GB, lower is better; independent of how "
                      "busy the machine is): haproxy " + " ".join(f"{x:.3f}" for x in cpu["haproxy"])
                      + "  relay " + " ".join(f"{x:.3f}" for x in cpu["relay"]))
        if "conns" in only:
            if not libpep:
                print("conns: SKIPPED, preload/libpep.so missing")
            else:
                r = bench_conns(procs, tmp, args.duration, args.rounds, args.proxy_cpus)
                names = [k for k in ("direct", "haproxy", "relay", "base") if k in r]
                best = {k: max(r[k]) for k in names}
                print(f"\n## new connections/s: wrk -t2 -c64 'Connection: close' to nginx "
                      f"(proxies on {args.proxy_cpus} cpus; best of {args.rounds}"
                      + (f"; base: the relay of {BASELINE_ROOT}" if "base" in r else "") + ")")
                for k in names:
                    print(f"  {k:8s} {best[k]:9.0f}/s   rounds: "
                          + " ".join(f"{x:.0f}" for x in r[k])
                          + "   " + "; ".join(sorted(set(r["notes"][k]))))
                print(f"  relay/haproxy = {best['relay'] / best['haproxy']:.2f}  (target >= 1.0)")
                print("  proxy CPU per connection (us, all its processes; per round): "
                      + "  ".join(f"{k} " + " ".join(f"{x:.0f}" for x in v)
                                  for k, v in r["cpu_us"].items()))
                if "base" in best:
                    print(f"  base/haproxy  = {best['base'] / best['haproxy']:.2f}")
        if "idle" in only and args.idle:
            r = bench_idle(procs, args.idle)
            rss0, rss1 = r["relay_rss_kb"]
            a0, a1 = r["avail_kb"]
            n = max(1, r["tunnels"])
            print(f"\n## idle tunnels: {r['tunnels']} open, {r['failed']} failed, "
                  f"opened in {r['seconds']:.1f}s, relay alive: {r['alive']}, "
                  f"new tunnel while held: {r['probe_ok']}")
            print(f"  relay RSS ({r['workers']} workers): {rss0 / 1024:.1f} MiB -> "
                  f"{rss1 / 1024:.1f} MiB = {(rss1 - rss0) * 1024 / n:.0f} bytes/tunnel "
                  "(user space)")
            s0, s1 = r["slab_kb"]
            print(f"  kernel Slab growth: {(s1 - s0) / 1024:.1f} MiB = {(s1 - s0) * 1024 / n:.0f} "
                  "bytes/tunnel for the 4 sockets of a tunnel's path (client, relay x2, "
                  "server); the relay's share is about half")
            print(f"  machine MemAvailable drop: {(a0 - a1) / 1024:.1f} MiB = "
                  f"{(a0 - a1) * 1024 / n:.0f} bytes/tunnel (upper bound: includes kernel "
                  "sockets at all 4 ends and the test client/server processes)")
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
