"""Two relays behind one address (ECMP): with a shared --tfo-key and a shared
--cookie-secret a client's connections land on both and are 0-RTT on both.

    client 192.0.2.2 -- router 192.0.2.1 ==multipath 203.0.113.100/32==> relay A 198.51.100.2
                        (L4 hash)                                     \\=> relay B 198.51.100.18
    both relays own 203.0.113.100 (on lo) and listen on it; the destination (an
    echo server) runs in the router ns at 192.0.2.1.

Without the shared key each relay's kernel has its own TFO key, so a cookie
from one is refused by the other (the negative control below).
"""
import socket

import pytest

from conftest import require_root
from pepsock.protocol import Connect, Cookie, ErrorCode, Message, connect_request
from pepsock.testbed.netns import Topology
from relay_helpers import Relay, Server, echo, read_reply, recv_all, syn_data_acked, tfo_send

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

VIP = "203.0.113.100"
PORT = 5124
DEST = ("192.0.2.1", 7007)
N = 24


@pytest.fixture
def fleet(tmp_path):
    require_root()
    topo = Topology(prefix="rf")
    try:
        client = topo.host("client", tfo=3)
        router = topo.host("router", forwarding=True, tfo=3)
        a = topo.host("a", tfo=3)
        b = topo.host("b", tfo=3)
        topo.link(client, ["192.0.2.2/24"], router, ["192.0.2.1/24"])
        topo.link(router, ["198.51.100.1/28"], a, ["198.51.100.2/28"])
        topo.link(router, ["198.51.100.17/28"], b, ["198.51.100.18/28"])
        topo.route(client, "default", "192.0.2.1")
        for relay, gw in ((a, "198.51.100.1"), (b, "198.51.100.17")):
            relay.run("ip", "addr", "add", f"{VIP}/32", "dev", "lo")
            topo.route(relay, "default", gw)
        router.sysctl("net.ipv4.fib_multipath_hash_policy", 1)      # L4: ports count
        router.run("ip", "route", "add", f"{VIP}/32", "nexthop", "via", "198.51.100.2",
                   "nexthop", "via", "198.51.100.18")
        with router.enter():
            srv = Server(echo, host="0.0.0.0", port=DEST[1])
        topo.echo = srv
        yield topo
        srv.close()
    finally:
        topo.cleanup()


def _relays(fleet, *args):
    return [Relay("--listen", f"{VIP}:{PORT}", "--allow-dest", "192.0.2.1/32",
                  "--stats", "127.0.0.1:0", *args, prefix=fleet.hosts[n].cmd())
            for n in ("a", "b")]


def _connect(fleet, header: bytes, early: bytes):
    """One standard-TFO connection from the client ns: (0-RTT?, reply, echoed)."""
    with fleet.hosts["client"].enter():
        s = socket.socket()
        s.settimeout(5)
        tfo_send(s, header + early, (VIP, PORT))
        msg, rest = read_reply(s)
        acked = syn_data_acked(s)
        if msg.error is None:
            s.shutdown(socket.SHUT_WR)
            rest = recv_all(s, rest)
        s.close()
    return acked, msg, rest


def _served(fleet, relays):
    out = []
    for name, r in zip(("a", "b"), relays):
        with fleet.hosts[name].enter():
            m = r.metrics()
        out.append((m["pep_relay_tunnels_established_total"], m["pep_relay_syn_data_total"]))
    return out


def test_shared_keys_make_both_relays_accept_each_others_cookies(fleet, tmp_path):
    key, secret = tmp_path / "tfo.key", tmp_path / "cookie.secret"
    key.write_text("00112233445566778899aabbccddeeff\nffeeddccbbaa99887766554433221100\n")
    secret.write_bytes(b"fleet-wide cookie secret 0123456789\n")
    relays = _relays(fleet, "--tfo-key", str(key), "--cookie-secret", str(secret))
    try:
        # The first connection learns both cookies: the kernel's TFO cookie (its
        # SYN asked for it) and the Cookie TLV (Error 3), from whichever relay.
        acked, msg, _ = _connect(fleet, connect_request(*DEST), b"")
        assert not acked and msg.error.code == ErrorCode.MISSING_COOKIE
        header = Message((Connect(*DEST), Cookie(msg.error.value[1:]))).encode()
        results = [_connect(fleet, header, f"n{i}".encode()) for i in range(N)]
        served = _served(fleet, relays)
    finally:
        for r in relays:
            r.stop()
    assert all(msg.error is None for _, msg, _ in results)
    assert [rest for _, _, rest in results] == [f"n{i}".encode() for i in range(N)]
    assert all(acked for acked, _, _ in results), [a for a, _, _ in results]
    # Both relays served connections, all of them 0-RTT.
    assert all(est > 0 and syn == est for est, syn in served), served
    assert sum(est for est, _ in served) == N


def test_without_a_shared_key_cookies_do_not_cross(fleet):
    relays = _relays(fleet)
    try:
        results = [_connect(fleet, connect_request(*DEST), f"n{i}".encode())
                   for i in range(N + 1)]
        served = _served(fleet, relays)
    finally:
        for r in relays:
            r.stop()
    assert all(msg.error is None for _, msg, _ in results)
    assert all(est > 0 for est, _ in served), served
    # Every switch between relays presents a cookie the other kernel refuses.
    assert sum(1 for acked, _, _ in results[1:] if not acked) >= 1
