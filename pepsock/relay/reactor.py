"""The event loop under the relay: epoll, handlers by fd, timers.

It knows nothing of tunnels.  One thread, one epoll set per process.
Handlers are plain callables looked up by fd and called with the event mask;
timers live in a heap with lazy cancellation.  `should_stop()` is the one
hook a user of the reactor overrides (the relay: draining, nothing left).

Contracts worth knowing (haproxy's fd layer keeps the same ones):
* forget(fd) right before close(fd): close() takes the fd out of the epoll
  set (no dup()s here), so no epoll_ctl; events of the current batch for
  that fd number are skipped, since the number may be reused at once by an
  accept() or socket() in the same batch.
* Registrations are made once; handlers keep readiness themselves
  (edge-triggered) and ask for no epoll_ctl in the steady state.
"""
from __future__ import annotations

import gc
import heapq
import select
import time

#: How long a listener rests after accept() failed for lack of fds.
ACCEPT_PAUSE = 0.1


class Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when, fn):
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        self.fn = None

    def __lt__(self, other):
        return self.when < other.when


class Reactor:
    """epoll + handlers + timers."""

    def __init__(self):
        self.ep = select.epoll()
        self.handlers: dict[int, object] = {}
        self.closed: set[int] = set()     # fds closed during the current batch
        self.timers: list[Timer] = []
        self.running = True

    # -- registration ------------------------------------------------------------
    def register(self, fd: int, handler, mask: int) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, mask)

    def forget(self, fd: int) -> None:
        """Drop fd's handler; the caller closes fd right away, and close()
        takes it out of the epoll set (we never dup sockets), so no syscall.

        The fd number may be reused at once (the next accept() or socket() in
        the same batch of events), so events already fetched for it belong to
        the old socket: `closed` makes run() skip them."""
        self.handlers.pop(fd, None)
        self.closed.add(fd)

    def unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        self.closed.add(fd)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def rebind(self, fd: int, handler, mask: int) -> None:
        """A registered fd changes hands (tunnel -> Closer) or interest."""
        self.handlers[fd] = handler
        self.ep.modify(fd, mask)

    def call_later(self, delay: float, fn) -> Timer:
        t = Timer(time.monotonic() + delay, fn)
        heapq.heappush(self.timers, t)
        return t

    def pause_listener(self, fd: int) -> None:
        """accept() failed for lack of fds (or a rate says wait): the
        listener stays readable, so stop polling it for a moment instead of
        spinning."""
        try:
            self.ep.modify(fd, 0)
        except OSError:
            return

        def resume():
            if fd in self.handlers:
                try:
                    self.ep.modify(fd, select.EPOLLIN)
                except OSError:
                    pass
        self.call_later(ACCEPT_PAUSE, resume)

    # -- run ----------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Checked before every wait: True ends run()."""
        return False

    def run(self) -> None:
        self.quiet_gc()
        poll = self.ep.poll
        while self.running:
            timeout = self.next_timeout()
            if self.should_stop():
                break
            self.closed.clear()
            try:
                events = poll(-1 if timeout is None else timeout, 512)
            except InterruptedError:
                continue
            self.dispatch(events)
            self.run_due_timers()

    # -- the parts of a loop turn (also engine.CoreLoop.run's) ---------------------------
    @staticmethod
    def quiet_gc() -> None:
        """Handlers leave no reference cycles behind (see Tunnel._done), so the
        cyclic GC only has to catch stragglers: run it rarely."""
        gc.freeze()
        gc.set_threshold(100_000, 50, 50)

    def next_timeout(self) -> float | None:
        """Seconds until the first timer is due; None: no timer."""
        timers = self.timers
        # Cancelled timers stay in the heap (lazy cancellation); one at the
        # head would only wake the wait up for nothing: drop it first.
        while timers and timers[0].fn is None:
            heapq.heappop(timers)
        return max(0.0, timers[0].when - time.monotonic()) if timers else None

    def dispatch(self, events) -> None:
        """Call the handlers of a batch of (fd, mask); the caller cleared
        `closed` before the wait that produced it."""
        handlers, closed = self.handlers, self.closed
        for fd, ev in events:
            if closed and fd in closed:
                continue        # stale: that fd was closed (maybe reused) in this batch
            h = handlers.get(fd)
            if h is not None:
                h(ev)

    def run_due_timers(self) -> None:
        timers = self.timers
        if not timers:
            return
        now = time.monotonic()
        while timers and timers[0].when <= now:
            t = heapq.heappop(timers)
            if t.fn is not None:
                fn, t.fn = t.fn, None
                fn()

    def close(self) -> None:
        for fd in list(self.handlers):
            self.unregister(fd)
        self.ep.close()
