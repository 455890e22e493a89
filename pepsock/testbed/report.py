"""Turn the results of `pep eval` into report.md, CSV files and PNG plots.

    python -m pepsock.testbed.report DIR     # rebuild DIR/report.md etc. from DIR/results.json
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
from statistics import mean

GOODPUT_FACTOR = 1448 / 1514      # TCP payload per Ethernet frame (timestamps on), what TBF counts
TRANSFER_EXPS = ("validate", "step", "bigq", "spike", "mmwave", "upload", "ipv6")
QDISC_ORDER = ("kernel", "fifo", "codel", "fq_codel")
QDISC_NAME = {"kernel": "kernel TBF+bfifo", "fifo": "FIFO", "codel": "CoDel", "fq_codel": "FQ-CoDel"}


def qd(run) -> str:
    """The bottleneck queue of a run (runs from before the user-space link: the kernel's)."""
    return run.get("qdisc", "kernel")


def cases(runs, exps=TRANSFER_EXPS) -> list[tuple[str, str]]:
    """(experiment, qdisc) pairs present, in report order."""
    have = {(r["experiment"], qd(r)) for r in runs}
    return [(e, q) for e in exps for q in QDISC_ORDER if (e, q) in have]
# two-sided 95% Student t quantiles, df = 1..30 (then ~1.96)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042]


# ---------------------------------------------------------------------------
# statistics

def mean_ci(xs) -> tuple[float, float, int]:
    """(mean, half width of the 95% confidence interval, n); half width is nan for n < 2."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    if n < 2:
        return m, float("nan"), n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
    return m, t * sd / math.sqrt(n), n


def pct(xs, p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio_ci(a, b, n_boot: int = 2000, seed: int = 1) -> tuple[float, float, float]:
    """mean(a)/mean(b) with a 95% bootstrap interval (resampling runs)."""
    a, b = [x for x in a if x == x], [x for x in b if x == x]
    if not a or not b:
        return float("nan"), float("nan"), float("nan")
    r = mean(a) / mean(b)
    if len(a) < 2 or len(b) < 2:
        return r, float("nan"), float("nan")
    rng = random.Random(seed)
    boots = sorted(mean(rng.choices(a, k=len(a))) / mean(rng.choices(b, k=len(b))) for _ in range(n_boot))
    return r, boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def fmt(x, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def fmt_ci(m, h, nd: int = 2) -> str:
    if m != m:
        return "–"
    return f"{m:.{nd}f} ± {h:.{nd}f}" if h == h else f"{m:.{nd}f}"


# ---------------------------------------------------------------------------
# per-run derived numbers

def run_fct(run) -> float:
    """Completion time of the run: from the first flow's start to the last flow's end (s)."""
    fl = run["flows"]
    if not fl or not all(f.get("complete") for f in fl):
        return float("nan")
    return max(f["t_end"] for f in fl) - min(f["t_start"] for f in fl)


def mean_flow_fct(run) -> float:
    fl = run["flows"]
    if not fl or not all(f.get("complete") for f in fl):
        return float("nan")
    return mean(f["fct"] for f in fl)


def jain(run) -> float:
    xs = [f["bytes"] / f["fct"] for f in run["flows"] if f.get("complete") and f["fct"] > 0]
    if not xs:
        return float("nan")
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def goodput_series(run, bin_s: float = 0.1) -> list[tuple[float, float]]:
    """Aggregate goodput (Mbit/s) per bin, on the run's time line (s since start)."""
    agg: dict[int, int] = {}
    for f in run["flows"]:
        for b, n in f.get("bins", []):
            agg[b] = agg.get(b, 0) + n
    if not agg:
        return []
    lo, hi = min(agg), max(agg)
    return [(b * bin_s, agg.get(b, 0) * 8 / bin_s / 1e6) for b in range(lo, hi + 1)]


def interactive(run, interval: float = 0.05, lead: float = 0.5) -> dict:
    """One-way delays (ms) and loss of the UDP flow while the transfer ran."""
    fl = [f for f in run["flows"] if "t_start" in f]
    if not fl:
        return {"owd": [], "sent": 0, "lost": 0}
    t0 = min(f["t_start"] for f in fl)
    t1 = max(f.get("t_end", f["t_start"]) for f in fl)
    got = {q: (r - s) * 1000 for q, s, r in run.get("udp", []) if t0 <= s <= t1}
    expected = [q for q in range(0, 100000) if t0 <= -lead + q * interval <= t1]
    lost = sum(1 for q in expected if q not in got)
    return {"owd": list(got.values()), "sent": len(expected), "lost": lost}


def ideal_fct(schedule_changes, nbytes_total: float, t_first: float) -> float:
    """Fluid lower bound: nothing arrives before `t_first` (the 0-RTT time to first byte,
    R1 + 2 R2), then the link delivers at its scheduled rate (as goodput) until nbytes are in."""
    ch = sorted((max(0.0, tt), r) for tt, r in schedule_changes)
    if not ch:
        return float("nan")
    got = 0.0
    for i, (tt, r) in enumerate(ch):
        lo = max(tt, t_first)
        end = ch[i + 1][0] if i + 1 < len(ch) else float("inf")
        if end <= lo:
            continue
        rate = r * GOODPUT_FACTOR / 8
        if rate > 0 and got + rate * (end - lo) >= nbytes_total:
            return lo + (nbytes_total - got) / rate
        got += rate * (end - lo)
    return float("nan")


# ---------------------------------------------------------------------------
# CSV

def write_csvs(res: dict, out: str) -> list[str]:
    files = []

    def w(name, header, rows):
        path = os.path.join(out, name)
        with open(path, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(header)
            wr.writerows(rows)
        files.append(name)

    w("calibration.csv", ["metric", "configured", "measured", "error_pct", "ok"],
      [[r["metric"], r["configured"], r["measured"], r["error_pct"], r["ok"]] for r in res.get("calibration", [])])
    runs = res.get("runs", [])
    w("flows.csv", ["experiment", "mode", "rep", "flows_n", "flow", "bytes", "complete", "t_start_s",
                    "t_first_s", "t_end_s", "fct_s", "error"],
      [[r["experiment"], r["mode"], r["rep"], r["flows_n"], i, f.get("bytes"), f.get("complete"),
        f.get("t_start"), f.get("t_first"), f.get("t_end"), f.get("fct"), f.get("error", "")]
       for r in runs for i, f in enumerate(r["flows"])])
    w("goodput.csv", ["experiment", "mode", "rep", "flows_n", "t_s", "goodput_mbit"],
      [[r["experiment"], r["mode"], r["rep"], r["flows_n"], round(t, 3), round(g, 3)]
       for r in runs for t, g in goodput_series(r)])
    w("interactive.csv", ["experiment", "mode", "rep", "seq", "sent_s", "received_s", "owd_ms"],
      [[r["experiment"], r["mode"], r["rep"], q, round(s, 6), round(rv, 6), round((rv - s) * 1000, 3)]
       for r in runs for q, s, rv in r.get("udp", [])])
    w("rate_changes.csv", ["experiment", "mode", "rep", "t_s", "rate_mbit"],
      [[r["experiment"], r["mode"], r["rep"], round(t, 4), rt / 1e6] for r in runs for t, rt in r["rate_changes"]])
    w("ttfb.csv", ["mode", "rep", "ttfb_ms", "error"],
      [[r["mode"], r["rep"], r["ttfb_ms"], r.get("error", "")] for r in res.get("ttfb", [])])
    if res.get("tls"):
        w("tls.csv", ["mode", "rep", "ttfb_ms", "error"],
          [[r["mode"], r["rep"], r["ttfb_ms"], r.get("error", "")] for r in res["tls"]])
    sat = res.get("satellite")
    if sat:
        w("satellite_flows.csv", ["bytes", "mode", "rep", "complete", "t_start_s", "t_first_s", "t_end_s",
                                  "fct_s", "error"],
          [[r["bytes"], r["mode"], r["rep"], f.get("complete"), f.get("t_start"), f.get("t_first"),
            f.get("t_end"), f.get("fct"), f.get("error", "")] for r in sat.get("runs", []) for f in r["flows"]])
        w("satellite_ttfb.csv", ["protocol", "mode", "rep", "ttfb_ms", "error"],
          [[proto, r["mode"], r["rep"], r["ttfb_ms"], r.get("error", "")]
           for proto in ("tcp", "tls") for r in sat.get("ttfb" if proto == "tcp" else "tls", [])])
    return files


# ---------------------------------------------------------------------------
# plots

MODE_COLOR = {"e2e": "tab:blue", "pep": "tab:orange"}
MODE_NAME = {"e2e": "end to end", "pep": "through the PEP"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def representative(runs):
    """The run whose completion time is the median of its group (what a timeline shows)."""
    ok = [r for r in runs if run_fct(r) == run_fct(r)]
    if not ok:
        return runs[0] if runs else None
    ok.sort(key=run_fct)
    return ok[(len(ok) - 1) // 2]


def plot_timeline(res, exp: str, path: str, title: str, qdiscs=None) -> bool:
    """One panel per (path, queue): the thesis's figure 5.1 layout when given fifo and fq_codel."""
    runs = [r for r in res.get("runs", []) if r["experiment"] == exp and (qdiscs is None or qd(r) in qdiscs)]
    panels = [(m, q) for m in ("e2e", "pep") for q in QDISC_ORDER
              if any(r["mode"] == m and qd(r) == q for r in runs)]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.9 * len(panels)), sharex=True, squeeze=False)
    shown = [representative([r for r in runs if r["mode"] == m and qd(r) == q]) for m, q in panels]
    owd_top = max([(r - s) * 1000 for run in shown for _, s, r in run.get("udp", [])] + [1.0]) * 1.05
    for ax, (mode, q), run in zip(axes[:, 0], panels, shown):
        g = goodput_series(run)
        ax.plot([t for t, _ in g], [x for _, x in g], color=MODE_COLOR[mode], lw=1.2,
                label="goodput (100 ms bins)")
        # configured rate (as goodput) as a step line
        ch = sorted(run["rate_changes"])
        if ch:
            t_end = max([t for t, _ in g] + [ch[-1][0] + 1])
            xs, ys = [], []
            for i, (t, r) in enumerate(ch):
                nxt = ch[i + 1][0] if i + 1 < len(ch) else t_end
                xs += [t, nxt]
                ys += [r / 1e6 * GOODPUT_FACTOR] * 2
            ax.plot(xs, ys, color="gray", ls="--", lw=1, label="link rate (as goodput)")
            # mark the rate changes; on a busy trace only the large ones (>= 15 Mbit/s, outages)
            big = len(ch) > 12
            for (t0, r0), (t, r) in zip(ch, ch[1:]):
                if not big or abs(r - r0) >= 15e6 or (r == 0) != (r0 == 0):
                    ax.axvline(t, color="red", lw=0.8, alpha=0.6)
        fl = [f for f in run["flows"] if "t_start" in f]
        if fl:
            ax.axvline(min(f["t_start"] for f in fl), color="red", lw=1.5)
            ends = [f["t_end"] for f in fl if "t_end" in f]
            if ends:
                ax.axvline(max(ends), color="red", lw=1.5)
        ax.set_ylabel("Mbit/s")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        udp = run.get("udp", [])
        ax2.scatter([s for _, s, _ in udp], [(r - s) * 1000 for _, s, r in udp], s=4, color="tab:green",
                    label="interactive one-way delay")
        ax2.set_ylabel("one-way delay (ms)", color="tab:green")
        ax2.set_ylim(0, owd_top)          # one scale for every panel, so they compare
        fct = run_fct(run)
        ax.set_title(f"{MODE_NAME[mode]} over {QDISC_NAME[q]} — rep {run['rep'] + 1}, completion {fmt(fct, 2)} s",
                     fontsize=10)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("time since the transfer was started (s); thick red: start and end; thin red: rate changes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fct(res, path: str) -> bool:
    cs = cases(res.get("runs", []))
    if not cs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(cs)), 4))
    width = 0.38
    for j, mode in enumerate(("e2e", "pep")):
        ms, hs = [], []
        for e, q in cs:
            m, h, _ = mean_ci(run_fct(r) for r in res["runs"]
                              if r["experiment"] == e and qd(r) == q and r["mode"] == mode)
            ms.append(m)
            hs.append(0 if h != h else h)
        xs = [i + (j - 0.5) * width for i in range(len(cs))]
        ax.bar(xs, ms, width, yerr=hs, capsize=4, color=MODE_COLOR[mode], label=MODE_NAME[mode])
    ax.set_xticks(range(len(cs)), [f"{e}\n{QDISC_NAME[q]}" for e, q in cs], fontsize=7)
    ax.set_ylabel("flow completion time (s), mean ± 95% CI")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_flows(res, path: str) -> bool:
    runs = [r for r in res.get("runs", []) if r["experiment"] == "flows"]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ns = sorted({r["flows_n"] for r in runs})
    qs = [q for q in QDISC_ORDER if any(qd(r) == q for r in runs)]
    styles = {"kernel": ":", "fifo": "-", "codel": "-.", "fq_codel": "--"}
    for q in qs:
        for mode in ("e2e", "pep"):
            pts = [(n, *mean_ci(run_fct(r) for r in runs if r["flows_n"] == n and r["mode"] == mode and qd(r) == q))
                   for n in ns]
            pts = [p for p in pts if p[3] > 0]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[0 if p[2] != p[2] else p[2] for p in pts], marker="o", capsize=4,
                            color=MODE_COLOR[mode], ls=styles[q], label=f"{MODE_NAME[mode]}, {QDISC_NAME[q]}")
    ax.set_xlabel("competing bulk flows")
    ax.set_ylabel("time until all flows finished (s)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


TTFB_ORDER = ["direct", "tfo", "pep", "aio", "pep-otfo", "pep-syn", "pep-hs", "pep-notfo", "connect", "socks5"]
TTFB_NAME = {"direct": "direct", "tfo": "direct + TFO",
             "pep": "PEP 0-RTT, request in the SYN (pepsock.create_connection, request_in_syn=True)",
             "aio": "PEP 0-RTT, request in the SYN (pepsock.open_connection + write)",
             "pep-syn": "PEP 0-RTT, request in the SYN (hand-built RFC 8803 SYN)",
             "pep-hs": "PEP 0-RTT, old way (create_connection returns after the handshake)",
             "pep-notfo": "PEP, client TFO off (request_in_syn=True)",
             "pep-otfo": "PEP 0-RTT + onward TFO to a TFO server (request_in_syn=True, the relay's default)",
             "connect": "HTTP CONNECT", "socks5": "SOCKS5"}


def ttfb_formula(mode: str, r1: float, r2: float) -> float:
    # With the request in the SYN behind the Convert header (RFC 8803's 0-RTT), the PEP
    # forwards it once its onward connect is done: R1 + 2 R2.  The old way (pep-hs):
    # create_connection returns once the handshake with the PEP is done, so the request
    # leaves one R1 after the header and waits for that or the PEP's onward connect (R2),
    # whichever is later.  Without client TFO there is no SYN data: the header and the
    # request follow the handshake (TCP_NODELAY until the reply, so no Nagle wait): 2R1+2R2.
    # pep-otfo: the relay also puts the client's payload in its own SYN to the server (TFO,
    # once it holds the server's cookie): the request reaches the server R1/2+R2/2 after the
    # start and the answer is back at R1+R2, as direct TFO, with the PEP in the middle.
    return {"direct": 2 * r1 + 2 * r2, "tfo": r1 + r2, "pep": r1 + 2 * r2, "aio": r1 + 2 * r2,
            "pep-otfo": r1 + r2,
            "pep-syn": r1 + 2 * r2, "pep-hs": r1 + r2 + max(r1, r2), "pep-notfo": 2 * r1 + 2 * r2,
            "connect": 3 * r1 + 2 * r2, "socks5": 4 * r1 + 2 * r2}[mode]


# HTTPS (TLS 1.3): TCP handshake, TLS handshake (1 RTT), request -> first byte. pepsock's
# no-wait paths put the ClientHello in the SYN behind the Convert header: the PEP forwards it
# once its onward connect is done, the ServerHello is back at R1+2R2, the Finished and the
# request take one more R1+R2: 2R1+3R2. libpep.so (curl-libpep) and pepsock's old way (pep-hs:
# create_connection with a timeout) send the ClientHello right after the TCP handshake with the
# PEP, before its reply, so it waits for that handshake or the PEP's onward connect, whichever
# is later: 2R1+2R2+max(R1,R2) (equal to 2R1+3R2 when R2 >= R1). pep-wait is the stdlib's
# wrap_socket of a PepSocket, which waits for the reply: 3R1+3R2, as direct.
_PEP_TLS_SYN = ("2R1+3R2", lambda a, b: 2 * a + 3 * b)
_PEP_TLS = ("2R1+2R2+max(R1,R2)", lambda a, b: 2 * a + 2 * b + max(a, b))
TLS_ORDER = ["direct", "curl", "pep", "aio", "pep-hs", "curl-libpep", "pep-wait", "connect", "socks5"]
TLS_NAME = {"direct": "direct (Python ssl)", "curl": "direct (curl)",
            "pep": "pepsock sync + ssl (pep_aware), ClientHello in the SYN",
            "aio": "pepsock asyncio (ssl=), ClientHello in the SYN",
            "pep-hs": "pepsock sync + ssl (pep_aware), old way (connect returns after the handshake)",
            "curl-libpep": "curl + libpep.so",
            "pep-wait": "pepsock sync + stdlib wrap_socket (waits for the reply)",
            "connect": "HTTP CONNECT + TLS", "socks5": "SOCKS5 + TLS"}
TLS_FORMULA = {"direct": ("3R1+3R2", lambda a, b: 3 * a + 3 * b), "curl": ("3R1+3R2", lambda a, b: 3 * a + 3 * b),
               "pep": _PEP_TLS_SYN, "aio": _PEP_TLS_SYN, "pep-hs": _PEP_TLS, "curl-libpep": _PEP_TLS,
               "pep-wait": ("3R1+3R2", lambda a, b: 3 * a + 3 * b),
               "connect": ("4R1+3R2", lambda a, b: 4 * a + 3 * b), "socks5": ("5R1+3R2", lambda a, b: 5 * a + 3 * b)}

TTFB_TEXT = {"direct": "2R1+2R2", "tfo": "R1+R2", "pep": "R1+2R2", "aio": "R1+2R2", "pep-syn": "R1+2R2",
             "pep-otfo": "R1+R2",
             "pep-hs": "R1+R2+max(R1,R2)", "pep-notfo": "2R1+2R2",
             "connect": "3R1+2R2", "socks5": "4R1+2R2"}


def plot_ttfb(res, r1, r2, path: str) -> bool:
    rows = res.get("ttfb", [])
    modes = [m for m in TTFB_ORDER if any(r["mode"] == m for r in rows)]
    if not modes:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, m in enumerate(modes):
        mm, h, _ = mean_ci(r["ttfb_ms"] for r in rows if r["mode"] == m)
        ax.bar(i, mm, 0.6, yerr=0 if h != h else h, capsize=4,
               color="tab:orange" if m.startswith("pep") else "tab:blue")
        f = ttfb_formula(m, r1, r2)
        ax.hlines(f, i - 0.35, i + 0.35, color="black", lw=2)
        ax.text(i, f + 2, TTFB_TEXT[m], ha="center", fontsize=8)
    ax.set_xticks(range(len(modes)), [TTFB_NAME[m] for m in modes], fontsize=8)
    ax.set_ylabel("time to first byte (ms), mean ± 95% CI")
    ax.set_title(f"bars: measured; black lines: formula (R1 = {r1:.1f} ms, R2 = {r2:.1f} ms, measured)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_owd_cdf(res, path: str) -> bool:
    """Interactive one-way delay CDFs: one panel per experiment, a line per (path, queue)."""
    runs = [r for r in res.get("runs", []) if r.get("udp")]
    exps = [e for e in TRANSFER_EXPS if any(r["experiment"] == e for r in runs)]
    if not exps:
        return False
    plt = _plt()
    ncols = min(3, len(exps))
    nrows = math.ceil(len(exps) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(exps):]:
        ax.set_visible(False)
    styles = {"kernel": ":", "fifo": "-", "codel": "-.", "fq_codel": "--"}
    for ax, e in zip(axes.flat, exps):
        for q in QDISC_ORDER:
            for mode in ("e2e", "pep"):
                xs = sorted(x for r in runs if r["experiment"] == e and qd(r) == q and r["mode"] == mode
                            for x in interactive(r)["owd"])
                if xs:
                    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], styles[q], color=MODE_COLOR[mode],
                            label=f"{MODE_NAME[mode]}, {QDISC_NAME[q]}")
        ax.set_xscale("log")
        ax.set_xlabel("interactive one-way delay (ms, log)")
        ax.set_ylabel("CDF")
        ax.set_title(e, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summarize(res: dict) -> dict:
    """The headline numbers (also what eval prints and the tests check)."""
    runs = res.get("runs", [])
    out: dict = {"transfers": {}, "flows": {}, "ttfb": {}}
    cal = {r["metric"]: r for r in res.get("calibration", [])}
    r1 = cal.get("R1 client-PEP RTT (ms)", {}).get("measured", res["settings"]["r1_ms"])
    r2 = cal.get("R2 PEP-server RTT (ms)", {}).get("measured", res["settings"]["r2_ms"])
    out["r1"], out["r2"] = r1, r2
    for e, q in cases(runs):
        d = {}
        for mode in ("e2e", "pep"):
            rs = [r for r in runs if r["experiment"] == e and qd(r) == q and r["mode"] == mode]
            if not rs:
                continue
            fcts = [run_fct(r) for r in rs]
            owd = [x for r in rs for x in interactive(r)["owd"]]
            p99s = [pct(interactive(r)["owd"], 99) for r in rs if interactive(r)["owd"]]
            sent = sum(interactive(r)["sent"] for r in rs if r.get("udp"))
            lost = sum(interactive(r)["lost"] for r in rs if r.get("udp"))
            d[mode] = {"fct": mean_ci(fcts), "fcts": fcts, "goodput": mean_ci(
                           r["bytes"] * r["flows_n"] * 8 / f / 1e6 for r, f in zip(rs, fcts) if f == f), "incomplete": sum(1 for f in fcts if f != f),
                       "owd_med": pct(owd, 50), "owd_p95": pct(owd, 95), "owd_p99": pct(owd, 99),
                       "owd_p99_runs": mean_ci(p99s), "queue_bytes": rs[0].get("queue_bytes"), "loss_pct": 100 * lost / sent if sent else float("nan"),
                       "ideal": ideal_fct(rs[0]["rate_changes"], rs[0]["bytes"] * rs[0]["flows_n"],
                                          (r1 + 2 * r2) / 1000)}
        if "e2e" in d and "pep" in d:
            d["ratio"] = ratio_ci(d["pep"]["fcts"], d["e2e"]["fcts"])
        if d:
            out["transfers"][(e, q)] = d
    fr = [r for r in runs if r["experiment"] == "flows"]
    for n in sorted({r["flows_n"] for r in fr}):
        for q, mode in ((q, m) for q in QDISC_ORDER for m in ("e2e", "pep")):
            rs = [r for r in fr if r["flows_n"] == n and r["mode"] == mode and qd(r) == q]
            if rs:
                out["flows"][(n, q, mode)] = {"all": mean_ci(run_fct(r) for r in rs),
                                           "mean": mean_ci(mean_flow_fct(r) for r in rs),
                                           "jain": mean_ci(jain(r) for r in rs)}
    out["ttfb"] = summarize_ttfb(res.get("ttfb", []), r1, r2)
    out["tls"] = summarize_tls(res.get("tls", []), r1, r2)
    sat = res.get("satellite")
    if sat:
        scal = {r["metric"]: r for r in sat.get("calibration", [])}
        sr1 = scal.get("R1 client-PEP RTT (ms)", {}).get("measured", sat["settings"]["r1_ms"])
        sr2 = scal.get("R2 PEP-server RTT (ms)", {}).get("measured", sat["settings"]["r2_ms"])
        fct = {}
        for size in sorted({r["bytes"] for r in sat.get("runs", [])}):
            d = {}
            for mode in ("e2e", "pep"):
                fcts = [run_fct(r) for r in sat["runs"] if r["bytes"] == size and r["mode"] == mode]
                if fcts:
                    d[mode] = {"fct": mean_ci(fcts), "fcts": fcts, "incomplete": sum(1 for f in fcts if f != f)}
            if "e2e" in d and "pep" in d:
                d["ratio"] = ratio_ci(d["pep"]["fcts"], d["e2e"]["fcts"])
            fct[size] = d
        out["satellite"] = {"r1": sr1, "r2": sr2, "fct": fct, "ttfb": summarize_ttfb(sat.get("ttfb", []), sr1, sr2),
                            "tls": summarize_tls(sat.get("tls", []), sr1, sr2)}
    return out


def summarize_ttfb(rows, r1: float, r2: float) -> dict:
    out = {}
    for m in TTFB_ORDER:
        xs = [r["ttfb_ms"] for r in rows if r["mode"] == m and r["ttfb_ms"] is not None]
        errs = sum(1 for r in rows if r["mode"] == m and r["ttfb_ms"] is None)
        if xs or errs:
            out[m] = {"ci": mean_ci(xs), "median": pct(xs, 50), "formula": ttfb_formula(m, r1, r2),
                      "errors": errs}
    return out


def summarize_tls(rows, r1: float, r2: float) -> dict:
    out = {}
    for m in TLS_ORDER:
        xs = [r["ttfb_ms"] for r in rows if r["mode"] == m and r["ttfb_ms"] is not None]
        errs = sum(1 for r in rows if r["mode"] == m and r["ttfb_ms"] is None)
        if xs or errs:
            text, f = TLS_FORMULA[m]
            out[m] = {"ci": mean_ci(xs), "median": pct(xs, 50), "formula": f(r1, r2), "text": text,
                      "errors": errs}
    return out


def _ttfb_table(L: list, ttfb: dict, names: dict | None = None) -> None:
    L.append("| method | formula | formula (ms) | measured mean ± CI (ms) | median | vs formula | failures |")
    L.append("|---|---|---|---|---|---|---|")
    for m, x in ttfb.items():
        dev = (x["ci"][0] - x["formula"]) / x["formula"] * 100 if x["ci"][2] else float("nan")
        L.append(f"| {(names or TTFB_NAME)[m]} | {x.get('text') or TTFB_TEXT[m]} | {x['formula']:.1f} | {fmt_ci(*x['ci'][:2])} | "
                 f"{fmt(x['median'], 2)} | {fmt(dev, 1)}% | {x['errors']} |")
    L.append("")


def plot_sat_fct(S, path: str) -> bool:
    fct = S.get("satellite", {}).get("fct", {})
    sizes = [n for n in fct if fct[n]]
    if not sizes:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, mode in enumerate(("e2e", "pep")):
        ms = [fct[n].get(mode, {}).get("fct", (float("nan"), 0, 0))[0] for n in sizes]
        hs = [fct[n].get(mode, {}).get("fct", (0, 0, 0))[1] for n in sizes]
        ax.bar([i + (j - 0.5) * width for i in range(len(sizes))], ms, width,
               yerr=[0 if h != h else h for h in hs], capsize=4, color=MODE_COLOR[mode], label=MODE_NAME[mode])
    ax.set_xticks(range(len(sizes)), [f"{n / 1e6:g} MB" for n in sizes])
    ax.set_ylabel("flow completion time (s), mean ± 95% CI")
    ax.set_title("GEO satellite hop: FCT per transfer size", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(res: dict, out: str, *, narrative: str | None = None) -> str:
    os.makedirs(out, exist_ok=True)
    csvs = write_csvs(res, out)
    S = summarize(res)
    r1, r2 = S["r1"], S["r2"]
    pngs = []
    runs = res.get("runs", [])
    for exp, title in (("validate", "Validation: the step case on the kernel TBF+bfifo and the user-space FIFO"),
                       ("step", "Step 10 -> 75 Mbit/s: bulk transfer and interactive UDP flow"),
                       ("bigq", "The step case with a 4x larger bottleneck queue"),
                       ("spike", "Spike to 75 Mbit/s and a 1 s outage on a 20 Mbit/s link"),
                       ("mmwave", "mmWave-like trace with blockage outages"),
                       ("upload", "Upload (client -> server), the uplink stepping 10 -> 75 Mbit/s"),
                       ("ipv6", "The step case over IPv6")):
        qs = [q for q in QDISC_ORDER if any(r["experiment"] == exp and qd(r) == q for r in runs)]
        name = f"timeline_{exp}.png" if exp == "validate" or qs in ([], ["kernel"]) else \
            f"timeline_{exp}_{'_vs_'.join(qs)}.png"
        if plot_timeline(res, exp, os.path.join(out, name), title):
            pngs.append((name, title + (f" ({', '.join(QDISC_NAME[q] for q in qs)})" if qs else "")))
    if plot_fct(res, os.path.join(out, "fct.png")):
        pngs.append(("fct.png", "Flow completion time, mean ± 95% CI"))
    if plot_flows(res, os.path.join(out, "flows.png")):
        pngs.append(("flows.png", "1..10 competing flows"))
    if plot_ttfb(res, r1, r2, os.path.join(out, "ttfb.png")):
        pngs.append(("ttfb.png", "Time to first byte vs formula"))
    if plot_owd_cdf(res, os.path.join(out, "interactive_cdf.png")):
        pngs.append(("interactive_cdf.png", "Interactive one-way delay, CDF"))

    s = res["settings"]
    L = []
    L.append("# pep eval: end to end vs through the PEP\n")
    L.append(f"Run {res.get('started', '')}, {res.get('duration_s', 0):.0f} s of wall time, "
             f"{'quick' if s.get('quick') else 'full'} mode.\n")
    if res.get("timings_s"):
        est = res.get("estimate_s", {})
        L.append("Wall time per part (s, measured / estimated at the start): " + ", ".join(
            f"{k} {v:.0f} / {est.get(k, float('nan')):.0f}" for k, v in res["timings_s"].items()) + ".\n")
    if narrative:
        L.append(narrative.strip() + "\n")
    L.append("## Targets\n")
    L.append("| target | measured | verdict |\n|---|---|---|")
    for line in targets(S):
        L.append(line)
    L.append("")
    L.append("## Settings\n")
    L.append("```\nclient --[wireless: R1, bottleneck]-- wrouter -- pep -- drouter --[wired: R2]-- server\n```\n")
    L.append("| setting | value |\n|---|---|")
    nice = {
        "kernel": "kernel", "machine": "machine", "python": "python", "cc": "congestion control (TCP_CONGESTION on agent and relay sockets)",
        "r1_ms": "R1, client-PEP RTT (ms, delay line in wrouter)", "r2_ms": "R2, PEP-server RTT (ms, delay line in drouter)",
        "wired_mbit": "wired link, server -> PEP (Mbit/s, drouter)", "queue_bytes": "bottleneck FIFO limit (bytes)",
        "wired_queue_bytes": "wired FIFO limit (bytes)", "tfo": "net.ipv4.tcp_fastopen (every namespace)",
        "delay_impl": "delay line implementation", "trace": "step experiment schedule",
        "step_bytes": "step: bytes per transfer", "bigq": "bigq (the step case, larger queue)", "spike_bytes": "spike: bytes per transfer",
        "mmwave_bytes": "mmwave: bytes per transfer", "flow_bytes": "flows: bytes per flow",
        "flows": "flows: numbers of competing flows", "reps": "repetitions (step, spike, mmwave)",
        "flows_reps": "repetitions (flows)", "ttfb_reps": "repetitions (ttfb, per method)",
        "interactive": "interactive flow", "pep": "PEP (relay)",
        "qdiscs": "bottleneck queues compared (validate: kernel TBF+bfifo and FIFO)",
        "qdiscs_per_experiment": "queues per experiment",
        "uplink_mbit": "uplink, client -> PEP (Mbit/s, user-space link, same queue kind)",
    }
    for k, name in nice.items():
        if k in s:
            L.append(f"| {name} | {s[k]} |")
    L.append("| offloads | TSO, GSO, GRO off on every veth |")
    L.append("| wireless rate | user-space link (FIFO, CoDel, FQ-CoDel): the delay line in wrouter serializes at the "
             "scheduled rate (changes applied in the line at their time; an outage is 0 bit/s) and the wired "
             "side gets the same queue kind; kernel: TBF (+ bfifo child) on wrouter's egress, changed over "
             "netlink (pyroute2), an outage is 8 kbit/s |")
    L.append("| FQ-CoDel | RFC 8290: 1024 queues by 5-tuple hash, DRR quantum 1514 B, new/old flow lists, CoDel "
             "target 5 ms / interval 100 ms per queue, 10240-packet limit, overflow drops from the fattest queue |")
    L.append("")
    L.append("## Calibration\n")
    L.append(f"Measured against configured, on the {QDISC_NAME.get(s.get('qdisc'), 'first')} bottleneck: idle ping RTTs; the goodput of one cubic flow with the bottleneck queue raised to 2 end-to-end BDPs for the measurement (so it measures the link, not TCP), expected = rate x 1448/1514 (TCP payload per Ethernet frame: both TBF and the user-space link count the 14-byte Ethernet header).\n")
    L.append("| metric | configured | measured | error | within 10% |\n|---|---|---|---|---|")
    for r in res.get("calibration", []):
        err = f"{r['error_pct']:+.1f}%" if isinstance(r["error_pct"], (int, float)) else ""
        ok = {True: "yes", False: "**no**", "": ""}.get(r["ok"], str(r["ok"]))
        meas = fmt(r["measured"], 2) if isinstance(r["measured"], float) else r["measured"]
        L.append(f"| {r['metric']} | {r['configured']} | {meas} | {err} | {ok} |")
    L.append("")
    dls = res.get("delaylines") or {}
    if dls:
        names = {"delayline0": "wireless (wrouter)", "delayline1": "wired (drouter)"}
        L.append("Delay lines over the whole run (a = towards the server, b = towards the client): packets, "
                 "drops, the worst lateness of a release behind its due time, and CPU time used.\n")
        L.append("| delay line | packets a / b | drops | worst lateness a / b (ms) | CPU (s) |\n|---|---|---|---|---|")
        for k, v in dls.items():
            if not v:
                continue
            L.append(f"| {names.get(k, k)} | {v.get('ab_in')} / {v.get('ba_in')} | "
                     f"{(v.get('ab_drops') or 0) + (v.get('ba_drops') or 0)} | "
                     f"{v.get('ab_late_max_us', 0) / 1000:.1f} / {v.get('ba_late_max_us', 0) / 1000:.1f} | "
                     f"{v.get('cpu_s')} |")
        L.append("")
    lags = [r.get("schedule_lag_max_ms") for r in res.get("runs", []) if r.get("schedule_lag_max_ms") is not None]
    if lags:
        L.append(f"Rate changes (netlink) were applied at most {max(lags):.1f} ms after their planned time "
                 f"(median of the per-run worst: {pct(lags, 50):.1f} ms).\n")
    if S["transfers"]:
        L.append("## Bulk transfers with an interactive flow, per bottleneck queue\n")
        L.append("FCT: mean ± 95% CI over repetitions (s). Ideal: the fluid bound (nothing before the 0-RTT "
                 "first byte at R1+2R2, then the link's scheduled rate as goodput). One-way delay (OWD) of the interactive flow while the transfer "
                 f"runs, pooled over repetitions; the propagation part is (R1+R2)/2 = {(r1 + r2) / 2:.1f} ms.\n")
        L.append("| experiment | queue | path | runs | limit (B) | FCT (s) | goodput (Mbit/s) | ideal (s) | OWD median (ms) | p95 | p99 | p99 per run (mean ± CI) | loss |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (e, q), d in S["transfers"].items():
            for mode in ("e2e", "pep"):
                if mode in d:
                    x = d[mode]
                    inc = f" ({x['incomplete']} incomplete)" if x["incomplete"] else ""
                    limit = x["queue_bytes"] if q in ("kernel", "fifo") else "10240 pkts"
                    L.append(f"| {e} | {QDISC_NAME[q]} | {MODE_NAME[mode]} | {x['fct'][2]}{inc} | {limit} | {fmt_ci(*x['fct'][:2])} | "
                             f"{fmt_ci(*x['goodput'][:2], nd=1)} | {fmt(x['ideal'], 2)} | "
                             f"{fmt(x['owd_med'])} | {fmt(x['owd_p95'])} | {fmt(x['owd_p99'])} | "
                             f"{fmt_ci(*x['owd_p99_runs'][:2], nd=1)} | {fmt(x['loss_pct'], 2)}% |")
            if "ratio" in d:
                r, lo, hi = d["ratio"]
                L.append(f"| {e} | {QDISC_NAME[q]} | **PEP / e2e FCT** | | | **{fmt(r, 3)}** (95% CI {fmt(lo, 3)}–{fmt(hi, 3)}) | | | | | | | |")
        L.append("")
    if S["flows"]:
        L.append("## Competing bulk flows (1..10), step schedule\n")
        L.append("Time until all flows finished, mean per-flow FCT, and Jain's fairness index of the flows' "
                 "goodputs (1 = fair); mean ± 95% CI over repetitions.\n")
        L.append("| flows | queue | path | all done (s) | mean flow FCT (s) | Jain |\n|---|---|---|---|---|---|")
        for (n, q, mode), x in S["flows"].items():
            L.append(f"| {n} | {QDISC_NAME[q]} | {MODE_NAME[mode]} | {fmt_ci(*x['all'][:2])} | {fmt_ci(*x['mean'][:2])} | "
                     f"{fmt_ci(*x['jain'][:2], nd=3)} |")
        L.append("")
    if S["ttfb"]:
        L.append("## Time to first byte\n")
        L.append(f"R1 = {r1:.2f} ms and R2 = {r2:.2f} ms as measured by the calibration pings; no other "
                 "traffic; wireless link at 75 Mbit/s. Request: a few bytes; TTFB runs from the start of "
                 "connecting to the first byte of the answer. pepsock's rows put the request in the SYN "
                 "behind the Convert header (docs/python.md, \"The request in the SYN\"); the pep-hs row "
                 "is the old way (create_connection with a timeout returns after the TCP handshake with "
                 "the PEP, then the request), which differs only when R1 > R2. The server's listener "
                 "takes TFO; the PEP rows go through a relay with --no-onward-tfo (R1+2R2: its SYN to "
                 "the server carries nothing), except the onward-TFO row: a second relay in its default "
                 "mode, which puts the client's payload in its own SYN once it holds the server's TFO "
                 "cookie (after the warm-up connections): R1+R2.\n")
        _ttfb_table(L, S["ttfb"])
    if S["tls"]:
        L.append("## HTTPS time to first byte\n")
        L.append("A TLS 1.3 handshake (self-signed certificate, not verified), then the request; TTFB from "
                 "the start of connecting to the first byte of the answer; the link idle at 75 Mbit/s. "
                 "curl's number is its time_starttransfer. Formula: TCP handshake + one TLS round trip + the "
                 "request. Through the PEP, pepsock (sync with its context made pepsock.tls.pep_aware, "
                 "asyncio open_connection(ssl=)) puts the ClientHello in the SYN behind the Convert header "
                 "(create_connection(request_in_syn=True), open_connection without a timeout): the PEP "
                 "forwards it once its onward connect is done, 2R1+3R2. curl + libpep.so and pepsock's old "
                 "way (create_connection with a timeout, the pep-hs row) send it right after the TCP "
                 "handshake with the PEP, before its reply, which overlaps the PEP's onward connect "
                 "(2R1+2R2+max(R1,R2): the same 2R1+3R2 when R2 >= R1, R1-R2 more when R1 > R2). The "
                 "stdlib's own wrap_socket of a PepSocket waits for the reply (the pep-wait row): 3R1+3R2, "
                 "as direct.\n")
        _ttfb_table(L, S["tls"], TLS_NAME)
    sat = S.get("satellite")
    if sat:
        ss = res["satellite"]["settings"]
        L.append("## GEO satellite\n")
        L.append(f"The satellite hop is the client-PEP hop: R1 = {sat['r1']:.1f} ms measured ({ss['r1_ms']:g} "
                 f"configured), {ss['wireless_mbit']:g} Mbit/s down and {ss['uplink_mbit']:g} up, FIFO of "
                 f"{ss['queue_bytes']} bytes each way, random loss {ss['loss_down']:g} each way (seeded); the "
                 f"ground side R2 = {sat['r2']:.1f} ms at {ss['wired_mbit']:g} Mbit/s. Congestion control: "
                 f"the endpoints {ss['cc']}, the PEP {ss['pep_client_cc']} towards the satellite and "
                 f"{ss['pep_server_cc']} towards the server. Socket buffers up to {ss['tcp_buf_max'] >> 20} MB.\n")
        L.append("| size | end to end FCT (s) | through the PEP FCT (s) | PEP / e2e |\n|---|---|---|---|")
        for n, d in sat["fct"].items():
            e, p = d.get("e2e"), d.get("pep")
            r = d.get("ratio", (float("nan"),) * 3)
            inc = lambda x: f" ({x['incomplete']} incomplete)" if x and x["incomplete"] else ""  # noqa: E731
            L.append(f"| {n / 1e6:g} MB | {fmt_ci(*e['fct'][:2]) if e else '–'}{inc(e)} | "
                     f"{fmt_ci(*p['fct'][:2]) if p else '–'}{inc(p)} | {fmt(r[0], 3)} |")
        L.append("")
        if sat["ttfb"]:
            L.append("Time to first byte over the satellite hop (link idle):\n")
            _ttfb_table(L, sat["ttfb"])
        if sat.get("tls"):
            L.append("HTTPS time to first byte over the satellite hop (as in the HTTPS section above):\n")
            _ttfb_table(L, sat["tls"], TLS_NAME)
        if plot_sat_fct(S, os.path.join(out, "sat_fct.png")):
            pngs.append(("sat_fct.png", "GEO satellite: FCT per size"))
        if plot_ttfb({"ttfb": res["satellite"].get("ttfb", [])}, sat["r1"], sat["r2"],
                     os.path.join(out, "sat_ttfb.png")):
            pngs.append(("sat_ttfb.png", "GEO satellite: time to first byte vs formula"))
    if pngs:
        L.append("## Plots\n")
        for p, t in pngs:
            L.append(f"### {t}\n\n![{t}]({p})\n")
    notes = res.get("notes", [])
    if notes:
        L.append("## Notes from the run\n")
        L += [f"- {n}" for n in notes]
        L.append("")
    L.append("## Files\n")
    L.append("Raw data: " + ", ".join(f"[{c}]({c})" for c in csvs) + ", and `results.json` (everything, "
             "rebuild this page with `python -m pepsock.testbed.report DIR`).\n")
    text = "\n".join(L) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def _get(S, e, q):
    return S["transfers"].get((e, q), {})


def _ttfb_targets(t: dict, r1: float, where: str) -> list[str]:
    """RFC 8803's 0-RTT (the request in the SYN, when measured) within 10% of R1+2R2, and
    how far each PEP method is below direct (about R1 is the protocol's gain)."""
    lines = []
    key = "pep" if "pep" in t and t["pep"]["ci"][2] else "pep-syn"
    if key in t and t[key]["ci"][2]:
        m, f = t[key]["ci"][0], t[key]["formula"]
        dev = (m - f) / f * 100
        lines.append(f"| {where}TTFB {TTFB_NAME[key]} within 10% of {TTFB_TEXT[key]} | {m:.1f} ms vs {f:.1f} ms "
                     f"({dev:+.1f}%) | {'met' if abs(dev) <= 10 else '**missed**'} |")
        if "direct" in t and t["direct"]["ci"][2]:
            for k in dict.fromkeys((key, "aio")):
                if k in t and t[k]["ci"][2]:
                    gain = t["direct"]["ci"][0] - t[k]["ci"][0]
                    lines.append(f"| {where}TTFB {TTFB_NAME[k]} at least 0.9 R1 below direct | {gain:.1f} ms below "
                                 f"(R1 = {r1:.1f} ms) | {'met' if gain >= 0.9 * r1 else '**missed**'} |")
    else:
        lines.append(f"| {where}TTFB PEP 0-RTT within 10% of R1+2R2, about R1 below direct | not measured | "
                     "**not measured** |")
    if "pep-otfo" in t and t["pep-otfo"]["ci"][2]:
        m, f = t["pep-otfo"]["ci"][0], t["pep-otfo"]["formula"]
        dev = (m - f) / f * 100
        lines.append(f"| {where}TTFB through the PEP with onward TFO (a TFO server) within 10% of R1+R2 | "
                     f"{m:.1f} ms vs {f:.1f} ms ({dev:+.1f}%) | {'met' if abs(dev) <= 10 else '**missed**'} |")
    return lines


def _reach(d: dict) -> str:
    """For an FCT ratio over 0.7: what even a perfect PEP could give, the fluid bound (the
    link's own schedule from the 0-RTT first byte on) over the measured end-to-end FCT."""
    if not ("ratio" in d and d["ratio"][0] > 0.7 and "pep" in d and "e2e" in d):
        return ""
    bound = d["pep"]["ideal"] / d["e2e"]["fct"][0]
    if bound != bound:
        return ""
    return f"; the fluid bound allows at best {fmt(bound, 3)}" + (" (out of reach)" if bound > 0.7 else "")


def targets(S) -> list[str]:
    lines = []
    # the user-space FIFO against the kernel's TBF+bfifo (validation), within 5%
    k, f = _get(S, "validate", "kernel"), _get(S, "validate", "fifo")
    for mode in ("e2e", "pep"):
        if mode in k and mode in f:
            for what, nd in (("fct", 2), ("goodput", 1)):
                a, b = f[mode][what][0], k[mode][what][0]
                dev = (a - b) / b * 100 if b == b and b else float("nan")
                lines.append(f"| validation, {MODE_NAME[mode]}: user-space FIFO {what} within 5% of kernel TBF+bfifo | "
                             f"{fmt(a, nd)} vs {fmt(b, nd)} ({fmt(dev, 1)}%) | "
                             f"{'met' if abs(dev) <= 5 else '**missed**'} |")
    # the FCT target on the main case (FIFO; the kernel queue in older results)
    base = "fifo" if ("step", "fifo") in S["transfers"] else "kernel"
    st = _get(S, "step", base)
    if "ratio" in st:
        r, lo, hi = st["ratio"]
        ok = r <= 0.8
        miss = "" if ok else f" (missed by {r - 0.8:+.3f}, i.e. {(r / 0.8 - 1) * 100:.0f}% over)"
        lines.append(f"| step, {QDISC_NAME[base]}: FCT through the PEP ≤ 0.8 × end to end | {fmt(r, 3)} (CI {fmt(lo, 3)}–{fmt(hi, 3)}){miss} | "
                     f"{'met' if ok else '**missed**'} |")
    else:
        why = "the step experiment was not run" if not st else "no PEP runs"
        lines.append(f"| step: FCT through the PEP ≤ 0.8 × end to end | not measured ({why}) | **not measured** |")
    # the thesis's comparison: with FQ-CoDel the PEP keeps its gain and the interactive flow its delay
    for e in ("step", "spike", "mmwave", "bigq", "upload", "ipv6"):
        fq, fi = _get(S, e, "fq_codel"), _get(S, e, base)
        if "ratio" in fq:
            r, lo, hi = fq["ratio"]
            lines.append(f"| {e}, FQ-CoDel: FCT through the PEP ≤ 0.7 × end to end | {fmt(r, 3)} "
                         f"(CI {fmt(lo, 3)}–{fmt(hi, 3)}){_reach(fq)} | {'met' if r <= 0.7 else '**missed**'} |")
        fq_owd = "e2e" in fq and "pep" in fq and fq["pep"]["owd_p99"] == fq["pep"]["owd_p99"]
        if fq_owd:
            a, b = fq["pep"]["owd_p99"], fq["e2e"]["owd_p99"]
            lines.append(f"| {e}, FQ-CoDel: interactive p99 OWD through the PEP within 5 ms of end to end | "
                         f"{fmt(a)} ms vs {fmt(b)} ms ({a - b:+.1f} ms) | {'met' if a - b <= 5 else '**missed**'} |")
            if "pep" in fi:
                c = fi["pep"]["owd_p99"]
                lines.append(f"| {e}: interactive p99 through the PEP with FQ-CoDel far below FIFO's (≤ ½) | "
                             f"{fmt(a)} ms vs {fmt(c)} ms ({fmt(a / c * 100 if c else float('nan'), 0)}%) | "
                             f"{'met' if a <= c / 2 else '**missed**'} |")
        cd = _get(S, e, "codel")
        if "ratio" in cd:
            if cd["pep"]["owd_p99"] == cd["pep"]["owd_p99"]:     # an interactive flow ran
                others = ", ".join(f"{QDISC_NAME[q]} {fmt(_get(S, e, q)['pep']['owd_p99'])} ms"
                                   for q in (base, "fq_codel") if "pep" in _get(S, e, q))
                lines.append(f"| {e}, CoDel alone (no target; for comparison): FCT through the PEP / end to "
                             f"end; interactive p99 through the PEP | {fmt(cd['ratio'][0], 3)}; "
                             f"{fmt(cd['pep']['owd_p99'])} ms ({others}) | – |")
            else:
                lines.append(f"| {e}, CoDel alone (no target; for comparison): FCT through the PEP / end to "
                             f"end | {fmt(cd['ratio'][0], 3)} | – |")
        if not fq_owd and "e2e" in fi and "pep" in fi and e in ("step", "spike", "mmwave"):
            a, b = fi["pep"]["owd_p99"], fi["e2e"]["owd_p99"]
            lines.append(f"| {e}, {QDISC_NAME[base]}: interactive p99 OWD through the PEP ≤ end to end | {fmt(a)} ms vs "
                         f"{fmt(b)} ms ({a - b:+.1f} ms) | {'met' if a <= b else '**missed**'} |")
    lines += _ttfb_targets(S["ttfb"], S["r1"], "")
    sat = S.get("satellite")
    if sat:
        lines += _ttfb_targets(sat["ttfb"], sat["r1"], "satellite: ")
        for n, d in sat["fct"].items():
            if "ratio" in d:
                r = d["ratio"][0]
                lines.append(f"| satellite {n / 1e6:g} MB: FCT through the PEP below end to end | {fmt(r, 3)}× | "
                             f"{'met' if r < 1 else '**missed**'} |")
    return lines


if __name__ == "__main__":
    d = sys.argv[1]
    with open(os.path.join(d, "results.json")) as f:
        res = json.load(f)
    nar = None
    if os.path.exists(os.path.join(d, "narrative.md")):
        nar = open(os.path.join(d, "narrative.md")).read()
    print(write_report(res, d, narrative=nar))
