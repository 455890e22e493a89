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
