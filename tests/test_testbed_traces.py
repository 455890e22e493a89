"""Trace and schedule parsing (no root needed)."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pepsock.testbed import traces as T


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 8))
    gaps = draw(st.lists(st.integers(1, 5000), min_size=n - 1, max_size=n - 1))
    times = [0]
    for g in gaps:
        times.append(times[-1] + g)
    rates = draw(st.lists(st.integers(0, 150_000), min_size=n, max_size=n))  # kbit/s
    return T.Schedule([(t / 1000, r * 1000.0) for t, r in zip(times, rates)])


@given(schedules())
def test_schedule_text_round_trip(s):
    back = T.parse(T.format_schedule(s))
    assert len(back.steps) == len(s.steps)
    for (t0, r0), (t1, r1) in zip(s.steps, back.steps):
        assert math.isclose(t0, t1, abs_tol=1e-9)
        assert math.isclose(r0, r1, rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=40, deadline=None)
@given(schedules())
def test_mahimahi_round_trip_keeps_rates(s):
    """Opportunities generated from a schedule, binned back, give its rate in every bin
    that lies inside one step (within one packet per bin: the trace's quantum)."""
    duration = s.steps[-1][0] + 0.5
    text = T.to_mahimahi(s, duration)
    back = T.parse(text, bin_ms=100)
    assert back.period == pytest.approx(round(duration * 1000) / 1000)
    quantum = T.PACKET_BYTES * 8 / 0.1
    edges = [t for t, _ in s.steps]
    for b in range(int(duration * 10) - 1):
        lo, hi = b / 10, (b + 1) / 10
        if any(lo < e < hi + 1e-9 for e in edges[1:]):
            continue           # a rate change inside this bin: the bin averages two rates
        want = s.rate_at(lo)
        assert abs(back.rate_at(lo + 0.05) - want) <= quantum + 1e-6


@given(st.text(max_size=200))
def test_parser_never_crashes(text):
    try:
        s = T.parse(text)
    except T.TraceError:
        return
    assert s.steps[0][0] == 0
    assert all(b[0] > a[0] for a, b in zip(s.steps, s.steps[1:]))
    assert all(r >= 0 for _, r in s.steps)


@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=50))
def test_mahimahi_needs_sorted_timestamps(ts):
    text = "\n".join(map(str, ts))
    if ts != sorted(ts) or max(ts) == 0:
        with pytest.raises(T.TraceError):
            T.parse_mahimahi(text)
    else:
        s = T.parse_mahimahi(text)
        assert s.period == ts[-1] / 1000
        # every opportunity is counted once: the rates integrate back to the packet count
        total_bits = sum(r * (b - a) for (a, r), b in
                         zip(s.steps, [t for t, _ in s.steps[1:]] + [s.period]))
        assert total_bits == pytest.approx(len(ts) * T.PACKET_BYTES * 8, rel=1e-9)


@pytest.mark.parametrize("bad", ["0 10\n0 20\n", "5 10\n", "0 -1\n", "0 x\n", "1 2 3\n", "", "# only\n"])
def test_bad_schedules_are_rejected(bad):
    with pytest.raises(T.TraceError):
        T.parse(bad)


def test_periodic_changes_repeat():
    s = T.parse_mahimahi("\n".join(["1"] * 10 + ["1000"]), bin_ms=500)
    ch = s.changes(2.5)
    assert [round(t, 3) for t, _ in ch] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert ch[0][1] > ch[1][1]


def test_shipped_traces_load():
    names = T.shipped()
    assert {"step-10-75", "spike-outage", "mmwave-blockage"} <= set(names)
    step = T.load("step-10-75")
    assert step.rate_at(0) == 10e6 and step.rate_at(5) == 75e6
    mm = T.load("mmwave-blockage")
    rates = [r for _, r in mm.steps]
    assert min(rates) == 0            # blockage outages
    assert max(rates) >= 75e6         # and spikes
    assert mm.period == pytest.approx(12.0)


def test_shipped_traces_match_their_generator(tmp_path):
    T.write_shipped(tmp_path)
    for p in tmp_path.iterdir():
        assert p.read_text() == (T.TRACE_DIR / p.name).read_text(), p.name
