"""The patched and extension-point paths on the client core (route + ClientSession):
failover past a refusing PEP, the Error 3 cookie retry (replaying the ClientHello
that went before the reply), hold-downs in the shared state, and the reply
deadline on asyncio paths. HTTPS throughout, so the retry carries TLS bytes.

Each test runs in a fresh namespace (TFO on) on its loopback, with its own
PEP_STATE_DIR.
"""
import asyncio
import errno
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest

import pepsock
from pepsock import pepstate
from converter import Converter, dead_port
from tls_helpers import HTTPSServer, make_cert

pytestmark = pytest.mark.timeout(120)

BODY = b"failover through the PEP\n" * 50
COOKIE = bytes(range(1, 13))


@pytest.fixture
def state(pep_state, monkeypatch):
    """conftest's pep_state (returned), loopback destinations through the PEP."""
    monkeypatch.setenv("PEP_NO_PROXY", "")
    return pep_state


@pytest.fixture
def web(ns, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "f").write_bytes(BODY)
    cert = make_cert(tmp_path)
    server = HTTPSServer(str(root), *cert)
    server.cafile = cert[0]
    yield server
    server.close()


def _url(web) -> str:
    return web.url("/f").replace("127.0.0.1", "localhost")


def _get_requests(web):
    requests = pytest.importorskip("requests")
    return requests.get(_url(web), verify=web.cafile, timeout=10).content


def _get_urllib(web):
    ctx = ssl.create_default_context(cafile=web.cafile)
    return urllib.request.urlopen(_url(web), context=ctx, timeout=10).read()


async def _http_over(reader, writer):
    writer.write(b"GET /f HTTP/1.0\r\nHost: localhost\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1]


def _get_asyncio(web):
    ctx = ssl.create_default_context(cafile=web.cafile)

    async def main():
        reader, writer = await asyncio.open_connection("localhost", web.address[1], ssl=ctx)
        return await _http_over(reader, writer)
    return asyncio.run(main())


def _get_aiohttp(web):
    aiohttp = pytest.importorskip("aiohttp")
    ctx = ssl.create_default_context(cafile=web.cafile)

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(_url(web), ssl=ctx) as r:
                return await r.read()
    return asyncio.run(main())


def _get_dial(web):
    """No patch: aiosock.dial's socket under asyncio's own TLS."""
    from pepsock.aiosock import dial
    ctx = ssl.create_default_context(cafile=web.cafile)

    async def main():
        sock = await dial("localhost", web.address[1])
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx,
                                                       server_hostname="localhost")
        return await _http_over(reader, writer)
    return asyncio.run(main())


def _get_aiohttp_factory(web):
    """No patch: the public aiohttp extension point."""
    aiohttp = pytest.importorskip("aiohttp")
    from pepsock.aiosock import aiohttp_socket_factory
    ctx = ssl.create_default_context(cafile=web.cafile)

    async def main():
        connector = aiohttp.TCPConnector(socket_factory=aiohttp_socket_factory)
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.get(_url(web), ssl=ctx) as r:
                return await r.read()
    return asyncio.run(main())


PATHS = {"requests": (_get_requests, True), "urllib": (_get_urllib, True),
         "asyncio": (_get_asyncio, True), "aiohttp": (_get_aiohttp, True),
         "aiosock.dial": (_get_dial, False), "aiohttp socket_factory": (_get_aiohttp_factory, False)}


@pytest.mark.parametrize("path", list(PATHS))
def test_refused_pep_then_error_3_over_tls(web, state, monkeypatch, path):
    """PEP_PROXY = a refusing PEP, then a converter that wants a Cookie TLV: the first
    is held down, the second answers Error 3 to the ClientHello-carrying attempt,
    the retry sends the cookie and replays the ClientHello; the page arrives whole."""
    get, patched = PATHS[path]
    dead = dead_port()
    with Converter(cookie=COOKIE) as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead},{conv.env_value}")
        if patched:
            pepsock.patch()
        try:
            assert get(web) == BODY
        finally:
            pepsock.unpatch()
        assert [s.cookie for s in conv.seen] == [None, COOKIE]
        assert conv.seen[1].early_data[:1] == b"\x16"   # the replayed ClientHello came with it
    down = pepstate.load(str(state), f"pep-127.0.0.1-{dead}")
    assert down["reason"] == "refused" and int(down["down_until"]) > time.time()
    assert pepstate.load(str(state), f"pep-{conv.address[0]}-{conv.address[1]}")["cookie"] \
        == COOKIE.hex()


@pytest.mark.parametrize("path", ["aiosock.dial", "aiohttp socket_factory"])
def test_asyncio_paths_enforce_the_reply_deadline(web, state, monkeypatch, path):
    """A PEP that takes the connection and never replies: the asyncio paths fail with
    ETIMEDOUT at PEP_REPLY_TIMEOUT (a timer on the loop), not hang."""
    monkeypatch.setenv("PEP_REPLY_TIMEOUT", "0.5")
    with Converter(reply_delay=float("inf")) as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        started = time.monotonic()
        with pytest.raises(Exception) as info:
            PATHS[path][0](web)
        took = time.monotonic() - started
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, OSError) and e.errno == errno.ETIMEDOUT for e in chain), chain
    assert 0.4 < took < 8, took


@pytest.mark.parametrize("path", ["aiosock.dial", "aiohttp socket_factory"])
def test_asyncio_paths_leave_a_silent_pep_at_its_connect_timeout(ns, web, state, monkeypatch,
                                                                   path):
    """A PEP whose SYNs are dropped: after PEP_CONNECT_TIMEOUT the next PEP is dialled
    (DialSocket: a timer on the loop moves the same fd on), and the first is held down."""
    silent = dead_port()
    r = subprocess.run(ns.cmd("iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(silent),
                              "-j", "DROP"), capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"iptables unusable here: {r.stderr.strip()}")
    monkeypatch.setenv("PEP_CONNECT_TIMEOUT", "0.5")
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{silent},{conv.env_value}")
        started = time.monotonic()
        assert PATHS[path][0](web) == BODY
        took = time.monotonic() - started
        assert len(conv.seen) == 1
    assert 0.4 < took < 8, took
    assert pepstate.load(str(state), f"pep-127.0.0.1-{silent}")["reason"] == "timeout"


def test_asyncio_pep_sockets_get_tcp_nodelay(web, state, monkeypatch):
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it
    Nagle holds a request behind the unacked TLS Finished (one more client-PEP RTT)."""
    from pepsock.aiosock import aiohttp_socket_factory, dial
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)

        async def main():
            reader, writer = await pepsock.open_connection(*web.address)
            opened = writer.get_extra_info("socket")
            sock = await dial(*web.address)
            made = aiohttp_socket_factory((socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                           web.address))
            try:
                return [opened.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                        sock.proto, made.proto]
            finally:
                writer.close()
                sock.close()
                made.close()

        nodelay, dialled, factory = asyncio.run(main())
    assert nodelay and dialled == factory == socket.IPPROTO_TCP


def test_dial_socket_blocking_connect_fails_over(web, state, monkeypatch):
    """A DialSocket used blocking (no event loop): connect() waits for the handshake and
    moves past a refusing PEP as create_connection does; reads strip the reply."""
    from pepsock.aiosock import DialSocket, aiohttp_socket_factory
    dead = dead_port()
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead},{conv.env_value}")
        sock = aiohttp_socket_factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", web.address))
        assert isinstance(sock, DialSocket)
        with sock:
            sock.settimeout(5)
            sock.connect(web.address)
            assert sock.getpeername() == web.address and sock.pep == conv.address
            tls = ssl.create_default_context(cafile=web.cafile).wrap_socket(
                sock, server_hostname="localhost")
            tls.sendall(b"GET /f HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            tls.close()
        assert data.split(b"\r\n\r\n", 1)[1] == BODY
    assert pepstate.load(str(state), f"pep-127.0.0.1-{dead}")["reason"] == "refused"
