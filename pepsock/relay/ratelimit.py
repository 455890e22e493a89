"""Token buckets keyed by client: a new-tunnel rate limit per client, and the
same machinery to rate-limit log lines.

Memory is bounded: at most `max_keys` buckets are kept; past that the one
seen least recently is dropped (it comes back full, which is what an idle
client's bucket would be anyway; an attacker with more keys than that is
bounded by the relay-wide limits instead).
"""
from __future__ import annotations

#: Buckets kept at most (about 100 bytes each).
MAX_KEYS = 65536


class TokenBuckets:
    """`rate` tokens a second, at most `burst` saved up, one per event."""

    __slots__ = ("rate", "burst", "max_keys", "buckets")

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_KEYS):
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self.max_keys = max_keys
        self.buckets: dict = {}

    def allow(self, key, now: float) -> bool:
        """Take one token from key's bucket; False if it is empty."""
        b = self.buckets.pop(key, None)
        tokens = self.burst if b is None else min(self.burst, b[0] + (now - b[1]) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self.buckets[key] = (tokens, now)     # re-inserted: most recently seen last
        if len(self.buckets) > self.max_keys:
            del self.buckets[next(iter(self.buckets))]
        return ok


class LogLimiter:
    """Rate limits for log lines about one client (refusals: issue 16 saw one
    client's 10,320 refused requests a second write 1.93 MB/s of log): at
    most `rate` lines a second per client (burst `burst`) and `total_rate`
    for all clients together.  What is dropped is counted and reported in
    one summary line every `every` seconds (the caller's timer)."""

    def __init__(self, rate: float = 5, burst: float = 20, total_rate: float = 200,
                 every: float = 10.0):
        self.per_client = TokenBuckets(rate, burst)
        self.total = TokenBuckets(total_rate, total_rate)
        self.every = every
        self.dropped: dict = {}
        self.since = 0.0

    def allow(self, key, now: float) -> bool:
        if self.per_client.allow(key, now) and self.total.allow("*", now):
            return True
        if key in self.dropped or len(self.dropped) < MAX_KEYS:
            self.dropped[key] = self.dropped.get(key, 0) + 1
        return False

    def summary(self, now: float) -> str | None:
        """The line that reports what was dropped since the last call (None if
        nothing was), then start counting afresh."""
        dropped, self.dropped, since, self.since = self.dropped, {}, self.since, now
        if not dropped:
            return None
        top = sorted(dropped.items(), key=lambda kv: -kv[1])[:3]
        return (f"log limit: {sum(dropped.values())} tunnel lines from {len(dropped)} clients "
                f"not written in the last {now - since:.0f}s (most: "
                + ", ".join(f"{k} {n}" for k, n in top) + ")")
