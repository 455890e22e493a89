"""Forged source addresses against the relay (issue 9): what one raw SYN with
a made-up source, a Convert header, a Connect TLV and a payload achieves.

    client ns 192.0.2.2 -- relay ns 192.0.2.1 | 198.51.100.1 -- server ns 198.51.100.2
                                                 203.0.113.0/24 routed to the server ns,
                                                 which drops it (no forwarding): a
                                                 destination that never answers

The forged SYNs leave the client namespace through a raw socket (IP_HDRINCL)
with source 192.0.2.77 (nobody's): the relay's SYN-ACK goes nowhere.  What
the destination saw is counted on its interface with an AF_PACKET socket.
"""
import os
import socket
import struct
import time

import pytest

from conftest import require_root, require_tool
from pepsock.protocol import Connect, Cookie, Error, ErrorCode, Message, connect_request
from pepsock.relay import cookies as C
from pepsock.tfo import MSG_FASTOPEN
from pepsock.testbed.netns import Topology
from rawsyn import PacketCounter, send_ipv4, syn_packet
from relay_helpers import Relay, Server, read_reply, recv_all, syn_data_acked, tfo_send

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

FORGED = "192.0.2.77"
DEST = ("198.51.100.2", 8080)
SILENT = ("203.0.113.5", 80)          # routed to the server ns, which drops it
REQUEST = b"GET /spoofed HTTP/1.0\r\n\r\n"


@pytest.fixture
def net():
    require_root()
    topo = Topology(prefix="rs")
    try:
        client = topo.host("client", tfo=3)
        relay = topo.host("relay", tfo=3)
        server = topo.host("server", tfo=3)
        for h in (client, relay, server):
            h.sysctl("net.ipv4.conf.all.rp_filter", 0)
            h.sysctl("net.ipv4.conf.default.rp_filter", 0)
        topo.link(client, ["192.0.2.2/24"], relay, ["192.0.2.1/24"])
        _, topo.server_if = topo.link(relay, ["198.51.100.1/24"], server, ["198.51.100.2/24"])
        topo.route(relay, "203.0.113.0/24", "198.51.100.2")
        topo.route(client, "198.51.100.0/24", "192.0.2.1")
        yield topo
    finally:
        topo.cleanup()


def received(conn) -> bytes:
    """What a connection brought, until EOF or 0.5 s of silence."""
    conn.settimeout(0.5)
    data = b""
    try:
        while chunk := conn.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


class Destination:
    """A listener at DEST in the server ns that records what each connection
    it accepted received (conns), and packet counters for DEST's and SILENT's
    ports."""

    def __init__(self, net):
        with net.hosts["server"].enter():
            self.server = Server(received, *DEST)
            self.packets = PacketCounter(net.server_if, DEST[1])
            self.silent = PacketCounter(net.server_if, SILENT[1])

    @property
    def conns(self) -> list[bytes]:
        return self.server.results

    def close(self):
        self.server.close()
        self.packets.close()
        self.silent.close()


@pytest.fixture
def dest(net):
    d = Destination(net)
    yield d
    d.close()


def start_relay(net, *args):
    return Relay("--listen", "192.0.2.1:0", "--stats", "127.0.0.1:0", *args,
                 prefix=net.hosts["relay"].cmd())


def metrics(net, relay):
    with net.hosts["relay"].enter():
        return relay.metrics()


def forge(net, relay, dest, payload=REQUEST, source=FORGED, sport=40000, options=b"",
          header=None):
    header = connect_request(*dest) if header is None else header
    pkt = syn_packet(source, relay.addr[0], sport, relay.addr[1], header + payload,
                     options=options)
    with net.hosts["client"].enter():
        send_ipv4(pkt)


def tfo_client(net, relay, dest, early, no_cookie=False, header=None):
    """A real client in the client ns: header + early data through TFO (standard
    cookie TFO unless no_cookie), returns (SYN data acked?, reply, bytes after)."""
    with net.hosts["client"].enter():
        s = socket.socket()
        s.settimeout(5)
        if no_cookie:
            s.setsockopt(socket.IPPROTO_TCP, 34, 1)
        tfo_send(s, (header or connect_request(*dest)) + early, relay.addr)
        msg, rest = read_reply(s)
        acked = syn_data_acked(s)
        s.shutdown(socket.SHUT_WR)
        if msg.error is None:
            rest = recv_all(s, rest)
        s.close()
    return acked, msg, rest


def test_forged_syn_against_default_relay_reaches_nobody(net, dest):
    with start_relay(net) as relay:
        assert "TFO cookies cannot protect" not in relay.log
        for i in range(6):
            # Half of them present a made-up TFO cookie (option 34, 8 bytes).
            junk = struct.pack("!BBH", 2, 4, 1460) + bytes((34, 10)) + os.urandom(8)
            forge(net, relay, DEST, sport=40000 + i, options=junk if i % 2 else b"")
        time.sleep(1.5)
        m = metrics(net, relay)
    assert dest.conns == []
    assert dest.packets.poll().syns == 0 and dest.packets.payload == 0
    # The kernel never handed the relay a connection: no cookie, no accept().
    assert m["pep_relay_tunnels_total"] == 0


def test_real_client_gets_0rtt_once_it_holds_a_cookie(net, dest):
    with start_relay(net) as relay:
        first = tfo_client(net, relay, DEST, b"one")
        second = tfo_client(net, relay, DEST, b"two")
        third = tfo_client(net, relay, DEST, b"three")
        m = metrics(net, relay)
    # Connection 1 asked for the cookie (1-RTT), 2 and 3 carried it (0-RTT).
    assert [first[0], second[0], third[0]] == [False, True, True]
    assert all(r[1].error is None for r in (first, second, third))
    assert sorted(dest.conns) == [b"one", b"three", b"two"]
    assert m["pep_relay_syn_data_total"] == 2


def test_forged_syn_against_no_cookie_relay_delivers_no_byte(net, dest):
    with start_relay(net, "--no-cookie", "--header-timeout", "2") as relay:
        assert "--no-cookie: the kernel accepts data in a SYN from any source" in relay.log
        for i in range(5):
            forge(net, relay, DEST, sport=40000 + i, source=f"192.0.2.{77 + i}")
        time.sleep(3)
        m = metrics(net, relay)
        log = relay.log
    # The relay did get the forged SYNs' data (that is what --no-cookie means)...
    assert m["pep_relay_unverified_total"] == 5
    # ...but no handshake ever completed: each tunnel was reset, and the
    # destination saw at most one SYN per forged SYN and not one byte.
    assert m["pep_relay_unverified_expired_total"] == 5
    assert log.count("client never completed its handshake") == 5
    assert dest.packets.poll().syns <= 5
    assert dest.packets.payload == 0
    assert all(data == b"" for data in dest.conns)
    # A real client still gets 0-RTT without a cookie, and its bytes arrive.
    with start_relay(net, "--no-cookie") as relay:
        acked, msg, _ = tfo_client(net, relay, DEST, b"real", no_cookie=True)
    assert acked and msg.error is None
    assert b"real" in dest.conns


def test_no_cookie_relay_never_retransmits_a_forged_clients_onward_syn(net, dest):
    with start_relay(net, "--no-cookie", "--header-timeout", "4") as relay:
        forge(net, relay, SILENT)
        time.sleep(4.5)
        forged_syns = dest.silent.poll().syns
        # Control: the same destination for a verified client gets the
        # kernel's retransmissions (at 1 s and 3 s), so the count can see them.
        with net.hosts["client"].enter():
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, 34, 1)
            s.sendto(connect_request(*SILENT), MSG_FASTOPEN, relay.addr)
            time.sleep(3.5)
            s.close()
        real_syns = dest.silent.poll().syns - forged_syns
    assert forged_syns == 1
    assert real_syns >= 2


@pytest.mark.parametrize("sysctl", [0x203, 0x603])
def test_host_that_waives_cookies_is_named_and_still_guarded(net, dest, sysctl):
    net.hosts["relay"].sysctl("net.ipv4.tcp_fastopen", sysctl)
    with start_relay(net, "--header-timeout", "1") as relay:
        assert "has the 0x200 bit" in relay.log
        assert f"sysctl -w net.ipv4.tcp_fastopen={sysctl & ~0x200}" in relay.log
        forge(net, relay, DEST)
        time.sleep(2)
        m = metrics(net, relay)
    # The kernel handed the forged SYN over; the relay's handshake guard held it.
    assert m["pep_relay_unverified_total"] == 1
    assert dest.packets.poll().payload == 0
    assert all(data == b"" for data in dest.conns)


def test_tfo_on_all_listeners_bit_does_not_waive_cookies(net, dest):
    # 0x400 (TFO_SERVER_WO_SOCKOPT1) enables TFO on every listener; measured
    # here: it does not make the kernel accept cookie-less SYN data, so the
    # relay does not warn about it.
    net.hosts["relay"].sysctl("net.ipv4.tcp_fastopen", 0x403)
    with start_relay(net) as relay:
        assert "TFO cookies cannot protect" not in relay.log
        forge(net, relay, DEST)
        time.sleep(1.5)
        m = metrics(net, relay)
    assert m["pep_relay_tunnels_total"] == 0
    assert dest.packets.poll().syns == 0


def test_route_without_cookie_is_named(net):
    relay_ns = net.hosts["relay"]
    relay_ns.run("ip", "route", "change", "192.0.2.0/24", "dev",
                 relay_ns.run("ip", "-o", "route", "get", "192.0.2.2").stdout.split("dev ")[1]
                 .split()[0], "fastopen_no_cookie", "1", check=False)
    out = relay_ns.run("ip", "route", "show").stdout
    if "fastopen_no_cookie" not in out:
        pytest.skip("this iproute2 cannot set fastopen_no_cookie")
    with start_relay(net) as relay:
        assert "fastopen_no_cookie 1" in relay.log and "ip route change" in relay.log


def test_no_cookie_with_cookie_secret(net, dest, tmp_path):
    """--no-cookie --cookie-secret: an address cookie (which only a client that
    received our Error 3 at that address holds) counts as proof and lifts the
    handshake wait; a token (authorization from anywhere) does not."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32 + b"\n")
    with start_relay(net, "--no-cookie", "--cookie-secret", str(secret),
                     "--header-timeout", "2") as relay:
        token = C.make_token(b"s" * 32, "roaming")
        forge(net, relay, DEST, payload=REQUEST)                      # no Cookie TLV
        forge(net, relay, DEST, payload=REQUEST, sport=40001,
              header=Message((Connect(*DEST), Cookie(token))).encode())
        time.sleep(3)
        m = metrics(net, relay)
        assert m["pep_relay_unverified_expired_total"] == 2
        assert dest.packets.poll().payload == 0
        assert all(data == b"" for data in dest.conns)
        # A real client: Error 3 gives it its address cookie...
        acked, msg, _ = tfo_client(net, relay, DEST, b"", no_cookie=True)
        assert msg.error.code == ErrorCode.MISSING_COOKIE
        header = Message((Connect(*DEST), Cookie(msg.error.value[1:]))).encode()
        # ...and with it the relay needs no handshake: the client's first ACK is
        # dropped (the relay's SYN-ACK retransmission would bring the next one
        # after 1 s), yet the reply and the echo come at once.
        require_tool("iptables")
        rule = ("OUTPUT", "-p", "tcp", "--dport", str(relay.addr[1]), "--tcp-flags",
                "SYN,ACK", "ACK", "-m", "connbytes", "--connbytes", "2:2", "--connbytes-dir",
                "original", "--connbytes-mode", "packets", "-j", "DROP")
        client = net.hosts["client"]
        client.run("iptables", "-w", "5", "-I", *rule)
        t0 = time.monotonic()
        acked, msg, rest = tfo_client(net, relay, DEST, b"proved", no_cookie=True, header=header)
        took = time.monotonic() - t0
        # Control: without the cookie (token instead), the reply waits for the ACK.
        token_header = Message((Connect(*DEST), Cookie(token))).encode()
        t0 = time.monotonic()
        _, msg2, _ = tfo_client(net, relay, DEST, b"", no_cookie=True, header=token_header)
        took2 = time.monotonic() - t0
        drops = client.run("iptables", "-w", "5", "-L", "OUTPUT", "-v", "-x", "-n").stdout
        client.run("iptables", "-w", "5", "-D", *rule)
        m = metrics(net, relay)
    assert acked and msg.error is None and msg2.error is None
    assert b"proved" in dest.conns
    assert m["pep_relay_unverified_cookie_total"] == 1
    assert " DROP " in drops and int(drops.split(" DROP ")[0].split()[-2]) == 2, drops
    assert took < 0.5 < 0.9 < took2, (took, took2)


def banner_server(net, port=2525) -> Server:
    """A destination that speaks first: 10 kB as soon as a connection is up
    (what made one forged SYN reflect ~150x its size before issue 9)."""
    with net.hosts["server"].enter():
        return Server(lambda c: c.sendall(b"220 " + b"x" * 10_000 + b"\r\n"),
                      "198.51.100.2", port)


@pytest.mark.parametrize("mode", [(), ("--no-cookie",)], ids=["default", "no-cookie"])
def test_forged_syn_makes_the_victim_receive_no_data(net, mode):
    """The forged source exists (a victim host that drops what it gets): it
    receives the kernel's SYN-ACKs and at most a reset, never a byte of data."""
    client = net.hosts["client"]
    require_tool("iptables")
    ifname = client.run("ip", "-o", "route", "get", "192.0.2.1").stdout.split("dev ")[1].split()[0]
    client.run("ip", "addr", "add", f"{FORGED}/32", "dev", ifname)
    client.run("iptables", "-w", "5", "-I", "INPUT", "-d", FORGED, "-j", "DROP")
    banner = banner_server(net)
    with client.enter():
        victim = PacketCounter(ifname, 40000)
    try:
        with start_relay(net, "--header-timeout", "2.5", *mode) as relay:
            pkt = syn_packet(FORGED, relay.addr[0], 40000, relay.addr[1],
                             connect_request(*banner.addr) + REQUEST)
            with client.enter():
                send_ipv4(pkt)
            time.sleep(4)
        victim.poll()
        print(f"forged SYN of {len(pkt)} bytes, mode {mode or 'default'}: victim got "
              f"{victim.segments} segments, {victim.wire_bytes} bytes, {victim.payload} of data")
        assert victim.payload == 0
        assert victim.segments <= 4          # SYN-ACK at 0, 1 s and 3 s, a reset
        assert victim.wire_bytes <= 4 * 60
    finally:
        victim.close()
        banner.close()


def test_unverified_clients_are_bounded_by_the_tfo_queue(net, dest):
    """--no-cookie: the kernel counts a TFO child until its handshake completes,
    so at most --tfo-queue forged SYNs are pending at once; the rest get no
    accept() at all (the kernel answers them as plain SYNs, data dropped)."""
    with start_relay(net, "--no-cookie", "--tfo-queue", "8", "--header-timeout", "3") as relay:
        for i in range(40):
            forge(net, relay, DEST, source=f"192.0.2.{100 + i}", sport=41000 + i)
        time.sleep(1)
        m = metrics(net, relay)
    assert m["pep_relay_unverified_total"] == 8
    assert m["pep_relay_tunnels_open"] <= 8
    assert dest.packets.poll().syns <= 8 and dest.packets.payload == 0


def test_refusal_at_accept_waits_for_the_handshake(net, dest):
    """--no-cookie with issue 16's per-client limits: a refusal decided at
    accept (Error 32 outside --allow-client, Error 64 past --max-per-client)
    goes to an unverified client only once its handshake completes. Forged
    sources get no byte and the errors are not counted as sent; a real
    client still gets each Error, with Error 64's Value 1 (retry after 1 s)."""
    client = net.hosts["client"]
    require_tool("iptables")
    ifname = client.run("ip", "-o", "route", "get", "192.0.2.1").stdout.split("dev ")[1].split()[0]
    outsider = "192.0.2.200"                        # outside --allow-client
    for victim_ip in (FORGED, outsider):
        client.run("ip", "addr", "add", f"{victim_ip}/32", "dev", ifname)
        client.run("iptables", "-w", "5", "-I", "INPUT", "-d", victim_ip, "-j", "DROP")
    with client.enter():
        victims = [PacketCounter(ifname, 40000 + i) for i in range(3)]
    try:
        with start_relay(net, "--no-cookie", "--header-timeout", "2", "--max-per-client", "1",
                         "--allow-client", "192.0.2.0/25") as relay:
            forge(net, relay, DEST, source=FORGED, sport=40000)     # takes FORGED's one slot
            forge(net, relay, DEST, source=FORGED, sport=40001)     # Error 64 at accept
            forge(net, relay, DEST, source=outsider, sport=40002)   # Error 32 at accept
            time.sleep(3.5)
            m = metrics(net, relay)
            # Control: the real client (verified by its handshake) gets both.
            with client.enter():
                first = socket.socket()
                first.setsockopt(socket.IPPROTO_TCP, 34, 1)
                tfo_send(first, connect_request(*DEST) + b"held", relay.addr)
                msg_first, _ = read_reply(first)
            _, msg_busy, _ = tfo_client(net, relay, DEST, b"x", no_cookie=True)
            first.close()
            relay2_args = ("--no-cookie", "--allow-client", "192.0.2.3/32")
        with start_relay(net, *relay2_args) as relay2:
            _, msg_outside, _ = tfo_client(net, relay2, DEST, b"x", no_cookie=True)
        for v in victims:
            v.poll()
    finally:
        for v in victims:
            v.close()
    print("forged sources refused at accept: " + ", ".join(
        f"{v.segments} segments, {v.payload} bytes of data" for v in victims))
    assert all(v.payload == 0 for v in victims)
    assert all(v.segments <= 4 for v in victims)    # SYN-ACKs and a reset
    assert m["pep_relay_unverified_expired_total"] == 1     # the one that got a tunnel
    assert m['pep_relay_errors_total{code="64",name="resource_exceeded"}'] == 0
    assert m['pep_relay_errors_total{code="32",name="not_authorized"}'] == 0
    assert msg_first.error is None
    assert msg_busy.error == Error(ErrorCode.RESOURCE_EXCEEDED, b"\x01")
    assert msg_outside.error.code == ErrorCode.NOT_AUTHORIZED


def test_unverified_retry_keeps_one_pending_slot(net, dest):
    """--no-cookie, --max-pending-per-client 1: a real client whose ACK is late
    (dropped for 1.5 s) while the destination ignores the first onward SYN.
    The relay drops that attempt at 0.7 s (no retransmission), connects again
    once the client's ACK arrives (the SYN-ACK retransmitted at 3 s), and the
    tunnel works. The retry holds the client's one slot throughout and gives
    it back once connected: the client's next tunnel is served (were the slot
    taken twice, or lost, it would get Error 64)."""
    require_tool("iptables")
    client, server = net.hosts["client"], net.hosts["server"]
    drop_ack = ["OUTPUT", "-p", "tcp", "-d", "192.0.2.1", "--tcp-flags", "ALL", "ACK", "-j", "DROP"]
    drop_syn = ["INPUT", "-p", "tcp", "--dport", str(DEST[1]), "--syn", "-j", "DROP"]
    with start_relay(net, "--no-cookie", "--header-timeout", "6",
                     "--max-pending-per-client", "1") as relay:
        client.run("iptables", "-w", "5", "-I", *drop_ack)
        server.run("iptables", "-w", "5", "-I", *drop_syn)
        t0 = time.monotonic()
        with client.enter():
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, 34, 1)
            tfo_send(s, connect_request(*DEST) + b"late", relay.addr)
        time.sleep(1.5)
        client.run("iptables", "-w", "5", "-D", *drop_ack)
        server.run("iptables", "-w", "5", "-D", *drop_syn)
        msg, _ = read_reply(s, timeout=8)
        took = time.monotonic() - t0
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        recv_all(s)
        s.close()
        _, again, _ = tfo_client(net, relay, DEST, b"next", no_cookie=True)
        m = metrics(net, relay)
    print(f"late ACK: reply after {took:.2f} s; destination SYNs {dest.packets.poll().syns}")
    assert msg.error is None, msg.error
    assert took >= 1.5
    assert dest.packets.syns == 3     # the unverified attempt's, the retry's, the next tunnel's
    assert again.error is None, again.error
    assert sorted(dest.conns) == [b"late", b"next"]
    assert m["pep_relay_unverified_total"] >= 1
    assert m["pep_relay_unverified_expired_total"] == 0
