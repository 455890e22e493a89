"""Every error the relay answers with (RFC 8803 Error TLV, then a clean close),
plus policy and limits.  Unreachable/timeout errors need routes, see
test_relay_netns.py."""
import socket
import time

import pytest

from pepsock.protocol import (
    Cookie, ErrorCode, Info, Message, SupportedTCPExtensions, TLVType, UnknownTLV,
    connect_request, error_reply,
)
from relay_helpers import (
    Relay, Server, convert_open, echo, free_port, read_reply, recv_all,
    wait_eof_or_reset,
)

pytestmark = pytest.mark.timeout(60)

ALLOW_LO = ("--allow-dest", "127.0.0.0/8")


@pytest.fixture(scope="module")
def relay():
    with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--header-timeout", "0.5",
               "--stats", "127.0.0.1:0") as r:
        yield r


@pytest.fixture(scope="module")
def echo_server():
    with Server(echo) as s:
        yield s


def _error_then_clean_close(s: socket.socket) -> int:
    msg, rest = read_reply(s)
    assert msg.error is not None, msg
    assert rest == b""
    s.shutdown(socket.SHUT_WR)
    # After the Error TLV the relay closes with a FIN, not a reset.
    assert wait_eof_or_reset(s) == "eof"
    s.close()
    return msg.error.code


def test_closed_port_is_error_96(relay):
    s = convert_open(relay.addr, ("127.0.0.1", free_port()), early=b"data nobody reads")
    assert _error_then_clean_close(s) == ErrorCode.CONNECTION_RESET


def test_error_96_wire_bytes_match_the_golden_vector(relay):
    s = convert_open(relay.addr, ("127.0.0.1", free_port()))
    s.settimeout(5)
    got = recv_all(s)
    s.close()
    assert got == bytes.fromhex("0102 2263 1e01 6000") == error_reply(96)


def test_bad_magic_is_error_1(relay):
    s = convert_open(relay.addr, None, header=bytes.fromhex("0106 2264") + bytes(20))
    assert _error_then_clean_close(s) == ErrorCode.MALFORMED_MESSAGE


def test_bad_version_is_error_0(relay):
    s = convert_open(relay.addr, None, header=bytes.fromhex("0201 2263"))
    assert _error_then_clean_close(s) == ErrorCode.UNSUPPORTED_VERSION


def test_zero_total_length_is_error_1(relay):
    s = convert_open(relay.addr, None, header=bytes.fromhex("0100 2263"))
    assert _error_then_clean_close(s) == ErrorCode.MALFORMED_MESSAGE


def test_message_without_connect_gets_an_error_tlv(relay):
    # Header only, and a message with only a Cookie: no Connect, no Info.
    for header in (bytes.fromhex("0101 2263"), Message((Cookie(b"abcd"),)).encode()):
        s = convert_open(relay.addr, None, header=header)
        assert _error_then_clean_close(s) == ErrorCode.MALFORMED_MESSAGE


def test_unknown_tlv_is_error_2(relay, echo_server):
    req = Message((UnknownTLV(0x42, b"\x00\x00"),)).encode()
    s = convert_open(relay.addr, None, header=req)
    assert _error_then_clean_close(s) == ErrorCode.UNSUPPORTED_MESSAGE


def test_error_tlv_in_request_is_error_2(relay):
    s = convert_open(relay.addr, None, header=error_reply(96))
    assert _error_then_clean_close(s) == ErrorCode.UNSUPPORTED_MESSAGE


def test_broken_connect_tlv_is_error_1(relay):
    req = bytearray(connect_request("192.0.2.10", 443))
    req[6:8] = b"\x00\x00"   # port 0
    s = convert_open(relay.addr, None, header=bytes(req))
    assert _error_then_clean_close(s) == ErrorCode.MALFORMED_MESSAGE


def test_info_request_answers_supported_extensions(relay):
    s = convert_open(relay.addr, None, header=Message((Info(),)).encode())
    msg, rest = read_reply(s)
    assert msg.error is None
    ext = msg.get(TLVType.SUPPORTED_TCP_EXTENSIONS)
    assert isinstance(ext, SupportedTCPExtensions) and 2 in ext.kinds
    s.shutdown(socket.SHUT_WR)
    assert wait_eof_or_reset(s) == "eof"
    s.close()


def test_header_timeout_is_error_1(relay):
    s = socket.create_connection(relay.addr, timeout=5)
    s.sendall(bytes.fromhex("0106"))     # a header that never completes
    t0 = time.monotonic()
    assert _error_then_clean_close(s) == ErrorCode.MALFORMED_MESSAGE
    assert 0.3 < time.monotonic() - t0 < 3


def test_client_eof_inside_header_is_error_1(relay):
    s = socket.create_connection(relay.addr, timeout=5)
    s.sendall(bytes.fromhex("0106 2263 0a"))
    assert _error_then_clean_close(s) == ErrorCode.MALFORMED_MESSAGE


def test_header_bytes_one_at_a_time(relay, echo_server):
    s = socket.create_connection(relay.addr, timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for b in connect_request(*echo_server.addr) + b"tail":
        s.send(bytes([b]))
        time.sleep(0.002)
    msg, rest = read_reply(s)
    assert msg.error is None
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s, rest) == b"tail"
    s.close()


def test_stats_count_errors_by_code(relay):
    m = relay.metrics()
    assert m['pep_relay_errors_total{code="96",name="connection_reset"}'] >= 1
    assert m['pep_relay_errors_total{code="1",name="malformed_message"}'] >= 1
    assert m['pep_relay_errors_total{code="2",name="unsupported_message"}'] >= 2
    assert m["pep_relay_tunnels_total"] >= 10


# -- policy ------------------------------------------------------------------------


def test_default_relay_refuses_loopback_destination():
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0") as r:
        s = convert_open(r.addr, srv.addr, early=b"GET /")
        assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED
        assert srv.conns == []          # never connected onward
        for dest in (("::1", srv.addr[1]), ("169.254.169.254", 80), ("fe80::1", 80)):
            s = convert_open(r.addr, dest)
            assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED, dest
        assert "denied by default" in r.wait_log("outcome=error 32")


def test_default_relay_refuses_its_own_addresses():
    own = _non_loopback_ipv4()
    if own is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    with Relay("--listen", "127.0.0.1:0") as r:
        s = convert_open(r.addr, (own, 22))
        assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED
        assert "address of this host" in r.wait_log("outcome=error 32")


def _non_loopback_ipv4():
    from pepsock.relay.admission import local_addresses
    addrs, _ = local_addresses()
    for a in sorted(addrs, key=str):
        if a.version == 4 and not a.is_loopback and not str(a).endswith(".255"):
            return str(a)
    return None


def test_allow_dest_with_ports_and_first_match_order():
    with Server(echo) as a, Server(echo) as b:
        port_a, port_b = a.addr[1], b.addr[1]
        with Relay("--listen", "127.0.0.1:0", "--deny-dest", f"127.0.0.1:{port_b}",
                   "--allow-dest", f"127.0.0.0/8:{min(port_a, port_b)}-{max(port_a, port_b)}",
                   ) as r:
            s = convert_open(r.addr, a.addr)
            msg, _ = read_reply(s)
            assert msg.error is None
            s.close()
            # b's port is inside the allowed range but the earlier deny wins.
            s = convert_open(r.addr, b.addr)
            assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED
            # Outside the range: back to the default deny of loopback.
            hi = max(port_a, port_b)
            outside = hi + 1 if hi < 65535 else min(port_a, port_b) - 1
            s = convert_open(r.addr, ("127.0.0.1", outside))
            assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED


def test_deny_dest_everything_then_allow_list():
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0",
                                    "--allow-dest", f"127.0.0.1:{srv.addr[1]}",
                                    "--deny-dest", "0.0.0.0/0", "--deny-dest", "::/0") as r:
        s = convert_open(r.addr, srv.addr)
        assert read_reply(s)[0].error is None
        s.close()
        s = convert_open(r.addr, ("198.51.100.7", 80))
        assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED


def test_client_outside_allow_client_gets_error_32():
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--allow-client", "10.0.0.0/8") as r:
        s = convert_open(r.addr, srv.addr)
        assert _error_then_clean_close(s) == ErrorCode.NOT_AUTHORIZED
        assert srv.conns == []
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--allow-client", "127.0.0.0/8") as r:
        s = convert_open(r.addr, srv.addr)
        assert read_reply(s)[0].error is None
        s.close()


def test_warning_when_public_listener_has_no_client_limit():
    with Relay("--listen", "0.0.0.0:0") as r:
        r.wait_log("no --allow-client")
    with Relay("--listen", "127.0.0.1:0") as r:
        time.sleep(0.2)
        assert "no --allow-client" not in r.log


def test_tfo_server_bit_warning_names_the_fix():
    with open("/proc/sys/net/ipv4/tcp_fastopen") as f:
        tfo = int(f.read())
    with Relay("--listen", "127.0.0.1:0") as r:
        time.sleep(0.2)
        if tfo & 2:
            assert "lacks the server bit" not in r.log
        else:
            assert f"sysctl -w net.ipv4.tcp_fastopen={tfo | 3}" in r.log


# -- limits ---------------------------------------------------------------------------


def _open_ok(relay, dest):
    s = convert_open(relay.addr, dest)
    msg, _ = read_reply(s)
    assert msg.error is None
    return s


def test_max_tunnels_is_error_64_and_frees_on_close():
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--max-tunnels", "2", "--stats", "127.0.0.1:0") as r:
        held = [_open_ok(r, srv.addr) for _ in range(2)]
        s = convert_open(r.addr, srv.addr)
        assert _error_then_clean_close(s) == ErrorCode.RESOURCE_EXCEEDED
        assert r.metrics()["pep_relay_tunnels_open"] == 2
        held.pop().close()
        deadline = time.monotonic() + 5
        while r.metrics()["pep_relay_tunnels_open"] > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        held.append(_open_ok(r, srv.addr))
        for s in held:
            s.close()


def test_per_client_limit_is_error_64():
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--max-per-client", "1") as r:
        first = _open_ok(r, srv.addr)
        s = convert_open(r.addr, srv.addr)
        assert _error_then_clean_close(s) == ErrorCode.RESOURCE_EXCEEDED
        first.close()
        r.wait_log("outcome=ok")
        _open_ok(r, srv.addr).close()


def test_per_client_limit_holds_for_the_whole_relay_with_workers():
    """--workers 2 --max-per-client 4: each worker allows 2, so one client
    holds at most 4 tunnels in all (each worker used to allow all 4: 8)."""
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--workers", "2",
                                    "--max-per-client", "4") as r:
        held, codes = [], []
        for _ in range(12):     # the kernel spreads them over both workers
            s = convert_open(r.addr, srv.addr)
            msg, _ = read_reply(s)
            if msg.error is None:
                held.append(s)
            else:
                codes.append(msg.error.code)
                s.close()
        for s in held:
            s.close()
    assert 2 <= len(held) <= 4, (len(held), codes)
    assert set(codes) == {ErrorCode.RESOURCE_EXCEEDED}, codes


def test_a_worker_gets_its_share_of_each_relay_wide_limit():
    from pepsock.relay.config import Config, worker_share
    from pepsock.relay.server import _admission, _shares_warnings
    assert worker_share(1024, 4) == 256
    assert worker_share(64, 3) == 21        # 63 in all: never more than asked
    assert worker_share(0, 4) == 0          # unlimited stays unlimited
    assert worker_share(3, 4) == 1          # cannot be split: 1 each
    assert worker_share(7, 1) == 7
    cfg = Config(listen=[("127.0.0.1", 0)], max_per_client=1024, max_pending=2048,
                 max_pending_per_client=3, tunnel_rate=100.0, tunnel_burst=500, workers=4)
    adm = _admission(cfg, [("127.0.0.1", 1)])
    assert (adm.max_per_client, adm.max_pending, adm.max_pending_per_client) == (256, 512, 1)
    assert (adm.rate.rate, adm.rate.burst) == (25.0, 125.0)
    assert adm.max_tunnels == cfg.max_tunnels       # per process: the fd limit
    assert adm.budget.per_client == cfg.memory_per_client // 4      # the budgets alike
    assert _shares_warnings(cfg) == [
        "--max-pending-per-client 3 with --workers 4: each worker allows 1, so the relay "
        "allows up to 4"]


def test_bad_options_are_refused():
    import subprocess
    import sys
    for args in (["--allow-dest", "not-a-cidr"], ["--listen", "nohostport"],
                 ["--workers", "0"], ["--client-cc", "nosuchcc"]):
        p = subprocess.run([sys.executable, "-m", "pepsock.relay", "--listen", "127.0.0.1:0",
                            *args], capture_output=True, timeout=20, text=True)
        assert p.returncode != 0, args
        assert p.stderr.strip(), args
