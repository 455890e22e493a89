"""The request in the SYN: pepsock.create_connection defers the SYN to the first write.

Against the test converter (tests/converter.py records whether the header came
in the SYN and which application bytes came with it) in a fresh namespace with
TFO on, and through delay lines for the round trip it saves.
"""
import errno
import os
import select
import subprocess
import socket
import threading
import time

import pytest

import pepsock
from pepsock import protocol, tfo
from converter import Converter, EchoServer

REQUEST = b"GET / HTTP/1.0\r\nHost: example\r\n\r\n"


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PEP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PEP_STATE_DIR", str(tmp_path / "pepstate"))
    monkeypatch.setenv("PEP_NO_PROXY", "")      # loopback destinations go through the PEP



def recv_exactly(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, got
        got += chunk
    return got


def dead_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("kw", [{}, {"timeout": None}, {"request_in_syn": True, "timeout": 5}])
def test_request_rides_in_the_syn_with_the_header(echo, kw):
    with Converter() as conv:
        sock = pepsock.create_connection(echo.address, pep=conv.address, **kw)
        with sock:
            assert sock.getpeername() == echo.address
            sock.sendall(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
            assert tfo.syn_data_acked(sock)
    assert conv.seen[0].syn_data
    assert conv.seen[0].early_data == REQUEST       # header + request in one SYN


def test_create_connection_sends_nothing_until_the_first_write(echo):
    with Converter() as conv:
        sock = pepsock.create_connection(echo.address, pep=conv.address)
        with sock:
            time.sleep(pepsock.client.FLUSH_AFTER / 4)
            assert conv.seen == []                  # no SYN yet
            sock.sendall(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST


def test_server_speaks_first_read_flushes_the_header(ns):
    with EchoServer(greeting=b"220 hello\r\n") as banner, Converter() as conv:
        with pepsock.create_connection(banner.address, pep=conv.address) as sock:
            assert recv_exactly(sock, 11) == b"220 hello\r\n"
            sock.sendall(b"x\r\n")
            assert recv_exactly(sock, 3) == b"x\r\n"
        assert conv.seen[0].syn_data and conv.seen[0].early_data == b""


def test_server_speaks_first_select_only_gets_the_banner(ns):
    """An application that waits in select() before any read or write: the flusher
    sends the header alone after FLUSH_AFTER, so the banner comes."""
    with EchoServer(greeting=b"220 hello\r\n") as banner, Converter() as conv:
        with pepsock.create_connection(banner.address, pep=conv.address) as sock:
            ready, _, _ = select.select([sock], [], [], 3)
            assert ready == [sock]
            assert recv_exactly(sock, 11) == b"220 hello\r\n"


def test_refused_pep_fails_over_at_the_first_write_with_the_request(echo, monkeypatch):
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead_port()},127.0.0.1:{conv.address[1]}")
        with pepsock.create_connection(echo.address) as sock:
            sock.sendall(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
            assert sock.pep == conv.address
        assert conv.seen[0].early_data == REQUEST   # replayed in the next PEP's SYN


def test_no_pep_left_falls_back_direct_with_the_request(echo, monkeypatch):
    monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead_port()}")
    with pepsock.create_connection(echo.address) as sock:
        sock.sendall(REQUEST)
        assert recv_exactly(sock, len(REQUEST)) == REQUEST
        assert sock.pep is None


def test_no_pep_left_and_fallback_fail_raises_at_the_first_write(echo, monkeypatch):
    monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead_port()}")
    monkeypatch.setenv("PEP_FALLBACK", "fail")
    with pepsock.create_connection(echo.address) as sock:
        with pytest.raises(ConnectionRefusedError):
            sock.sendall(REQUEST)
        with pytest.raises(ConnectionRefusedError):
            sock.recv(10)


def test_cookie_retry_replays_the_request(echo):
    with Converter(cookie=b"\x01\x02\x03\x04") as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            sock.sendall(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
        assert len(conv.seen) == 2
        assert conv.seen[0].early_data == REQUEST
        assert conv.seen[1].cookie == b"\x01\x02\x03\x04"
        assert conv.seen[1].early_data == REQUEST


def test_error_reply_surfaces_at_the_read(echo):
    with Converter(error=(protocol.ErrorCode.DESTINATION_UNREACHABLE, b"")) as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            sock.sendall(REQUEST)
            with pytest.raises(OSError) as info:
                sock.recv(10)
            assert info.value.errno == errno.ENETUNREACH
        assert conv.seen[0].early_data == REQUEST


def test_pep_confirm_still_waits_for_the_verdict(echo, monkeypatch):
    monkeypatch.setenv("PEP_CONFIRM", "1")
    with Converter(error=(protocol.ErrorCode.DESTINATION_UNREACHABLE, b"")) as conv:
        with pytest.raises(OSError) as info:
            pepsock.create_connection(echo.address, pep=conv.address)
        assert info.value.errno == errno.ENETUNREACH
        assert conv.seen[0].early_data == b""


def test_large_first_write_goes_whole(echo):
    payload = os.urandom(200_000)
    with Converter() as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
            assert recv_exactly(sock, len(payload)) == payload
        assert conv.seen[0].syn_data and payload.startswith(conv.seen[0].early_data)


def test_non_blocking_first_write(echo):
    with Converter() as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            sock.setblocking(False)
            assert sock.send(REQUEST) == len(REQUEST)
            got = b""
            deadline = time.monotonic() + 5
            while len(got) < len(REQUEST) and time.monotonic() < deadline:
                select.select([sock], [], [], 0.5)
                try:
                    got += sock.recv(100)
                except BlockingIOError:
                    pass
            assert got == REQUEST
        assert conv.seen[0].early_data == REQUEST


def test_shutdown_before_any_write_sends_the_header(echo):
    with Converter() as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        assert conv.seen[0].connect.port == echo.address[1]


def test_close_before_any_write_sends_nothing(echo):
    with Converter() as conv:
        pepsock.create_connection(echo.address, pep=conv.address).close()
        time.sleep(pepsock.client.FLUSH_AFTER * 3)
        assert conv.seen == []


def test_no_tfo_on_the_client_nodelay_until_the_reply(topology, tmp_path):
    """TFO off on the client host (sysctl 2: server only): a plain SYN, the header
    after the handshake, TCP_NODELAY held until the reply so that Nagle does not keep
    the first write behind it; the application's own setting comes back after."""
    host = topology.host("cli", tfo=2)
    with host.enter(), EchoServer() as echo, Converter() as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0   # the app's
            assert socket.socket.getsockopt(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY)
            sock.sendall(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
            assert not socket.socket.getsockopt(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # the app wants it
            sock.sendall(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
            assert socket.socket.getsockopt(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not conv.seen[0].syn_data


# -- through delay lines: the round trip saved ---------------------------------------------

def test_ttfb_through_delay_lines_drops_by_r1(tmp_path, monkeypatch):
    """R1 (client-PEP) = 200 ms, R2 (PEP-server) = 20 ms, `pep relay` in the middle.
    Before (header in the SYN, request after the handshake): R1 + R2 + max(R1, R2) =
    420 ms; the request in the SYN: R1 + 2 R2 = 240 ms. Without TFO on the client
    (plain SYN, header after the handshake, TCP_NODELAY until the reply): 2 R1 + 2 R2 =
    440 ms, not 3 R1 + R2 = 620 ms (Nagle holding the request behind the unacked header)."""
    from conftest import require_root
    from pepsock.testbed.topology import ADDR, Settings, Testbed
    from relay_helpers import Relay
    require_root()
    with Testbed(Settings(r1_ms=200, r2_ms=20, wireless_mbit=50), prefix="ts") as tb:
        with tb.server.enter():
            echo = EchoServer(host="0.0.0.0")
        relay = Relay("--listen", f"{ADDR['pep_w']}:5124", prefix=tb.pep.cmd())
        dest = (ADDR["server"], echo.address[1])
        times = {"before": [], "in_syn": [], "no_tfo": [], "asyncio": []}
        try:
            with tb.client.enter():
                for rep in range(3):     # rep 0 learns that the relay wants TFO cookies
                    for how in times:
                        if how == "no_tfo":
                            tb.client.sysctl("net.ipv4.tcp_fastopen", 2)
                        t0 = time.monotonic()
                        if how == "asyncio":
                            assert _aio(_aio_get(dest, relay.addr)) == REQUEST
                            times[how].append(time.monotonic() - t0)
                            continue
                        kw = {"timeout": 5} if how == "before" else {}
                        with pepsock.create_connection(dest, pep=relay.addr, **kw) as sock:
                            t_connect = time.monotonic() - t0
                            sock.sendall(REQUEST)
                            assert recv_exactly(sock, len(REQUEST)) == REQUEST
                            times[how].append(time.monotonic() - t0)
                        if how == "in_syn" and rep > 0:
                            assert t_connect < 0.05, t_connect      # returned at once
                        tb.client.sysctl("net.ipv4.tcp_fastopen", 3)
        finally:
            relay.stop()
            echo.close()
    before, in_syn, no_tfo = (min(times[k]) for k in ("before", "in_syn", "no_tfo"))
    assert before > 0.40 and in_syn > 0.23, times          # what the delays allow at best
    assert before - in_syn > 0.14, times                   # about R1 = 200 ms saved
    assert in_syn < 0.33, times
    assert no_tfo < 0.55, times                            # 2 R1 + 2 R2, not 3 R1 + R2
    assert min(times["asyncio"]) < 0.33, times             # open_connection: R1 + 2 R2 too


async def _aio_get(dest, pep):
    reader, writer = await pepsock.open_connection(*dest, pep=pep)
    writer.write(REQUEST)
    got = await reader.readexactly(len(REQUEST))
    writer.close()
    return got


def test_tls_client_hello_rides_in_the_syn(ns, tmp_path):
    """create_tls_connection without a timeout: the ClientHello is the first write,
    so it goes in the SYN with the Convert header."""
    import ssl
    from tls_helpers import TLSEchoServer, make_cert
    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(cafile=cert)
    server = TLSEchoServer(cert, key)
    try:
        with Converter() as conv:
            with pepsock.create_tls_connection(server.address, ctx, server_hostname="localhost",
                                               pep=conv.address) as tls:
                tls.sendall(b"ping\n")
                assert tls.recv(10) == b"PING\n"
            assert conv.seen[0].syn_data
            assert conv.seen[0].early_data[:1] == b"\x16"     # a TLS handshake record
    finally:
        server.close()


def test_black_holed_pep_fails_over_inside_the_first_write(echo, ns, monkeypatch):
    """The first PEP drops SYNs: the first write waits for its connect timeout,
    then the request goes in the next PEP's SYN; create_connection itself returned
    at once."""
    r = subprocess.run(ns.cmd("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9",
                              "-j", "DROP"), capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"iptables unusable here: {r.stderr.strip()}")
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:9,127.0.0.1:{conv.address[1]}")
        monkeypatch.setenv("PEP_CONNECT_TIMEOUT", "0.4")
        started = time.monotonic()
        with pepsock.create_connection(echo.address) as sock:
            assert time.monotonic() - started < 0.2
            sock.sendall(REQUEST)
            assert 0.35 < time.monotonic() - started < 3
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
            assert sock.pep == conv.address
        assert conv.seen[0].early_data == REQUEST


def test_http_client_under_the_patch_sends_its_request_in_the_syn(echo, monkeypatch):
    """http.client passes no timeout: under pepsock.patch() its GET rides in the SYN."""
    import http.client
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{conv.address[1]}")
        pepsock.patch()
        try:
            c = http.client.HTTPConnection(*echo.address)
            c.request("GET", "/x")        # the echo server answers with the request itself
            c.sock.settimeout(5)
            assert c.sock.recv(4) == b"GET "
            c.close()
        finally:
            pepsock.unpatch()
        assert conv.seen[0].early_data.startswith(b"GET /x HTTP/1.1\r\n")


def test_non_blocking_large_first_write_takes_what_the_syn_carries(echo):
    payload = os.urandom(100_000)
    with Converter() as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            sock.setblocking(False)
            first = sock.send(payload)
            assert 0 < first < len(payload)          # the SYN's share, no waiting
            sent, got = first, b""
            deadline = time.monotonic() + 10
            while len(got) < len(payload) and time.monotonic() < deadline:
                want_write = [sock] if sent < len(payload) else []
                readable, writable, _ = select.select([sock], want_write, [], 0.5)
                if writable:
                    try:
                        sent += sock.send(payload[sent:])
                    except BlockingIOError:
                        pass
                if readable:
                    try:
                        got += sock.recv(65536)
                    except BlockingIOError:
                        pass
            assert got == payload
        assert conv.seen[0].syn_data and payload.startswith(conv.seen[0].early_data)


# -- asyncio: open_connection without a timeout ----------------------------------------------

def _aio(coro):
    import asyncio
    return asyncio.run(asyncio.wait_for(coro, 10))


def _tcp_state(writer) -> int:
    """tcpi_state of the transport's socket: 2 SYN_SENT (the SYN waits for the first
    write), 1 ESTABLISHED."""
    return writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def _echo_request(echo, conv, **kw):
    """open_connection through `conv`, then the request echoed: (the echo,
    the TCP state right after open_connection returned)."""
    reader, writer = await pepsock.open_connection(*echo.address, pep=conv.address, **kw)
    state = _tcp_state(writer)
    writer.write(REQUEST)
    got = await reader.readexactly(len(REQUEST))
    writer.close()
    return got, state


def test_asyncio_request_rides_in_the_syn(echo):
    with Converter() as conv:
        assert _aio(_echo_request(echo, conv)) == (REQUEST, 2)     # no SYN before the write
    assert conv.seen[0].syn_data and conv.seen[0].early_data == REQUEST


def test_asyncio_with_a_timeout_waits_for_the_handshake_as_before(echo):
    with Converter() as conv:
        assert _aio(_echo_request(echo, conv, timeout=5)) == (REQUEST, 1)  # handshake done


def test_asyncio_refused_pep_fails_over_with_the_request(echo, monkeypatch):
    async def main():
        reader, writer = await pepsock.open_connection(*echo.address)
        writer.write(REQUEST)
        got = await reader.readexactly(len(REQUEST))
        writer.close()
        return got
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead_port()},127.0.0.1:{conv.address[1]}")
        assert _aio(main()) == REQUEST
    assert conv.seen[0].early_data == REQUEST


def test_asyncio_server_speaks_first(ns):
    async def main(conv, banner):
        reader, writer = await pepsock.open_connection(*banner.address, pep=conv.address)
        got = await reader.readexactly(11)
        writer.close()
        return got
    with EchoServer(greeting=b"220 hello\r\n") as banner, Converter() as conv:
        assert _aio(main(conv, banner)) == b"220 hello\r\n"


def test_asyncio_error_reply_surfaces_at_the_read(echo):
    async def main(conv):
        reader, writer = await pepsock.open_connection(*echo.address, pep=conv.address)
        writer.write(REQUEST)
        try:
            with pytest.raises(OSError) as info:
                await reader.read(10)
        finally:
            writer.close()
        return info.value
    with Converter(error=(protocol.ErrorCode.DESTINATION_UNREACHABLE, b"")) as conv:
        assert _aio(main(conv)).errno == errno.ENETUNREACH


def test_asyncio_request_in_the_syn_learns_tfo_mode_and_rtt(echo, tmp_path):
    """Nobody waits for the handshake of a non-blocking first write: what it shows
    (SYN data acked, RTT) is learnt when the first bytes come back."""
    async def main(conv):
        reader, writer = await pepsock.open_connection(*echo.address, pep=conv.address)
        writer.write(REQUEST)
        await reader.readexactly(len(REQUEST))
        writer.close()
    with Converter() as conv:
        _aio(main(conv))
    files = list((tmp_path / "pepstate").iterdir())
    assert len(files) == 1
    fields = dict(kv.split("=", 1) for kv in files[0].read_text().split())
    assert fields["tfo"] == "nocookie" and int(fields["rtt_us"]) > 0


def test_sendmsg_first_write_rides_in_the_syn(echo):
    with Converter() as conv:
        with pepsock.create_connection(echo.address, pep=conv.address) as sock:
            assert sock.sendmsg([REQUEST[:4], REQUEST[4:]]) == len(REQUEST)
            assert recv_exactly(sock, len(REQUEST)) == REQUEST
    assert conv.seen[0].early_data == REQUEST


def test_fork_child_gets_a_working_flusher(ns):
    """The flusher's lock and thread are fresh in a forked child: a server-speaks-first
    connection made there still gets its header out."""
    with EchoServer(greeting=b"220 hello\r\n") as banner, Converter() as conv:
        with pepsock.create_connection(banner.address, pep=conv.address) as warm:
            select.select([warm], [], [], 3)            # the parent's flusher has run
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with pepsock.create_connection(banner.address, pep=conv.address) as sock:
                    code = 0 if select.select([sock], [], [], 3)[0] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("mode, in_syn", [("pep", True), ("aio", True), ("pep-hs", False)])
def test_eval_ttfb_rows_send_the_request_in_the_syn(echo, mode, in_syn):
    """pep eval's TTFB rows (testbed/agents.py): pepsock sync (request_in_syn=True with a
    timeout) and asyncio put the request in the SYN; pep-hs is the old way."""
    from pepsock.testbed import agents
    with Converter() as conv:
        if mode == "aio":
            assert agents._aio_first_bytes(echo.address, conv.address, 5, REQUEST) == REQUEST[:16]
        else:
            with agents.open_flow(mode, echo.address, conv.address, None, 5, REQUEST) as sock:
                assert recv_exactly(sock, len(REQUEST)) == REQUEST
    assert conv.seen[0].syn_data
    if in_syn:
        assert conv.seen[0].early_data == REQUEST
    # pep-hs sends the request right after the handshake: on loopback it may reach
    # the converter before its first recv and join the header's chunk, so only the
    # in-SYN rows are checked here (the round trip it costs is measured through
    # delay lines in test_ttfb_through_delay_lines_drops_by_r1).


@pytest.mark.parametrize("mode, in_syn", [("pep", True), ("aio", True), ("pep-hs", False), ("pep-wait", False)])
def test_eval_https_rows_send_the_client_hello_in_the_syn(ns, tmp_path, mode, in_syn):
    """pep eval's HTTPS TTFB rows: the ClientHello rides in the SYN for pepsock sync and
    asyncio; pep-hs (old way) and pep-wait (the stdlib's wrap_socket) send it later."""
    import contextlib
    import io
    import json
    from pepsock.testbed import agents
    from tls_helpers import TLSEchoServer, make_cert
    cert, key = make_cert(tmp_path)
    server = TLSEchoServer(cert, key)
    try:
        with Converter() as conv:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):      # the agent's command line, as pep eval runs it
                agents.main(["ttfb", "--tls", "--mode", mode, "--reps", "1", "--warmup", "0",
                             "--server", "%s:%d" % server.address, "--proxy", "%s:%d" % conv.address])
            assert json.loads(printed.getvalue())["results"][0]["ttfb_ms"]
        assert conv.seen[0].syn_data
        # pep-hs: the ClientHello follows the handshake at once and may join the
        # header's chunk on loopback (see the plain-TCP test above).
        if in_syn or mode == "pep-wait":     # pep-wait sends nothing before the reply
            assert (conv.seen[0].early_data[:1] == b"\x16") == in_syn     # a TLS handshake record
    finally:
        server.close()
