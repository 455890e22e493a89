"""The relay under hostile input, faults and policy (issue 6).

Two namespaces; the relay runs with its default destination policy:

    ns relay: relay on 127.0.0.1 and 198.51.100.1 (+ 2001:db8::1)
              route 203.0.113.0/24 via far (far drops it: a destination that times out)
              route 192.0.2.0/24 unreachable
    ns far:   198.51.100.2, the destination servers (echo, half-closers, resetters)

Every hostile or broken client gets the Error TLV docs/protocol.md names (or a
reset where it reset first); afterwards a good client is served at once and
the relay holds exactly the fds it started with (pooled pipes aside).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import require_root, require_tool
from pepsock import protocol
from pepsock.protocol import ErrorCode, connect_request
from pepsock.testbed.netns import Topology
from relay_helpers import (
    Relay, Server, convert_open, echo, read_reply, recv_all, recv_exact, reset_close,
    recv_to_the_end, wait_eof_or_reset,
)
from reliability_helpers import (
    fd_count, relay_fds_beyond_pool, relay_metrics, settle_fds, wait_until,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.root]

RELAY_IP, FAR_IP, RELAY_IP6 = "198.51.100.1", "198.51.100.2", "2001:db8::1"
HEADER_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def net():
    require_root()
    topo = Topology(prefix="rb")
    try:
        relay = topo.host("relay", tfo=3)
        far = topo.host("far", tfo=3)
        topo.link(relay, [f"{RELAY_IP}/24", f"{RELAY_IP6}/64"], far,
                  [f"{FAR_IP}/24", "2001:db8::2/64"])
        topo.route(relay, "203.0.113.0/24", FAR_IP)
        relay.run("ip", "route", "add", "unreachable", "192.0.2.0/24")
        yield topo
    finally:
        topo.cleanup()


def _start_relay(net, *extra):
    return Relay("--listen", "127.0.0.1:0", "--listen", f"{RELAY_IP}:0",
                 "--listen", f"[{RELAY_IP6}]:0",
                 "--header-timeout", str(HEADER_TIMEOUT),
                 "--connect-timeout", str(CONNECT_TIMEOUT), "--stats", "127.0.0.1:0",
                 *extra, prefix=net.hosts["relay"].cmd())


@pytest.fixture(scope="module")
def relay(net):
    r = _start_relay(net)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def baseline(net, relay):
    """The relay's fds (less pipes) before any test touched it."""
    return relay_fds_beyond_pool(relay, net.hosts["relay"])


def _far_server(net, handler):
    with net.hosts["far"].enter():
        return Server(handler, host=FAR_IP)


@pytest.fixture(scope="module")
def far_echo(net):
    srv = _far_server(net, echo)
    yield srv
    srv.close()


def _inside(net):
    return net.hosts["relay"].enter()


def _good_roundtrip(relay_addr, dest, size=100_000, timeout=5.0) -> float:
    """One well-behaved tunnel; returns its duration (s). Raises on any loss."""
    t0 = time.monotonic()
    s = convert_open(relay_addr, dest, timeout=timeout)
    with s:
        msg, rest = read_reply(s, timeout)
        assert msg.error is None, msg
        data = os.urandom(size)
        threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
        got = recv_exact(s, size, rest)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    return time.monotonic() - t0


def _error_of(s, timeout=5.0):
    msg, _ = read_reply(s, timeout)
    return None if msg.error is None else msg.error.code


# ---------------------------------------------------------------------------
# Hostile input: a mix against the running relay


def _client(src_ip: str, relay_addr, payload: bytes, *, tfo=True, timeout=6.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src_ip, 0))
    if tfo and payload:
        s.setsockopt(socket.IPPROTO_TCP, 34, 1)
        sent = s.sendto(payload, socket.MSG_FASTOPEN, relay_addr)
        if sent < len(payload):
            s.sendall(payload[sent:])
    else:
        s.connect(relay_addr)
        if payload:
            s.sendall(payload)
    return s


def _hostile_cases(relay_addr, far_addr, dead_addr):
    """name -> (function(src_ip) -> observed, expected)."""
    good = connect_request(*far_addr)

    def expect_error(payload, *, shut=False, extra=b""):
        def run(src):
            s = _client(src, relay_addr, payload)
            with s:
                if extra:
                    try:
                        s.sendall(extra)
                    except OSError:
                        pass
                if shut:
                    s.shutdown(socket.SHUT_WR)
                return _error_of(s)
        return run

    def garbage(src):
        data = os.urandom(64)
        data = bytes((data[0] | 0x02,)) + data[1:]  # version byte never 1
        return expect_error(data)(src)

    def garbage_v1(src):
        data = b"\x01" + bytes((os.urandom(1)[0] | 1,)) + b"\x63\x22" + os.urandom(60)
        return expect_error(data)(src)

    def truncated(src):
        cut = 4 + os.urandom(1)[0] % 19
        return expect_error(good[:cut], shut=True)(src)

    def oversized(src):
        # Total Length 255 (1020 bytes) of junk TLVs, then 64 KiB more: Error 1,
        # and the relay never buffers past the 1020 bytes it needs.
        body = bytes((1, 255, 0x22, 0x63)) + bytes((0x0A, 255)) + os.urandom(1014)
        return expect_error(body, extra=os.urandom(65536))(src)

    def tlv_past_end(src):
        return expect_error(bytes((1, 6, 0x22, 0x63, 0x0A, 9)) + good[6:])(src)

    def length0(src):
        return expect_error(bytes((1, 7, 0x22, 0x63, 0x0A, 0)) + os.urandom(22))(src)

    def length0_after_connect(src):
        msg = bytes((1, 8, 0x22, 0x63)) + good[4:] + b"\x16\x00\x00\x00"
        return expect_error(msg)(src)

    def unknown_tlv(src):
        msg = protocol.Message((protocol.Connect(*far_addr),
                                protocol.UnknownTLV(0x77, b"\x00\x00"))).encode()
        return expect_error(msg)(src)

    def slowloris(src):
        s = _client(src, relay_addr, good[:3])
        with s:
            t0 = time.monotonic()
            code = _error_of(s, 4 * HEADER_TIMEOUT + 2)
            return code, time.monotonic() - t0 < HEADER_TIMEOUT + 1.5

    def drip(src):
        s = _client(src, relay_addr, good[:1], tfo=False)
        with s:
            t0 = time.monotonic()
            try:
                for b in good[1:]:
                    time.sleep(HEADER_TIMEOUT / 5)
                    s.send(bytes((b,)))
            except OSError:
                pass
            code = _error_of(s, 4 * HEADER_TIMEOUT + 2)
            return code, time.monotonic() - t0 < 2 * HEADER_TIMEOUT + 1.5

    def reset_mid_header(src):
        s = _client(src, relay_addr, good[:9])
        time.sleep(0.05)
        reset_close(s)
        return "reset"

    def vanish_mid_header(src):
        s = _client(src, relay_addr, good[:11])
        s.close()
        return "gone"

    def reset_while_connecting(src):
        s = _client(src, relay_addr, connect_request("203.0.113.9", 80))
        time.sleep(0.2)
        reset_close(s)
        return "reset"

    def reset_mid_transfer(src):
        s = _client(src, relay_addr, good)
        msg, rest = read_reply(s)
        assert msg.error is None
        s.sendall(os.urandom(200_000))
        recv_exact(s, 50_000, rest)
        reset_close(s)
        return "reset"

    def refused(src):
        return expect_error(connect_request(*dead_addr))(src)

    E = ErrorCode
    return {
        "garbage": (garbage, E.UNSUPPORTED_VERSION),
        "garbage_v1_bad_magic": (garbage_v1, E.MALFORMED_MESSAGE),
        "truncated_then_eof": (truncated, E.MALFORMED_MESSAGE),
        "oversized_plus_64k": (oversized, E.MALFORMED_MESSAGE),
        "tlv_past_total_length": (tlv_past_end, E.MALFORMED_MESSAGE),
        "length0_tlv": (length0, E.MALFORMED_MESSAGE),
        "length0_after_connect": (length0_after_connect, E.MALFORMED_MESSAGE),
        "unknown_tlv": (unknown_tlv, E.UNSUPPORTED_MESSAGE),
        "slowloris_half_header": (slowloris, (E.MALFORMED_MESSAGE, True)),
        "drip_one_byte_at_a_time": (drip, (E.MALFORMED_MESSAGE, True)),
        "reset_mid_header": (reset_mid_header, "reset"),
        "vanish_mid_header": (vanish_mid_header, "gone"),
        "reset_while_connecting": (reset_while_connecting, "reset"),
        "reset_mid_transfer": (reset_mid_transfer, "reset"),
        "destination_refuses": (refused, E.CONNECTION_RESET),
    }


def test_hostile_mix_then_good_client_at_once_and_no_leaked_fds(net, relay, baseline, far_echo):
    host = net.hosts["relay"]
    with _inside(net):
        dead = socket.socket()
    dead.close()
    dead_addr = (FAR_IP, 9)  # discard port, nothing listens on far
    cases = _hostile_cases(relay.addr, far_echo.addr, dead_addr)
    per_case = 12
    jobs = [(name, i) for name in cases for i in range(per_case)]
    results: dict[str, list] = {name: [] for name in cases}
    errors = []
    good_latency = []
    start_metrics = relay_metrics(relay, host)
    with _inside(net):
        with cf.ThreadPoolExecutor(max_workers=96) as pool:
            futs = {}
            for k, (name, i) in enumerate(jobs):
                src = f"127.0.{1 + k // 250}.{2 + k % 250}"
                futs[pool.submit(cases[name][0], src)] = name
            # While slowloris clients hold half headers, a good client is served at once.
            time.sleep(0.3)
            for _ in range(3):
                good_latency.append(_good_roundtrip(("127.0.0.1", relay.addr[1]),
                                                    far_echo.addr, 20_000))
            for fut in cf.as_completed(futs, timeout=60):
                try:
                    results[futs[fut]].append(fut.result())
                except Exception as exc:  # noqa: BLE001
                    errors.append((futs[fut], repr(exc)))
    assert not errors, errors
    for name, (_, expected) in cases.items():
        assert results[name] == [expected] * per_case, (name, results[name])
    assert max(good_latency) < 1.0, good_latency
    # Afterwards: served at once, no tunnel left open, no fd leaked.
    with _inside(net):
        assert _good_roundtrip(relay.addr, far_echo.addr) < 1.0
    assert settle_fds(relay, host, baseline) == baseline
    m = relay_metrics(relay, host)
    assert m["pep_relay_tunnels_open"] == 0
    assert relay.proc.poll() is None
    total = m["pep_relay_tunnels_total"] - start_metrics["pep_relay_tunnels_total"]
    print(f"hostile mix: {len(jobs)} hostile clients ({len(cases)} kinds x {per_case}) + 4 good; "
          f"tunnels counted {int(total)}; good latency during slowloris "
          f"{max(good_latency) * 1000:.0f} ms; fds back to {baseline}")


def test_slowloris_crowd_does_not_starve_good_clients(net, relay, baseline, far_echo):
    """300 clients each holding 3 bytes of header: all cut at --header-timeout,
    while good clients keep being served at once."""
    host = net.hosts["relay"]
    held = []
    with _inside(net):
        good = connect_request(*far_echo.addr)
        for k in range(300):
            held.append(_client(f"127.1.{k // 200}.{1 + k % 200}", relay.addr, good[:3]))
        wait_until(lambda: relay_metrics(relay, host)["pep_relay_tunnels_open"] >= 300, 5)
        lat = [_good_roundtrip(relay.addr, far_echo.addr, 10_000) for _ in range(5)]
        t0 = time.monotonic()
        codes = [_error_of(s, HEADER_TIMEOUT + 5) for s in held]
        cut_by = time.monotonic() - t0
    for s in held:
        s.close()
    assert codes == [ErrorCode.MALFORMED_MESSAGE] * 300
    assert max(lat) < 1.0, lat
    assert cut_by < HEADER_TIMEOUT + 2
    assert settle_fds(relay, host, baseline) == baseline


# ---------------------------------------------------------------------------
# Destination faults


def test_destination_refuses_unreachable_times_out(net, relay, baseline):
    host = net.hosts["relay"]
    with _inside(net):
        for dest, code, value, limit in (
                ((FAR_IP, 9), ErrorCode.CONNECTION_RESET, b"", 1.0),
                (("192.0.2.7", 80), ErrorCode.DESTINATION_UNREACHABLE, b"\x01", 1.0),
                (("203.0.113.9", 80), ErrorCode.NETWORK_FAILURE, b"", CONNECT_TIMEOUT + 1.0)):
            t0 = time.monotonic()
            s = convert_open(relay.addr, dest, b"early bytes")
            with s:
                msg, rest = read_reply(s, 10)
                took = time.monotonic() - t0
                assert msg.error is not None and msg.error.code == code, (dest, msg)
                assert msg.error.value[:len(value)] == value
                assert rest == b"" and took < limit, (dest, took)
                s.shutdown(socket.SHUT_WR)
                assert wait_eof_or_reset(s) == "eof"
    assert settle_fds(relay, host, baseline) == baseline


def test_destination_resets_mid_transfer(net, relay, baseline):
    host = net.hosts["relay"]

    def resetter(conn):
        recv_exact(conn, 50_000)
        conn.sendall(b"x" * 10_000)
        reset_close(conn)
        return "reset sent"

    srv = _far_server(net, resetter)
    try:
        with _inside(net):
            s = convert_open(relay.addr, srv.addr)
            msg, rest = read_reply(s)
            assert msg.error is None
            s.sendall(os.urandom(50_000))
            t0 = time.monotonic()
            got, outcome = recv_to_the_end(s, rest)
            s.close()
        assert outcome == "reset"  # carried across, never a clean EOF
        assert time.monotonic() - t0 < 3
        assert len(got) <= 10_000 and set(got) <= {ord("x")}
    finally:
        srv.close()
    assert settle_fds(relay, host, baseline) == baseline


def test_destination_half_closes_early_client_still_delivers(net, relay, baseline):
    host = net.hosts["relay"]

    def early_closer(conn):
        conn.sendall(b"bye early")
        conn.shutdown(socket.SHUT_WR)
        return hashlib.sha256(recv_all(conn)).hexdigest()

    srv = _far_server(net, early_closer)
    try:
        with _inside(net):
            s = convert_open(relay.addr, srv.addr)
            msg, rest = read_reply(s)
            assert msg.error is None
            assert recv_all(s, rest) == b"bye early"  # the server's FIN arrives as EOF
            data = os.urandom(300_000)
            s.sendall(data)  # and our half still works
            s.shutdown(socket.SHUT_WR)
            assert wait_eof_or_reset(s) == "eof"
            s.close()
        assert wait_until(lambda: srv.results, 5)
        assert srv.results == [hashlib.sha256(data).hexdigest()]
    finally:
        srv.close()
    assert settle_fds(relay, host, baseline) == baseline


# ---------------------------------------------------------------------------
# Client faults


def _recording_server(net):
    def record(conn):
        got = bytearray()
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return ("eof", hashlib.sha256(got).hexdigest(), len(got))
                got += chunk
        except ConnectionResetError:
            return ("reset", None, len(got))
    return _far_server(net, record)


def test_client_resets_mid_transfer_destination_sees_reset(net, relay, baseline):
    host = net.hosts["relay"]
    srv = _recording_server(net)
    try:
        with _inside(net):
            s = convert_open(relay.addr, srv.addr)
            read_reply(s)
            s.sendall(os.urandom(100_000))
            time.sleep(0.2)
            reset_close(s)
        assert wait_until(lambda: srv.results, 5)
        assert srv.results[0][0] == "reset"  # not mistaken for a finished upload
    finally:
        srv.close()
    assert settle_fds(relay, host, baseline) == baseline


def test_client_half_closes_then_reads_everything(net, relay, baseline):
    host = net.hosts["relay"]

    def upload_then_answer(conn):
        got = recv_all(conn)
        conn.sendall(hashlib.sha256(got).digest() * 4096)  # 128 KiB answer after our EOF
        return len(got)

    srv = _far_server(net, upload_then_answer)
    try:
        with _inside(net):
            s = convert_open(relay.addr, srv.addr)
            msg, rest = read_reply(s)
            data = os.urandom(500_000)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            answer = recv_all(s, rest)
            s.close()
        assert answer == hashlib.sha256(data).digest() * 4096
    finally:
        srv.close()
    assert settle_fds(relay, host, baseline) == baseline


def test_client_vanishes_after_partial_header_makes_no_onward_connection(net, relay, baseline):
    host = net.hosts["relay"]
    srv = _recording_server(net)
    try:
        with _inside(net):
            for cut in (1, 4, 10, 23):
                s = convert_open(relay.addr, srv.addr, header=connect_request(*srv.addr)[:cut])
                s.close()
        time.sleep(0.3)
        assert srv.conns == []
    finally:
        srv.close()
    assert settle_fds(relay, host, baseline) == baseline


# ---------------------------------------------------------------------------
# Policy: a stranger and every forbidden destination class


@pytest.mark.parametrize("dest, code", [
    (("127.0.0.1", 22), ErrorCode.NOT_AUTHORIZED),          # loopback
    (("127.9.9.9", 80), ErrorCode.NOT_AUTHORIZED),
    (("::1", 22), ErrorCode.NOT_AUTHORIZED),
    (("::ffff:127.0.0.1", 22), ErrorCode.NOT_AUTHORIZED),   # v4-mapped loopback
    (("::127.0.0.1", 22), ErrorCode.NOT_AUTHORIZED),        # IPv4-compatible loopback
    (("0.1.2.3", 80), ErrorCode.NOT_AUTHORIZED),            # "this network"
    ((RELAY_IP, 22), ErrorCode.NOT_AUTHORIZED),             # the relay's own addresses
    (("198.51.100.255", 22), ErrorCode.NOT_AUTHORIZED),     # its subnet's broadcast
    ((RELAY_IP6, 22), ErrorCode.NOT_AUTHORIZED),
    (("169.254.169.254", 80), ErrorCode.NOT_AUTHORIZED),    # link-local (metadata)
    (("fe80::1", 80), ErrorCode.NOT_AUTHORIZED),
    (("224.0.0.1", 80), ErrorCode.MALFORMED_MESSAGE),       # multicast: not a valid Connect
    (("ff02::1", 80), ErrorCode.MALFORMED_MESSAGE),
    (("255.255.255.255", 80), ErrorCode.MALFORMED_MESSAGE),  # broadcast
    (("0.0.0.0", 80), ErrorCode.MALFORMED_MESSAGE),          # unspecified
    (("::", 80), ErrorCode.MALFORMED_MESSAGE),
])
def test_forbidden_destination_classes_refused(net, relay, dest, code):
    # The encoder refuses the last five, so the header is built by hand.
    text = dest[0] if ":" in dest[0] else "::ffff:" + dest[0]
    addr = socket.inet_pton(socket.AF_INET6, text)
    header = bytes((1, 6, 0x22, 0x63, 0x0A, 5)) + struct.pack("!H", dest[1]) + addr
    with _inside(net):
        for relay_addr in relay.addrs:  # via loopback, v4 and v6 listeners
            s = convert_open(relay_addr, dest, header=header)
            with s:
                assert _error_of(s) == code, (relay_addr, dest)


def test_client_outside_allow_client_refused_inside_served(net, far_echo):
    r = _start_relay(net, "--allow-client", f"{FAR_IP}/32")
    try:
        with _inside(net):  # from the relay's own namespace: source is not FAR_IP
            for addr in r.addrs:
                s = convert_open(addr, far_echo.addr)
                with s:
                    assert _error_of(s) == ErrorCode.NOT_AUTHORIZED
        # From the allowed host, the same relay serves.
        with net.hosts["far"].enter():
            s = convert_open((RELAY_IP, r.addrs[1][1]), ("203.0.113.1", 9))
            with s:
                # allowed client; destination black-holed -> 65, not 32
                assert _error_of(s, 5) == ErrorCode.NETWORK_FAILURE
    finally:
        r.stop()


# ---------------------------------------------------------------------------
# The relay killed mid-transfer, restarted; SIGTERM drains


def _firehose(conn):
    """Send 64 KiB every 20 ms until the peer goes away."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    block = os.urandom(65536)
    try:
        while True:
            conn.sendall(block)
            time.sleep(0.02)
    except OSError:
        return "peer gone"


def test_relay_killed_mid_transfer_client_errors_then_restart_serves_at_once(net, far_echo):
    host = net.hosts["relay"]
    srv = _far_server(net, _firehose)
    r = _start_relay(net)
    port = r.addrs[0][1]
    try:
        with _inside(net):
            socks = []
            for _ in range(5):
                s = convert_open(r.addr, srv.addr, timeout=10)
                read_reply(s)
                recv_exact(s, 100_000)
                socks.append(s)
            r.proc.kill()  # SIGKILL mid-transfer
            t0 = time.monotonic()
            outcomes = []
            for s in socks:
                try:
                    while s.recv(1 << 20):
                        pass
                    outcomes.append("eof")
                except ConnectionResetError:
                    outcomes.append("reset")
                except socket.timeout:
                    outcomes.append("HANG")
                s.close()
            took = time.monotonic() - t0
        assert "HANG" not in outcomes and took < 3, (outcomes, took)
        r.kill()
        # Restarted on the same port: new connections work at once.
        r = Relay("--listen", f"127.0.0.1:{port}", "--header-timeout", "1",
                  prefix=host.cmd())
        with _inside(net):
            assert _good_roundtrip(r.addr, far_echo.addr) < 1.0
    finally:
        r.kill()
        srv.close()


def _slow_http(conn):
    """HTTP/1.1 200 with a 100 MB Content-Length, then 64 KiB every 20 ms:
    the client reads as fast as it gets, so few bytes wait in buffers."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return "no request"
        buf += chunk
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    return _firehose(conn)


def test_relay_killed_curl_under_libpep_fails_fast(net):
    require_tool("curl")
    from preload_helpers import preload_env
    srv = _far_server(net, _slow_http)
    r = _start_relay(net)
    try:
        env = preload_env(pep=r.addr, no_proxy="")
        proc = subprocess.Popen(
            net.hosts["relay"].cmd("curl", "-sS", "-o", "/dev/null", "--max-time", "30",
                                   f"http://{srv.addr[0]}:{srv.addr[1]}/big"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert wait_until(lambda: relay_metrics(r, net.hosts["relay"])
                          .get('pep_relay_bytes_total{direction="down"}', 0) > 500_000, 10)
        r.proc.kill()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=10)
        took = time.monotonic() - t0
        assert proc.returncode in (18, 56), (proc.returncode, err)  # partial / recv failure
        assert took < 3, took
    finally:
        if proc.poll() is None:
            proc.kill()
        r.kill()
        srv.close()


def test_sigterm_drains_transfers_in_flight_intact(net, far_echo):
    r = _start_relay(net, "--drain-timeout", "20")
    try:
        size, n = 2_000_000, 10
        results = [None] * n
        with _inside(net):
            socks = []
            for _ in range(n):
                s = convert_open(r.addr, far_echo.addr, timeout=20)
                msg, rest = read_reply(s)
                assert msg.error is None
                socks.append((s, rest))

            def transfer(i):
                s, rest = socks[i]
                data = os.urandom(size)
                t = threading.Thread(target=s.sendall, args=(data,), daemon=True)
                t.start()
                got = recv_exact(s, size, rest)
                t.join(20)
                s.shutdown(socket.SHUT_WR)
                tail = recv_all(s)
                s.close()
                results[i] = got == data and tail == b""

            threads = [threading.Thread(target=transfer, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            time.sleep(0.1)
            r.signal(signal.SIGTERM)
            r.wait_log("draining")
            with pytest.raises(OSError):  # no new tunnels once draining
                socket.create_connection(r.addr, timeout=2).close()
            for t in threads:
                t.join(30)
        assert results == [True] * n
        assert r.proc.wait(timeout=10) == 0
    finally:
        r.kill()


# ---------------------------------------------------------------------------
# Out of file descriptors (a hard RLIMIT_NOFILE the relay cannot raise)


def test_relay_out_of_fds_recovers_once_clients_leave(net, far_echo):
    """Past its fd limit the relay refuses (Error 64) or queues; once the clients
    leave it must serve again, not stay wedged with tunnels waiting for pipes."""
    require_tool("prlimit")
    host = net.hosts["relay"]
    r = Relay("--listen", "127.0.0.1:0", "--header-timeout", "1", "--stats", "127.0.0.1:0",
              prefix=["prlimit", "--nofile=64:64", *host.cmd()])
    try:
        with _inside(net):
            socks = [convert_open(r.addr, far_echo.addr, timeout=2) for _ in range(40)]
            outcomes = []
            deadline = time.monotonic() + 2
            for s in socks:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    msg, _ = read_reply(s)
                    outcomes.append("ok" if msg.error is None else int(msg.error.code))
                except OSError as exc:
                    outcomes.append(type(exc).__name__)
            assert outcomes.count("ok") < 40, outcomes  # the limit was reached
            for s in socks:
                s.close()
            served = wait_until(lambda: _try_good(r.addr, far_echo.addr), 6, 0.2)
        assert served, f"relay still refusing 6 s after its clients left; outcomes {outcomes}"
        assert wait_until(lambda: _open_tunnels(r, host) == 0, 5)
    finally:
        r.kill()


def _try_good(relay_addr, dest) -> bool:
    try:
        s = convert_open(relay_addr, dest, timeout=1)
        with s:
            msg, rest = read_reply(s, 1)
            if msg.error is not None:
                return False
            s.sendall(b"ping")
            return recv_exact(s, 4, rest) == b"ping"
    except OSError:
        return False


def _open_tunnels(relay, host):
    try:
        return relay_metrics(relay, host)["pep_relay_tunnels_open"]
    except OSError:
        return None


def test_worker_killed_mid_transfer_others_unharmed_and_replaced(net, far_echo):
    """--workers 2: SIGKILL one worker mid-transfer. Its clients get an error at
    once, the other worker's tunnels go on intact, new tunnels are served, and
    the master starts a new worker."""
    host = net.hosts["relay"]
    srv = _far_server(net, _firehose)
    r = _start_relay(net, "--workers", "2")

    def workers():
        with open(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children") as f:
            return [int(p) for p in f.read().split()]
    try:
        assert wait_until(lambda: len(workers()) == 2, 5)
        first = workers()
        with _inside(net):
            socks = []
            for _ in range(16):  # SO_REUSEPORT spreads them over both workers
                s = convert_open(r.addr, srv.addr, timeout=10)
                read_reply(s)
                recv_exact(s, 65536)
                socks.append(s)
            victim = first[0]
            victim_fds = fd_count(victim)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            broken, alive = 0, 0
            for s in socks:
                s.settimeout(3)
                try:
                    got = 0
                    while got < 300_000:
                        chunk = s.recv(65536)
                        if not chunk:
                            raise ConnectionResetError("eof")
                        got += len(chunk)
                    alive += 1
                except (ConnectionResetError, socket.timeout) as exc:
                    assert not isinstance(exc, socket.timeout), "a client hung"
                    broken += 1
                s.close()
            assert time.monotonic() - t0 < 10
            assert broken >= 1 and alive >= 1, (broken, alive, victim_fds)
            assert wait_until(lambda: len(workers()) == 2 and victim not in workers(), 5)
            time.sleep(0.5)
            # One restart, and the new worker stays up (no restart storm).
            assert r.log.count("restarting") == 1 and "failed" not in r.log, r.log[-2000:]
            for _ in range(6):
                try:
                    assert _good_roundtrip(r.addr, far_echo.addr) < 1.0
                except OSError as exc:
                    raise AssertionError(f"{exc!r}\n{r.log[-3000:]}") from None
    finally:
        r.stop()
        srv.close()


def test_master_killed_workers_follow_and_restart_owns_the_port(net, far_echo):
    """kill -9 of the --workers master must not leave orphan workers serving the
    port (with the old configuration) beside a restarted relay."""
    host = net.hosts["relay"]
    r = _start_relay(net, "--workers", "2")
    port = r.addrs[0][1]
    with open(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children") as f:
        kids = [int(p) for p in f.read().split()]
    assert len(kids) == 2

    def alive():
        out = []
        for k in kids:
            try:
                with open(f"/proc/{k}/stat") as f:
                    if f.read().split()[2] != "Z":
                        out.append(k)
            except FileNotFoundError:
                pass
        return out
    r2 = None
    try:
        r.proc.kill()
        r.proc.wait(timeout=5)
        gone = wait_until(lambda: not alive(), 3)
        assert gone, f"workers {alive()} still running 3 s after their master died"
        r2 = Relay("--listen", f"127.0.0.1:{port}", "--stats", "127.0.0.1:0",
                   prefix=host.cmd())
        with _inside(net):
            for _ in range(10):
                _good_roundtrip(r2.addr, far_echo.addr, 1000)
        assert relay_metrics(r2, host)["pep_relay_tunnels_total"] == 10
    finally:
        for k in alive():
            os.kill(k, signal.SIGKILL)
        if r2 is not None:
            r2.kill()
