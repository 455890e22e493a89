"""Relay tests that need their own network namespaces (root): 0-RTT proof
with net.ipv4.tcp_fastopen=3 set inside the namespace (never on the host),
unreachable and timed-out destinations, a default-config relay reaching a
real remote host and refusing its own addresses.

    client, relay (ns "relay", tfo=3) -- 198.51.100.0/24 -- ns "far" (server)
    relay routes: 203.0.113.0/24 via the far host (which drops it: no forwarding),
                  192.0.2.0/24 unreachable, no IPv6 route at all.
"""
import os
import socket
import time
import urllib.request

import pytest

from conftest import require_root
from pepsock.protocol import ErrorCode
from pepsock.testbed.netns import Topology
from pepsock.tfo import TCP_FASTOPEN
from relay_helpers import (
    Relay, Server, convert_open, echo, read_reply, recv_all, syn_data_acked,
    wait_eof_or_reset,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.root]


@pytest.fixture(scope="module")
def net():
    require_root()
    topo = Topology(prefix="rl")
    try:
        relay = topo.host("relay", tfo=3)
        far = topo.host("far", tfo=3)
        topo.link(relay, ["198.51.100.1/24"], far, ["198.51.100.2/24"])
        topo.route(relay, "203.0.113.0/24", "198.51.100.2")
        relay.run("ip", "route", "add", "unreachable", "192.0.2.0/24")
        yield topo
    finally:
        topo.cleanup()


@pytest.fixture(scope="module")
def relay(net):
    host = net.hosts["relay"]
    r = Relay("--listen", "127.0.0.1:0", "--listen", "198.51.100.1:0",
              "--connect-timeout", "1", "--stats", "127.0.0.1:0", prefix=host.cmd())
    yield r
    r.stop()


@pytest.fixture(scope="module")
def far_echo(net):
    with net.hosts["far"].enter():
        srv = Server(echo, host="198.51.100.2")
    yield srv
    srv.close()


def _metrics(net, relay):
    with net.hosts["relay"].enter():
        host, port = relay.stats
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as resp:
            text = resp.read().decode()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines() if ln and not ln.startswith("#")}


def _get_tfo_cookie(relay_addr, dest):
    """One connection with standard TFO: the SYN asks for the relay's TFO
    cookie (its data follows the handshake), the kernel caches it, and the
    next SYNs to that address carry it and their data (0-RTT)."""
    s = convert_open(relay_addr, dest, no_cookie=False)
    msg, _ = read_reply(s)
    assert msg.error is None and not syn_data_acked(s)
    s.close()


def test_data_in_the_syn_is_accepted_and_200k_echoed(net, relay, far_echo):
    data = os.urandom(200_000)
    with net.hosts["relay"].enter():
        _get_tfo_cookie(relay.addr, far_echo.addr)
    before = _metrics(net, relay)["pep_relay_syn_data_total"]
    with net.hosts["relay"].enter():
        s = convert_open(relay.addr, far_echo.addr, early=b"0rtt", no_cookie=False)
        msg, rest = read_reply(s)
        # The SYN-ACK acknowledged the header and the early data (0-RTT).
        assert syn_data_acked(s)
        assert msg.error is None
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s, rest)
        s.close()
    assert got == b"0rtt" + data
    assert _metrics(net, relay)["pep_relay_syn_data_total"] == before + 1


def test_client_in_another_namespace_gets_0rtt(net, relay, far_echo):
    # A client on the far host, through the veth, to the relay's public address.
    public = relay.addrs[1]
    with net.hosts["far"].enter():
        _get_tfo_cookie(public, far_echo.addr)
        s = convert_open(public, far_echo.addr, early=b"x" * 1000, no_cookie=False)
        msg, rest = read_reply(s)
        assert syn_data_acked(s)
        assert msg.error is None
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, rest) == b"x" * 1000
        s.close()


def test_no_route_is_error_97_network(net, relay):
    with net.hosts["relay"].enter():
        s = convert_open(relay.addr, ("2001:db8::1", 80))
        msg, _ = read_reply(s)
    assert msg.error.code == ErrorCode.DESTINATION_UNREACHABLE
    assert msg.error.value[:1] == b"\x00"     # ICMP code 0: network unreachable


def test_unreachable_route_is_error_97_host(net, relay):
    with net.hosts["relay"].enter():
        s = convert_open(relay.addr, ("192.0.2.10", 443))
        msg, _ = read_reply(s)
    assert msg.error.code == ErrorCode.DESTINATION_UNREACHABLE
    assert msg.error.value[:1] == b"\x01"     # host unreachable


def test_connect_timeout_is_error_65(net, relay):
    with net.hosts["relay"].enter():
        t0 = time.monotonic()
        s = convert_open(relay.addr, ("203.0.113.5", 80), early=b"lost")
        msg, _ = read_reply(s)
        took = time.monotonic() - t0
        s.shutdown(socket.SHUT_WR)
        assert wait_eof_or_reset(s) == "eof"
        s.close()
    assert msg.error.code == ErrorCode.NETWORK_FAILURE
    assert 0.8 < took < 4


def test_closed_port_on_remote_host_is_error_96(net, relay):
    with net.hosts["relay"].enter():
        s = convert_open(relay.addr, ("198.51.100.2", 9))
        msg, _ = read_reply(s)
    assert msg.error.code == ErrorCode.CONNECTION_RESET


def test_default_relay_refuses_its_own_addresses(net, relay):
    with net.hosts["relay"].enter():
        for dest in (("198.51.100.1", 22), ("198.51.100.255", 22), ("127.0.0.1", 22)):
            s = convert_open(relay.addr, dest)
            msg, _ = read_reply(s)
            assert msg.error.code == ErrorCode.NOT_AUTHORIZED, dest
            s.close()


# ---------------------------------------------------------------------------------
# Onward TCP Fast Open: the relay's SYN carries a verified client's early data.


def _tfo_server(host: str) -> Server:
    """An echo server with TCP_FASTOPEN on its listener; each connection's
    result is (did its SYN carry acknowledged data, bytes echoed)."""
    def handler(conn):
        syn = syn_data_acked(conn)
        return syn, echo(conn)
    srv = Server(handler, host=host)
    srv.sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 16)
    return srv


def _tunnel_through(relay_addr, dest, early: bytes) -> bytes:
    s = convert_open(relay_addr, dest, early=early, no_cookie=False)
    msg, rest = read_reply(s)
    assert msg.error is None
    s.shutdown(socket.SHUT_WR)
    got = recv_all(s, rest)
    s.close()
    return got


def _wait_results(srv: Server, n: int) -> list:
    deadline = time.monotonic() + 5
    while len(srv.results) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not srv.errors
    return list(srv.results)


@pytest.mark.parametrize("onward_tfo", [True, False])
def test_onward_syn_carries_the_early_data_from_the_second_tunnel_on(net, onward_tfo):
    """A TFO server: the first tunnel's onward SYN asks for its cookie, the
    second's carries the client's early data (server side TCPI_OPT_SYN_DATA);
    with --no-onward-tfo never.  Early data larger than the room the client's
    SYN leaves (RFC 8803 9.3) still arrives whole: the rest follows."""
    host = net.hosts["relay"]
    args = () if onward_tfo else ("--no-onward-tfo",)
    # A destination address of its own per case: the kernel's TFO cookie cache
    # is per destination, and the other case must start without a cookie.
    dest_ip = "198.51.100.2"
    with net.hosts["far"].enter():
        srv = _tfo_server(dest_ip)
    r = Relay("--listen", "127.0.0.1:0", "--stats", "127.0.0.1:0", *args,
              prefix=host.cmd())
    try:
        with host.enter():
            # Only destination-port-specific state: flush the onward cookie cache.
            host.run("ip", "tcp_metrics", "flush", dest_ip, check=False)
            # The client's TFO cookie for the relay (maybe cached already).
            assert _tunnel_through(r.addr, srv.addr, b"") == b""
            early = [b"first request " * 3, b"second request " * 3, bytes(range(256)) * 4]
            for data in early:
                assert _tunnel_through(r.addr, srv.addr, data) == data
        results = _wait_results(srv, 4)
        syns = [syn for syn, _ in results[1:]]      # [0]: the cookie fetch, no early data
        assert [n for _, n in results[1:]] == [len(d) for d in early]
        metrics = _metrics(net, r)
        if onward_tfo:
            assert syns == [False, True, True], syns
            assert metrics["pep_relay_onward_syn_data_total"] == 2
        else:
            assert syns == [False, False, False], syns
            assert metrics["pep_relay_onward_syn_data_total"] == 0
    finally:
        r.stop()
        srv.close()
