"""Does a Python delay line keep up at 75 Mbit/s?  C vs Python, same testbed.

    python benchmarks/bench_testbed_delayline.py [seconds]

For each implementation: build the five-namespace chain (R1 10 ms, R2 40 ms),
shape the bottleneck to 75 Mbit/s, run one cubic bulk transfer for a few
seconds and report goodput (ideal: 75 * 1448/1514 = 71.7 Mbit/s), ping RTT
while idle and the delay line's worst lateness and drops.  Needs root.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pepsock.testbed import procs
from pepsock.testbed.topology import ADDR, Settings, Testbed


def run(impl: str, seconds: float) -> dict:
    # a queue of 2 end-to-end BDPs, so one cubic flow can keep the link full: this measures the line
    with Testbed(Settings(delay_impl=impl, wireless_mbit=75, queue_bytes=940_000)) as tb:
        p = procs.agent(tb.client, "ping", ADDR["server"], "--count", 5)
        rtt = sorted(procs.result(p, 20)["rtts_ms"])
        srv = procs.agent(tb.server, "server", "--port", 5001, "--cc", "cubic")
        procs.wait_ready(srv)
        nbytes = int(75e6 / 8 * seconds)
        p = procs.agent(tb.client, "bulk", "--server", ADDR["server"] + ":5001", "--bytes", nbytes,
                        "--cc", "cubic", "--timeout", seconds * 6)
        f = procs.result(p, seconds * 6 + 10)["flows"][0]
        procs.stop(srv)
        bins = [b[1] * 8 / 0.1 / 1e6 for b in f["bins"]]
        steady = sorted(bins[len(bins) // 3: -2]) or [0]
        stats = tb.close()
        return {"impl": impl, "idle_rtt_ms": rtt[len(rtt) // 2], "goodput_mbit": f["bytes"] * 8 / f["fct"] / 1e6,
                "steady_median_mbit": steady[len(steady) // 2], "delaylines": stats}


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 5
    for impl in ("c", "py"):
        print(json.dumps(run(impl, secs)))
