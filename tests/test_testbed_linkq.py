"""The user-space bottleneck (pepsock/testbed/linkq.c), driven through cffi on virtual time.

No root, no namespaces: packets are pushed at chosen times and popped when due, so
every number is exact.  The FQ-CoDel checks are RFC 8290's properties: a sparse
flow beside a saturating one sees (almost) no queue; two bulk flows share the
link evenly, also with different packet sizes (DRR in bytes); CoDel (RFC 8289)
drops under a standing queue and not under a short burst.  The library is built
with UBSan (-fno-sanitize-recover) so undefined behaviour fails the test, and
test_under_asan runs the file again against an ASan + UBSan build.
"""
import os
import struct
import subprocess
import sys

import pytest

cffi = pytest.importorskip("cffi")

from pepsock.testbed.delayline import build_linkq_lib  # noqa: E402

# The declarations are linkq.h's own (its preprocessor lines aside: cffi's cdef
# takes none), so the test cannot drift from the header.
HEADER = os.path.join(os.path.dirname(__file__), os.pardir, "pepsock", "testbed", "linkq.h")
with open(HEADER) as f:
    CDEF = "".join(line for line in f if not line.startswith("#"))

ffi = cffi.FFI()
ffi.cdef(CDEF)
if os.environ.get("LINKQ_LIB"):     # test_under_asan: this file again, against the ASan build
    C = ffi.dlopen(os.environ["LINKQ_LIB"])
else:
    try:
        C = ffi.dlopen(build_linkq_lib(sanitize="ubsan"))
    except Exception:               # no UBSan runtime: the plain build
        C = ffi.dlopen(build_linkq_lib())

MS = 1_000_000
S = 1_000_000_000
INF = 2**64 - 1


def ip4(sport: int, dport: int = 5001, size: int = 1500, proto: int = 6, v6: bool = False) -> bytes:
    """An IPv4 (or IPv6) packet of `size` bytes from 192.0.2.10:sport to 203.0.113.10:dport."""
    l4 = struct.pack("!HH", sport, dport)
    if v6:
        hdr = struct.pack("!IHBB", 6 << 28, size - 40, proto, 64) + bytes(15) + b"\x10" + bytes(15) + b"\x20"
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, proto, 0,
                          bytes([192, 0, 2, 10]), bytes([203, 0, 113, 10]))
    return (hdr + l4).ljust(size, b"\0")


class Link:
    """One lq on virtual time; `run()` feeds it a list of (time_ns, packet, tag) arrivals."""

    def __init__(self, qdisc="fifo", limit=0, rate=10_000_000, delay=10 * MS, slots=20000):
        self.q = ffi.gc(C.lq_new(slots), C.lq_free)
        assert self.q != ffi.NULL
        assert C.lq_set_qdisc(self.q, qdisc.encode(), limit) == 0
        C.lq_set_delay(self.q, delay)
        C.lq_set_rate(self.q, 0, rate)
        self.out = []            # (tag, t_in, t_due, len)
        self._d = ffi.new("const uint8_t **")
        self._n = ffi.new("size_t *")
        self._ti = ffi.new("uint64_t *")
        self._td = ffi.new("uint64_t *")
        self.tags = {}

    def drain(self, now):
        while C.lq_pop(self.q, now, self._d, self._n, self._ti, self._td):
            data = bytes(ffi.buffer(self._d[0], self._n[0]))
            self.out.append((self.tags.get(data[20:24] if data[0] >> 4 == 4 else data[40:44]),
                             self._ti[0], self._td[0], self._n[0]))

    def push(self, now, pkt, tag):
        self.tags[pkt[20:24] if pkt[0] >> 4 == 4 else pkt[40:44]] = tag
        self.drain(now)
        return C.lq_push(self.q, now, pkt, len(pkt))

    def run(self, arrivals, until):
        for t, pkt, tag in sorted(arrivals, key=lambda a: a[0]):
            self.push(t, pkt, tag)
        # step through the remaining events as the delay line does
        now = arrivals[-1][0] if arrivals else 0
        while now < until:
            nxt = C.lq_next_event(self.q, now)
            if nxt == INF or nxt > until:
                break
            now = max(now, nxt)
            self.drain(now)
        self.drain(until)
        return self

    def stats(self):
        st = ffi.new("struct lq_stats *")
        C.lq_get_stats(self.q, st)
        return {k: getattr(st, k) for k in ("in", "out", "out_bytes", "drop_overflow", "drop_codel",
                                            "drop_loss", "drop_nobuf", "drop_flush", "backlog_max_bytes")}

    def delays_ms(self, tag):
        return sorted((td - ti) / MS for t, ti, td, _ in self.out if t == tag)

    def bytes_of(self, tag, t_from=0, t_to=INF):
        return sum(n for t, _, td, n in self.out if t == tag and t_from <= td < t_to)


def cbr(sport, rate_bps, start, end, size=1500, tag=None, dport=5001):
    """Constant bit rate arrivals (an unresponsive sender)."""
    gap = int(size * 8 * S / rate_bps)
    pkt = ip4(sport, dport, size)
    return [(t, pkt, tag or sport) for t in range(start, end, gap)]


def pct(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


# ------------------------------------------------------------------ the link itself

def test_rate_delay_and_serialization_are_exact():
    """10 Mbit/s, 10 ms: one packet leaves at arrival + 1.2 ms (1500 B) + 10 ms; back to back
    they leave 1.2 ms apart; a saturated second carries rate x 1 s."""
    L = Link(rate=10_000_000, delay=10 * MS)
    L.run([(0, ip4(1), "a")], 50 * MS)
    (_, ti, td, n), = L.out
    assert n == 1500 and td - ti == 1_200_000 + 10 * MS
    L = Link(rate=10_000_000, delay=10 * MS).run(cbr(1, 20_000_000, 0, S), 3 * S)
    dues = [td for _, _, td, _ in L.out]
    assert all(b - a == 1_200_000 for a, b in zip(dues, dues[1:]))
    assert abs(L.bytes_of(1, 10 * MS, S + 10 * MS) - 1_250_000) <= 1500
    # with an Ethernet header counted, as the delay line does: 1514 B = 1.2112 ms
    L = Link(rate=10_000_000, delay=0)
    C.lq_set_overhead(L.q, 14)
    L.run(cbr(1, 20_000_000, 0, 100 * MS), S)
    dues = [td for _, _, td, _ in L.out]
    assert all(b - a == 1_211_200 for a, b in zip(dues, dues[1:]))


def test_schedule_steps_and_outage():
    """A schedule 10 -> 0 -> 40 Mbit/s: the bytes of each stretch match its rate; nothing leaves
    in the outage; a periodic schedule repeats; a malformed one is refused."""
    L = Link(rate=10_000_000, delay=0)
    at = ffi.new("uint64_t[]", [0, S, 2 * S])
    rate = ffi.new("uint64_t[]", [10_000_000, 0, 40_000_000])
    assert C.lq_set_schedule(L.q, 0, 0, 0, 3, at, rate) == 0
    L.run(cbr(1, 80_000_000, 0, 3 * S), 3 * S)   # more than any rate: always backlogged
    assert abs(L.bytes_of(1, 0, S) - 1_250_000) <= 1500
    assert L.bytes_of(1, S + 2 * MS, 2 * S) == 0
    assert abs(L.bytes_of(1, 2 * S, 3 * S) - 5_000_000) <= 1500
    assert C.lq_rate_at(L.q, 5 * S) == 40_000_000
    assert C.lq_set_schedule(L.q, 0, 0, 3 * S, 3, at, rate) == 0      # period 3 s
    assert C.lq_rate_at(L.q, 3 * S + 10) == 10_000_000 and C.lq_rate_at(L.q, 4 * S + 10) == 0
    bad = ffi.new("uint64_t[]", [5, 1])
    assert C.lq_set_schedule(L.q, 0, 0, 0, 2, bad, rate) == -1
    assert C.lq_set_schedule(L.q, 0, 0, S, 3, at, rate) == -1          # period shorter than the steps


def test_rate_change_mid_packet_and_unlimited():
    """A packet half sent when the rate doubles finishes at the new rate; rate inf only delays."""
    L = Link(rate=1_000_000, delay=0)     # 1500 B = 12 ms at 1 Mbit/s
    at = ffi.new("uint64_t[]", [0, 6 * MS])
    rate = ffi.new("uint64_t[]", [1_000_000, 2_000_000])
    C.lq_set_schedule(L.q, 0, 0, 0, 2, at, rate)
    L.run([(0, ip4(1), 1)], S)
    assert L.out[0][2] == 9 * MS          # 6 ms at 1 Mbit/s, the other half in 3 ms at 2
    L = Link(rate=INF, delay=7 * MS).run([(t, ip4(1), 1) for t in range(0, 10 * MS, MS // 10)], S)
    assert all(td - ti == 7 * MS for _, ti, td, _ in L.out) and len(L.out) == 100


def test_fifo_limit_is_in_bytes():
    L = Link("fifo", limit=15_000, rate=1_000_000, delay=0)
    L.run([(0, ip4(1), 1)] * 20, S)
    st = L.stats()
    # one on the wire, 10 x 1500 B queued, the other 9 dropped at the tail
    assert st["drop_overflow"] == 9 and len(L.out) == 11


def test_random_loss_is_seeded():
    def run(seed):
        L = Link(rate=INF, delay=0)
        C.lq_set_loss(L.q, 0.1, seed)
        L.run(cbr(1, 10_000_000, 0, S), S)
        return [ti for _, ti, _, _ in L.out], L.stats()["drop_loss"]
    a, da = run(7)
    b, db = run(7)
    c, _ = run(8)
    assert a == b and a != c
    assert 0.07 <= da / (len(a) + da) <= 0.13


def test_flows_are_told_apart_by_five_tuple():
    q = ffi.gc(C.lq_new(4), C.lq_free)
    flows = {C.lq_flow_of(q, p, len(p)) for p in (ip4(s) for s in range(1000, 1200))}
    assert len(flows) > 150                       # 200 flows into 1024 queues: few collisions
    same = ip4(1234)
    assert C.lq_flow_of(q, same, 1500) == C.lq_flow_of(q, ip4(1234, size=100), 100)
    assert C.lq_flow_of(q, ip4(1, v6=True), 1500) != C.lq_flow_of(q, ip4(2, v6=True), 1500)
    assert C.lq_flow_of(q, ip4(1, proto=17), 1500) != C.lq_flow_of(q, ip4(1, proto=6), 1500)


# ------------------------------------------------------------- RFC 8290 properties

def _distinct_ports(n, base=40000):
    q = ffi.gc(C.lq_new(4), C.lq_free)
    ports, seen = [], set()
    for p in range(base, base + 1000):
        f = C.lq_flow_of(q, ip4(p), 1500)
        if f not in seen:
            seen.add(f)
            ports.append(p)
        if len(ports) == n:
            return ports


@pytest.mark.parametrize("qdisc", ["fifo", "fq_codel"])
def test_sparse_flow_beside_a_bulk_flow(qdisc):
    """100-byte datagrams every 50 ms beside a flow offering twice the link rate (10 Mbit/s,
    93,750-byte FIFO): behind the FIFO they wait ~75 ms; with FQ-CoDel their delay stays
    within 1.5 ms of the propagation delay (at most one bulk packet's serialization, 1.2 ms)."""
    bulk, sparse = _distinct_ports(2)
    L = Link(qdisc, limit=93_750 if qdisc == "fifo" else 0, rate=10_000_000, delay=20 * MS)
    arrivals = cbr(bulk, 20_000_000, 0, 5 * S, tag="bulk")
    arrivals += [(t, ip4(sparse, size=100), "sparse") for t in range(S, 5 * S, 50 * MS)]
    L.run(arrivals, 6 * S)
    d = L.delays_ms("sparse")
    assert len(d) == 80
    if qdisc == "fifo":
        assert pct(d, 50) > 20 + 70
    else:
        assert pct(d, 99) <= 20 + 1.5, d[-5:]
        # and the bulk flow still has the rest of the link
        assert L.bytes_of("bulk", S, 5 * S) >= 0.97 * 4 * 1_250_000 - L.bytes_of("sparse", S, 5 * S)


@pytest.mark.parametrize("sizes", [(1500, 1500), (1500, 300)])
def test_two_bulk_flows_share_evenly(sizes):
    """Two flows each offering the whole link: FQ-CoDel gives each half, within 2% (in bytes,
    also when one sends 300-byte packets: DRR counts bytes, not packets)."""
    a, b = _distinct_ports(2)
    L = Link("fq_codel", rate=20_000_000, delay=5 * MS)
    arrivals = cbr(a, 20_000_000, 0, 4 * S, size=sizes[0], tag="a")
    arrivals += cbr(b, 20_000_000, 0, 4 * S, size=sizes[1], tag="b")
    L.run(arrivals, 5 * S)
    ba, bb = L.bytes_of("a", S, 4 * S), L.bytes_of("b", S, 4 * S)
    assert abs(ba - bb) / (ba + bb) <= 0.02, (ba, bb)
    assert ba + bb >= 0.98 * 3 * 2_500_000


def test_codel_drops_under_a_standing_queue_not_a_burst():
    """CoDel: a 5% overload by an unresponsive sender builds a standing queue, which CoDel
    holds near its 5 ms target by dropping about the excess (a FIFO with no limit grows it
    to half a second in 10 s); a one-off burst of 30 packets (36 ms of queue, drained in
    less than the 100 ms interval) loses nothing.  (Against a 25% unresponsive overload the
    control law needs seconds to catch up -- by design: it is tuned for flows that back off.)"""
    for qdisc in ("codel", "fq_codel"):
        L = Link(qdisc, rate=10_000_000, delay=0)
        L.run(cbr(1, 10_500_000, 0, 10 * S), 11 * S)
        st = L.stats()
        excess = st["in"] * 0.5 / 10.5
        assert 0.8 * excess <= st["drop_codel"] <= 1.2 * excess, (qdisc, st)
        late = sorted((td - ti) / MS for _, ti, td, _ in L.out if ti > 5 * S)
        assert pct(late, 50) < 15, (qdisc, pct(late, 50))       # target + the control law's overshoot
        assert st["drop_overflow"] == 0
        L = Link(qdisc, rate=10_000_000, delay=0)
        L.run([(S, ip4(1), 1)] * 30 + cbr(1, 1_000_000, 2 * S, 4 * S), 5 * S)
        st = L.stats()
        assert st["drop_codel"] == 0 and st["out"] == st["in"], (qdisc, st)
    L = Link("fifo", rate=10_000_000, delay=0).run(cbr(1, 10_500_000, 0, 10 * S), 11 * S)
    assert L.stats()["drop_codel"] == 0 and max(td - ti for _, ti, td, _ in L.out) > 0.4 * S


def test_fq_overflow_drops_from_the_fattest_queue():
    """Over the packet limit, FQ-CoDel drops from the flow with the most bytes queued, so a
    sparse flow's packets survive a flood."""
    flood, sparse = _distinct_ports(2)
    L = Link("fq_codel", limit=50, rate=1_000_000, delay=0)
    arr = [(0, ip4(flood), "flood")] * 200 + [(MS, ip4(sparse, size=100), "sparse")] * 3
    L.run(arr, 10 * S)
    st = L.stats()
    assert st["drop_overflow"] >= 150
    assert len(L.delays_ms("sparse")) == 3


def test_fq_overflow_drops_half_the_fattest_queue_in_one_batch():
    """As Linux's fq_codel_drop(): one overflow drops from the head of the fattest queue
    until half its bytes are gone, at most 64 packets (drop_batch_size), not one packet;
    the other flows keep everything.  The link is in an outage, so nothing leaves but the
    first packet, which sits in the serializer (not in the queue)."""
    fat, thin, other = _distinct_ports(3)
    L = Link("fq_codel", limit=50, rate=0, delay=0)
    for _ in range(40):
        assert L.push(0, ip4(fat), "fat") == 0
    for _ in range(11):
        L.push(0, ip4(thin), "thin")
    assert L.stats()["drop_overflow"] == 0 and C.lq_backlog_packets(L.q) == 50
    L.push(0, ip4(other, size=100), "other")      # the 51st queued packet: over the limit
    # half of the fat flow's 39 x 1500 queued bytes, rounded up to packets: 20 packets
    # (19 would leave more than half); thin and other lose nothing
    assert L.stats()["drop_overflow"] == 20
    assert C.lq_backlog_packets(L.q) == 31 and C.lq_backlog_bytes(L.q) == 30 * 1500 + 100
    # a flood bigger than 128 packets: the batch stops at 64
    L = Link("fq_codel", limit=300, rate=0, delay=0)
    for _ in range(302):
        L.push(0, ip4(fat), "fat")
    assert L.stats()["drop_overflow"] == 64 and C.lq_backlog_packets(L.q) == 301 - 64


def test_changing_the_qdisc_flushes_and_counts():
    L = Link("fifo", rate=1_000_000, delay=0)
    for _ in range(10):
        L.push(0, ip4(1), 1)
    assert C.lq_backlog_packets(L.q) == 9
    assert C.lq_set_qdisc(L.q, b"fq_codel", 0) == 0
    assert ffi.string(C.lq_qdisc_name(L.q)) == b"fq_codel"
    assert L.stats()["drop_flush"] == 9 and C.lq_backlog_packets(L.q) == 0
    assert C.lq_set_qdisc(L.q, b"sfq", 0) == -1


@pytest.mark.skipif(bool(os.environ.get("LINKQ_LIB")), reason="already the sanitizer run")
def test_under_asan():
    """This whole file again, against linkq.c built with ASan + UBSan."""
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    runtime = os.path.realpath(out)
    if not os.path.exists(runtime):
        pytest.skip("no libasan")
    env = dict(os.environ, LINKQ_LIB=build_linkq_lib(sanitize="asan"), LD_PRELOAD=runtime,
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           os.path.join(here, "test_testbed_linkq.py")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(here))
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "passed" in proc.stdout and "AddressSanitizer" not in tail, tail


def test_eval_rejects_bad_options():
    """pep eval refuses an unknown queue or experiment before building anything."""
    from pepsock.testbed import eval as ev
    from pepsock.testbed.netns import have_netns
    if not have_netns()[0]:
        pytest.skip("pep eval stops earlier without root")
    assert ev.main(["--qdisc", "sfq", "--experiments", "step"]) == 2
    assert ev.main(["--experiments", "stepp"]) == 2
    assert ev.main(["--qdisc", "fq_codel", "--delay-impl", "py", "--experiments", "step"]) == 2


def test_eval_plans_queues_and_duration():
    """The full run compares FIFO, CoDel and FQ-CoDel (bigq only the byte-limited FIFO, the
    competing flows not CoDel alone); --quick keeps every experiment, FIFO vs FQ-CoDel for
    the thesis's comparison, one queue elsewhere.  Their estimated durations stay within
    the budgets (quick about 5 minutes, full an hour) on the model's per-run costs (which
    run 5-20 % above what a quick run measured)."""
    from pepsock.testbed.eval import ALL, QUICK
    from pepsock.testbed.experiments import Plan, estimate
    from pepsock.testbed.traces import load, spike_outage_schedule, step_schedule
    full, quick = Plan(), Plan.quick_plan()
    assert full.qdiscs_for("step") == ["fifo", "codel", "fq_codel"]
    assert full.qdiscs_for("bigq") == ["fifo"] and full.qdiscs_for("validate") == ["kernel", "fifo"]
    assert full.qdiscs_for("flows") == ["fifo", "fq_codel"]
    assert quick.qdiscs_for("spike") == ["fifo", "fq_codel"] and quick.qdiscs_for("flows") == ["fifo"]
    assert quick.qdiscs_for("upload") == ["fq_codel"]
    assert QUICK == ALL
    st = step_schedule()
    schedules = {e: st for e in ("validate", "step", "bigq", "flows", "upload", "ipv6")}
    schedules.update(spike=spike_outage_schedule(), mmwave=load("mmwave-blockage"))
    q = estimate(quick, ALL, 10, 40, 550, schedules)
    f = estimate(full, ALL, 10, 40, 550, schedules)
    assert set(ALL) <= set(q) and set(ALL) <= set(f)
    assert sum(q.values()) <= 330 and sum(f.values()) <= 3600, (sum(q.values()), sum(f.values()))
    assert sum(f.values()) > 3 * sum(q.values())
