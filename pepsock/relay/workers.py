"""--workers N: the master process forks N workers, restarts one that dies,
and turns a stop signal into one SIGTERM per worker.

Each worker runs its own loop with its own SO_REUSEPORT listener on the
same port (the kernel spreads connections by 4-tuple hash); the master
keeps the port bound (without listening) and serves the summed stats.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from typing import Callable

log = logging.getLogger("pepsock.relay")

PR_SET_PDEATHSIG = 1
#: How long the master waits for every worker to say it listens.
READY_TIMEOUT = 10.0


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: workers may outlive a killed master")
    if os.getppid() != parent:      # the master died before prctl took effect
        os._exit(0)


class Supervisor:
    """`work(slot, ready_fd)` runs in each forked worker: it writes one byte
    to ready_fd once it listens and returns the worker's exit code."""

    def __init__(self, workers: int, drain_timeout: float, work: Callable[[int, int], int]):
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.work = work
        self.children: dict[int, int] = {}     # pid -> slot
        self.stopping = False
        self.loop = None
        self.master = os.getpid()

    def spawn(self, slot: int) -> int:
        """Fork worker `slot`; the read end of its readiness pipe."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                # A worker must not outlive its master (kill -9): it would keep
                # serving the port beside a restarted relay.  SIGTERM on the
                # master's death makes it drain and exit like a normal stop.
                _die_with_parent(self.master)
                code = self.work(slot, w)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                os._exit(code)
        os.close(w)
        self.children[pid] = slot
        return r

    def start(self) -> None:
        readies = [self.spawn(i) for i in range(self.workers)]
        deadline = time.monotonic() + READY_TIMEOUT
        for r in readies:
            rl, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not rl or not os.read(r, 1):
                log.error("a worker failed to start")
            os.close(r)

    def attach(self, loop) -> None:
        """The master's loop delivers signals here (loop.on_signal)."""
        self.loop = loop
        loop.on_signal = self.on_signal

    def on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            again = self.stopping
            self.stopping = True
            for pid in self.children:  # a second signal makes the workers reset at once
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if not again:
                self.loop.call_later(self.drain_timeout + 5, self.kill_all)
        elif signum == signal.SIGCHLD:
            self.reap()

    def kill_all(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.children.pop(pid, None)
            if slot is None:
                continue
            if not self.stopping:
                log.warning("worker %d (pid %d) exited with status %d; restarting", slot, pid,
                            status)
                r = self.spawn(slot)
                os.close(r)
        if self.stopping and not self.children and self.loop is not None:
            self.loop.running = False
