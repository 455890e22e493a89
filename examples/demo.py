"""Why a PEP: the thesis's setting, in five namespaces, in under a minute (as root).

    client --[wireless: R1 = 10 ms, 10 -> 75 Mbit/s]-- wrouter -- PEP -- drouter --[wired: R2 = 40 ms]-- server

The wireless hop has its own delay line and a TBF bottleneck whose rate steps
from 10 to 75 Mbit/s four seconds in (pepsock/testbed: the delay line and the
shaping that `pep eval` uses). The client fetches 20 MB twice, end to end and
through `pep relay` with the Convert header in the SYN, and the time to first
byte is measured on its own. Each number is printed next to the formula it
should match:

* time to first byte, direct: 2 R1 + 2 R2 (handshake, then request and answer);
  through the 0-RTT PEP: R1 + 2 R2 (the SYN carries the request for the PEP,
  which opens its own connection, R2, and forwards the request, R2).
* transfer time: the fluid bound (nothing before the first byte, then every
  byte at the link's scheduled rate, counted as TCP payload). The PEP's short
  loop over the wireless hop fills the new rate at once; the end-to-end flow
  (a 50 ms loop with a queue of a fraction of its BDP) grows into it by one
  segment per round trip.

Needs the `demo` extra (pyroute2, to change the rate over netlink) and a C
compiler for the delay line (else the slower Python one runs). Everything is
removed at the end, Ctrl-C included. docs/evaluation/report.md has the full run.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from pepsock.extras import missing_extra
from pepsock.testbed.netns import have_netns

STEP_AT_S = 4.0


def measure(nbytes: int, ttfb_reps: int) -> dict:
    from pepsock.testbed import procs
    from pepsock.testbed.experiments import ADDR, PEP_PORT, SERVER_PORT, Plan, Runner
    from pepsock.testbed.topology import Settings, Testbed
    from pepsock.testbed.traces import step_schedule

    schedule = step_schedule(at=STEP_AT_S)
    out: dict = {"notes": []}
    with Testbed(Settings(), prefix="demo") as tb:
        runner = Runner(tb, Plan())
        try:
            runner.start()
            if not runner.pep_ok:
                raise RuntimeError(f"the relay did not start: {runner.pep_status}")
            out["notes"] += tb.notes
            out["r1_ms"] = statistics.median(runner.ping(tb.client, ADDR["pep_w"]))
            out["r2_ms"] = statistics.median(runner.ping(tb.pep, ADDR["server"]))
            tb.reset(75.0)
            for mode, agent_mode in (("e2e", "direct"), ("pep", "pep")):
                args = ["ttfb", "--server", f"{ADDR['server']}:{SERVER_PORT}", "--mode", agent_mode,
                        "--reps", ttfb_reps, "--warmup", 2, "--cc", tb.s.cc]
                if mode == "pep":
                    args += ["--proxy", f"{ADDR['pep_w']}:{PEP_PORT}"]
                res = procs.result(procs.agent(tb.client, *args), ttfb_reps * 6 + 20)
                got = [r["ttfb_ms"] for r in res["results"] if r.get("ttfb_ms")]
                out[f"ttfb_{mode}_ms"] = statistics.median(got) if got else float("nan")
            for mode in ("e2e", "pep"):
                run = runner.transfer("demo", mode, 0, schedule, nbytes, interactive=False,
                                      timeout=40.0)
                flow = run["flows"][0]
                if not flow.get("complete"):
                    raise RuntimeError(f"{mode} transfer failed: {flow.get('error', 'incomplete')}")
                out[f"fct_{mode}_s"] = flow["fct"]
                out[f"first_{mode}_s"] = flow["t_first"] - flow["t_start"]
        finally:
            runner.stop()
    out["schedule"] = schedule
    return out


def show(m: dict, nbytes: int) -> None:
    from pepsock.testbed.report import ideal_fct
    r1, r2 = m["r1_ms"], m["r2_ms"]
    direct_f, pep_f = 2 * r1 + 2 * r2, r1 + 2 * r2
    changes = list(m["schedule"].steps)
    bound_direct = ideal_fct(changes, nbytes, direct_f / 1000)
    bound_pep = ideal_fct(changes, nbytes, pep_f / 1000)
    w = 30
    print()
    print(f"R1 (client-PEP RTT) {r1:.1f} ms, R2 (PEP-server RTT) {r2:.1f} ms, measured by ping; "
          f"wireless rate 10 Mbit/s, 75 Mbit/s from t = {STEP_AT_S:g} s")
    print()
    print(f"{'':<26}{'direct (end to end)':<{w}}{'through the PEP (0-RTT)':<{w}}")
    print(f"{'time to first byte (ms)':<26}{m['ttfb_e2e_ms']:<{w}.1f}{m['ttfb_pep_ms']:<{w}.1f}")
    print(f"{'  should match':<26}{f'2R1+2R2 = {direct_f:.1f}':<{w}}{f'R1+2R2 = {pep_f:.1f}':<{w}}")
    label = f"{nbytes / 1e6:g} MB transfer (s)"
    print(f"{label:<26}{m['fct_e2e_s']:<{w}.2f}{m['fct_pep_s']:<{w}.2f}")
    print(f"{'  fluid bound':<26}{bound_direct:<{w}.2f}{bound_pep:<{w}.2f}")
    print()
    print(f"through the PEP: first byte {m['ttfb_e2e_ms'] - m['ttfb_pep_ms']:.1f} ms sooner "
          f"(formula: R1 = {r1:.1f} ms), transfer in {m['fct_pep_s'] / m['fct_e2e_s']:.2f}x the "
          f"time ({m['fct_e2e_s'] - m['fct_pep_s']:.2f} s sooner)")
    for note in m["notes"]:
        print("note:", note)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=20_000_000, help="transfer size (default 20 MB)")
    parser.add_argument("--ttfb-reps", type=int, default=5, help="first-byte samples per path")
    args = parser.parse_args()
    ok, why = have_netns()
    if not ok:
        print(f"demo: {why}", file=sys.stderr)
        return 2
    problem = missing_extra("demo")
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    print("demo: building client, wireless router, PEP, wired router, server (namespaces)...",
          flush=True)
    try:
        m = measure(args.bytes, args.ttfb_reps)
    except subprocess.CalledProcessError as exc:   # ip, tc, sysctl inside the namespaces
        print(f"demo: `{' '.join(map(str, exc.cmd))}` failed: {(exc.stderr or '').strip()}",
              file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    show(m, args.bytes)
    print(f"(demo took {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
