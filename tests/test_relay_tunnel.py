"""The relay's data path, end to end: a real relay subprocess, the RFC 8803
test client from relay_helpers, destination servers on loopback.

Loopback destinations are refused by default, so these relays run with
--allow-dest 127.0.0.0/8 (the default-deny itself is tested in
test_relay_policy.py).

The tests on the shared `relay` fixture run on both engines (--engine c, the
default, and python); the rest on the default one.
"""
import hashlib
import re
import os
import socket
import threading
import time

import pytest

from relay_helpers import (
    Relay, Server, convert_open, echo, read_reply, recv_all, recv_exact, reset_close,
)

pytestmark = pytest.mark.timeout(60)

ALLOW_LO = ("--allow-dest", "127.0.0.0/8", "--allow-dest", "::1")


@pytest.fixture(scope="module", params=["c", "python"])
def relay(request):
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--engine", request.param) as r:
        yield r


@pytest.fixture
def echo_server():
    with Server(echo) as s:
        yield s


def test_success_reply_then_echo_200k_intact(relay, echo_server):
    data = os.urandom(200_000)
    s = convert_open(relay.addr, echo_server.addr)
    msg, rest = read_reply(s)
    assert msg.error is None and msg.tlvs == ()
    sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
    sender.start()
    got = recv_all(s, rest)
    sender.join(5)
    s.close()
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_early_data_after_header_is_forwarded(relay):
    seen = []

    def handler(conn):
        seen.append(recv_exact(conn, 11))
        conn.sendall(b"ok")

    with Server(handler) as srv:
        # Header + early data in one SYN; nothing else is ever sent.
        s = convert_open(relay.addr, srv.addr, early=b"early bytes")
        msg, rest = read_reply(s)
        assert msg.error is None
        assert recv_exact(s, 2, rest) == b"ok"
        s.close()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [b"early bytes"]


def test_large_early_data_split_over_packets(relay, echo_server):
    # More early data than fits in one SYN: the rest follows the handshake and
    # must still come after the header, in order.
    data = os.urandom(50_000)
    s = convert_open(relay.addr, echo_server.addr, early=data)
    msg, rest = read_reply(s)
    assert msg.error is None
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s, rest) == data
    s.close()


def test_client_half_close_reaches_server_and_reply_still_flows(relay):
    def handler(conn):
        got = recv_all(conn)          # returns only when the client's FIN arrives
        conn.sendall(b"after-eof:" + got)
        return got

    with Server(handler) as srv:
        s = convert_open(relay.addr, srv.addr)
        read_reply(s)
        s.sendall(b"request")
        s.shutdown(socket.SHUT_WR)
        _, rest = b"", b""
        assert recv_all(s) == b"after-eof:request"
        s.close()


def test_server_half_close_reaches_client_and_client_can_still_send(relay):
    done = threading.Event()
    got = []

    def handler(conn):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))
        done.set()

    with Server(handler) as srv:
        s = convert_open(relay.addr, srv.addr)
        msg, rest = read_reply(s)
        assert recv_all(s, rest) == b"banner"   # EOF seen by the client
        s.sendall(b"still talking")             # the other direction stays open
        s.shutdown(socket.SHUT_WR)
        assert done.wait(5)
        s.close()
    assert got == [b"still talking"]


def test_client_reset_is_carried_to_server(relay):
    outcome = []

    def handler(conn):
        try:
            data = conn.recv(100)
            outcome.append(("data", data) if data else ("eof", b""))
        except ConnectionResetError:
            outcome.append(("reset", b""))

    with Server(handler) as srv:
        s = convert_open(relay.addr, srv.addr)
        read_reply(s)
        time.sleep(0.1)
        reset_close(s)
        deadline = time.monotonic() + 5
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.01)
    assert outcome == [("reset", b"")]


def test_server_reset_is_carried_to_client(relay):
    def handler(conn):
        conn.sendall(b"x")
        time.sleep(0.1)
        reset_close(conn)

    with Server(handler) as srv:
        s = convert_open(relay.addr, srv.addr)
        msg, rest = read_reply(s)
        assert msg.error is None
        got = bytearray(rest)
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break   # a FIN instead of a reset: fails below
                got += chunk
        s.close()
        assert got == b"x"


def test_many_concurrent_tunnels_bidirectional(relay, echo_server):
    n = 20
    payloads = [os.urandom(100_000 + i) for i in range(n)]
    results = [None] * n

    def one(i):
        s = convert_open(relay.addr, echo_server.addr)
        _, rest = read_reply(s)
        t = threading.Thread(target=lambda: (s.sendall(payloads[i]), s.shutdown(socket.SHUT_WR)))
        t.start()
        results[i] = recv_all(s, rest)
        t.join(10)
        s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == payloads


def test_slow_reader_does_not_lose_bytes_or_spin(relay):
    """The server sends 8 MB to a client that reads slowly: the relay's pipes
    fill, it must stop reading (not spin) and deliver every byte."""
    data = os.urandom(8 << 20)

    def handler(conn):
        conn.sendall(data)

    with Server(handler) as srv:
        s = convert_open(relay.addr, srv.addr)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        _, rest = read_reply(s)
        time.sleep(0.5)   # let every buffer on the way fill up
        cpu0 = _cpu(relay.proc.pid)
        time.sleep(0.5)
        cpu1 = _cpu(relay.proc.pid)
        got = recv_all(s, rest)
        s.close()
    assert got == data
    # Blocked on a full pipe the relay sleeps: well under 20% of a core.
    assert cpu1 - cpu0 < 0.1


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ipv6_listener_and_destination():
    with Server(echo, host="::1") as srv, \
            Relay("--listen", "[::1]:0", "--listen", "127.0.0.1:0", *ALLOW_LO) as r:
        assert len(r.addrs) == 2 and r.addrs[0][0] == "::1"
        for relay_addr in r.addrs:
            s = convert_open(relay_addr, srv.addr, early=b"v6")
            msg, rest = read_reply(s)
            assert msg.error is None
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, rest) == b"v6"
            s.close()


def test_tunnel_log_line(echo_server):
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO) as r:
        s = convert_open(r.addr, echo_server.addr, early=b"12345")
        _, rest = read_reply(s)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, rest) == b"12345"
        s.close()
        log = r.wait_log("outcome=ok")
    line = [ln for ln in log.splitlines() if "outcome=ok" in ln][0]
    host, port = echo_server.addr
    assert "client=127.0.0.1:" in line
    assert f"dest={host}:{port}" in line
    assert "up=5 down=5" in line
    assert "duration=" in line


def test_per_side_congestion_control_and_buffers():
    """--client-cc/--server-cc and per-side buffers land on the right sockets
    (read back with `ss -tim` on the relay's two sockets of one tunnel)."""
    import shutil
    import subprocess
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        avail = f.read().split()
    if not {"reno", "cubic"} <= set(avail):
        pytest.skip(f"needs reno and cubic, have {avail}")
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--client-cc", "reno", "--server-cc", "cubic",
                                    "--client-rcvbuf", "256k", "--server-sndbuf", "512k") as r:
        s = convert_open(r.addr, srv.addr)
        read_reply(s)
        rport, sport = r.addr[1], srv.addr[1]
        # The relay's socket toward the client has local port rport; its socket
        # toward the server has remote port sport (the echo server's own socket
        # has local port sport, filtered out by dport).
        client_side = subprocess.run(["ss", "-Htinm", "state", "established",
                                      f"( sport = :{rport} )"],
                                     capture_output=True, text=True, timeout=10).stdout
        server_side = subprocess.run(["ss", "-Htinm", "state", "established",
                                      f"( dport = :{sport} )"],
                                     capture_output=True, text=True, timeout=10).stdout
        s.close()
    assert "reno" in client_side.split(), client_side
    assert "cubic" in server_side.split(), server_side
    # SO_RCVBUF/SO_SNDBUF are doubled by the kernel: rb / tb in skmem.
    import re
    rb = int(re.search(r"skmem:\(r\d+,rb(\d+)", client_side).group(1))
    tb = int(re.search(r",tb(\d+)", server_side).group(1))
    assert rb == 2 * 256 * 1024
    assert tb == 2 * 512 * 1024


@pytest.mark.parametrize("pipe_size", ["4096", "64k", "64m"])
def test_pipe_sizes_small_and_refused(echo_server, pipe_size):
    """Tiny pipes (many short splices) and a size the kernel refuses (above
    fs.pipe-max-size without CAP_SYS_RESOURCE: the real capacity is read back)
    both deliver every byte."""
    data = os.urandom(3 << 20)
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--pipe-size", pipe_size) as r:
        s = convert_open(r.addr, echo_server.addr)
        _, rest = read_reply(s)
        t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        t.start()
        got = recv_all(s, rest)
        t.join(10)
        s.close()
        log = r.log
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    if pipe_size == "64m":
        with open("/proc/sys/fs/pipe-max-size") as f:
            if int(f.read()) < 64 << 20 and "F_SETPIPE_SZ" not in log:
                # Allowed only with CAP_SYS_RESOURCE.
                assert _has_cap_sys_resource()


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def test_keepalive_on_both_sides():
    import shutil
    import subprocess
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--keepalive", "30") as r:
        s = convert_open(r.addr, srv.addr)
        read_reply(s)
        out = {}
        for side, flt in (("client", f"( sport = :{r.addr[1]} )"),
                          ("server", f"( dport = :{srv.addr[1]} )")):
            out[side] = subprocess.run(["ss", "-Htno", "state", "established", flt],
                                       capture_output=True, text=True, timeout=10).stdout
        s.close()
    for side, text in out.items():
        m = re.search(r"timer:\(keepalive,(\d+(?:\.\d+)?)(min|sec)", text)
        assert m, (side, text)
        secs = float(m.group(1)) * (60 if m.group(2) == "min" else 1)
        assert 20 < secs <= 30, (side, text)
