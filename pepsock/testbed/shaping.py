"""Bandwidth: a TBF with a bfifo child on a router's egress, its rate changed over
netlink (pyroute2) on a schedule, so nothing forks per change.

    root 1: tbf rate R burst B limit Q     <- the rate, changed on schedule
      qdisc 10: bfifo limit Q bytes        <- the bottleneck queue, fixed in bytes

Why TBF and not HTB: changing an HTB class's rate keeps its token deficit and its
wake-up time, so after an outage (a very low rate) the class stays asleep for as
long as one packet took at the low rate (1.5 s at 8 kbit/s): a testbed artefact.
tbf_change() refills the bucket on every change, so a new rate applies at once.
A TBF cannot do 0 bit/s; an outage is `OUTAGE_BPS`, with the bucket at one
frame: at most one packet leaves when the outage starts, then one per ~1.5 s.
"""
from __future__ import annotations

import os
import threading
import time

from .traces import Schedule

OUTAGE_BPS = 8_000


def _burst(rate_bps: float) -> int:
    # ~1 ms worth of bytes, at least one full frame: precise at 75 Mbit/s, no stalls at low rates.
    return max(1600, int(rate_bps / 8 / 1000))


class Shaper:
    """TBF + bfifo on `ifname` inside `host`'s namespace."""

    def __init__(self, host, ifname: str, rate_bps: float, queue_bytes: int):
        self.host, self.ifname, self.queue_bytes = host, ifname, int(queue_bytes)
        rate = max(OUTAGE_BPS, int(rate_bps))
        host.run("tc", "qdisc", "replace", "dev", ifname, "root", "handle", "1:", "tbf",
                 "rate", f"{rate}bit", "burst", str(_burst(rate)), "limit", str(self.queue_bytes))
        host.run("tc", "qdisc", "replace", "dev", ifname, "parent", "1:1", "handle", "10:", "bfifo",
                 "limit", str(self.queue_bytes))
        self.rate_bps = rate
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()
        self.changes: list[tuple[float, float]] = []   # (monotonic time, rate) actually applied

    def _netlink(self):
        # pyroute2 0.9 keeps per-thread state, so each thread gets its own socket;
        # callers hold host.enter(), so it is opened in (and talks to) the router's namespace.
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            from pyroute2 import IPRoute
            ipr = self._local.ipr = IPRoute()
            self._local.idx = ipr.link_lookup(ifname=self.ifname)[0]
            self._all.append(ipr)
        return ipr, self._local.idx

    def warm(self) -> None:
        with self._lock, self.host.enter():
            self._netlink()

    def set_rate(self, rate_bps: float) -> None:
        rate = max(OUTAGE_BPS, int(rate_bps))
        b = _burst(rate)
        with self._lock, self.host.enter():
            ipr, idx = self._netlink()
            # limit = our bfifo's limit: tbf_change() passes it on to the child unchanged
            ipr.tc("change", "tbf", idx, handle=0x10000, rate=f"{rate}bit", burst=b,
                   limit=self.queue_bytes)
            self.rate_bps = rate
            self.changes.append((time.monotonic(), float(rate_bps)))

    def set_queue(self, queue_bytes: int) -> None:
        """New bfifo limit (one `tc` call; used between runs, not on a schedule)."""
        with self._lock:
            self.queue_bytes = int(queue_bytes)
            self.host.run("tc", "qdisc", "change", "dev", self.ifname, "root", "handle", "1:", "tbf",
                          "rate", f"{self.rate_bps}bit", "burst", str(_burst(self.rate_bps)),
                          "limit", str(self.queue_bytes))
            self.host.run("tc", "qdisc", "change", "dev", self.ifname, "parent", "1:1", "handle", "10:",
                          "bfifo", "limit", str(self.queue_bytes))

    def stats(self) -> dict:
        """Counters of the bottleneck queue (sent bytes/packets, drops, backlog)."""
        out = self.host.run("tc", "-s", "qdisc", "show", "dev", self.ifname, check=False).stdout
        res = {}
        block = out.split("qdisc bfifo", 1)[-1]
        import re
        m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", block)
        if m:
            res = {"sent_bytes": int(m[1]), "sent_pkts": int(m[2]), "dropped": int(m[3])}
        return res

    def close(self) -> None:
        with self._lock:
            for ipr in self._all:
                try:
                    ipr.close()
                except Exception:
                    pass
            self._all.clear()


class ScheduleRunner:
    """A thread that applies a Schedule's rate changes to a Shaper, starting at t0."""

    def __init__(self, shaper: Shaper, schedule: Schedule, duration: float):
        self.shaper, self.schedule, self.duration = shaper, schedule, duration
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="schedule")
        self.t0: float | None = None
        self.errors: list[str] = []
        self.lags: list[float] = []      # applied minus planned time of each change (s)

    def start(self, t0: float | None = None) -> "ScheduleRunner":
        self.t0 = time.monotonic() if t0 is None else t0
        self._thread.start()
        return self

    def _run(self) -> None:
        try:  # this thread only: a busy machine should not make rate changes late
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except (OSError, AttributeError):
            pass
        try:
            self.shaper.warm()       # open this thread's netlink socket before the first change
        except Exception as e:
            self.errors.append(repr(e))
        for t, rate in self.schedule.changes(self.duration):
            wait = self.t0 + t - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            try:
                self.shaper.set_rate(rate)
                self.lags.append(self.shaper.changes[-1][0] - (self.t0 + t))
            except Exception as e:  # keep going; the report lists it
                self.errors.append(repr(e))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


QDISCS = ("kernel", "fifo", "codel", "fq_codel")


class LineShaper:
    """The bottleneck in user space: one direction of a C delay line (linkq.c) with a
    rate, a queue discipline and optional random loss.  Same interface as `Shaper`, plus
    `start_schedule`, which hands the whole schedule to the line (applied there to the
    nanosecond, no thread).  FIFO's limit is in bytes (`queue_bytes`); CoDel and FQ-CoDel
    keep Linux's default limit of 10240 packets, as their queues stay short by design."""

    def __init__(self, line, direction: str, rate_bps: float, queue_bytes: int, qdisc: str = "fifo",
                 loss: float = 0.0, seed: int = 1):
        self.line, self.direction = line, direction
        self.queue_bytes, self.qdisc = int(queue_bytes), qdisc
        self.rate_bps = rate_bps
        self.changes: list[tuple[float, float]] = []
        self._configure(loss, seed)
        self.set_rate(rate_bps)
        self.changes.clear()

    def _configure(self, loss: float, seed: int) -> None:
        limit = self.queue_bytes if self.qdisc == "fifo" else 0
        self.line.set(self.direction, qdisc=self.qdisc, limit=limit, loss=repr(float(loss)), seed=seed)

    def set_qdisc(self, qdisc: str) -> None:
        self.qdisc = qdisc
        limit = self.queue_bytes if qdisc == "fifo" else 0
        self.line.set(self.direction, qdisc=qdisc, limit=limit)

    def warm(self) -> None:
        pass

    def set_rate(self, rate_bps: float) -> None:
        self.line.set(self.direction, rate="inf" if rate_bps == float("inf") else int(rate_bps))
        self.rate_bps = rate_bps
        self.changes.append((time.monotonic(), float(rate_bps)))

    def set_queue(self, queue_bytes: int) -> None:
        self.queue_bytes = int(queue_bytes)
        if self.qdisc == "fifo":
            self.line.set(self.direction, limit=self.queue_bytes)

    def start_schedule(self, schedule: Schedule, duration: float, t0: float) -> "LineSchedule":
        self.line.schedule(self.direction, t0, schedule.steps, schedule.period)
        return LineSchedule(self, schedule, duration, t0)

    def stats(self) -> dict:
        c = self.line.counters()
        d = self.direction
        return {"sent_bytes": c[f"{d}_out_bytes"], "sent_pkts": c[f"{d}_out"],
                "dropped": c[f"{d}_drop_overflow"] + c[f"{d}_drop_codel"],
                "dropped_codel": c[f"{d}_drop_codel"], "dropped_loss": c[f"{d}_drop_loss"],
                "backlog_max_bytes": c[f"{d}_backlog_max_bytes"], "qdisc": self.qdisc}

    def close(self) -> None:
        pass


class LineSchedule:
    """A schedule running inside the delay line; `stop()` records the changes that took place."""

    def __init__(self, shaper: LineShaper, schedule: Schedule, duration: float, t0: float):
        self.shaper, self.schedule, self.duration, self.t0 = shaper, schedule, duration, t0
        self.errors: list[str] = []
        self.lags: list[float] = []      # none: the line applies each change at its time

    def stop(self) -> None:
        until = min(self.duration, time.monotonic() - self.t0)
        self.shaper.changes += [(self.t0 + t, r) for t, r in self.schedule.changes(until)]


def start_schedule(shaper, schedule: Schedule, duration: float, t0: float):
    """Run `schedule` on a bottleneck from t0: inside the delay line, or by the netlink thread."""
    if hasattr(shaper, "start_schedule"):
        return shaper.start_schedule(schedule, duration, t0)
    return ScheduleRunner(shaper, schedule, duration).start(t0=t0)
