"""Issue 12: the stats endpoint never blocks the relay's loop.

The relay serves tunnels and its Prometheus endpoint from one event loop, so a
stats client that sends half a request, trickles it byte by byte, or asks and
then never reads must cost the tunnels nothing: here all eight stats slots
(MAX_STATS_CLIENTS) are held by such clients while a tunnel is opened and
echoes small messages back and forth, each round trip timed.  A loop that
blocked on any of them would hold every round trip for the stats client
timeout (2 s) or forever: checked by hand against a relay whose stats client
read on until the request was complete (the test failed in 16 s).  The write
side is exercised but cannot block here: the answer (~4.3 KB) fits in the
relay's socket send buffer, so a blocking sendall would pass too.
"""
from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

from conftest import require_root
from pepsock.testbed.netns import Topology
from relay_helpers import Relay, Server, convert_open, echo, read_reply, recv_exact

pytestmark = [pytest.mark.timeout(60), pytest.mark.root]

REQUEST = b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n"
#: The endpoint's documented contract (docs/relay.md, Observability): 8
#: connections served at once, each closed after 2 s.
MAX_STATS_CLIENTS = 8
STATS_CLIENT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def ns():
    require_root()
    topo = Topology(prefix="rsl")
    try:
        yield topo.host("relay", tfo=3)
    finally:
        topo.cleanup()


def _stalled_stats_clients(stats: tuple[str, int]) -> tuple[list[socket.socket], threading.Event]:
    """Fill every stats slot with a client that makes the relay wait:
    silent ones, one with half a request, one trickling its request a byte
    every 100 ms, and ones that send a whole request but never read the answer
    (a receive buffer of the kernel's minimum, so the answer cannot all be
    taken at once)."""
    held = []
    stop = threading.Event()
    for kind in ["silent"] * 3 + ["half", "trickle"] + ["unread"] * (MAX_STATS_CLIENTS - 5):
        s = socket.socket()
        if kind == "unread":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        s.settimeout(2)
        s.connect(stats)
        if kind == "half":
            s.sendall(REQUEST[:10])
        elif kind == "unread":
            s.sendall(REQUEST)
        elif kind == "trickle":
            def trickle(s=s):
                for b in REQUEST:
                    if stop.wait(0.1):
                        return
                    try:
                        s.send(bytes([b]))
                    except OSError:
                        return
            threading.Thread(target=trickle, daemon=True).start()
        held.append(s)
    return held, stop


def _closed_by_peer(s: socket.socket) -> bool:
    """Reads what is left; True once the relay's FIN or reset arrives."""
    s.settimeout(0.5)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_stalled_stats_clients_do_not_delay_tunnels(ns):
    with ns.enter():
        srv = Server(echo)
    relay = Relay("--listen", "127.0.0.1:0", "--allow-dest", "127.0.0.0/8", "--no-cookie",
                  "--stats", "127.0.0.1:0", prefix=ns.cmd())
    held: list[socket.socket] = []
    stop = threading.Event()
    try:
        with ns.enter():
            # The answer's size, and a round-trip baseline with the stats port quiet.
            answer = b""
            with socket.create_connection(relay.stats, timeout=3) as s:
                s.sendall(REQUEST)
                while chunk := s.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.0 200")

            def round_trips(n: int) -> list[float]:
                t0 = time.monotonic()
                s = convert_open(relay.addr, srv.addr)
                assert read_reply(s)[0].error is None
                times = [time.monotonic() - t0]
                for i in range(n):
                    t = time.monotonic()
                    msg = b"%04d" % i
                    s.sendall(msg)
                    assert recv_exact(s, 4) == msg
                    times.append(time.monotonic() - t)
                s.close()
                return times

            quiet = round_trips(20)
            held, stop = _stalled_stats_clients(relay.stats)
            time.sleep(0.2)             # every one of them accepted and waiting
            t0 = time.monotonic()
            busy = round_trips(20)
            took = time.monotonic() - t0
            # The stalled clients are closed after STATS_CLIENT_TIMEOUT (the
            # unread answers never finished), and the endpoint serves again.
            time.sleep(STATS_CLIENT_TIMEOUT + 0.5)
            closed = sum(_closed_by_peer(s) for s in held)
            with socket.create_connection(relay.stats, timeout=3) as s:
                s.sendall(REQUEST)
                assert s.recv(12) == b"HTTP/1.0 200"
    finally:
        stop.set()
        for s in held:
            s.close()
        relay.stop()
        srv.close()
    print(f"stats answer {len(answer)} bytes; {len(held)} stalled stats clients; tunnel "
          f"set-up + 20 echo round trips took {took * 1000:.1f} ms: set-up "
          f"{busy[0] * 1000:.2f} ms (quiet {quiet[0] * 1000:.2f}), round trip median "
          f"{statistics.median(busy[1:]) * 1000:.2f} ms max {max(busy[1:]) * 1000:.2f} ms "
          f"(quiet {statistics.median(quiet[1:]) * 1000:.2f} / {max(quiet[1:]) * 1000:.2f}); "
          f"{closed} of them closed by the relay after {STATS_CLIENT_TIMEOUT:g} s")
    # A blocked loop would hold a round trip for the 2 s client timeout (or
    # forever); the margins are for a loaded 2-core machine.
    assert took < 1.0, busy
    assert max(busy) < 0.5, busy
    assert closed == len(held)
