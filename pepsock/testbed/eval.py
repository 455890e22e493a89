"""`pep eval`: reproduce the thesis's evaluation (chapter 5) in network namespaces.

    pep eval [--quick] [--out DIR] [--experiments step,flows,spike,mmwave,ttfb,...] [--qdisc fifo,codel,fq_codel]
             [--trace FILE] [--reps N]
    python -m pepsock.testbed.eval ...

Builds client -- wrouter -- pep -- drouter -- server (see topology.py), prints a
calibration check, runs the experiments with a progress bar on stderr, writes
DIR/report.md + CSV + PNG + results.json, and removes every namespace it made,
also on Ctrl-C or SIGTERM.  Each transfer case runs over every queue of --qdisc
(the user-space link's fifo / codel / fq_codel, or the kernel's TBF + bfifo), end
to end and through the PEP, interleaved.  `satellite` builds a second testbed
with a GEO hop.  Needs root, iproute2, a C compiler, pyroute2 and matplotlib (the
`eval` extra); tinyproxy and microsocks for the proxy rows, curl and openssl for
the HTTPS rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .topology import ADDR, Settings  # noqa: E402  (pure Python, no root needed to import)

ALL = ["validate", "step", "bigq", "flows", "spike", "mmwave", "upload", "ipv6", "ttfb", "tls", "satellite"]
QUICK = ALL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pep eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and flow counts (a few minutes; CI)")
    p.add_argument("--out", default="eval-report", help="report folder (default: ./eval-report)")
    p.add_argument("--experiments",
                   help=f"comma-separated subset of {','.join(ALL)} (default: all; --quick: {','.join(QUICK)})")
    p.add_argument("--qdisc",
                   help="bottleneck queues to compare, comma-separated: fifo (drop-tail, --queue bytes), "
                        "codel (RFC 8289), fq_codel (RFC 8290) in the user-space link, or kernel (TBF + "
                        "bfifo) (default fifo,codel,fq_codel; --quick fifo,fq_codel; `validate` always "
                        "runs kernel and fifo, `bigq` only the byte-limited FIFOs)")
    p.add_argument("--uplink", type=float, default=10.0,
                   help="uplink (client -> PEP) rate in Mbit/s, shaped in the user-space link with the "
                        "same queue; 0 leaves it unshaped (default 10; the upload case steps it 10 -> 75)")
    p.add_argument("--trace", help="rate trace for the step experiment: a mahimahi trace (one ms "
                                   "timestamp per 1500-byte delivery opportunity) or a schedule "
                                   "(`<time_ms> <rate_mbit>` lines), or a shipped name: "
                                   "step-10-75, spike-outage, mmwave-blockage")
    p.add_argument("--reps", type=int, help="repetitions of step/spike/mmwave (default 5; quick 1) and, when "
                                            "given, of validate/upload/ipv6 too (default 3/3/2; quick 1)")
    p.add_argument("--ttfb-reps", type=int, help="TTFB samples per method (default 20; quick 3)")
    p.add_argument("--flows", help="numbers of competing flows, e.g. 1,2,4,6,8,10")
    p.add_argument("--r1", type=float, default=10.0, help="client-PEP RTT in ms (default 10)")
    p.add_argument("--r2", type=float, default=40.0, help="PEP-server RTT in ms (default 40)")
    p.add_argument("--queue", type=int, default=93_750,
                   help="bottleneck FIFO limit in bytes, user-space FIFO or kernel bfifo (default 93750: "
                        "75 Mbit/s x 10 ms)")
    p.add_argument("--cc", default="cubic", help="congestion control pinned on every experiment socket (TCP_CONGESTION) (default cubic)")
    p.add_argument("--delay-impl", choices=["c", "py"], default="c", help="delay line implementation")
    p.add_argument("--pep-cmd", help="relay command line, {listen} is replaced by ADDR:PORT "
                                     "(default: python -m pepsock.cli relay --listen {listen})")
    p.add_argument("--cleanup", action="store_true",
                   help="only remove testbeds left behind by a run that was killed with SIGKILL, then exit")
    p.add_argument("--step-bytes", type=int, help="bytes per transfer in the step experiment (default 20 MB)")
    p.add_argument("--sat-rtt", type=float, default=550.0, help="satellite: client-PEP RTT in ms (default 550)")
    p.add_argument("--sat-loss", type=float, default=0.001,
                   help="satellite: random loss on the satellite hop, each direction (default 0.001)")
    p.add_argument("--sat-sizes", help="satellite: transfer sizes in bytes, comma-separated "
                                       "(default 100000,1000000,10000000; quick 100000,1000000)")
    p.add_argument("--sat-cc", default="bbr",
                   help="satellite: the PEP's congestion control on the satellite side (default bbr; "
                        "the endpoints and the PEP's ground side use --cc)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .netns import have_netns
    ok, why = have_netns()
    if not ok:
        print(f"pep eval: {why}", file=sys.stderr)
        return 2
    if args.cleanup:
        from .topology import remove_stale
        gone = remove_stale()
        print(f"pep eval: removed {len(gone)} stale testbed(s){': ' if gone else ''}{', '.join(gone)}")
        return 0
    exps = [e.strip() for e in (args.experiments or ",".join(QUICK if args.quick else ALL)).split(",")
            if e.strip()]
    args.experiments_list = exps
    bad = [e for e in exps if e not in ALL]
    if bad:
        print(f"pep eval: unknown experiment(s) {', '.join(bad)}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 2
    from .experiments import Plan
    from .topology import install_signal_handlers, restore_signal_handlers
    from .traces import TraceError, load

    plan = Plan.quick_plan() if args.quick else Plan()
    plan.experiments = exps
    if args.reps:   # every transfer case, so a quick run can be given more repetitions
        plan.reps = plan.validate_reps = plan.upload_reps = plan.ipv6_reps = args.reps
    if args.ttfb_reps:
        plan.ttfb_reps = args.ttfb_reps
    if args.flows:
        plan.flows = [int(x) for x in args.flows.split(",")]
    if args.step_bytes:
        plan.step_bytes = args.step_bytes
    if args.sat_sizes:
        plan.sat_sizes = [int(x) for x in args.sat_sizes.split(",")]
        if args.reps:
            plan.sat_reps = args.reps
    plan.pep_cmd = args.pep_cmd
    from .shaping import QDISCS
    if args.qdisc:
        plan.qdiscs = [q.strip() for q in args.qdisc.split(",") if q.strip()]
        plan.single_qdisc = {}      # the queues asked for, for every experiment
    if not plan.qdiscs or any(q not in QDISCS for q in plan.qdiscs):
        print(f"pep eval: --qdisc: choose from {', '.join(QDISCS)}", file=sys.stderr)
        return 2
    if args.delay_impl != "c" and plan.qdiscs != ["kernel"]:
        print("pep eval: the user-space queues need the C delay line: --delay-impl py needs --qdisc kernel",
              file=sys.stderr)
        return 2
    if args.trace:
        try:
            load(args.trace)
        except (TraceError, OSError) as e:
            print(f"pep eval: --trace: {e}", file=sys.stderr)
            return 2
        plan.trace = args.trace
    settings = Settings(r1_ms=args.r1, r2_ms=args.r2, queue_bytes=args.queue, cc=args.cc,
                        delay_impl=args.delay_impl, qdisc=plan.qdiscs[0],
                        uplink_mbit=(args.uplink or None) if args.delay_impl == "c" else None)

    old_handlers = install_signal_handlers()
    try:
        return _run(args, plan, settings, exps)
    finally:
        restore_signal_handlers(old_handlers)


def _run(args, plan, settings, exps) -> int:
    from . import report
    from .experiments import Runner, Progress, log, settings_dict
    from .topology import Testbed
    from .traces import load
    t_start = time.time()
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": [], "ttfb": [],
                 "calibration": [], "notes": []}
    tb = runner = progress = None
    from .experiments import estimate
    from .traces import spike_outage_schedule, step_schedule
    step = load(plan.trace) if plan.trace else step_schedule()
    schedules = {e: step for e in ("validate", "step", "bigq", "flows", "upload", "ipv6")}
    schedules.update(spike=spike_outage_schedule(), mmwave=load("mmwave-blockage"))
    est = estimate(plan, exps, settings.r1_ms, settings.r2_ms, args.sat_rtt, schedules)
    res["estimate_s"] = est
    log(f"pep eval: estimated {sum(est.values()) / 60:.0f} min on a 2-core host ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items()) + " min)")
    timings = res["timings_s"] = {}
    mark = [time.time()]

    def took(name: str) -> None:
        now = time.time()
        timings[name] = timings.get(name, 0.0) + now - mark[0]
        mark[0] = now
    try:
        tb = Testbed(settings)
        runner = Runner(tb, plan)
        runner.start()
        log(f"pep eval: testbed {tb.topo.tag}; PEP {runner.pep_status}")
        res["settings"] = settings_dict(tb, plan, runner)
        res["notes"] += tb.notes
        for n in tb.notes:
            log("pep eval: " + n)
        res["calibration"] = runner.calibrate()
        log("calibration (measured vs configured, must be within 10%):")
        for r in res["calibration"]:
            if isinstance(r["error_pct"], float):
                log(f"  {r['metric']:<40} configured {r['configured']:>8}  measured {r['measured']:8.2f}  "
                    f"{r['error_pct']:+6.1f}%  {'ok' if r['ok'] else 'OUT OF TOLERANCE'}")
            else:
                log(f"  {r['metric']:<40} {r['measured']}")
        took("setup")
        # (name, schedule, bytes, repetitions, options), in the order they run
        transfers = []
        if "validate" in exps:
            transfers.append(("validate", runner.step_schedule(), plan.step_bytes, plan.validate_reps, {}))
        if "step" in exps:
            transfers.append(("step", runner.step_schedule(), plan.step_bytes, plan.reps, {}))
        if "bigq" in exps:
            transfers.append(("bigq", runner.step_schedule(), plan.step_bytes, plan.bigq_reps,
                              {"queue_bytes": settings.queue_bytes * plan.bigq_factor}))
        if "spike" in exps:
            transfers.append(("spike", spike_outage_schedule(), plan.spike_bytes, plan.reps, {}))
        if "mmwave" in exps:
            transfers.append(("mmwave", load("mmwave-blockage"), plan.mmwave_bytes, plan.reps, {}))
        if "flows" in exps:
            transfers.append(("flows", runner.step_schedule(), plan.flow_bytes, plan.flows_reps,
                              {"flows_list": plan.flows, "interactive": False}))
        if "upload" in exps:
            if tb.uplink is None:
                res["notes"].append("upload skipped: the uplink is not shaped (--uplink 0)")
            else:
                transfers.append(("upload", runner.step_schedule(), plan.upload_bytes, plan.upload_reps,
                                  {"upload": True, "interactive": False}))
        if "ipv6" in exps:
            transfers.append(("ipv6", runner.step_schedule(), plan.step_bytes, plan.ipv6_reps, {"v6": True}))
        modes = len(runner.modes())
        total = sum(reps * modes * len(opts.get("flows_list", (1,))) * len(plan.qdiscs_for(name))
                    for name, _, _, reps, opts in transfers)
        if "ttfb" in exps:
            total += 9      # exp_ttfb's modes
        if "tls" in exps:
            total += 9      # exp_tls's modes
        if "satellite" in exps:
            total += len(plan.sat_sizes) * plan.sat_reps * modes + 9 + (9 if "tls" in exps and plan.sat_tls else 0)
        progress = Progress(total)
        for name, schedule, nbytes, reps, opts in transfers:
            res["runs"] += runner.exp_transfers(name, schedule, nbytes, reps, progress, **opts)
            took(name)
        if "ttfb" in exps:
            res["ttfb"] = runner.exp_ttfb(progress)
            took("ttfb")
        if "tls" in exps:
            from .experiments import exp_tls
            res["tls"] = exp_tls(runner, progress)
            took("tls")
        if "satellite" in exps:
            # one testbed at a time: the terrestrial one goes before the satellite one is built
            _teardown(tb, runner, res)
            tb = runner = None
            res["satellite"] = {}
            tb, runner = _satellite(args, plan, settings, progress, res["satellite"])
            took("satellite")
        progress.close()
    except KeyboardInterrupt:
        if progress:
            progress.close()
        log("pep eval: interrupted; tearing down")
        res["notes"].append("interrupted before the end")
        _teardown(tb, runner, res)
        return 130
    except Exception as e:
        if progress:
            progress.close()
        _teardown(tb, runner, res)
        log(f"pep eval: failed: {e!r}")
        raise
    _teardown(tb, runner, res)
    res["duration_s"] = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, default=str)
    report.write_report(res, args.out)
    S = report.summarize(res)
    log(f"pep eval: report in {os.path.join(args.out, 'report.md')} ({res['duration_s']:.0f} s; "
        + ", ".join(f"{k} {v:.0f} s (estimated {est.get(k, 0):.0f})" for k, v in timings.items()) + ")")
    for line in report.targets(S):
        log("  " + line.strip("|").replace(" | ", ": ", 1).replace(" | ", " -> "))
    return 0


def _satellite(args, plan, ground, progress, out: dict):
    """A GEO satellite hop between client and PEP, the ground side behind it: FCT for a few
    sizes, end to end and through the PEP, and TTFB per method.  Returns (testbed, runner)
    for the caller to tear down."""
    from dataclasses import asdict
    from .experiments import Runner, log
    from .topology import Testbed
    from .traces import Schedule
    sat = Settings(r1_ms=args.sat_rtt, r2_ms=plan.sat_r2_ms, wireless_mbit=plan.sat_down_mbit,
                   uplink_mbit=plan.sat_up_mbit, queue_bytes=plan.sat_queue_bytes, cc=ground.cc,
                   qdisc="fifo", loss_down=args.sat_loss, loss_up=args.sat_loss, seed=7,
                   pep_client_cc=args.sat_cc, pep_server_cc=ground.cc, tcp_buf_max=32 << 20,
                   delay_impl=ground.delay_impl)
    tb = Testbed(sat, prefix="evs")
    runner = Runner(tb, plan)
    runner.start()
    out["settings"] = asdict(sat)
    out["notes"] = list(tb.notes)
    log(f"pep eval: satellite testbed {tb.topo.tag}; PEP {runner.pep_status}")
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")   # noqa: E731
    out["calibration"] = [
        {"metric": "R1 client-PEP RTT (ms)", "configured": sat.r1_ms,
         "measured": med(runner.ping(tb.client, ADDR["pep_w"], 3))},
        {"metric": "R2 PEP-server RTT (ms)", "configured": sat.r2_ms,
         "measured": med(runner.ping(tb.pep, ADDR["server"], 5))}]
    flat = Schedule([(0.0, sat.wireless_mbit * 1e6)], name=f"constant {sat.wireless_mbit:g} Mbit/s")
    out["runs"] = []
    for size in plan.sat_sizes:
        out["runs"] += runner.exp_transfers("satellite", flat, size, plan.sat_reps, progress,
                                            qdiscs=["fifo"], interactive=False, timeout=plan.sat_timeout)
    saved = plan.ttfb_reps
    plan.ttfb_reps = plan.sat_ttfb_reps
    try:
        out["ttfb"] = runner.exp_ttfb(progress, rate_mbit=sat.wireless_mbit, timeout=10,
                                      warmup=plan.sat_ttfb_warmup)
        if "tls" in args.experiments_list and plan.sat_tls:
            from .experiments import exp_tls
            out["tls"] = exp_tls(runner, progress, rate_mbit=sat.wireless_mbit, timeout=10)
    finally:
        plan.ttfb_reps = saved
    out["notes"] += runner.notes
    runner.notes.clear()
    return tb, runner


def _teardown(tb, runner, res) -> None:
    if runner is not None:
        res["notes"] += runner.notes
        try:
            runner.stop()
        except Exception:
            pass
    if tb is not None:
        st = tb.close()
        where = "satellite " if "delaylines" in res else ""
        for k, v in st.items():
            lost = (v.get("ab_drops") or 0) + (v.get("ba_drops") or 0)
            if lost > 2:   # a write or two before both TUN devices are up is normal
                res["notes"].append(f"{where}{k} lost {lost} packets inside the line (no free slot or a "
                                    f"write error): {v}")
        res["satellite_delaylines" if "delaylines" in res else "delaylines"] = st


if __name__ == "__main__":
    sys.exit(main())
