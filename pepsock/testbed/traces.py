"""Link rate traces: mahimahi's format and a plain rate schedule.

* **mahimahi trace**: one integer per line, a time in milliseconds at which one
  1500-byte packet may be delivered; several lines may share a millisecond; the
  trace repeats with a period equal to its last timestamp.
* **rate schedule**: lines `<time_ms> <rate_mbit>`; the rate holds from that time
  until the next line, the last one holds for ever.  `#` starts a comment.

Both become a `Schedule` (piecewise-constant rate, optionally periodic), which
`shaping.ScheduleRunner` applies to the bottleneck TBF.  A mahimahi trace is binned
(100 ms by default) into the rate it delivers in each bin.

`python -m pepsock.testbed.traces` regenerates the shipped traces in traces/.
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKET_BYTES = 1500
TRACE_DIR = Path(__file__).with_name("traces")


class TraceError(ValueError):
    pass


@dataclass
class Schedule:
    """Piecewise-constant rate: steps[i] = (start_s, rate_bps), starts strictly increasing, first 0."""

    steps: list[tuple[float, float]]
    period: float | None = None     # repeat after this many seconds (mahimahi semantics)
    name: str = "schedule"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.steps:
            raise TraceError("empty schedule")
        if self.steps[0][0] != 0:
            raise TraceError("schedule must start at time 0")
        for (t0, _), (t1, _) in zip(self.steps, self.steps[1:]):
            if not t1 > t0:
                raise TraceError(f"times must increase: {t0} then {t1}")
        for t, r in self.steps:
            if r < 0 or not math.isfinite(r) or not math.isfinite(t):
                raise TraceError(f"bad step ({t}, {r})")
        if self.period is not None and not self.period > self.steps[-1][0]:
            raise TraceError("period must be longer than the last step's start")

    def rate_at(self, t: float) -> float:
        if self.period:
            t = t % self.period
        rate = self.steps[0][1]
        for start, r in self.steps:
            if start <= t:
                rate = r
            else:
                break
        return rate

    def changes(self, until: float) -> list[tuple[float, float]]:
        """Every (time, rate) at which the rate must be set, from 0 up to `until` seconds."""
        out: list[tuple[float, float]] = []
        base = 0.0
        while True:
            for start, r in self.steps:
                t = base + start
                if t > until:
                    return out
                if not out or out[-1][1] != r:
                    out.append((t, r))
            if not self.period:
                return out
            base += self.period

    def mean_rate(self, until: float) -> float:
        ch = self.changes(until) + [(until, 0.0)]
        total = sum((t1 - t0) * r for (t0, r), (t1, _) in zip(ch, ch[1:]))
        return total / until if until > 0 else 0.0


# ---------------------------------------------------------------------------
# Parsing and formatting

def _lines(text: str):
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield n, line.split()


def parse_schedule(text: str, name: str = "schedule") -> Schedule:
    steps: list[tuple[float, float]] = []
    for n, f in _lines(text):
        if len(f) != 2:
            raise TraceError(f"line {n}: want `<time_ms> <rate_mbit>`")
        try:
            t, r = float(f[0]) / 1000.0, float(f[1]) * 1e6
        except ValueError:
            raise TraceError(f"line {n}: not numbers: {' '.join(f)}") from None
        steps.append((t, r))
    return Schedule(steps, name=name)


def parse_mahimahi(text: str, bin_ms: int = 100, name: str = "trace") -> Schedule:
    times: list[int] = []
    for n, f in _lines(text):
        if len(f) != 1:
            raise TraceError(f"line {n}: a mahimahi trace has one number per line")
        try:
            t = int(f[0])
        except ValueError:
            raise TraceError(f"line {n}: not an integer: {f[0]}") from None
        if t < 0 or (times and t < times[-1]):
            raise TraceError(f"line {n}: timestamps must be non-negative and non-decreasing")
        times.append(t)
    if not times or times[-1] <= 0:
        raise TraceError("trace needs at least one delivery opportunity after 0 ms")
    period_ms = times[-1]
    nbins = max(1, math.ceil(period_ms / bin_ms))
    # Only the bins that hold opportunities are stored: a long period with few of them
    # (a 70-year trace is one line) must not allocate a list of every bin.
    counts: dict[int, int] = {}
    for t in times:
        # mahimahi: opportunity at t ms delivers in (t-1, t]; t == period wraps to the next cycle's end
        i = min((t - 1) // bin_ms if t > 0 else 0, nbins - 1)
        counts[i] = counts.get(i, 0) + 1
    last_bin = period_ms - (nbins - 1) * bin_ms
    steps: list[tuple[float, float]] = []

    def add(i: int, c: int) -> None:
        width = (last_bin if i == nbins - 1 else bin_ms) / 1000.0
        rate = c * PACKET_BYTES * 8 / width
        if not steps or steps[-1][1] != rate:
            steps.append((i * bin_ms / 1000.0, rate))

    nxt = 0                       # first bin not yet covered
    for i in sorted(counts):
        if i > nxt:
            add(nxt, 0)           # the empty bins before bin i: rate 0
        add(i, counts[i])
        nxt = i + 1
    if nxt < nbins:
        add(nxt, 0)
    return Schedule(steps, period=period_ms / 1000.0, name=name,
                    meta={"format": "mahimahi", "opportunities": len(times), "bin_ms": bin_ms})


def parse(text: str, name: str = "trace", bin_ms: int = 100) -> Schedule:
    """Either format, told apart by the number of columns."""
    cols = {len(f) for _, f in _lines(text)}
    if not cols:
        raise TraceError("empty trace")
    if cols == {1}:
        return parse_mahimahi(text, bin_ms=bin_ms, name=name)
    return parse_schedule(text, name=name)


def load(path: str | Path, bin_ms: int = 100) -> Schedule:
    """A user's file, or the name of a shipped trace (`step-10-75`, `mmwave-blockage`, ...)."""
    p = Path(path)
    if not p.exists():
        for cand in (TRACE_DIR / str(path), *TRACE_DIR.glob(f"{path}.*")):
            if cand.exists():
                p = cand
                break
        else:
            raise TraceError(f"no trace file {path} (shipped: {', '.join(shipped())})")
    return parse(p.read_text(), name=p.stem, bin_ms=bin_ms)


def shipped() -> list[str]:
    return sorted(p.stem for p in TRACE_DIR.glob("*") if p.suffix in (".sched", ".trace"))


def format_schedule(s: Schedule) -> str:
    return "".join(f"{_num(t * 1000)} {_num(r / 1e6)}\n" for t, r in s.steps)


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


def to_mahimahi(s: Schedule, duration: float) -> str:
    """Delivery opportunities (ms) that realise the schedule for `duration` seconds."""
    out: list[str] = []
    credit = 0.0
    for ms in range(1, int(round(duration * 1000)) + 1):
        credit += s.rate_at((ms - 1) / 1000.0) / 8 / 1000.0
        while credit >= PACKET_BYTES:
            out.append(str(ms))
            credit -= PACKET_BYTES
    if not out or out[-1] != str(int(round(duration * 1000))):
        out.append(str(int(round(duration * 1000))))  # pin the period to `duration`
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# The traces we ship

def step_schedule(low=10e6, high=75e6, at=4.0) -> Schedule:
    """The thesis's case: 10 Mbit/s, then 75 Mbit/s from `at` seconds on."""
    return Schedule([(0.0, low), (at, high)], name="step-10-75")


def spike_outage_schedule() -> Schedule:
    """A 1 s spike to 75 Mbit/s on a 20 Mbit/s link, then a 1 s outage."""
    return Schedule([(0.0, 20e6), (2.0, 75e6), (3.0, 20e6), (5.0, 0.0), (6.0, 20e6)],
                    name="spike-outage")


def mmwave_schedule(duration=12.0, seed=5, bin_s=0.05) -> Schedule:
    """mmWave-like: line of sight around 60 Mbit/s with fast fading, human blockages
    that drop it to nothing for 0.3-1 s (with a slow fade in and out), and a
    short spike to 75+ Mbit/s when the beam realigns."""
    rng = random.Random(seed)
    n = int(duration / bin_s)
    rates = []
    level = 60e6
    for _ in range(n):
        level += rng.gauss(0, 4e6) + (60e6 - level) * 0.2
        rates.append(max(20e6, min(80e6, level)))
    t = 1.5
    while t < duration - 1.5:
        length = rng.uniform(0.3, 1.0)
        a, b = int(t / bin_s), int((t + length) / bin_s)
        for i in range(max(0, a - 2), a):              # fade out
            rates[i] *= 0.4
        for i in range(a, min(n, b)):                  # blocked
            rates[i] = 0.0
        for i in range(b, min(n, b + 4)):              # beam realigned: spike
            rates[i] = 90e6
        t += length + rng.uniform(2.0, 4.0)
    steps: list[tuple[float, float]] = []
    for i, r in enumerate(rates):
        r = round(r / 1e5) * 1e5
        if not steps or steps[-1][1] != r:
            steps.append((round(i * bin_s, 3), r))
    return Schedule(steps, name="mmwave-blockage")


def write_shipped(directory: Path = TRACE_DIR) -> None:
    directory.mkdir(exist_ok=True)
    hdr = "# {}: generated by `python -m pepsock.testbed.traces`; {}\n"
    s = step_schedule()
    (directory / "step-10-75.sched").write_text(
        hdr.format(s.name, "rate schedule: <time_ms> <rate_mbit>") + format_schedule(s))
    s = spike_outage_schedule()
    (directory / "spike-outage.sched").write_text(
        hdr.format(s.name, "rate schedule: <time_ms> <rate_mbit>") + format_schedule(s))
    s = mmwave_schedule()
    (directory / "mmwave-blockage.trace").write_text(
        hdr.format(s.name, "mahimahi format: one 1500-byte delivery opportunity per line, in ms")
        + to_mahimahi(s, 12.0))


if __name__ == "__main__":
    write_shipped(Path(sys.argv[1]) if len(sys.argv) > 1 else TRACE_DIR)
