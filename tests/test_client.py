"""pepsock.create_connection / open_connection against a real converter, real TFO.

Each test runs inside a fresh network namespace (net.ipv4.tcp_fastopen=3 set
there, never on the host), on its loopback.
"""
import asyncio
import errno
import logging
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest

import pepsock
from pepsock import protocol, tfo
from converter import Converter, EchoServer


@pytest.fixture(autouse=True)
def clean_env(pep_state):
    """Each test: its own shared-state directory, no PEP_* settings from outside."""


def test_bytes_round_trip_and_header_in_syn(echo):
    with Converter() as conv:
        sock = pepsock.create_connection(echo.address, timeout=5, pep=conv.address)
        with sock:
            payload = os.urandom(300_000)
            threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                assert chunk
                got += chunk
            assert got == payload
            assert tfo.syn_data_acked(sock)  # the client's view: SYN data acknowledged
            assert sock.getpeername() == echo.address
        assert conv.seen[0].syn_data  # the converter's view: it arrived in the SYN
        assert conv.seen[0].connect.port == echo.address[1]


def test_env_selects_the_pep_and_no_proxy_default_bypasses_loopback(echo, monkeypatch):
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"{conv.address[0]}:{conv.address[1]}")
        monkeypatch.delenv("PEP_NO_PROXY", raising=False)
        with pepsock.create_connection(echo.address, timeout=5) as direct:
            assert not isinstance(direct, pepsock.PepSocket)
        monkeypatch.setenv("PEP_NO_PROXY", "")
        with pepsock.create_connection(echo.address, timeout=5) as via:
            assert isinstance(via, pepsock.PepSocket)
            via.sendall(b"ping")
            assert via.recv(4) == b"ping"
        assert len(conv.seen) == 1


def test_bad_pep_proxy_is_a_clear_error_and_runs_unproxied(echo, monkeypatch, caplog):
    """As libpep.so (docs/protocol.md "Environment values"): one error line naming
    the variable, then direct connections, not an exception in every connect."""
    monkeypatch.setenv("PEP_PROXY", "192.0.2.1")
    with caplog.at_level(logging.ERROR, logger="pepsock"):
        for _ in range(2):
            with pepsock.create_connection(echo.address, timeout=5) as s:
                s.sendall(b"direct")
                assert s.recv(10) == b"direct"
    lines = [r.getMessage() for r in caplog.records if r.name == "pepsock"]
    assert len(lines) == 1 and "PEP_PROXY='192.0.2.1'" in lines[0], lines
    assert lines[0].endswith("; running unproxied")
    monkeypatch.setenv("PEP_PROXY", "192.0.2.1:0")
    with pytest.raises(ValueError, match="PEP_PROXY"):
        pepsock.route.parse_settings(os.environ)


def test_ipv6_pep_and_ipv4_destination(echo, ns):
    with Converter(host="::1") as conv:
        with pepsock.create_connection(echo.address, timeout=5, pep=("::1", conv.address[1])) as s:
            s.sendall(b"v6 pep")
            assert s.recv(10) == b"v6 pep"
        assert conv.seen[0].syn_data


def test_ipv6_destination(ns):
    with EchoServer("::1") as echo6, Converter() as conv:
        with pepsock.create_connection(echo6.address, timeout=5, pep=conv.address) as s:
            s.sendall(b"to v6")
            assert s.recv(10) == b"to v6"
            assert s.getpeername()[:2] == ("::1", echo6.address[1])
        assert str(conv.seen[0].connect.address) == "::1"


@pytest.mark.parametrize("split", [1, 3])
def test_split_reply_is_stripped(echo, split):
    tlv = protocol.ExtendedTCPHeader(b"\x00" * 18)
    with Converter(split=split, split_delay=0.01, reply_tlvs=(tlv,)) as conv:
        with pepsock.create_connection(echo.address, timeout=5, pep=conv.address) as s:
            s.sendall(b"after the reply")
            got = b""
            while len(got) < 15:
                got += s.recv(100)
            assert got == b"after the reply"


@pytest.mark.parametrize("code, value, exc_type, err", [
    (96, b"", ConnectionRefusedError, errno.ECONNREFUSED),
    (97, b"\x01", OSError, errno.EHOSTUNREACH),
    (97, b"\x00", OSError, errno.ENETUNREACH),
    (32, b"", PermissionError, errno.EACCES),
    (64, b"", OSError, errno.ENOBUFS),    # pep= forces the PEP: no fallback
    (65, b"", OSError, errno.ENETUNREACH),
    (1, b"", OSError, errno.EPROTO),
    (3, b"", OSError, errno.EPROTO),      # Missing Cookie without a cookie: nothing to retry with
])
def test_error_reply_raises_on_first_read_and_resets(echo, code, value, exc_type, err):
    with Converter(error=(code, value)) as conv:
        s = pepsock.create_connection(echo.address, timeout=5, pep=conv.address)
        with s:
            with pytest.raises(exc_type) as info:
                s.recv(10)
            assert info.value.errno == err and info.value.code == code
            with pytest.raises(exc_type):  # and stays failed, writes included
                s.sendall(b"x")


def test_refused_destination_through_the_converter(ns):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with Converter() as conv:
        with pepsock.create_connection(("127.0.0.1", port), timeout=5, pep=conv.address) as s:
            with pytest.raises(ConnectionRefusedError):
                s.recv(1)


def test_garbage_reply_is_a_protocol_error(echo):
    with Converter(raw_reply=b"HTTP/1.1 200 OK\r\n\r\n") as conv:
        with pepsock.create_connection(echo.address, timeout=5, pep=conv.address) as s:
            with pytest.raises(OSError) as info:
                s.recv(10)
            assert info.value.errno == errno.EPROTO


def test_pep_closing_before_reply(echo):
    with Converter(raw_reply=b"\x01\x02") as conv:  # half a header, then close
        with pepsock.create_connection(echo.address, timeout=5, pep=conv.address) as s:
            with pytest.raises(ConnectionResetError):
                s.recv(10)


def test_makefile_and_timeouts(echo):
    with Converter() as conv:
        with pepsock.create_connection(echo.address, timeout=5, pep=conv.address) as s:
            f = s.makefile("rwb")
            f.write(b"line one\nline two\n")
            f.flush()
            assert f.readline() == b"line one\n"
            assert f.readline() == b"line two\n"
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(10)


def test_nonblocking_read_before_reply_is_eagain(ns):
    with Converter(split=2, split_delay=0.3) as conv, EchoServer() as echo:
        s = pepsock.create_connection(echo.address, timeout=5, pep=conv.address)
        with s:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(10)
            s.setblocking(True)
            s.sendall(b"ok")
            assert s.recv(2) == b"ok"


def test_connect_timeout_to_a_black_holed_pep(ns):
    require_iptables = subprocess.run(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9",
                                       "-j", "DROP"], capture_output=True)
    if require_iptables.returncode:
        pytest.skip(f"iptables unusable here: {require_iptables.stderr.decode().strip()}")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pepsock.create_connection(("192.0.2.1", 80), timeout=0.5, pep=("127.0.0.1", 9))
    assert time.monotonic() - started < 2


def test_unreachable_pep_tries_next_address(echo, monkeypatch):
    with Converter() as conv:
        real = socket.getaddrinfo

        def two_addresses(host, port, *a, **k):
            if host == "pep.test":
                dead = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", 1))
                return [dead] + real("127.0.0.1", port, *a, **k)
            return real(host, port, *a, **k)

        monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
        with pepsock.create_connection(echo.address, timeout=5,
                                       pep=("pep.test", conv.address[1])) as s:
            s.sendall(b"second")
            assert s.recv(6) == b"second"


def test_no_tfo_still_works_in_one_rtt(ns, echo):
    ns.sysctl("net.ipv4.tcp_fastopen", 0)
    with Converter() as conv:
        with pepsock.create_connection(echo.address, timeout=5, pep=conv.address) as s:
            s.sendall(b"1rtt")
            assert s.recv(4) == b"1rtt"
            assert not tfo.syn_data_acked(s)
        assert not conv.seen[0].syn_data


def _self_signed(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                       capture_output=True)
    if r.returncode:
        pytest.skip("needs the openssl command to make a test certificate")
    return str(cert), str(key)


def test_ssl_wrapping(ns, tmp_path):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())

    threading.Thread(target=serve, daemon=True).start()
    client_ctx = ssl.create_default_context(cafile=cert)
    with Converter() as conv:
        raw = pepsock.create_connection(listener.getsockname(), timeout=5, pep=conv.address)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"secret")
            assert tls.recv(100) == b"SECRET"
    listener.close()


# -- asyncio ----------------------------------------------------------------------

def test_asyncio_round_trip_and_split_reply(echo):
    async def main():
        with Converter(split=1, split_delay=0.005) as conv:
            reader, writer = await pepsock.open_connection(*echo.address, pep=conv.address)
            writer.write(b"hello asyncio\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            await writer.wait_closed()
            return line, conv.seen[0].syn_data
    line, syn_data = asyncio.run(main())
    assert line == b"hello asyncio\n" and syn_data


def test_asyncio_error_reply(echo):
    async def main():
        with Converter(error=(96, b"")) as conv:
            reader, writer = await pepsock.open_connection(*echo.address, pep=conv.address)
            with pytest.raises(ConnectionRefusedError) as info:
                await asyncio.wait_for(reader.read(10), 5)
            writer.close()
            return info.value
    exc = asyncio.run(main())
    assert exc.code == 96


def test_asyncio_tls(ns, tmp_path):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def main():
        async def handle(r, w):
            w.write((await r.readline()).upper())
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        with Converter() as conv:
            ctx = ssl.create_default_context(cafile=cert)
            reader, writer = await pepsock.open_connection(
                "127.0.0.1", port, pep=conv.address, ssl=ctx, server_hostname="localhost")
            writer.write(b"tls line\n")
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
        server.close()
        return line
    assert asyncio.run(main()) == b"TLS LINE\n"


def test_asyncio_direct_when_bypassed(echo, monkeypatch):
    monkeypatch.delenv("PEP_PROXY", raising=False)

    async def main():
        reader, writer = await pepsock.open_connection(*echo.address)
        writer.write(b"d")
        got = await reader.read(1)
        writer.close()
        return got
    assert asyncio.run(main()) == b"d"


def test_connection_to_the_pep_itself_goes_direct_sync_and_asyncio(ns, monkeypatch):
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        monkeypatch.setenv("PEP_NO_PROXY", "")
        s = pepsock.create_connection(conv.address, timeout=5)
        assert not isinstance(s, pepsock.PepSocket)
        s.close()

        async def main():
            reader, writer = await pepsock.open_connection(*conv.address)
            sock = writer.get_extra_info("socket")
            writer.close()
            return sock
        assert not isinstance(asyncio.run(main()), pepsock.PepSocket)
        time.sleep(0.1)
        assert all(seen.connect is None for seen in conv.seen)   # no Convert header sent


def test_asyncio_peername_is_the_destination_ipv6(ns):
    async def main():
        with EchoServer("::1") as echo6, Converter() as conv:
            reader, writer = await pepsock.open_connection(*echo6.address, pep=conv.address)
            peer = writer.get_extra_info("peername")
            writer.write(b"v6")
            got = await asyncio.wait_for(reader.readexactly(2), 5)
            writer.close()
            return peer, echo6.address, got
    peer, address, got = asyncio.run(main())
    assert peer == (address[0], address[1], 0, 0) and got == b"v6"
