"""Kernel memory a tunnel may pin, and who pays for it.

A tunnel whose peers stop reading fills, in the worst case, both sockets'
receive and send buffers and both pipes: memory in the kernel, outside the
relay's RSS, and (for pipes) outside the TCP limits too.  Issue 16 measured
~26 MiB per tunnel with autotuned buffers; 90 tunnels from one address
reached the host's hard TCP limit.  So every tunnel is charged its worst
case when it is accepted, to its client (clients.client_key) and to the
process, and its buffers are *sized* to what it was granted:

* sizes come in levels: level 0 is the full size (FullSizes), each level
  halves every buffer and the pipe limit, down to a floor;
* a tunnel gets the largest level that keeps its client's commitment under
  half the client budget, and that takes at most 1/16 of what is left of
  half the global budget (so the relay's first few tunnels cannot take it
  all: grants shrink smoothly as the relay fills); past those halves it gets
  the floor; past the whole budgets: Error 64.  So the first tunnels of a
  client get deep buffers (a long fat link needs them) and many tunnels
  still fit, each small;
* socket buffers are set with SO_RCVBUF/SO_SNDBUF, which also turns off
  autotuning: the size granted is the most the socket can hold.  The kernel
  doubles the value set (half is bookkeeping overhead), so a buffer of B
  kernel bytes is set as B/2 and charged as B;
* a pipe is charged its limit: a direction never holds more than that in it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import worker_share

#: Floors: a 16 KiB kernel buffer (8 KiB of window) and 4 KiB in a pipe keep
#: a tunnel working, slowly, however many a client opens.
MIN_BUFFER = 16 << 10
MIN_PIPE = 4 << 10
#: Levels below full size; the floor is reached well before the last one.
LEVELS = 12
#: A tunnel takes at most this share of what is left of the global half.
GLOBAL_SHARE = 16


@dataclass(frozen=True)
class Sizes:
    """One tunnel's grant, in kernel bytes (what the kernel will account)."""

    client_rcv: int
    client_snd: int
    server_rcv: int
    server_snd: int
    pipe: int           # per direction
    #: the total, charged and released once per tunnel (computed, not given)
    cost: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "cost", self.client_rcv + self.client_snd + self.server_rcv
                           + self.server_snd + 2 * self.pipe)

    def level(self, k: int) -> "Sizes":
        b = lambda n: max(MIN_BUFFER, n >> k)   # noqa: E731
        return Sizes(b(self.client_rcv), b(self.client_snd), b(self.server_rcv),
                     b(self.server_snd), max(MIN_PIPE, self.pipe >> k))


class Budget:
    """Commitments per client and in total, in kernel bytes.  0 = no limit."""

    def __init__(self, full: Sizes, per_client: int, total: int):
        self.full = full
        self.levels = [full] + [full.level(k) for k in range(1, LEVELS)]
        self.per_client = per_client
        self.total = total
        self.committed = 0
        self.by_client: dict[str, int] = {}

    def reserve(self, key: str, exempt: bool = False) -> Sizes | None:
        """The sizes granted to a new tunnel of client `key` (charged), or
        None when even the floor would overrun a budget (Error 64).
        `exempt` (loopback clients) skips the per-client budget."""
        mine = self.by_client.get(key, 0)
        per_client = 0 if exempt else self.per_client
        grant = None
        room = (self.total // 2 - self.committed) // GLOBAL_SHARE
        for sizes in self.levels:
            c = sizes.cost
            if _fits(mine + c, per_client // 2) and (self.total <= 0 or c <= room):
                grant = sizes
                break
        if grant is None:
            floor = self.levels[-1]
            if not (_fits(mine + floor.cost, per_client) and
                    _fits(self.committed + floor.cost, self.total)):
                return None
            grant = floor
        self.by_client[key] = mine + grant.cost
        self.committed += grant.cost
        return grant

    def release(self, key: str, sizes: Sizes | None) -> None:
        if sizes is None:
            return
        self.committed -= sizes.cost
        left = self.by_client.get(key, 0) - sizes.cost
        if left <= 0:
            self.by_client.pop(key, None)
        else:
            self.by_client[key] = left


def _fits(amount: int, limit: int) -> bool:
    return limit <= 0 or amount <= limit


def tcp_mem_hard_limit() -> int:
    """net.ipv4.tcp_mem's hard limit in bytes (0 if unknown): the global
    budget's default is three quarters of it, so the relay alone never
    drives the host's TCP to where every connection suffers."""
    try:
        with open("/proc/sys/net/ipv4/tcp_mem") as f:
            pages = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 0
    import resource
    return pages * resource.getpagesize()


def _sysctl_max(name: str) -> int:
    """The third field of net.ipv4.tcp_rmem / tcp_wmem: what autotuning may reach."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20


def full_sizes(cfg) -> Sizes:
    """Level 0 from the --client-*/--server-* buffer options and --pipe-size.
    A value of 0 (autotuning) is charged at the most autotuning may reach."""
    rmax, wmax = _sysctl_max("tcp_rmem"), _sysctl_max("tcp_wmem")

    def kernel(value: int, autotune_max: int) -> int:
        return 2 * value if value else autotune_max
    return Sizes(kernel(cfg.client.rcvbuf, rmax), kernel(cfg.client.sndbuf, wmax),
                 kernel(cfg.server.rcvbuf, rmax), kernel(cfg.server.sndbuf, wmax),
                 cfg.pipe_size)


def make_budget(cfg) -> Budget:
    """The process's budget: per client and in total, each split evenly
    between --workers (SO_REUSEPORT spreads a client's connections evenly)."""
    total = cfg.memory_budget
    if total is None:
        total = tcp_mem_hard_limit() * 3 // 4
    return Budget(full_sizes(cfg), worker_share(cfg.memory_per_client, cfg.workers),
                  worker_share(total, cfg.workers))
