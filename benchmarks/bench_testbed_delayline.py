"""Does the user-space bottleneck keep up?  Kernel TBF+bfifo vs the C line's FIFO and
FQ-CoDel at 75 Mbit/s and above, and the Python delay line (delay only) for reference.

    python benchmarks/bench_testbed_delayline.py [seconds] [rates, e.g. 75,150]

For each case: build the five-namespace chain (R1 10 ms, R2 40 ms), shape the
bottleneck to the rate (the wired side to twice it), run one cubic bulk transfer
for a few seconds with a queue of 2 end-to-end BDPs (so TCP can fill the link:
this measures the line, not TCP) and report the steady goodput against rate x
1448/1514, the idle RTT, the line's worst lateness, drops and CPU seconds per
second of transfer.  Each row also gives goodput as a ratio of the kernel
reference at the same rate (run side by side).  Needs root.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pepsock.testbed import procs  # noqa: E402
from pepsock.testbed.topology import ADDR, Settings, Testbed  # noqa: E402

FACTOR = 1448 / 1514


def run(qdisc: str, impl: str, rate: float, seconds: float) -> dict:
    q = int(rate * 1e6 / 8 * 0.05 * 2)
    with Testbed(Settings(delay_impl=impl, wireless_mbit=rate, wired_mbit=2 * rate, queue_bytes=q,
                          qdisc=qdisc), prefix="evb") as tb:
        p = procs.agent(tb.client, "ping", ADDR["server"], "--count", 5)
        rtt = sorted(procs.result(p, 20)["rtts_ms"])
        srv = procs.agent(tb.server, "server", "--port", 5001, "--cc", "cubic")
        procs.wait_ready(srv)
        nbytes = int(rate * 1e6 / 8 * seconds)
        cpu0 = tb.delaylines[0].cpu_seconds()
        t0 = time.monotonic()
        p = procs.agent(tb.client, "bulk", "--server", ADDR["server"] + ":5001", "--bytes", nbytes,
                        "--cc", "cubic", "--timeout", seconds * 6)
        f = procs.result(p, seconds * 6 + 10)["flows"][0]
        wall = time.monotonic() - t0
        cpu1 = tb.delaylines[0].cpu_seconds()
        procs.stop(srv)
        bins = [b[1] * 8 / 0.1 / 1e6 for b in f["bins"]]
        steady = sorted(bins[len(bins) // 3: -2]) or [0]
        stats = tb.close()
        wl = stats.get("delayline0", {})
        return {"qdisc": qdisc, "impl": impl, "rate_mbit": rate, "idle_rtt_ms": rtt[len(rtt) // 2],
                "steady_median_mbit": steady[len(steady) // 2], "ideal_mbit": round(rate * FACTOR, 2),
                "late_max_ms": max(wl.get("ab_late_max_us", 0), wl.get("ba_late_max_us", 0)) / 1000,
                "drops_line": (wl.get("ab_drops") or 0) + (wl.get("ba_drops") or 0),
                "cpu_per_s": round((cpu1 - cpu0) / wall, 3) if cpu0 is not None and cpu1 is not None else None}


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 5
    rates = [float(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "75,150").split(",")]
    for rate in rates:
        ref = run("kernel", "c", rate, secs)
        ref["vs_kernel"] = 1.0
        print(json.dumps(ref), flush=True)
        for qdisc, impl in (("fifo", "c"), ("fq_codel", "c")) + ((("kernel", "py"),) if rate <= 75 else ()):
            r = run(qdisc, impl, rate, secs)
            r["vs_kernel"] = round(r["steady_median_mbit"] / ref["steady_median_mbit"], 3)
            print(json.dumps(r), flush=True)
