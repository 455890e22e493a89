"""Onward TCP Fast Open on the evaluation testbed's delay lines: through the
relay, a request's first response byte arrives after R1 + R2 when the
destination supports TFO (the relay's SYN carries the request), and after
R1 + 2 R2 with --no-onward-tfo (the relay's handshake, then the request).

    client --R1-- relay (pep) --R2-- server (TCP_FASTOPEN on its listener)
"""
import socket
import time

import pytest

from conftest import require_root, require_tool
from pepsock.tfo import TCP_FASTOPEN
from relay_helpers import Relay, Server, convert_open, read_reply, syn_data_acked

pytest.importorskip("pyroute2", reason="the eval extra (pip install pepsock[eval]) is not installed")

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

R1_MS, R2_MS = 20, 60


@pytest.fixture(scope="module")
def testbed():
    require_root()
    require_tool("cc")
    from pepsock.testbed.topology import Settings, Testbed
    tb = Testbed(Settings(r1_ms=R1_MS, r2_ms=R2_MS, wireless_mbit=100), prefix="evo")
    yield tb
    tb.close()


def _respond(conn):
    """A server that answers a request at once, and says whether it came in the SYN."""
    syn = syn_data_acked(conn)
    req = conn.recv(4096)
    conn.sendall(b"R")
    while conn.recv(4096):
        pass
    return syn, req


def _ttfb_ms(relay_addr, dest, request: bytes) -> float:
    """Time from the request (in the client's SYN) to the first response byte."""
    t0 = time.monotonic()
    s = convert_open(relay_addr, dest, early=request, no_cookie=False, timeout=5)
    msg, rest = read_reply(s)
    assert msg.error is None
    if not rest:
        rest = s.recv(1)
    t = (time.monotonic() - t0) * 1000
    assert rest == b"R"
    s.close()
    return t


@pytest.mark.parametrize("onward_tfo", [True, False])
def test_ttfb_is_r1_plus_r2_with_onward_tfo(testbed, onward_tfo):
    from pepsock.testbed.topology import ADDR
    tb = testbed
    with tb.server.enter():
        srv = Server(_respond, host=ADDR["server"], port=6000 + onward_tfo)
    srv.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 16)
    args = () if onward_tfo else ("--no-onward-tfo",)
    r = Relay("--listen", f"{ADDR['pep_w']}:0", "--allow-dest", "203.0.113.0/24",
              *args, prefix=tb.pep.cmd())
    try:
        request = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
        with tb.client.enter():
            times = [_ttfb_ms(r.addr, srv.addr, request) for _ in range(5)]
    finally:
        r.stop()
        srv.close()
    # 1: the client fetches the relay's cookie (one R1 more); 2: the relay
    # fetches the server's; from 3 on both SYNs carry the request.
    steady = sorted(times[2:])[1]
    syns = [syn for syn, _ in srv.results]
    print(f"onward_tfo={onward_tfo}: TTFB ms {[round(t, 1) for t in times]}, server saw SYN "
          f"data {syns}")
    assert all(req == request for _, req in srv.results)
    if onward_tfo:
        assert syns[2:] == [True] * 3
        assert R1_MS + R2_MS <= steady < R1_MS + 1.5 * R2_MS, times
    else:
        assert not any(syns)
        assert steady >= R1_MS + 2 * R2_MS - 2, times
