"""Relay counters and their Prometheus text exposition.

Each process keeps its counters in one flat Python list (`Stats.v`): the hot
path does `stats.v[BYTES_UP] += n` and nothing else.  With --workers N every
worker copies its list into its own slot of a shared anonymous mmap once a
second (and when it exits); the master serves the sum.  With one process the
list is rendered directly.
"""
from __future__ import annotations

import mmap
import struct
from bisect import bisect_left

from ..protocol import ErrorCode

# Indices into Stats.v
TUNNELS_OPEN = 0       # gauge: accepted connections not yet closed
TUNNELS_TOTAL = 1      # accepted connections
ESTABLISHED = 2        # tunnels that got a success reply
BYTES_UP = 3           # client -> server bytes delivered
BYTES_DOWN = 4         # server -> client bytes delivered
SETUP_COUNT = 5
SETUP_SUM_US = 6       # setup latency sum, microseconds
SYN_DATA = 7           # accepted connections whose SYN data was acked (0-RTT)
RESETS = 8             # tunnels ended by a reset (either side, or drain abort)
PIPES = 9              # gauge: pipes open (pooled or in use)
_BASE = 10

ERROR_CODES = tuple(ErrorCode)
ERROR_INDEX = {int(c): _BASE + i for i, c in enumerate(ERROR_CODES)}
ERR_OTHER = _BASE + len(ERROR_CODES)

#: Setup latency buckets (seconds): accept to reply sent.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKET0 = ERR_OTHER + 1

# Proof of the client's address (routability.py, cookies.py)
UNVERIFIED = _BUCKET0 + len(BUCKETS)  # accepted before the client's handshake completed
UNVERIFIED_EXPIRED = UNVERIFIED + 1   # ... and reset: the handshake never completed
COOKIE_MISSING = UNVERIFIED + 2       # Connect without the Cookie TLV: Error 3 with a cookie
COOKIE_BAD = UNVERIFIED + 3           # Cookie TLV not ours or not for this address: Error 32
TOKEN_EXPIRED = UNVERIFIED + 4        # a `pep cookie` token past its expiry: Error 32
UNVERIFIED_BY_COOKIE = UNVERIFIED + 5  # unverified, but an address cookie proved the address

# Gauges of the memory budget (budget.py), refreshed when published.
MEMORY_COMMITTED = UNVERIFIED + 6     # kernel bytes tunnels may pin (worst case)
PIPE_BYTES = MEMORY_COMMITTED + 1     # bytes sitting in pipes now
ONWARD_SYN_DATA = PIPE_BYTES + 1      # onward connects whose SYN carried the client's bytes
REPLIES_COALESCED = ONWARD_SYN_DATA + 1  # C engine: Success replies sent with the first bytes
NVALUES = REPLIES_COALESCED + 1

_SLOT = struct.Struct(f"={NVALUES}Q")


class Stats:
    __slots__ = ("v",)

    def __init__(self):
        self.v = [0] * NVALUES

    def error(self, code: int) -> None:
        self.v[ERROR_INDEX.get(int(code), ERR_OTHER)] += 1

    def setup(self, seconds: float) -> None:
        v = self.v
        v[SETUP_COUNT] += 1
        v[SETUP_SUM_US] += int(seconds * 1e6)
        i = bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            v[_BUCKET0 + i] += 1


class SharedSlots:
    """One slot of counters per worker in a MAP_SHARED anonymous mapping."""

    def __init__(self, n: int):
        self.n = n
        self.map = mmap.mmap(-1, max(1, n) * _SLOT.size)

    def store(self, slot: int, stats: Stats) -> None:
        v = [x if x >= 0 else 0 for x in stats.v]
        _SLOT.pack_into(self.map, slot * _SLOT.size, *v)

    def total(self) -> list[int]:
        out = [0] * NVALUES
        for slot in range(self.n):
            for i, x in enumerate(_SLOT.unpack_from(self.map, slot * _SLOT.size)):
                out[i] += x
        return out


def render(v: list[int], workers: int = 1) -> str:
    """Prometheus text format 0.0.4."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("pep_relay_tunnels_open", "gauge", "Client connections accepted and not yet closed.",
           [("", v[TUNNELS_OPEN])])
    metric("pep_relay_tunnels_total", "counter", "Client connections accepted.",
           [("", v[TUNNELS_TOTAL])])
    metric("pep_relay_tunnels_established_total", "counter",
           "Tunnels whose onward connect succeeded (success reply sent).", [("", v[ESTABLISHED])])
    metric("pep_relay_bytes_total", "counter", "Bytes delivered through tunnels.",
           [('{direction="up"}', v[BYTES_UP]), ('{direction="down"}', v[BYTES_DOWN])])
    metric("pep_relay_errors_total", "counter", "Error TLVs sent, by RFC 8803 error code.",
           [(f'{{code="{int(c)}",name="{c.name.lower()}"}}', v[ERROR_INDEX[int(c)]])
            for c in ERROR_CODES] + [('{code="other",name="other"}', v[ERR_OTHER])])
    metric("pep_relay_syn_data_total", "counter",
           "Accepted connections whose data in the SYN was acknowledged (0-RTT).",
           [("", v[SYN_DATA])])
    metric("pep_relay_onward_syn_data_total", "counter",
           "Onward connects that put the client's early data in their SYN (TCP Fast Open "
           "with a cookie the destination gave).", [("", v[ONWARD_SYN_DATA])])
    metric("pep_relay_replies_coalesced_total", "counter",
           "Success replies sent in one segment with the destination's first bytes (C engine: "
           "clients that sent early data).", [("", v[REPLIES_COALESCED])])
    metric("pep_relay_resets_total", "counter", "Tunnels ended by a reset.", [("", v[RESETS])])
    metric("pep_relay_pipes", "gauge", "Pipes held (in use or pooled).", [("", v[PIPES])])
    metric("pep_relay_unverified_total", "counter",
           "Clients accepted before their handshake completed (--no-cookie).",
           [("", v[UNVERIFIED])])
    metric("pep_relay_unverified_expired_total", "counter",
           "Unverified clients reset because their handshake never completed "
           "(forged source addresses).", [("", v[UNVERIFIED_EXPIRED])])
    metric("pep_relay_unverified_cookie_total", "counter",
           "Unverified clients whose address cookie (Cookie TLV) proved their address.",
           [("", v[UNVERIFIED_BY_COOKIE])])
    metric("pep_relay_cookie_refusals_total", "counter",
           "Connect requests refused for their Cookie TLV (--cookie-secret).",
           [('{reason="missing"}', v[COOKIE_MISSING]), ('{reason="bad"}', v[COOKIE_BAD]),
            ('{reason="expired"}', v[TOKEN_EXPIRED])])
    cum, samples = 0, []
    for i, le in enumerate(BUCKETS):
        cum += v[_BUCKET0 + i]
        samples.append((f'_bucket{{le="{le}"}}', cum))
    samples.append(('_bucket{le="+Inf"}', v[SETUP_COUNT]))
    samples.append(("_sum", v[SETUP_SUM_US] / 1e6))
    samples.append(("_count", v[SETUP_COUNT]))
    metric("pep_relay_setup_seconds", "histogram",
           "Accept to reply sent (header read, policy, onward connect).", samples)
    metric("pep_relay_memory_committed_bytes", "gauge",
           "Kernel memory (socket buffers + pipes) granted to open tunnels, worst case.",
           [("", v[MEMORY_COMMITTED])])
    metric("pep_relay_pipe_bytes", "gauge", "Bytes held in pipes now.", [("", v[PIPE_BYTES])])
    metric("pep_relay_workers", "gauge", "Worker processes.", [("", workers)])
    return "\n".join(lines) + "\n"
