#!/usr/bin/env python3
"""What libpep.so costs the CLIENT per new connection, against another libpep.so.

    python3 benchmarks/bench_preload_conns.py [--baseline /work/main/preload/libpep.so]
        [--rounds 3] [--duration 3] [--connections 8] [--strace]

One `pep relay` (as deployed: TFO cookies required) and one nginx in a network
namespace of this run's (net.ipv4.tcp_fastopen=3 inside it); wrk with
`Connection: close` through the relay under LD_PRELOAD of this checkout's
preload/libpep.so ('new') and of --baseline ('base'), alternating, the same
relay for both.  Each libpep has its own PEP_STATE_DIR and a 1 s warm-up run
(libpep learns the PEP's TFO mode, the kernel gets the cookie).

Prints, per round and as medians: wrk's CPU (user + system, from
getrusage(RUSAGE_CHILDREN) around each run) per request, and new/base; and,
for scale, wrk without libpep through haproxy (one thread) to the same
nginx in the same rounds (--no-haproxy: not).
--strace also counts wrk's system calls per request (`strace -f -c`, wrk -t1
-c1 -d2s; strace's own overhead makes that run's rate meaningless).

The server side (relay, nginx) is the same for both; only the client's
libpep differs.  Needs root (netns), nginx, wrk (and strace for --strace).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_relay  # noqa: E402


def run_wrk(port: int, env: dict, seconds: float, conns: int,
            strace_out: str | None = None) -> tuple[int, float]:
    """(requests, CPU seconds of wrk); in the namespace, no `ip netns exec`
    process in between (this thread enters it, the child inherits it)."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{int(seconds)}s", "-H", "Connection: close",
            f"http://127.0.0.1:{port}/"]
    if strace_out:
        argv = ["strace", "-f", "-c", "-o", strace_out, *argv]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with bench_relay.enter():
        out = subprocess.run(argv, capture_output=True, text=True, env=env,
                             timeout=seconds + 60)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"(\d+) requests in", out.stdout)
    if not m:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    errors = re.search(r"Socket errors:.*", out.stdout)
    if errors:
        print(f"#   wrk: {errors.group(0)}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return int(m.group(1)), cpu


def strace_calls(path: str) -> dict[str, int]:
    """`strace -c`'s table: syscall -> calls."""
    calls = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[3].isdigit() and not line.startswith("100.00"):
                calls[parts[-1]] = int(parts[3])
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="/work/main/preload/libpep.so",
                    help="the libpep.so to compare with (read-only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--connections", type=int, default=8, help="wrk -c (one thread)")
    ap.add_argument("--no-haproxy", action="store_true",
                    help="no round through haproxy (wrk without libpep)")
    ap.add_argument("--strace", action="store_true",
                    help="also count system calls per request (wrk -t1 -c1 -d2s)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a network namespace)")
        return 2
    if not args.no_haproxy and not shutil.which("haproxy"):
        args.no_haproxy = True
    for tool in ("nginx", "wrk") + (("strace",) if args.strace else ()):
        if not shutil.which(tool):
            print(f"missing {tool}")
            return 2
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "preload")], check=True)
    libs = {"base": os.path.abspath(args.baseline), "new": bench_relay.LIBPEP}
    from pepsock.testbed.netns import Topology
    topo = Topology(prefix="pc")
    procs = bench_relay.Procs()
    tmp = tempfile.mkdtemp(prefix="bench-preload-conns-")
    try:
        bench_relay.NS = topo.host("bench", tfo=3)
        _, nport = bench_relay.start_nginx(procs, tmp)
        _, rport = bench_relay.start_relay(procs, "--max-per-client", "0", "--no-tunnel-log",
                                           no_cookie=False)
        envs, ports = {}, {}
        for name, lib in libs.items():
            env = bench_relay.pep_env(rport)
            env["LD_PRELOAD"] = lib
            env["PEP_STATE_DIR"] = os.path.join(tmp, f"state-{name}")
            os.makedirs(env["PEP_STATE_DIR"], mode=0o700)
            run_wrk(nport, env, 1, 1)  # warm-up: TFO mode learnt, cookie in the kernel
            envs[name], ports[name] = env, nport
        if not args.no_haproxy:
            _, hport = bench_relay.start_haproxy(procs, tmp, nport, threads=1)
            envs["haproxy"], ports["haproxy"] = dict(os.environ), hport
        print(f"# bench_preload_conns  load={os.getloadavg()[0]:.2f}  kernel={os.uname().release}"
              f"\n# base: {libs['base']}\n# new:  {libs['new']}")
        if args.strace:
            counts = {}
            for name, env in envs.items():
                if name == "haproxy":
                    continue
                out = os.path.join(tmp, f"strace-{name}")
                reqs, _ = run_wrk(nport, env, 2, 1, strace_out=out)
                counts[name] = (reqs, strace_calls(out))
            print("\n## system calls per request (strace -f -c, wrk -t1 -c1 -d2s)")
            names = sorted(set(counts["base"][1]) | set(counts["new"][1]))
            print(f"  {'syscall':18s} {'base':>7s} {'new':>7s}")
            for s in names:
                b = counts["base"][1].get(s, 0) / counts["base"][0]
                n = counts["new"][1].get(s, 0) / counts["new"][0]
                if b >= 0.01 or n >= 0.01:
                    print(f"  {s:18s} {b:7.2f} {n:7.2f}")
            tb = sum(counts["base"][1].values()) / counts["base"][0]
            tn = sum(counts["new"][1].values()) / counts["new"][0]
            print(f"  {'total':18s} {tb:7.2f} {tn:7.2f}   new/base = {tn / tb:.2f}")
        print(f"\n## wrk CPU per request (us), wrk -t1 -c{args.connections} "
              f"-d{int(args.duration)}s 'Connection: close' through the relay")
        per = {name: [] for name in envs}
        for i in range(args.rounds):
            order = list(envs) if i % 2 == 0 else list(reversed(envs))
            for name in order:
                reqs, cpu = run_wrk(ports[name], envs[name], args.duration, args.connections)
                per[name].append(cpu * 1e6 / reqs)
                print(f"  round {i + 1} {name:7s} {reqs / args.duration:8.0f} req/s  "
                      f"{per[name][-1]:6.1f} us/request")
        ratios = [n / b for n, b in zip(per["new"], per["base"])]
        print(f"  median: base {statistics.median(per['base']):.1f} us  "
              f"new {statistics.median(per['new']):.1f} us  new/base per round: "
              + " ".join(f"{r:.2f}" for r in ratios)
              + f"  median {statistics.median(ratios):.2f}")
        if "haproxy" in per:
            vs = {n: statistics.median([a / h for a, h in zip(per[n], per["haproxy"])])
                  for n in ("base", "new")}
            print(f"  for scale, wrk without libpep through haproxy (1 thread): "
                  f"{statistics.median(per['haproxy']):.1f} us; per round, median "
                  + "  ".join(f"{n}/haproxy {v:.2f}" for n, v in vs.items()))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        topo.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
