"""The pipe pool: the kernel buffers splice() moves bytes through.

Contracts (haproxy's pipe.c keeps the same ones, in its own words):
* A pipe is taken only while a direction has bytes in flight and given back
  as soon as it is empty: an idle tunnel holds no pipe.  Only an *empty*
  pipe goes back to the pool (put); one that still holds bytes is closed
  (close), its bytes dropped with the tunnel that owned them.
* get() returns (read fd, write fd, capacity).  The capacity is read back,
  never assumed: F_SETPIPE_SZ may be refused (fs.pipe-max-size, per-user
  pipe limits), and a direction's byte count is only right against the real
  one.
* get() returns None when no pipe can be had (out of fds): the caller copies
  through user space instead, so no tunnel ever waits for another's pipe.
* At most `keep` empty pipes are pooled; beyond, they are closed.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032

log = logging.getLogger("pepsock.relay")


class PipePool:
    __slots__ = ("size", "keep", "pool", "open", "_warned")

    def __init__(self, size: int, keep: int):
        self.size = size        # --pipe-size asked for
        self.keep = keep        # --pipe-pool: empty pipes kept
        self.pool: list[tuple[int, int, int]] = []
        self.open = 0           # pipes open, busy or pooled (the pep_relay_pipes gauge)
        self._warned = False

    def get(self):
        if self.pool:
            return self.pool.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                return None
            raise
        try:
            cap = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            cap = fcntl.fcntl(w, F_GETPIPE_SZ)
            if not self._warned:
                self._warned = True
                log.warning("F_SETPIPE_SZ %d refused, pipes are %d bytes (fs.pipe-max-size, "
                            "fs.pipe-user-pages-soft)", self.size, cap)
        self.open += 1
        return r, w, cap

    def put(self, pipe) -> None:
        """Give back an empty pipe."""
        if len(self.pool) < self.keep:
            self.pool.append(pipe)
        else:
            self.close(pipe)

    def close(self, pipe) -> None:
        os.close(pipe[0])
        os.close(pipe[1])
        self.open -= 1

    def close_all(self) -> None:
        for p in self.pool:
            self.close(p)
        self.pool.clear()
