"""librelaycore.so (the C engine's core, relaycore/) on its own and under
ASan/UBSan.

* The core driven directly through cffi, in this process: the record a new
  tunnel makes (client address, destination, early data, option kinds, the
  Cookie TLV's value, how far the header got), a header in two pieces, a
  header that breaks the rules, the header timeout, an Error reply's clean
  close, and every fd back to where it was after rc_free().
* A relay subprocess on the ASan/UBSan build of the core (PEP_RELAYCORE=asan,
  libasan preloaded) through the paths that matter: copy and splice, both
  half-closes, resets each way, the destination's reset with bytes still to
  deliver, refusals, bad headers, a refused connect, the drain; with and
  without --no-cookie (clients that may be unverified, HELD).  Any sanitizer
  report fails the test.
* The Success reply held for the destination's first bytes when the client
  sent early data (tunnel.c): one segment fewer (the client's TCP_INFO), sent
  alone at once for a header-only client or when the client sends more,
  alone after REPLY_HOLD_NS for a silent destination, before the FIN of one
  that closes without a byte and before a destination's reset, and a
  spliced download behind it intact.
"""
from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import threading
import time

import pytest

cffi = pytest.importorskip("cffi")

from pepsock.protocol import (  # noqa: E402
    Connect, Cookie, Message, MessageReader, TCPOption, connect_request, error_reply,
    success_reply,
)
from pepsock.relay import core as relaycore  # noqa: E402
from relay_helpers import (  # noqa: E402
    TCP_FASTOPEN_NO_COOKIE, Relay, Server, convert_open, echo, error_code, read_reply, recv_all,
    recv_exact, recv_to_the_end, tfo_send, wait_eof_or_reset,
)
import preload_helpers  # noqa: E402

pytestmark = pytest.mark.timeout(120)

RC_NEW, RC_HEADER, RC_CONNECTED, RC_CONNECT_FAILED, RC_ENDED = 1, 2, 3, 4, 5
HDR_NONE, HDR_CONNECT, HDR_INFO, HDR_BAD, HDR_TIMEOUT = range(5)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Core:
    """One core on a loopback TFO listener, stepped by hand."""

    def __init__(self, header_timeout: float = 5.0):
        self.ffi, self.lib = relaycore.load()
        ffi = self.ffi
        cfg = ffi.new("struct rc_config *")
        cfg.header_timeout = header_timeout
        cfg.connect_limit = 3.0
        cfg.linger_timeout = 2.0
        cfg.pipe_size = 65536
        cfg.pipe_pool = 4
        cfg.max_closers = 16
        cfg.nodelay = 1
        cfg.syn_retries = -1
        recs = ffi.new("struct rc_record **")
        self.core = self.lib.rc_new(cfg, recs)
        assert self.core != ffi.NULL
        self.recs = recs[0]
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.setsockopt(socket.IPPROTO_TCP, 23, 16)     # TCP_FASTOPEN
        self.ls.listen(16)
        self.ls.setblocking(False)
        self.addr = self.ls.getsockname()
        assert self.lib.rc_add_listener(self.core, self.ls.fileno()) == 0

    def wait(self, kind: int, timeout: float = 3.0):
        """Step until a record of `kind` comes; returns it (a copy of the fields)."""
        deadline = time.monotonic() + timeout
        ext = self.ffi.new("int *")
        while time.monotonic() < deadline:
            n = self.lib.rc_wait(self.core, 50, ext)
            for i in range(n):
                r = self.recs[i]
                if r.kind == kind:
                    return r
        raise AssertionError(f"no record of kind {kind}")

    def close(self):
        self.lib.rc_free(self.core)
        self.ls.close()


@pytest.fixture
def core():
    before = _fds()
    c = Core()
    yield c
    c.close()
    time.sleep(0.05)
    assert _fds() == before, "the core left fds open"


def test_new_record_says_who_where_and_what_came_with_the_header(core):
    ffi = core.ffi
    header = Message((Connect("192.0.2.7", 8080, (TCPOption(2, b"\x05\xb4"),
                                                   TCPOption(19, b"x" * 16))),
                      Cookie(b"\x01cookie!"))).encode()
    s = convert_open(core.addr, ("192.0.2.7", 8080), b"early bytes", header=header)
    r = core.wait(RC_NEW)
    assert r.hdr == HDR_CONNECT
    assert r.family == socket.AF_INET
    assert bytes(ffi.buffer(r.client_addr, 4)) == socket.inet_aton("127.0.0.1")
    assert r.client_port == s.getsockname()[1]
    assert bytes(ffi.buffer(r.dest_addr, 16)) == b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert r.dest_port == 8080
    assert r.early == len(b"early bytes")
    assert bytes(ffi.buffer(r.kinds, r.nkinds)) == bytes([2, 19])
    cookie = bytes(ffi.buffer(r.cookie, r.cookie_len))
    assert cookie.rstrip(b"\0") == b"\x01cookie!"
    # Refused: the Error reply arrives whole, then a clean EOF (no reset).
    reply = error_reply(32)
    assert core.lib.rc_refuse(core.core, r.id, reply, len(reply), 32, 0) == 0
    assert core.lib.rc_counters(core.core).closers == 1
    assert error_code(s) == 32
    assert wait_eof_or_reset(s) == "eof"
    s.close()
    deadline = time.monotonic() + 3
    while core.lib.rc_counters(core.core).closers and time.monotonic() < deadline:
        core.lib.rc_step(core.core)
        time.sleep(0.01)
    assert core.lib.rc_counters(core.core).closers == 0
    assert core.lib.rc_counters(core.core).tunnels == 0


def test_error_replies_lingering_at_once_are_bounded(core):
    """MAX_CLOSERS (16 here): Error replies waiting for their client's FIN are
    bounded; past the bound each still gets its whole reply, then the close
    at once; the lingering ones end at the linger timeout."""
    clients = []
    reply = error_reply(32)
    for i in range(20):
        s = convert_open(core.addr, ("192.0.2.7", 80 + i))
        r = core.wait(RC_NEW)
        assert core.lib.rc_refuse(core.core, r.id, reply, len(reply), 32, 0) == 0
        clients.append(s)
    assert core.lib.rc_counters(core.core).closers == 16
    for s in clients:       # none has sent its FIN: the first 16 linger for it
        assert error_code(s) == 32
        s.send(b"more")     # discarded by a lingering closer, reset by a closed socket
    time.sleep(0.2)
    core.lib.rc_step(core.core)

    def reset(s) -> bool:
        """After its FIN, a reset shows in the next send (recv says EOF first)."""
        try:
            s.send(b"again")
        except (BrokenPipeError, ConnectionResetError):
            return True
        return False
    assert [reset(s) for s in clients].count(True) == 4
    deadline = time.monotonic() + 5     # cfg.linger_timeout = 2 s
    while core.lib.rc_counters(core.core).closers and time.monotonic() < deadline:
        core.lib.rc_step(core.core)
        time.sleep(0.02)
    assert core.lib.rc_counters(core.core).closers == 0
    for s in clients:
        s.close()


def test_header_in_two_pieces_then_a_header_record(core):
    header = Message((Connect("198.51.100.1", 443),)).encode()
    s = convert_open(core.addr, ("198.51.100.1", 443), header=header[:5])
    r = core.wait(RC_NEW)
    assert r.hdr == HDR_NONE
    tid = r.id
    assert core.lib.rc_wait_header(core.core, tid) == 0
    s.sendall(header[5:] + b"GET")
    r = core.wait(RC_HEADER)
    assert (r.id, r.hdr, r.dest_port, r.early) == (tid, HDR_CONNECT, 443, 3)
    reply = error_reply(64, b"\x01")
    core.lib.rc_refuse(core.core, tid, reply, len(reply), 64, 0)
    assert error_code(s) == 64
    s.close()


@pytest.mark.parametrize("garbage, code", [(b"\x02\x01\x22\x63", 0), (b"\x01\x00\x22\x63", 1),
                                           (b"\x01\x02\x00\x00xxxx", 1)])
def test_header_that_breaks_the_rules(core, garbage, code):
    s = convert_open(core.addr, ("192.0.2.1", 1), header=garbage)
    r = core.wait(RC_NEW)
    if r.hdr == HDR_NONE:   # the rule needs more bytes: the client's EOF decides
        core.lib.rc_wait_header(core.core, r.id)
        s.shutdown(socket.SHUT_WR)
        r = core.wait(RC_HEADER)
    assert (r.hdr, r.err) == (HDR_BAD, code)
    reply = error_reply(code)
    core.lib.rc_refuse(core.core, r.id, reply, len(reply), code, 0)
    assert error_code(s) == code
    s.close()


def test_header_timeout_is_a_record():
    before = _fds()
    c = Core(header_timeout=0.2)
    try:
        s = socket.create_connection(c.addr)
        r = c.wait(RC_NEW)
        assert r.hdr == HDR_NONE
        c.lib.rc_wait_header(c.core, r.id)
        t0 = time.monotonic()
        r = c.wait(RC_HEADER)
        assert r.hdr == HDR_TIMEOUT and 0.15 < time.monotonic() - t0 < 2
        assert 0 < c.lib.rc_next_deadline(c.core) or c.lib.rc_next_deadline(c.core) == 0
        c.lib.rc_abort_all(c.core, b"test")
        s.close()
    finally:
        c.close()
    time.sleep(0.05)
    assert _fds() == before


# ---------------------------------------------------------------------------------
# The Success reply rides with the destination's first bytes (early-data clients)

SUCCESS = success_reply()


def _rc_connect(core: Core, rid: int, dest: tuple[str, int]) -> None:
    """rc_connect to a loopback destination; on loopback the handshake runs
    inside connect(), so the tunnel opens (CONNECTED) inside the call."""
    c = core.ffi.new("struct rc_connect *")
    c.family = socket.AF_INET
    c.addr[0:4] = list(socket.inet_aton(dest[0]))
    c.port = dest[1]
    assert core.lib.rc_connect(core.core, rid, c) == 0
    kinds = [core.recs[i].kind for i in range(core.lib.rc_count(core.core))]
    assert RC_CONNECTED in kinds, kinds


def _pending(s: socket.socket, wait: float = 0.05) -> bytes:
    """What the client has now (the core is not stepped meanwhile)."""
    return s.recv(4096) if select.select([s], [], [], wait)[0] else b""


def _step_until_readable(core: Core, s: socket.socket, timeout: float = 3.0) -> float:
    """Step the core until the client has bytes; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    ext = core.ffi.new("int *")
    while time.monotonic() < deadline:
        core.lib.rc_wait(core.core, 10, ext)
        if select.select([s], [], [], 0)[0]:
            return time.monotonic()
    raise AssertionError("nothing reached the client")


@pytest.fixture
def silent():
    """A destination that completes handshakes and says nothing."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    yield ls
    ls.close()


def test_header_only_client_gets_the_success_at_once(core, silent):
    """No early data: the client may be waiting for the reply (PEP_CONFIRM,
    a server that speaks first), so it is sent inside rc_connect, before the
    core runs again (a held reply could only come from a later step)."""
    s = convert_open(core.addr, silent.getsockname())
    r = core.wait(RC_NEW)
    assert (r.hdr, r.early) == (HDR_CONNECT, 0)
    _rc_connect(core, r.id, silent.getsockname())
    assert _pending(s, 1.0) == SUCCESS
    assert core.lib.rc_counters(core.core).replies_coalesced == 0
    core.lib.rc_abort_all(core.core, b"test")
    s.close()


def test_early_data_and_a_silent_destination_the_success_goes_alone_after_the_hold(
        core, silent):
    s = convert_open(core.addr, silent.getsockname(), b"GET")
    r = core.wait(RC_NEW)
    assert r.early == 3
    _rc_connect(core, r.id, silent.getsockname())
    opened = time.monotonic()
    assert _pending(s) == b""           # held
    conn, _ = silent.accept()
    conn.settimeout(5)
    assert conn.recv(100) == b"GET"     # the early data went on meanwhile
    waited = _step_until_readable(core, s) - opened
    assert 0.15 < waited < 2, waited    # REPLY_HOLD_NS = 0.2 s
    assert _pending(s) == SUCCESS       # alone
    conn.sendall(b"late")               # then the destination's bytes, as ever
    _step_until_readable(core, s)
    assert _pending(s) == b"late"
    assert core.lib.rc_counters(core.core).replies_coalesced == 0
    conn.close()
    core.lib.rc_abort_all(core.core, b"test")
    s.close()


def test_early_data_then_more_from_the_client_the_success_goes_at_once(core, silent):
    """A client that streams (an upload it bounds by the reply) gets the
    reply as soon as its next bytes come, not after the hold."""
    s = convert_open(core.addr, silent.getsockname(), b"up1")
    r = core.wait(RC_NEW)
    _rc_connect(core, r.id, silent.getsockname())
    assert _pending(s, 0) == b""        # held
    sent = time.monotonic()
    s.sendall(b"up2")
    waited = _step_until_readable(core, s) - sent
    assert waited < 0.15, waited
    assert _pending(s) == SUCCESS
    conn, _ = silent.accept()
    conn.settimeout(5)
    assert recv_exact(conn, 6) == b"up1up2"
    assert core.lib.rc_counters(core.core).replies_coalesced == 0
    conn.close()
    core.lib.rc_abort_all(core.core, b"test")
    s.close()


# ---------------------------------------------------------------------------------
# The relay on the ASan/UBSan core

ALLOW_LO = ("--allow-dest", "127.0.0.0/8", "--deny-dest", "192.0.2.0/24")


def _asan_env() -> dict:
    relaycore.library_path(relaycore.ASAN_NAME)     # built if missing
    return {"PEP_RELAYCORE": "asan", "LD_PRELOAD": preload_helpers.asan_runtime(),
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


def _exercise(relay: Relay) -> None:
    with Server(echo) as es:
        for size in (1, 5000, 3 << 20):        # copied, copied, spliced
            data = os.urandom(size)
            s = convert_open(relay.addr, es.addr, data[:100])
            _, rest = read_reply(s)
            t = threading.Thread(target=lambda: (s.sendall(data[100:]),
                                                 s.shutdown(socket.SHUT_WR)))
            t.start()
            assert recv_all(s, rest) == data
            t.join(10)
            s.close()

    def reset_after(conn):
        # Only once the tunnel is open (the client's byte came through): a
        # reset that beats the relay's look at its onward connect fails the
        # connect instead (Error reply), which is not what this exercises.
        conn.recv(10)
        conn.sendall(os.urandom(200_000))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()
    with Server(reset_after) as rs:            # the destination resets: FLUSHING
        s = convert_open(relay.addr, rs.addr)
        msg, rest = read_reply(s)
        assert msg.error is None, msg
        s.sendall(b"go")
        time.sleep(0.3)
        got = bytearray(rest)
        try:
            while chunk := s.recv(1 << 16):
                got += chunk
        except ConnectionResetError:
            pass
        assert len(got) == 200_000
        s.close()
    with Server(lambda c: c.recv(10)) as hs:    # the client resets
        s = convert_open(relay.addr, hs.addr, b"x")
        read_reply(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    s = convert_open(relay.addr, ("127.0.0.1", port))      # connect refused: Error 96
    assert error_code(s) == 96
    s.close()
    s = convert_open(relay.addr, ("192.0.2.1", 80))        # not allowed: Error 32
    assert error_code(s) == 32
    s.close()
    for garbage in (b"\x07", b"\x01\x03\x22\x63\x0a\x01\0\0", b"\x01\x01\x22\x63"):
        s = socket.socket()
        s.settimeout(5)
        tfo_send(s, garbage, relay.addr)
        s.shutdown(socket.SHUT_WR)
        assert error_code(s) is not None
        s.close()
    with Server(lambda c: time.sleep(1)) as idle:           # open at the drain
        s = convert_open(relay.addr, idle.addr, b"x")
        read_reply(s)
        relay.signal()
        s.close()


@pytest.mark.parametrize("mode", [(), ("--no-cookie",)], ids=["cookie", "no-cookie"])
def test_relay_on_the_sanitized_core(mode):
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--pipe-size", "65536", *mode,
               "--log-level", "debug", env=_asan_env()) as relay:
        _exercise(relay)
        assert relay.stop(15) == 0, relay.log
        log = relay.log
    assert "AddressSanitizer" not in log and "runtime error" not in log, log
    assert "engine: c (" in log and relaycore.ASAN_NAME in log, log


@pytest.fixture(scope="module")
def asan_relay():
    # Short timeouts: a random Connect that parses gets its Error 65 in a second.
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--header-timeout", "1",
               "--connect-timeout", "1", env=_asan_env()) as relay:
        yield relay
        assert relay.stop(15) == 0, relay.log
        assert "AddressSanitizer" not in relay.log and "runtime error" not in relay.log


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(min_size=1, max_size=64),
    # A valid header's start with arbitrary bytes after it: lengths, TLVs, options.
    st.binary(max_size=1100).map(lambda b: b"\x01" + bytes([len(b) // 4 % 256]) + b"\x22\x63" + b),
))
def test_any_first_bytes_get_an_answer_and_nothing_breaks(asan_relay, data):
    """Whatever a client sends first, the core answers (an Error, or a
    Success for a Connect that happens to parse) or closes; it never
    crashes or hangs, and a good tunnel works right after."""
    s = socket.socket()
    s.settimeout(5)
    try:
        tfo_send(s, data, asan_relay.addr)
        s.shutdown(socket.SHUT_WR)
        reader = MessageReader()
        while not reader.done:
            chunk = s.recv(4096)
            if not chunk:
                break
            reader.feed(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()
    assert asan_relay.proc.poll() is None, asan_relay.log


# ---------------------------------------------------------------------------------
# The same on the relay (ASan/UBSan core): segments, order, splice behind it


def _data_segs_in(s: socket.socket) -> int:
    """tcpi_data_segs_in (u32 at 152 of the kernel's tcp_info, Linux >= 4.6)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return struct.unpack_from("I", info, 152)[0]


@pytest.fixture(scope="module")
def stats_relay():
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--stats", "127.0.0.1:0",
               env=_asan_env()) as relay:
        yield relay
        assert relay.stop(15) == 0, relay.log
        assert "AddressSanitizer" not in relay.log and "runtime error" not in relay.log


def _coalesced(relay: Relay) -> float:
    return relay.metrics()["pep_relay_replies_coalesced_total"]


def test_success_rides_with_the_first_response_bytes(stats_relay):
    """Early data and a destination that answers at once: the client's first
    recv has the Success and the response, which came in ONE data segment
    (the reply alone would be a segment of its own: two)."""
    def answer(conn):
        conn.recv(100)
        conn.sendall(b"pong")
        conn.recv(100)          # until the client closes
    before = _coalesced(stats_relay)
    with Server(answer) as srv:
        s = convert_open(stats_relay.addr, srv.addr, b"ping")
        assert s.recv(1024) == SUCCESS + b"pong"
        assert _data_segs_in(s) == 1
        s.close()
    assert _coalesced(stats_relay) == before + 1


def test_destination_closing_without_a_byte_success_then_eof(stats_relay):
    with Server(lambda c: c.recv(100)) as srv:
        s = convert_open(stats_relay.addr, srv.addr, b"ping")
        msg, rest = read_reply(s)
        assert msg.error is None and rest == b""
        assert wait_eof_or_reset(s) == "eof"
        s.close()


def test_spliced_download_behind_a_coalesced_success(stats_relay):
    """The reply in front of a buffer that fills (then splice): a few MB intact."""
    data = os.urandom(4 << 20)

    def download(conn):
        conn.recv(100)
        conn.sendall(data)
    before = _coalesced(stats_relay)
    with Server(download) as srv:
        s = convert_open(stats_relay.addr, srv.addr, b"GET /big")
        s.settimeout(10)
        msg, rest = read_reply(s)
        assert msg.error is None
        got = recv_all(s, rest)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        s.close()
    assert _coalesced(stats_relay) == before + 1


@pytest.mark.parametrize("size", [0, 200_000], ids=["nothing", "200KB"])
def test_destination_reset_the_held_success_then_what_it_sent_then_the_reset(
        stats_relay, size):
    """The reset handling (FLUSHING) sends a held reply first: the client
    gets the Success, every byte the destination sent, then the reset."""
    data = os.urandom(size)

    def reset_after(conn):
        conn.recv(100)
        conn.sendall(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    with Server(reset_after) as srv:
        s = convert_open(stats_relay.addr, srv.addr, b"ping")
        msg, rest = read_reply(s)
        assert msg.error is None
        got, how = recv_to_the_end(s, rest)
        assert (len(got), how) == (size, "reset")
        assert got == data
        s.close()


def test_a_response_ending_on_the_replys_spill_gets_it_after_the_spill_hold(core, silent):
    """The coalesced reply shifts the stream by its 4 bytes: a response of one whole
    client-side segment fills it and leaves a spill of 4 bytes, which the core holds back
    while the client's window has room (as a segment of its own it would take a slot of
    the initial window), SPILL_HOLD_NS = 10 ms at most: then it goes, though the
    destination neither sends more nor closes."""
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
    s.settimeout(5)
    tfo_send(s, connect_request(*silent.getsockname()) + b"GET", core.addr)
    r = core.wait(RC_NEW)
    assert r.early == 3
    _rc_connect(core, r.id, silent.getsockname())
    conn, _ = silent.accept()
    conn.settimeout(5)
    assert conn.recv(100) == b"GET"
    # tcpi_snd_mss (u32 at 16): the client's 524 (536 - timestamps), as the relay's
    mss = struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 16)[0]
    body = os.urandom(mss)
    conn.sendall(body)
    _step_until_readable(core, s)
    got = s.recv(65536)
    assert got == SUCCESS + body[:mss - len(SUCCESS)]       # one whole segment
    first = time.monotonic()
    got += s.recv(65536) if select.select([s], [], [], 0)[0] else b""
    while len(got) < len(SUCCESS) + len(body):
        _step_until_readable(core, s)
        got += s.recv(65536)
    gap = time.monotonic() - first
    assert got == SUCCESS + body
    assert 0.008 <= gap < 1, gap
    assert core.lib.rc_counters(core.core).replies_coalesced == 1
    conn.close()
    core.lib.rc_abort_all(core.core, b"test")
    s.close()
