"""How long an onward connect may keep knocking: at most 1 + --syn-retries
SYNs reach a destination that does not answer.

TCP_SYNCNT alone does not bound the count on current kernels: the kernel
gives up on a time it models as exponential backoff (1+2+4... s), while
net.ipv4.tcp_syn_linear_timeouts (4 since Linux 6.x) resends the first SYNs
every second, so TCP_SYNCNT 2 still let 6 SYNs out in 7 s (measured,
tests/test_relay_harden.py; the issue saw 7 in 10 s with the default).  So
the relay also ends the connect itself halfway between the last allowed
SYN and the one after it.
"""
from __future__ import annotations

#: The kernel's initial SYN retransmission timeout (TCP_TIMEOUT_INIT).
SYN_RTO = 1.0


def linear_syn_timeouts() -> int:
    """net.ipv4.tcp_syn_linear_timeouts of this namespace (0 if absent)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_syn_linear_timeouts") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def syn_deadline(retries: int, linear: int | None = None) -> float:
    """Seconds after connect() by which 1 + `retries` SYNs have gone out and
    the next has not.  After retransmission k the kernel keeps the timeout
    if k <= `linear`, else doubles it."""
    if linear is None:
        linear = linear_syn_timeouts()
    t, interval = 0.0, SYN_RTO
    for k in range(1, retries + 1):     # t: when retransmission k goes out
        t += interval
        if k > linear:
            interval *= 2
    return t + interval / 2


_limits: dict = {}


def connect_limit(retries: int, timeout: float) -> float:
    """The onward connect's time limit: --connect-timeout, or sooner if the
    SYN budget runs out first (read once per process: the sysctl is per
    network namespace, and a process stays in its own)."""
    key = (retries, timeout)
    if key not in _limits:
        _limits[key] = min(timeout, syn_deadline(retries))
    return _limits[key]
