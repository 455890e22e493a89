"""Helpers for the relay tests: run `python -m pepsock.relay` as a real
subprocess, an RFC 8803 test client built from raw sockets + pepsock.protocol
(header sent in the SYN with MSG_FASTOPEN), and small destination servers.

Everything here is bounded by timeouts: a broken relay fails a test, it never
hangs the suite.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

from pepsock.protocol import MessageReader, connect_request
from pepsock.tfo import MSG_FASTOPEN, TCP_FASTOPEN_NO_COOKIE, syn_data_acked  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Relay:
    """A relay subprocess; `addr` is its first listening address."""

    def __init__(self, *args: str, prefix: list[str] | None = None, timeout: float = 10,
                 env: dict | None = None, new_session: bool = False):
        argv = [*(prefix or []), sys.executable, "-m", "pepsock.relay", *args]
        e = dict(os.environ)
        e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=e, cwd=ROOT, start_new_session=new_session)
        self.addrs: list[tuple[str, int]] = []
        self.stats: tuple[str, int] | None = None
        self.stderr = b""
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()
        deadline = time.monotonic() + timeout
        want_stats = any(a == "--stats" or a.startswith("--stats=") for a in args)
        buf = b""
        while True:
            lines = buf.decode(errors="replace").splitlines()
            listen = [ln for ln in lines if ln.startswith("listening on ")]
            stats = [ln for ln in lines if ln.startswith("stats on ")]
            if listen and (stats or not want_stats) and buf.endswith(b"\n"):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"relay did not start: {buf!r} {self.stderr!r}")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise RuntimeError(f"relay exited {self.proc.returncode}: {self.stderr!r}")
                buf += chunk
                # Give a second listener line a moment to arrive with the first.
                time.sleep(0.05)
                r2, _, _ = select.select([self.proc.stdout], [], [], 0)
                if r2:
                    buf += os.read(self.proc.stdout.fileno(), 4096)
        self.addrs = [_parse(ln[len("listening on "):]) for ln in listen]
        if stats:
            self.stats = _parse(stats[0][len("stats on "):])
        self.addr = self.addrs[0]

    def _drain_stderr(self):
        while True:
            chunk = self.proc.stderr.read1(65536) if hasattr(self.proc.stderr, "read1") \
                else self.proc.stderr.read(4096)
            if not chunk:
                return
            self.stderr += chunk

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    def wait_log(self, text: str, timeout: float = 5) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return self.log
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in relay log:\n{self.log}")

    def metrics(self) -> dict[str, float]:
        assert self.stats, "relay started without --stats"
        host, port = self.stats
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._err_thread.join(timeout=2)

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._err_thread.join(timeout=2)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _parse(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------
# The test client


def convert_open(relay: tuple[str, int], dest: tuple[str, int], early: bytes = b"",
                 *, header: bytes | None = None, timeout: float = 5.0,
                 no_cookie: bool = True) -> socket.socket:
    """Open a TFO connection to the relay carrying the Convert header (or the
    raw `header` bytes) and `early` data in the SYN."""
    family = socket.AF_INET6 if ":" in relay[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if no_cookie:
        try:
            s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        except OSError:
            pass
    msg = connect_request(dest[0], dest[1]) if header is None else header
    tfo_send(s, msg + early, relay, timeout)
    return s


def tfo_send(s: socket.socket, payload: bytes, addr, timeout: float = 5.0) -> None:
    """sendto(MSG_FASTOPEN), then the rest.  Without a cookie for `addr` (and
    without TCP_FASTOPEN_NO_COOKIE) the kernel sends a bare SYN asking for one
    and a socket with a timeout says EINPROGRESS: the bytes follow the handshake."""
    try:
        sent = s.sendto(payload, MSG_FASTOPEN, addr)
    except BlockingIOError:
        select.select([], [s], [], timeout)
        sent = 0
    if sent < len(payload):
        s.sendall(payload[sent:])


def read_reply(s: socket.socket, timeout: float = 5.0):
    """(Message, bytes after it) from the relay's reply."""
    s.settimeout(timeout)
    reader = MessageReader()
    while not reader.done:
        data = s.recv(1024)
        if not data:
            reader.eof()
        reader.feed(data)
    return reader.message, reader.rest


def error_code(s: socket.socket, timeout: float = 5.0) -> int | None:
    msg, _ = read_reply(s, timeout)
    return None if msg.error is None else msg.error.code


def recv_exact(s: socket.socket, n: int, prefix: bytes = b"") -> bytes:
    buf = bytearray(prefix)
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(s: socket.socket, prefix: bytes = b"") -> bytes:
    buf = bytearray(prefix)
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk


def recv_to_the_end(s: socket.socket, prefix: bytes = b"") -> tuple[bytes, str]:
    """prefix and everything after it until the stream ends, and how it
    ended: 'eof' (a clean end) or 'reset'."""
    buf = bytearray(prefix)
    try:
        while chunk := s.recv(1 << 20):
            buf += chunk
    except ConnectionResetError:
        return bytes(buf), "reset"
    return bytes(buf), "eof"


def wait_eof_or_reset(s: socket.socket, timeout: float = 5.0) -> str:
    """'eof', 'reset', or 'data' (if bytes still arrive)."""
    s.settimeout(timeout)
    try:
        data = s.recv(65536)
    except ConnectionResetError:
        return "reset"
    return "data" if data else "eof"


# ---------------------------------------------------------------------------------
# Destination servers (threads in the test process)


class Server:
    """A TCP server on 127.0.0.1:0 running `handler(conn)` per connection in a thread."""

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()[:2]
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.results: list = []
        self.errors: list = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(10)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.results.append(self.handler(conn))
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.errors.append(e)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.sock.close()
        self._t.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def echo(conn: socket.socket):
    """Echo until EOF, then close."""
    total = 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return total
        conn.sendall(data)
        total += len(data)


def free_port() -> int:
    """A port nobody listens on (bound then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def reset_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
