"""TLS through the PEP without waiting for its reply (pepsock.tls, asyncio ssl=).

A converter that holds its reply for REPLY_DELAY while already forwarding the
client's bytes shows when the ClientHello leaves: the TLS server notes when it
arrived, the converter when it sent the reply. Each test runs in a fresh
namespace (TFO on) on its loopback; certificates come from the openssl command.
"""
import asyncio
import errno
import select
import socket
import ssl
import threading
import time

import pytest

import pepsock
from pepsock import tls as pep_tls
from converter import Converter
from tls_helpers import TLSEchoServer, make_cert

REPLY_DELAY = 0.3


@pytest.fixture
def cert(tmp_path):
    return make_cert(tmp_path)


@pytest.fixture
def server(ns, cert):
    with TLSEchoServer(*cert) as srv:
        yield srv


@pytest.fixture
def client_ctx(cert):
    return ssl.create_default_context(cafile=cert[0])


def _sent_before_reply(server, conv) -> float:
    """Seconds by which the ClientHello beat the converter's reply (> 0: it did)."""
    return conv.seen[0].reply_sent_at - server.hello_at[0]


def test_client_hello_leaves_before_the_reply(server, client_ctx):
    with Converter(reply_delay=REPLY_DELAY) as conv:
        raw = pepsock.create_connection(server.address, timeout=5, pep=conv.address)
        with pepsock.wrap_tls(raw, client_ctx, server_hostname="localhost") as tls:
            assert isinstance(tls, ssl.SSLSocket)
            tls.sendall(b"secret\n")
            assert tls.recv(100) == b"SECRET\n"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.cipher()[0]
            assert tls.getpeercert()["subject"] == ((("commonName", "localhost"),),)
            assert tls.getpeercert(binary_form=True)[:1] == b"\x30"   # DER
            assert tls.getpeername() == server.address
            assert tls.pep == conv.address
        assert _sent_before_reply(server, conv) > REPLY_DELAY / 2


def test_the_stdlib_wrap_waits_for_the_reply(server, client_ctx):
    """The comparison: ssl's own SSLSocket must wait (it reads the fd itself)."""
    with Converter(reply_delay=REPLY_DELAY) as conv:
        raw = pepsock.create_connection(server.address, timeout=5, pep=conv.address)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"x\n")
            assert tls.recv(10) == b"X\n"
        assert _sent_before_reply(server, conv) < 0


def test_pep_aware_context_and_create_tls_connection(server, client_ctx):
    with Converter(reply_delay=REPLY_DELAY) as conv:
        ctx = pep_tls.pep_aware(client_ctx)
        raw = pepsock.create_connection(server.address, timeout=5, pep=conv.address)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert isinstance(tls, pep_tls.PepTLSSocket)
            tls.sendall(b"a\n")
            assert tls.recv(10) == b"A\n"
        with pepsock.create_tls_connection(server.address, client_ctx, timeout=5,
                                           server_hostname="localhost", pep=conv.address) as tls:
            tls.sendall(b"b\n")
            assert tls.recv(10) == b"B\n"
        assert all(s.reply_sent_at > h for s, h in zip(conv.seen, server.hello_at))


def test_makefile_big_transfer_and_timeouts(server, client_ctx):
    with Converter(reply_delay=0.05) as conv:
        tls = pepsock.create_tls_connection(server.address, client_ctx, timeout=5,
                                            server_hostname="localhost", pep=conv.address)
        with tls:
            f = tls.makefile("rwb")
            lines = [b"%06d" % i + b"x" * 2000 + b"\n" for i in range(300)]   # ~600 kB
            for line in lines:
                f.write(line)
            f.flush()
            for line in lines:
                assert f.readline() == line.upper()
            big = b"y" * 2_000_000 + b"\n"   # one sendall, larger than a write's share
            sender = threading.Thread(target=tls.sendall, args=(big,), daemon=True)
            sender.start()
            assert f.readline() == big.upper()
            sender.join(5)
            f.close()
            tls.settimeout(0.2)
            assert tls.gettimeout() == 0.2 and tls.raw.gettimeout() == 0.2
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                tls.recv(10)
            assert time.monotonic() - started < 2


def test_non_blocking_use(server, client_ctx):
    with Converter(reply_delay=REPLY_DELAY) as conv:
        raw = pepsock.create_connection(server.address, timeout=5, pep=conv.address)
        raw.setblocking(False)
        tls = pepsock.wrap_tls(raw, client_ctx, server_hostname="localhost",
                               do_handshake_on_connect=False)
        with tls:
            rounds = 0
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    select.select([tls], [], [], 5)
                except ssl.SSLWantWriteError:
                    select.select([], [tls], [], 5)
                rounds += 1
            assert rounds >= 1   # the reply was held: the first try could not finish
            with pytest.raises(ssl.SSLWantReadError):
                tls.recv(10)
            tls.send(b"nb\n")
            got = b""
            while not got.endswith(b"\n"):
                if not tls.pending():
                    select.select([tls], [], [], 5)
                try:
                    got += tls.recv(10)
                except ssl.SSLWantReadError:
                    pass
            assert got == b"NB\n"
        assert _sent_before_reply(server, conv) > REPLY_DELAY / 2


def test_unwrap_goes_on_in_clear(server, client_ctx):
    with Converter() as conv:
        tls = pepsock.create_tls_connection(server.address, client_ctx, timeout=5,
                                            server_hostname="localhost", pep=conv.address)
        tls.sendall(b"UNWRAP\n")
        assert tls.recv(3) == b"OK\n"
        plain = tls.unwrap()
        assert isinstance(plain, pepsock.PepSocket)
        tls.close()   # the connection now belongs to `plain`
        plain.sendall(b"clear")
        assert plain.recv(10) == b"clear"
        plain.close()


def test_error_reply_fails_the_handshake(server, client_ctx):
    with Converter(error=(96, b"")) as conv:
        raw = pepsock.create_connection(server.address, timeout=5, pep=conv.address)
        with pytest.raises(ConnectionRefusedError) as info:
            pepsock.wrap_tls(raw, client_ctx, server_hostname="localhost")
        assert info.value.code == 96
        assert raw._closed    # wrap_tls closed what it could not wrap
        assert not server.hello_at   # nothing reached the destination


def test_bad_certificate_is_an_ssl_error(server):
    with Converter() as conv:
        with pytest.raises(ssl.SSLCertVerificationError):
            pepsock.create_tls_connection(server.address, ssl.create_default_context(),
                                          timeout=5, server_hostname="localhost",
                                          pep=conv.address)


def test_plain_sockets_keep_the_stdlib_path(server, client_ctx):
    ctx = pep_tls.pep_aware(client_ctx)
    with socket.create_connection(server.address, timeout=5) as plain:
        with ctx.wrap_socket(plain, server_hostname="localhost") as tls:
            assert type(tls) is ssl.SSLSocket
            tls.sendall(b"d\n")
            assert tls.recv(10) == b"D\n"


# -- asyncio --------------------------------------------------------------------------

def test_asyncio_tls_starts_before_the_reply(server, client_ctx):
    async def main(conv):
        reader, writer = await pepsock.open_connection(
            *server.address, pep=conv.address, ssl=client_ctx, server_hostname="localhost")
        writer.write(b"async tls\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        assert writer.get_extra_info("peername") == server.address
        assert writer.get_extra_info("ssl_object").version()
        writer.close()
        await writer.wait_closed()
        return line

    with Converter(reply_delay=REPLY_DELAY) as conv:
        assert asyncio.run(main(conv)) == b"ASYNC TLS\n"
        assert _sent_before_reply(server, conv) > REPLY_DELAY / 2


def test_asyncio_tls_error_reply(server, client_ctx):
    async def main(conv):
        await pepsock.open_connection(*server.address, pep=conv.address, ssl=client_ctx,
                                      server_hostname="localhost")

    with Converter(error=(97, b"\x01")) as conv:
        with pytest.raises(OSError) as info:
            asyncio.run(main(conv))
        assert info.value.errno == errno.EHOSTUNREACH


# -- through delay lines: the round trip saved ---------------------------------------------

def test_handshake_through_delay_lines_saves_a_round_trip(tmp_path):
    """R1 (client-PEP) = R2 (PEP-server) = 100 ms, `pep relay` in the middle: the
    stdlib's wrap (waits for the reply) needs 2(R1+R2) = 400 ms to finish the TLS
    handshake, pepsock.wrap_tls 2 R1 + R2 = 300 ms (libpep.so's figure, see
    benchmarks/bench_tls_handshake.py)."""
    from conftest import require_root
    from pepsock.testbed.topology import ADDR, Settings, Testbed
    from relay_helpers import Relay
    require_root()
    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(cafile=cert)
    with Testbed(Settings(r1_ms=100, r2_ms=100, wireless_mbit=50), prefix="tt") as tb:
        with tb.server.enter():
            server = TLSEchoServer(cert, key, host="0.0.0.0")
        relay = Relay("--listen", f"{ADDR['pep_w']}:5124", prefix=tb.pep.cmd())
        try:
            times = {"stdlib": [], "pepsock": []}
            with tb.client.enter():
                dest = (ADDR["server"], server.address[1])
                for _ in range(3):
                    for how in times:
                        t0 = time.monotonic()
                        raw = pepsock.create_connection(dest, timeout=5, pep=relay.addr)
                        if how == "stdlib":
                            tls = ctx.wrap_socket(raw, server_hostname="localhost")
                        else:
                            tls = pepsock.wrap_tls(raw, ctx, server_hostname="localhost")
                        times[how].append(time.monotonic() - t0)
                        tls.close()
        finally:
            relay.stop()
            server.close()
    wait, nowait = min(times["stdlib"]), min(times["pepsock"])
    assert wait > 0.37 and nowait > 0.28, times    # what the delays allow at best
    assert wait - nowait > 0.06, times              # about R1 = 100 ms saved


def test_a_pep_that_never_replies_times_the_handshake_out(server, client_ctx):
    with Converter(reply_delay=3) as conv:
        raw = pepsock.create_connection(server.address, timeout=0.5, pep=conv.address)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            pepsock.wrap_tls(raw, client_ctx, server_hostname="localhost")
        assert time.monotonic() - started < 2
        assert raw._closed


def test_asyncio_tls_pep_closing_before_its_reply(server, client_ctx):
    async def main(conv):
        await pepsock.open_connection(*server.address, pep=conv.address, ssl=client_ctx,
                                      server_hostname="localhost")

    with Converter(raw_reply=b"\x01\x02") as conv:   # half a header, then close
        with pytest.raises(ConnectionResetError):
            asyncio.run(main(conv))


def test_one_thread_sends_while_another_receives(server, client_ctx):
    """As with the stdlib's SSLSocket, a writer and a reader thread may share one
    PepTLSSocket (OpenSSL and the BIOs are serialised, ciphertext stays in order)."""
    with Converter() as conv:
        tls = pepsock.create_tls_connection(server.address, client_ctx, timeout=10,
                                            server_hostname="localhost", pep=conv.address)
        lines = [bytes([97 + i % 26]) * 1_000_000 + b"\n" for i in range(8)]

        def send_all():
            for line in lines:
                tls.sendall(line)

        with tls, tls.makefile("rb") as f:
            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            for line in lines:
                assert f.readline() == line.upper()
            sender.join(10)


def test_ipv6_pep_and_destination(ns, cert, client_ctx):
    with TLSEchoServer(*cert, host="::1") as server6, Converter(host="::1") as conv:
        with pepsock.create_tls_connection(server6.address, client_ctx, timeout=5,
                                           server_hostname="localhost", pep=conv.address) as tls:
            assert tls.getpeername()[:2] == server6.address
            tls.sendall(b"six\n")
            assert tls.recv(10) == b"SIX\n"

        async def main():
            reader, writer = await pepsock.open_connection(
                *server6.address, pep=conv.address, ssl=client_ctx, server_hostname="localhost")
            writer.write(b"aio six\n")
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            return line

        assert asyncio.run(main()) == b"AIO SIX\n"
        assert [str(s.connect.address) for s in conv.seen] == ["::1", "::1"]


@pytest.mark.parametrize("mode, before", [("pep", True), ("aio", True), ("pep-hs", True), ("pep-wait", False)])
def test_eval_https_rows_send_the_client_hello_before_the_reply(server, mode, before):
    """pep eval's HTTPS TTFB rows (testbed/agents.py): pepsock sync (pep_aware context) and
    asyncio do not wait for the PEP's reply; the row labelled pep-wait does."""
    from types import SimpleNamespace
    from pepsock.testbed import agents
    with Converter(reply_delay=REPLY_DELAY) as conv:
        a = SimpleNamespace(mode=mode, size=100, timeout=5, cc=None)
        assert agents._ttfb_tls_once(a, server.address, conv.address, agents._tls_context())
        lead = _sent_before_reply(server, conv)
        assert lead > REPLY_DELAY / 2 if before else lead < 0, lead
