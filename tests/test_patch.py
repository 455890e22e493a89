"""pepsock.patch(): requests, urllib3, http.client/urllib, httpx (sync and async) and
aiohttp, unmodified, through `pep relay` and the test converter, HTTP and HTTPS,
keep-alive pools reusing their connections; `pep python` runs a script patched.

Every test runs in a fresh namespace (TFO on) on its loopback, with
PEP_NO_PROXY set so that loopback is not bypassed (except the relay's stats port).
"""
import asyncio
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import urllib.request

import pytest

import pepsock
from pepsock import patching
from pepsock.client import PepSocket
from pepsock.tls import PepAwareSSLSocket, PepTLSSocket
from converter import Converter
from relay_helpers import ROOT, Relay
from tls_helpers import CountingHTTPServer, HTTPSServer, make_cert

pytestmark = pytest.mark.timeout(120)

BODY = b"through the PEP\n" * 100


@pytest.fixture
def cert(tmp_path):
    return make_cert(tmp_path)


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "f").write_bytes(BODY)
    return str(root)


class Pep:
    """The PEP under test: `pep relay` (a subprocess in the namespace) or the converter."""

    def __init__(self, kind: str, ns):
        self.kind = kind
        if kind == "relay":
            self.relay = Relay("--listen", "127.0.0.1:0", "--allow-dest", "127.0.0.0/8",
                               "--stats", "127.0.0.1:0", prefix=ns.cmd())
            self.address = self.relay.addr
            self.bypass = f"127.0.0.1:{self.relay.stats[1]}"   # reading metrics goes direct
        else:
            self.conv = Converter()
            self.address = self.conv.address
            self.bypass = ""

    def tunnels(self) -> int:
        if self.kind == "relay":
            return int(self.relay.metrics()["pep_relay_tunnels_total"])
        return len(self.conv.seen)

    def close(self):
        if self.kind == "relay":
            self.relay.stop()
        else:
            self.conv.close()


@pytest.fixture(params=["relay", "converter"])
def pep(request, ns, monkeypatch, tmp_path):
    p = Pep(request.param, ns)
    monkeypatch.setenv("PEP_PROXY", f"{p.address[0]}:{p.address[1]}")
    monkeypatch.setenv("PEP_NO_PROXY", p.bypass)
    monkeypatch.setenv("PEP_STATE_DIR", str(tmp_path / "state"))
    pepsock.patch()
    yield p
    pepsock.unpatch()
    p.close()


@pytest.fixture(params=["http", "https"])
def web(request, ns, site, cert):
    server = HTTPSServer(site, *cert) if request.param == "https" else CountingHTTPServer(site)
    server.scheme = request.param
    server.cafile = cert[0]
    yield server
    server.close()


def _ctx(web) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=web.cafile)


def _url(web, path="/f") -> str:
    return web.url(path).replace("127.0.0.1", "localhost") if web.scheme == "https" else web.url(path)


def test_requests_session_keeps_alive(pep, web):
    requests = pytest.importorskip("requests")
    with requests.Session() as s:
        for _ in range(3):
            r = s.get(_url(web), verify=web.cafile, timeout=10)
            assert r.status_code == 200 and r.content == BODY
    assert web.connections == 1
    assert pep.tunnels() == 1


def test_urllib3_pool_and_tls_socket(pep, web):
    urllib3 = pytest.importorskip("urllib3")
    with urllib3.PoolManager(ca_certs=web.cafile) as pool:
        for _ in range(2):
            r = pool.request("GET", _url(web), timeout=10, preload_content=False)
            sock = r.connection.sock
            assert r.read() == BODY
            r.release_conn()
        assert isinstance(sock, PepTLSSocket if web.scheme == "https" else PepSocket)
    assert web.connections == 1 and pep.tunnels() == 1


def test_http_client_and_urllib(pep, web):
    with urllib.request.urlopen(_url(web), timeout=10, context=_ctx(web)) as r:
        assert r.read() == BODY
    assert pep.tunnels() == 1


def test_httpx_sync_keeps_alive(pep, web):
    httpx = pytest.importorskip("httpx")
    with httpx.Client(verify=_ctx(web), timeout=10) as c:
        for _ in range(3):
            r = c.get(_url(web))
            assert r.status_code == 200 and r.content == BODY
    assert web.connections == 1 and pep.tunnels() == 1


def test_httpx_async_keeps_alive(pep, web):
    httpx = pytest.importorskip("httpx")

    async def main():
        async with httpx.AsyncClient(verify=_ctx(web), timeout=10) as c:
            for _ in range(3):
                r = await c.get(_url(web))
                assert r.status_code == 200 and r.content == BODY

    asyncio.run(main())
    assert web.connections == 1 and pep.tunnels() == 1


def test_aiohttp_keeps_alive(pep, web):
    aiohttp = pytest.importorskip("aiohttp")

    async def main():
        ctx = _ctx(web) if web.scheme == "https" else None   # one context: one pool key
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            for _ in range(3):
                async with s.get(_url(web), ssl=ctx) as r:
                    assert r.status == 200 and await r.read() == BODY

    asyncio.run(main())
    assert web.connections == 1 and pep.tunnels() == 1


def test_asyncio_open_connection_peername_is_the_destination(pep, web):
    async def main():
        reader, writer = await asyncio.open_connection(
            *web.address, ssl=_ctx(web) if web.scheme == "https" else None,
            server_hostname="localhost" if web.scheme == "https" else None)
        assert writer.get_extra_info("peername") == web.address
        writer.write(b"GET /f HTTP/1.0\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return data

    assert asyncio.run(main()).endswith(BODY)
    assert pep.tunnels() == 1


def test_https_client_hello_before_the_reply(ns, site, cert, monkeypatch):
    """Through a converter that holds its reply 300 ms: requests (sync) and
    aiohttp (asyncio) both have the TLS handshake under way before it."""
    aiohttp = pytest.importorskip("aiohttp")
    requests = pytest.importorskip("requests")
    with HTTPSServer(site, *cert, peek_hello=True) as web, Converter(reply_delay=0.3) as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        monkeypatch.setenv("PEP_NO_PROXY", "")
        pepsock.patch()
        try:
            url = web.url("/f").replace("127.0.0.1", "localhost")
            assert requests.get(url, verify=cert[0], timeout=10).content == BODY

            async def main():
                async with aiohttp.ClientSession() as s:
                    async with s.get(url, ssl=ssl.create_default_context(cafile=cert[0])) as r:
                        return await r.read()

            assert asyncio.run(main()) == BODY
        finally:
            pepsock.unpatch()
        assert len(web.hello_at) == 2 and len(conv.seen) == 2
        for seen, hello in zip(conv.seen, web.hello_at):
            assert seen.reply_sent_at - hello > 0.15


def test_default_no_proxy_keeps_loopback_direct(ns, site, monkeypatch):
    requests = pytest.importorskip("requests")
    with CountingHTTPServer(site) as web, Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        monkeypatch.delenv("PEP_NO_PROXY", raising=False)
        pepsock.patch()
        try:
            assert requests.get(web.url("/f"), timeout=10).content == BODY
        finally:
            pepsock.unpatch()
        assert conv.seen == []


def test_patch_is_idempotent_and_unpatch_restores():
    u3 = pytest.importorskip("urllib3.util.connection")
    before = (socket.create_connection, u3.create_connection, ssl.SSLContext.sslsocket_class,
              asyncio.BaseEventLoop.create_connection)
    pepsock.patch()
    pepsock.patch()
    try:
        assert patching.is_patched()
        assert socket.create_connection is patching.create_connection
        assert u3.create_connection.__wrapped__ is before[1]
        assert ssl.SSLContext.sslsocket_class is PepAwareSSLSocket
    finally:
        pepsock.unpatch()
    pepsock.unpatch()
    after = (socket.create_connection, u3.create_connection, ssl.SSLContext.sslsocket_class,
             asyncio.BaseEventLoop.create_connection)
    assert after == before and not patching.is_patched()


def test_a_module_imported_after_patch_is_patched(tmp_path):
    """aiohttp (or urllib3) imported only after patch() still gets the PEP."""
    pytest.importorskip("aiohttp")
    code = textwrap.dedent("""
        import sys, pepsock
        assert "aiohttp" not in sys.modules
        pepsock.patch()
        import aiohttp
        from pepsock.aiosock import aiohttp_socket_factory
        c = aiohttp.TCPConnector.__init__
        assert c.__wrapped__, "TCPConnector not patched"
        pepsock.unpatch()
        assert not hasattr(aiohttp.TCPConnector.__init__, "__wrapped__")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.stdout.strip() == "ok", r.stderr


def test_pep_python_runs_a_script_patched(ns, site, tmp_path):
    script = tmp_path / "fetch.py"
    script.write_text(textwrap.dedent("""
        import sys, urllib.request
        print(sys.argv[1:], urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()[:15])
    """))
    with CountingHTTPServer(site) as web, Converter() as conv:
        env = {**os.environ, "PYTHONPATH": ROOT, "PEP_NO_PROXY": "",
               "PEP_STATE_DIR": str(tmp_path / "state")}
        env.pop("PEP_PROXY", None)
        r = subprocess.run(ns.cmd(sys.executable, "-m", "pepsock.cli", "python", "--pep",
                                  conv.env_value, str(script), web.url("/f")),
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"['{web.url('/f')}'] through the PEP"
        assert len(conv.seen) == 1 and conv.seen[0].syn_data
        r = subprocess.run([sys.executable, "-m", "pepsock.pyrun", "-c",
                            "import sys; print(sys.argv)", "a", "b"],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.stdout.strip() == "['-c', 'a', 'b']", r.stderr


def test_aiohttp_socket_factory_without_patch(ns, site, cert, monkeypatch):
    """The public extension point: one aiohttp session on the PEP, nothing patched."""
    aiohttp = pytest.importorskip("aiohttp")
    from pepsock.aiosock import aiohttp_socket_factory
    with HTTPSServer(site, *cert) as web, Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        monkeypatch.setenv("PEP_NO_PROXY", "")
        ctx = ssl.create_default_context(cafile=cert[0])

        async def main():
            connector = aiohttp.TCPConnector(socket_factory=aiohttp_socket_factory)
            async with aiohttp.ClientSession(connector=connector) as s:
                for _ in range(2):
                    url = web.url("/f").replace("127.0.0.1", "localhost")
                    async with s.get(url, ssl=ctx) as r:
                        assert await r.read() == BODY

        assert not patching.is_patched()
        asyncio.run(main())
        assert len(conv.seen) == 1 and web.connections == 1


def test_asyncio_dial_gives_a_socket_for_create_connection(ns, site, monkeypatch):
    from pepsock.aiosock import dial
    with CountingHTTPServer(site) as web, Converter() as conv:
        async def main():
            sock = await dial(*web.address, pep=conv.address)
            reader, writer = await asyncio.open_connection(sock=sock)
            assert writer.get_extra_info("peername") == web.address
            writer.write(b"GET /f HTTP/1.0\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return data

        assert asyncio.run(main()).endswith(BODY)
        assert conv.seen[0].syn_data


def test_pep_python_bad_arguments(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    for argv, err in ((["--pep", "nonsense", "x.py"], "--pep"), ([], "usage"), (["-m"], "usage")):
        r = subprocess.run([sys.executable, "-m", "pepsock.cli", "python", *argv],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2 and err in r.stderr, (argv, r.stderr)
    script = tmp_path / "exit3.py"
    script.write_text("raise SystemExit(3)\n")
    r = subprocess.run([sys.executable, "-m", "pepsock.pyrun", str(script)], timeout=60, env=env)
    assert r.returncode == 3


def test_patch_and_unpatch_from_many_threads():
    import threading
    u3 = pytest.importorskip("urllib3.util.connection")
    before = (socket.create_connection, u3.create_connection, ssl.SSLContext.sslsocket_class,
              asyncio.BaseEventLoop.create_connection, len(sys.meta_path))

    def flip():
        for _ in range(200):
            pepsock.patch()
            pepsock.unpatch()

    threads = [threading.Thread(target=flip) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pepsock.patch()
    assert socket.create_connection is patching.create_connection
    pepsock.unpatch()
    assert (socket.create_connection, u3.create_connection, ssl.SSLContext.sslsocket_class,
            asyncio.BaseEventLoop.create_connection, len(sys.meta_path)) == before


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_httpx_transports_without_patch(ns, web, kind):
    """The httpx transports over httpcore's public network_backend: one pool, one
    connection through the PEP for three requests, nothing patched."""
    httpx = pytest.importorskip("httpx")
    from pepsock.httpx_transport import AsyncPepHTTPTransport, PepHTTPTransport
    with Converter(reply_delay=0.05) as conv:
        if kind == "sync":
            with httpx.Client(transport=PepHTTPTransport(pep=conv.address, verify=_ctx(web)),
                              timeout=10) as c:
                bodies = [c.get(_url(web)).content for _ in range(3)]
        else:
            async def main():
                transport = AsyncPepHTTPTransport(pep=conv.address, verify=_ctx(web))
                async with httpx.AsyncClient(transport=transport, timeout=10) as c:
                    return [(await c.get(_url(web))).content for _ in range(3)]
            bodies = asyncio.run(main())
        assert not patching.is_patched()
        assert bodies == [BODY] * 3
        assert len(conv.seen) == 1 and web.connections == 1


def test_httpx_transport_maps_errors(ns):
    httpx = pytest.importorskip("httpx")
    from pepsock.httpx_transport import PepHTTPTransport
    with Converter(error=(96, b"")) as conv:
        with httpx.Client(transport=PepHTTPTransport(pep=conv.address), timeout=5) as c:
            with pytest.raises(httpx.ReadError) as info:
                c.get("http://192.0.2.7:81/")
        assert "RFC 8803 error 96" in str(info.value)   # the PEP's verdict, in httpx's type
