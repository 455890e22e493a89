"""A user-space link emulator over two TUN devices, one per emulated link.

Each packet read from one TUN device is written to the other one when that
direction's emulated link lets it go: by default at arrival + D, in arrival
order (mahimahi's delay queue); with a rate set, after a serializer at that rate
(or schedule) and a queue (drop-tail FIFO in bytes, CoDel or FQ-CoDel), and with
optional seeded random loss -- see linkq.h.  The router namespace steers traffic
through it with policy routing (see `topology.py`): packets arriving from the
left veth are routed to TUN A, the line writes them to TUN B, and the kernel
forwards them out of the right veth; the other direction goes B -> A.

The C line (`delayline.c` + `linkq.c`) is compiled once with `cc` into a temp
directory (cached by the hash of its sources) and takes commands on its stdin
(`DelayLine.set`, `.schedule`, `.counters`).  `python -m pepsock.testbed.delayline
A B D_AB_US D_BA_US` is the plain delay line in Python (no queue, no rate), kept
to measure whether Python keeps up: see benchmarks/bench_testbed_delayline.py.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

SOURCE = Path(__file__).with_name("delayline.c")
LINKQ = [Path(__file__).with_name("linkq.c"), Path(__file__).with_name("linkq.h")]
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


def _compile(name: str, extra: list[str], cc: str | None) -> str:
    """Compile delayline.c + linkq.c (or linkq.c alone for a library) once per source
    version into the temp directory and return the output's path."""
    sources = ([SOURCE] if name == "delayline" else []) + LINKQ
    for p in sources:
        if not p.exists():
            raise RuntimeError(f"{p} is missing (an installed wheel needs 'testbed/*.c' and "
                               "'testbed/*.h' in package-data)")
    digest = hashlib.sha256()
    for p in sources:
        digest.update(p.read_bytes())
    digest.update(" ".join(extra).encode())
    out = Path(tempfile.gettempdir()) / f"pepsock-{name}-{digest.hexdigest()[:12]}"
    if _ours(out):
        return str(out)
    cc = cc or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("needs a C compiler (cc) to build the delay line")
    tmpdir = tempfile.mkdtemp(prefix="pepsock-dl-")
    try:
        for p in sources:
            shutil.copy(p, tmpdir)
        binary = Path(tmpdir) / name
        cfiles = [str(Path(tmpdir) / p.name) for p in sources if p.suffix == ".c"]
        subprocess.run([cc, *CFLAGS, *extra, "-o", str(binary), *cfiles, "-lm"], check=True,
                       capture_output=True, text=True, timeout=60)
        os.replace(binary, out)  # atomic: concurrent builders are fine
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return str(out)


def build(cc: str | None = None) -> str:
    """The delay line binary (delayline.c + linkq.c)."""
    return _compile("delayline", [], cc)


def build_linkq_lib(sanitize: str = "", cc: str | None = None) -> str:
    """linkq.c alone as a shared library, for the tests that drive it through cffi:
    sanitize "" (plain), "ubsan", or "asan" (ASan + UBSan; needs libasan preloaded)."""
    extra = ["-fPIC", "-shared"]
    if sanitize == "ubsan":
        extra += ["-fsanitize=undefined", "-fno-sanitize-recover=undefined", "-g"]
    elif sanitize == "asan":
        extra += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-O1", "-g"]
    return _compile(f"liblinkq-{sanitize}.so" if sanitize else "liblinkq.so", extra, cc)


def _ours(path: Path) -> bool:
    """A cached binary we may run (as root): a regular file of ours that nobody else can
    write. The temp directory is shared: another user's file under this predictable name
    is not run but rebuilt over (os.replace, as root in a sticky directory)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


class DelayLine:
    """One running delay line inside a namespace (a child process).

    The C line also emulates each direction's bottleneck (see linkq.h): `set()`
    and `schedule()` talk to it over its stdin. The Python line only delays."""

    def __init__(self, host, tun_a: str, tun_b: str, delay_ab_us: int, delay_ba_us: int,
                 *, impl: str = "c", slots: int = 16384):
        self.host = host
        self._lock = threading.Lock()
        self.tun_a, self.tun_b = tun_a, tun_b
        self.delay_ab_us, self.delay_ba_us = int(delay_ab_us), int(delay_ba_us)
        self.impl = impl
        if impl == "c":
            argv = [build(), tun_a, tun_b, str(self.delay_ab_us), str(self.delay_ba_us), str(slots)]
        else:
            argv = [sys.executable, "-m", "pepsock.testbed.delayline", tun_a, tun_b,
                    str(self.delay_ab_us), str(self.delay_ba_us), str(slots)]
        self.proc = host.popen(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"delay line did not start in {host.name}: {line!r} {err}")
        self.stats: dict = {}

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one control line to the C line and return its answer ("err ..." raises)."""
        if self.impl != "c":
            raise RuntimeError("the Python delay line has no control channel (use --delay-impl c)")
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            answer = self.proc.stdout.readline().strip() if ready else ""
        if not answer:
            raise RuntimeError(f"delay line in {self.host.name} did not answer {line[:60]!r}")
        if answer.startswith("err"):
            raise ValueError(f"delay line: {answer} (for {line[:80]!r})")
        return answer

    def set(self, direction: str, **kv) -> None:
        """set ab|ba rate=... qdisc=... limit=... loss=... seed=... (see delayline.c)."""
        self.command(f"set {direction} " + " ".join(f"{k}={v}" for k, v in kv.items()))

    def schedule(self, direction: str, t0: float, steps: list[tuple[float, float]],
                 period: float | None = None) -> None:
        """A rate schedule starting at monotonic time t0 (seconds): steps are (start s, bit/s)."""
        parts = " ".join(f"{int(round(t * 1e9))}:{int(r)}" for t, r in steps)
        self.command(f"sched {direction} {int(t0 * 1e9)} {int((period or 0) * 1e9)} {parts}")

    def counters(self) -> dict:
        return json.loads(self.command("stats"))

    def stop(self) -> dict:
        """Stop it and return its counters (packets in/out, drops, worst lateness)."""
        if self.proc.poll() is None:
            cpu = self.cpu_seconds()
            self.proc.send_signal(signal.SIGTERM)
            try:
                _, err = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate(timeout=5)
            for line in (err or "").splitlines():
                if line.startswith("{"):
                    try:
                        self.stats = json.loads(line)
                    except ValueError:
                        pass
            self.stats["cpu_s"] = cpu
        return self.stats

    def cpu_seconds(self) -> float | None:
        """user+system CPU time the delay line process has used so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None


# ---------------------------------------------------------------------------
# The same algorithm in Python (for the "does Python keep up?" measurement).

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


def _tun_open(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _py_main(argv: list[str]) -> int:
    a, b, d_ab, d_ba = argv[0], argv[1], int(argv[2]) / 1e6, int(argv[3]) / 1e6
    slots = int(argv[4]) if len(argv) > 4 else 16384
    fa, fb = _tun_open(a), _tun_open(b)
    try:  # as the C version: real-time priority so a busy machine does not stall the line
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))
    except (OSError, AttributeError):
        pass
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    qs = {fa: deque(), fb: deque()}          # packets read from fd, waiting
    other = {fa: fb, fb: fa}
    delay = {fa: d_ab, fb: d_ba}
    stats = {"ab_in": 0, "ab_out": 0, "ab_drops": 0, "ab_late_max_us": 0,
             "ba_in": 0, "ba_out": 0, "ba_drops": 0, "ba_late_max_us": 0}
    key = {fa: "ab", fb: "ba"}
    poller = select.poll()
    poller.register(fa, select.POLLIN)
    poller.register(fb, select.POLLIN)
    clock = time.monotonic
    print("ready", flush=True)
    while not stop:
        now = clock()
        nxt = None
        for fd, q in qs.items():
            k = key[fd]
            while q and q[0][0] <= now:
                due, pkt = q.popleft()
                late = int((now - due) * 1e6)
                if late > stats[k + "_late_max_us"]:
                    stats[k + "_late_max_us"] = late
                try:
                    os.write(other[fd], pkt)
                    stats[k + "_out"] += 1
                except OSError:
                    stats[k + "_drops"] += 1
            if q and (nxt is None or q[0][0] < nxt):
                nxt = q[0][0]
        timeout = None if nxt is None else max(0.0, (nxt - now) * 1000)
        try:
            events = poller.poll(timeout)
        except InterruptedError:
            continue
        for fd, _ in events:
            q, k = qs[fd], key[fd]
            for _ in range(256):
                try:
                    pkt = os.read(fd, 2048)
                except BlockingIOError:
                    break
                stats[k + "_in"] += 1
                if len(q) >= slots:
                    stats[k + "_drops"] += 1
                    continue
                q.append((clock() + delay[fd], pkt))
    print(json.dumps(stats), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_py_main(sys.argv[1:]))
