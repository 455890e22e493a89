"""pepsock when a PEP fails: PEP_PROXY lists, hold-downs shared across processes,
PEP_FALLBACK, connect and reply timeouts, PEP_CONFIRM, Error 3 cookie retry and
TFO cookie-mode learning; sync and asyncio. Real sockets, real TFO, each test in
a namespace of its own with its own PEP_STATE_DIR.
"""
import asyncio
import errno
import os
import socket
import subprocess
import sys
import time

import pytest

import pepsock
from pepsock import pepstate
from converter import Converter, EchoServer, dead_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_env(pep_state, monkeypatch):
    """conftest's pep_state (returned), loopback destinations through the PEP."""
    monkeypatch.setenv("PEP_NO_PROXY", "")
    return pep_state


def black_hole(ns, port: int) -> None:
    r = subprocess.run(ns.cmd("iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port),
                              "-j", "DROP"), capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"iptables unusable here: {r.stderr.strip()}")


def proxy_list(*ports) -> str:
    return ",".join(f"127.0.0.1:{p}" for p in ports)


def round_trip(sock, payload=b"ping") -> None:
    with sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(100)
            assert chunk
            got += chunk
        assert got == payload


def state_of(state_dir, port) -> dict:
    return pepstate.load(str(state_dir), f"pep-127.0.0.1-{port}")


def in_other_process(ns, state_dir, env: dict, echo_port: int) -> float:
    """Seconds a second process takes for one round trip (same PEP_STATE_DIR)."""
    code = ("import time, pepsock\n"
            "t = time.monotonic()\n"
            f"s = pepsock.create_connection(('127.0.0.1', {echo_port}), timeout=10)\n"
            "s.sendall(b'x'); assert s.recv(1) == b'x'\n"
            "print(time.monotonic() - t)\n")
    full = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "PEP_STATE_DIR": str(state_dir),
            "PEP_NO_PROXY": "", **env}
    out = subprocess.run(ns.cmd(sys.executable, "-c", code), env=full, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


# -- the PEP list, hold-downs, fallback ---------------------------------------------------


def test_refusing_pep_fails_over_and_is_held_down_for_other_processes(echo, ns, clean_env,
                                                                        monkeypatch):
    dead = dead_port()
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", proxy_list(dead, conv.address[1]))
        round_trip(pepsock.create_connection(echo.address, timeout=5))
        assert len(conv.seen) == 1
        fields = state_of(clean_env, dead)
        assert fields["reason"] == "refused"
        assert 25 <= int(fields["down_until"]) - time.time() <= 31
        in_other_process(ns, clean_env, {"PEP_PROXY": proxy_list(dead, conv.address[1])},
                         echo.address[1])
        assert len(conv.seen) == 2


def test_black_holed_pep_costs_the_timeout_once_across_processes(echo, ns, clean_env,
                                                                 monkeypatch):
    black_hole(ns, 9)
    with Converter() as conv:
        env = {"PEP_PROXY": proxy_list(9, conv.address[1]), "PEP_CONNECT_TIMEOUT": "0.5"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        started = time.monotonic()
        round_trip(pepsock.create_connection(echo.address, timeout=10))
        first = time.monotonic() - started
        assert 0.45 <= first < 3
        assert state_of(clean_env, 9)["reason"] == "timeout"
        second = in_other_process(ns, clean_env, env, echo.address[1])
        assert second < 0.4, f"second process paid the timeout again ({second:.2f} s)"


def test_with_no_pep_left_to_try_only_the_callers_timeout_counts(echo, ns, monkeypatch):
    """pep= (or the last PEP under PEP_FALLBACK=fail): no PEP connect timeout, so a
    SYN lost once (retransmitted after 1 s) does not fail the connection."""
    black_hole(ns, 9)
    monkeypatch.setenv("PEP_CONNECT_TIMEOUT", "0.2")
    for kw, env in (({"pep": ("127.0.0.1", 9)}, {}),
                    ({}, {"PEP_PROXY": "127.0.0.1:9", "PEP_FALLBACK": "fail"})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            pepsock.create_connection(echo.address, timeout=0.8, **kw)
        assert 0.7 < time.monotonic() - started < 2


def test_fallback_direct_and_fail(echo, ns, monkeypatch):
    dead = dead_port()
    monkeypatch.setenv("PEP_PROXY", proxy_list(dead))
    s = pepsock.create_connection(echo.address, timeout=5)
    assert not isinstance(s, pepsock.PepSocket)      # straight to the destination
    round_trip(s)
    monkeypatch.setenv("PEP_FALLBACK", "fail")
    with pytest.raises(ConnectionRefusedError) as info:
        pepsock.create_connection(echo.address, timeout=5)
    assert "held down" in str(info.value) and "PEP_FALLBACK=fail" in str(info.value)


def test_forced_pep_neither_skips_nor_falls_back(echo, ns, clean_env):
    dead = dead_port()
    for _ in range(2):      # held down after the first, still tried: pep= forces it
        with pytest.raises(ConnectionRefusedError):
            pepsock.create_connection(echo.address, timeout=5, pep=("127.0.0.1", dead))
    assert state_of(clean_env, dead)["reason"] == "refused"


def test_destination_errors_never_fall_back(ns, monkeypatch):
    with Converter() as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        s = pepsock.create_connection(("127.0.0.1", dead_port()), timeout=5)
        with s, pytest.raises(ConnectionRefusedError) as info:
            s.recv(1)
        assert info.value.code == 96
        assert len(conv.seen) == 1


def test_error_64_holds_down_for_its_delay_and_replays_early_bytes(echo, ns, clean_env,
                                                                   monkeypatch):
    with Converter(error=(64, b"\x07")) as busy, Converter() as good:
        monkeypatch.setenv("PEP_PROXY", f"{busy.env_value},{good.env_value}")
        s = pepsock.create_connection(echo.address, timeout=5)
        with s:
            s.sendall(b"sent before the reply")      # rides with the header; replayed
            got = b""
            while len(got) < 21:
                got += s.recv(100)
            assert got == b"sent before the reply"
            assert s.getpeername() == echo.address
            assert s.pep == good.address
        fields = state_of(clean_env, busy.address[1])
        assert fields["reason"] == "error64"
        assert 5 <= int(fields["down_until"]) - time.time() <= 8
        assert len(busy.seen) == 1 and len(good.seen) == 1
        round_trip(pepsock.create_connection(echo.address, timeout=5))
        assert len(busy.seen) == 1                     # held down: not asked again


def test_error_65_without_a_delay_means_30s_and_fail_mode_refuses(echo, ns, clean_env,
                                                                  monkeypatch):
    with Converter(error=(65, b"")) as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        monkeypatch.setenv("PEP_FALLBACK", "fail")
        s = pepsock.create_connection(echo.address, timeout=5)
        with s, pytest.raises(ConnectionRefusedError) as info:
            s.recv(1)
        assert "Error 65" in str(info.value)
        assert 25 <= int(state_of(clean_env, conv.address[1])["down_until"]) - time.time() <= 31


# -- timeouts and PEP_CONFIRM --------------------------------------------------------------


def test_never_replying_pep_times_out_with_etimedout(echo, monkeypatch):
    monkeypatch.setenv("PEP_REPLY_TIMEOUT", "0.5")
    with Converter(reply_delay=float("inf")) as conv:
        s = pepsock.create_connection(echo.address, pep=conv.address)
        started = time.monotonic()
        with s, pytest.raises(TimeoutError) as info:
            s.recv(1)
        assert info.value.errno == errno.ETIMEDOUT
        assert 0.3 < time.monotonic() - started < 2
        with pytest.raises(TimeoutError):               # and stays failed
            s.send(b"x")


def test_callers_timeout_counts_until_the_reply(echo):
    with Converter(reply_delay=float("inf")) as conv:
        started = time.monotonic()
        s = pepsock.create_connection(echo.address, timeout=0.6, pep=conv.address)
        with s, pytest.raises(TimeoutError) as info:
            s.makefile("rb").read(1)
        assert info.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - started < 1.5


def test_delayed_reply_within_the_timeouts_is_fine(echo):
    with Converter(reply_delay=0.3) as conv:
        round_trip(pepsock.create_connection(echo.address, timeout=5, pep=conv.address))


def test_confirm_makes_connect_wait_for_the_verdict(ns, monkeypatch):
    with Converter(reply_delay=0.2) as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        monkeypatch.setenv("PEP_CONFIRM", "1")
        with pytest.raises(ConnectionRefusedError):
            pepsock.create_connection(("127.0.0.1", dead_port()), timeout=5)
        monkeypatch.setenv("PEP_CONFIRM", "192.0.2.0/24")   # rules: this one is not confirmed
        s = pepsock.create_connection(("127.0.0.1", dead_port()), timeout=5)
        assert not s.reply_received
        s.close()


# -- cookies -------------------------------------------------------------------------------


def test_error_3_retries_with_the_cookie_and_caches_it_for_other_processes(echo, ns, clean_env,
                                                                           monkeypatch):
    cookie = bytes(range(1, 13))
    with Converter(cookie=cookie) as conv:
        monkeypatch.setenv("PEP_PROXY", conv.env_value)
        s = pepsock.create_connection(echo.address, timeout=5)
        with s:
            s.sendall(b"early")
            assert s.recv(5) == b"early"
            # The retry's RST must not leave SO_LINGER {1, 0} behind: close()
            # of the healthy retried connection would reset it too.
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == bytes(8)
        assert [x.cookie for x in conv.seen] == [None, cookie]
        assert conv.seen[1].early_data == b"early"       # replayed in the retry's SYN
        assert state_of(clean_env, conv.address[1])["cookie"] == cookie.hex()
        in_other_process(ns, clean_env, {"PEP_PROXY": conv.env_value}, echo.address[1])
        assert [x.cookie for x in conv.seen] == [None, cookie, cookie]   # no new Error 3


def test_pep_cookie_env_is_sent(echo, monkeypatch):
    cookie = b"\xaa" * 8
    monkeypatch.setenv("PEP_COOKIE", cookie.hex())
    with Converter(cookie=cookie) as conv:
        round_trip(pepsock.create_connection(echo.address, timeout=5, pep=conv.address))
        assert [x.cookie for x in conv.seen] == [cookie]


def test_wrong_cookie_is_not_authorized_and_forgotten(echo, clean_env):
    with Converter(cookie=b"right-cookie") as conv:
        pepstate.update(pepstate.state_dir(os.environ), f"pep-127.0.0.1-{conv.address[1]}",
                        cookie=b"stale".hex())
        s = pepsock.create_connection(echo.address, timeout=5, pep=conv.address)
        with s, pytest.raises(PermissionError):
            s.recv(1)
        assert "cookie" not in state_of(clean_env, conv.address[1])


def test_tfo_cookie_mode_is_learnt(echo, clean_env):
    """Against a PEP whose kernel wants TFO cookies: connection 1 (no cookie) is not
    0-RTT and teaches the client; 2 asks the kernel for a cookie; 3 on are 0-RTT."""
    with Converter(listener_no_cookie=False) as conv:
        for _ in range(4):
            round_trip(pepsock.create_connection(echo.address, timeout=5, pep=conv.address))
        assert [x.syn_data for x in conv.seen] == [False, False, True, True]
        assert state_of(clean_env, conv.address[1])["tfo"] == "cookie"
    with Converter() as open_conv:
        round_trip(pepsock.create_connection(echo.address, timeout=5, pep=open_conv.address))
        assert open_conv.seen[0].syn_data
        assert state_of(clean_env, open_conv.address[1])["tfo"] == "nocookie"


# -- asyncio ---------------------------------------------------------------------------------


async def _aio_round_trip(reader, writer, payload=b"ping"):
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    writer.close()
    return got


def test_asyncio_failover_cookie_and_peername(echo, ns, clean_env, monkeypatch):
    cookie = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    dead = dead_port()

    async def main():
        with Converter(error=(64, b"\x09")) as busy, Converter(cookie=cookie) as conv:
            monkeypatch.setenv("PEP_PROXY", f"127.0.0.1:{dead},{busy.env_value},{conv.env_value}")
            reader, writer = await pepsock.open_connection(*echo.address)
            assert writer.get_extra_info("peername") == echo.address
            writer.write(b"early bytes")                 # before the reply: replayed twice
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(11), 5)
            writer.close()
            return got, [x.cookie for x in conv.seen], len(busy.seen)
    got, cookies, busy_seen = asyncio.run(main())
    assert got == b"early bytes"
    assert cookies == [None, cookie] and busy_seen == 1
    assert state_of(clean_env, dead)["reason"] == "refused"


def test_asyncio_reply_timeout(echo, monkeypatch):
    monkeypatch.setenv("PEP_REPLY_TIMEOUT", "0.4")

    async def main():
        with Converter(reply_delay=float("inf")) as conv:
            reader, writer = await pepsock.open_connection(*echo.address, pep=conv.address)
            started = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                await asyncio.wait_for(reader.read(1), 5)
            writer.close()
            return info.value, time.monotonic() - started
    exc, took = asyncio.run(main())
    assert exc.errno == errno.ETIMEDOUT and took < 2


def test_asyncio_black_holed_pep_fails_over(echo, ns, monkeypatch):
    black_hole(ns, 9)

    async def main():
        with Converter() as conv:
            monkeypatch.setenv("PEP_PROXY", proxy_list(9, conv.address[1]))
            monkeypatch.setenv("PEP_CONNECT_TIMEOUT", "0.3")
            started = time.monotonic()
            # No timeout: the request in the SYN, so the failover happens in the first
            # write's SYN (open_connection returned at once) and the round trip pays it.
            reader, writer = await pepsock.open_connection(*echo.address)
            got = await _aio_round_trip(reader, writer)
            return got, time.monotonic() - started
    got, took = asyncio.run(main())
    assert got == b"ping" and 0.25 < took < 2


# -- the socket object ----------------------------------------------------------------------


def test_dup_and_fromfd(echo):
    with Converter() as conv:
        s = pepsock.create_connection(echo.address, timeout=5, pep=conv.address)
        d = s.dup()
        assert isinstance(d, pepsock.PepSocket) and d.getpeername() == echo.address
        s.sendall(b"via the original")
        assert d.recv(100) == b"via the original"    # the dup strips the same reply
        s.close()
        round_trip(d, b"dup alone")
        plain = socket.create_connection(echo.address, timeout=5)
        f = pepsock.PepSocket.fromfd(plain.fileno(), plain.family, plain.type)
        plain.close()
        assert f.reply_received and f.getpeername() == echo.address
        f.settimeout(5)     # the dup'd fd is non-blocking, as with socket.fromfd
        round_trip(f, b"fromfd")


def test_fallback_is_said_once_per_hold_down(echo, ns, monkeypatch, caplog):
    monkeypatch.setenv("PEP_PROXY", proxy_list(dead_port()))
    for _ in range(3):
        pepsock.create_connection(echo.address, timeout=5).close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pepsock"]
    assert sum("held down for 30 s" in m for m in lines) == 1
    assert sum("connecting directly" in m for m in lines) == 1


def test_asyncio_confirm_and_a_delayed_reply_forwarding_bytes(ns, monkeypatch):
    monkeypatch.setenv("PEP_CONFIRM", "1")

    async def main():
        with Converter(reply_delay=0.3) as conv, EchoServer() as echo:
            monkeypatch.setenv("PEP_PROXY", conv.env_value)
            with pytest.raises(ConnectionRefusedError):
                await pepsock.open_connection("127.0.0.1", dead_port())
            monkeypatch.setenv("PEP_CONFIRM", "0")
            started = time.monotonic()
            reader, writer = await pepsock.open_connection(*echo.address)
            opened = time.monotonic() - started
            got = await _aio_round_trip(reader, writer)
            return opened, got
    opened, got = asyncio.run(main())
    assert opened < 0.25 and got == b"ping"     # 0-RTT: open_connection did not wait


def test_asyncio_retry_does_not_block_the_loop(echo, ns, clean_env, monkeypatch):
    """Error 64 after open_connection returned, then a black-holed PEP, then a good one:
    the loop keeps running while the black hole's connect timeout runs out."""
    black_hole(ns, 9)

    async def main():
        with Converter(error=(64, b"\x05")) as busy, Converter() as good:
            monkeypatch.setenv("PEP_PROXY", f"{busy.env_value},127.0.0.1:9,{good.env_value}")
            monkeypatch.setenv("PEP_CONNECT_TIMEOUT", "0.5")
            reader, writer = await pepsock.open_connection(*echo.address)
            gaps, last = [], time.monotonic()

            async def ticker():
                nonlocal last
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
            tick = asyncio.ensure_future(ticker())
            started = time.monotonic()
            writer.write(b"survives two retries")
            got = await asyncio.wait_for(reader.readexactly(20), 5)
            took = time.monotonic() - started
            tick.cancel()
            writer.close()
            return got, took, max(gaps), len(good.seen)
    got, took, worst_gap, good_seen = asyncio.run(main())
    assert got == b"survives two retries" and good_seen == 1
    assert 0.45 < took < 3
    assert worst_gap < 0.3, f"the loop stalled {worst_gap:.2f} s"
    assert state_of(clean_env, 9)["reason"] == "timeout"
