"""Faults on the client side (issue 6): the PEP down, black-holed or behind a
middlebox that drops SYNs carrying data, for the Python client and for
programs under libpep.so (curl).  A program gets a clear error within its own
timeout, never a hang; SYN-data loss falls back to a plain SYN and works.

    ns cli 192.0.2.1 -- 192.0.2.254 ns rt 198.51.100.254 -- 198.51.100.1 ns pep
                                 (iptables here)          (converter + HTTP/echo)

iptables rules and tcp_fastopen=3 are set only inside these namespaces.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

import pepsock
from conftest import require_root, require_tool
from pepsock.testbed.netns import Topology
from preload_helpers import (Converter, EchoServer, HTTPServer, build, client_router_pep,
                             forward_rules, make_payload, preload_env)

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

PEP_IP = "198.51.100.1"
#: IPv4 length of a SYN with data: a Linux SYN without data is 60 bytes (72-76
#: with a TFO cookie option); ours carries the 24-byte Convert header, so >= 84.
SYN_DATA_RULE = ["-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN", "-m", "length",
                 "--length", "81:65535"]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    require_root()
    topo = Topology(prefix="rb")
    try:
        _, _, pep = client_router_pep(topo, [PEP_IP])
        root = tmp_path_factory.mktemp("www")
        payload = make_payload(str(root), "1m.bin", 1 << 20)
        with pep.enter():
            conv = Converter(host=PEP_IP)
            http = HTTPServer(str(root), host=PEP_IP)
            echo = EchoServer(host=PEP_IP)
        topo.payload = payload
        topo.conv, topo.http, topo.echo = conv, http, echo
        yield topo
        conv.close()
        http.close()
        echo.close()
    finally:
        topo.cleanup()


@pytest.fixture
def rules(net):
    """iptables rules in the router namespace, flushed after the test."""
    require_tool("iptables")
    yield from forward_rules(net.hosts["rt"])


def _drops(net) -> int:
    out = net.hosts["rt"].run("iptables", "-w", "5", "-nvxL", "FORWARD").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "DROP" in line)


def _curl(net, url, pep, *extra, timeout=30, **env_extra):
    require_tool("curl")
    env = preload_env(pep=pep, no_proxy="", **env_extra)
    start = time.monotonic()
    proc = subprocess.run(net.hosts["cli"].cmd("curl", "-sS", "-o", "/dev/null",
                                                "-w", "%{http_code} %{size_download}", *extra, url),
                          capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.monotonic() - start


def _dead_port(net) -> int:
    with net.hosts["pep"].enter():
        s = socket.socket()
        s.bind((PEP_IP, 0))
        port = s.getsockname()[1]
        s.close()
    return port


# ---------------------------------------------------------------------------
# PEP down: connection refused


def test_python_client_pep_down_refused_fast(net):
    with net.hosts["cli"].enter():
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            pepsock.create_connection(net.echo.address, timeout=5, pep=(PEP_IP, _dead_port(net)))
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("syn_write", ["1", "0"])
def test_curl_under_libpep_pep_down_refused_fast(net, syn_write):
    """PEP_FALLBACK=fail: the refusal is curl's, at once: its connect's
    (couldn't connect, 7), or with the SYN held for curl's request
    (PEP_SYN_WRITE, the default) its read's (56)."""
    build()
    proc, took = _curl(net, net.http.url("/1m.bin"), (PEP_IP, _dead_port(net)),
                       "--connect-timeout", "3", "--max-time", "5", PEP_FALLBACK="fail",
                       PEP_SYN_WRITE=syn_write)
    assert proc.returncode == (7 if syn_write == "0" else 56), (proc.returncode, proc.stderr)
    assert "refused" in proc.stderr.lower() or "connect" in proc.stderr.lower(), proc.stderr
    assert took < 2.0


def test_curl_under_libpep_pep_down_falls_back_direct_fast(net):
    """PEP_FALLBACK=direct (the default): the only PEP refuses, curl gets the
    file straight from the server at once, and one line says so."""
    build()
    proc, took = _curl(net, net.http.url("/1m.bin"), (PEP_IP, _dead_port(net)),
                       "--connect-timeout", "3", "--max-time", "5")
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["200", str(len(net.payload))]
    assert "no PEP usable" in proc.stderr and "connecting directly" in proc.stderr
    assert took < 2.0


# ---------------------------------------------------------------------------
# PEP black-holed: every packet to it dropped by the router


def test_python_client_pep_blackholed_times_out_on_time(net, rules):
    rules("-d", PEP_IP, "-p", "tcp", "--dport", str(net.conv.address[1]), "-j", "DROP")
    with net.hosts["cli"].enter():
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            pepsock.create_connection(net.echo.address, timeout=1.5, pep=net.conv.address)
        took = time.monotonic() - start
    assert 1.4 < took < 2.5, took
    assert _drops(net) >= 1


@pytest.mark.parametrize("syn_write", ["1", "0"])
def test_curl_under_libpep_pep_blackholed_times_out_on_time(net, rules, syn_write):
    """PEP_SYN_WRITE=0: curl's --connect-timeout ends it. With the SYN held
    for curl's request (the default), curl's connect is done before any SYN
    left: libpep's handshake deadline (3 s) moves the connection, request
    and all, to the destination (PEP_FALLBACK=direct), within --max-time."""
    build()
    rules("-d", PEP_IP, "-p", "tcp", "--dport", str(net.conv.address[1]), "-j", "DROP")
    proc, took = _curl(net, net.http.url("/1m.bin"), net.conv.address,
                       "--connect-timeout", "2", "--max-time", "6", PEP_SYN_WRITE=syn_write)
    if syn_write == "0":
        assert proc.returncode == 28, (proc.returncode, proc.stderr)  # operation timed out
        assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr
        assert 1.8 < took < 3.5, took
    else:
        assert proc.returncode == 0, (proc.returncode, proc.stderr)
        assert proc.stdout.split() == ["200", str(len(net.payload))]
        assert "did not answer in time" in proc.stderr, proc.stderr
        assert 2.5 < took < 5.5, took
    assert _drops(net) >= 1


def test_curl_under_libpep_pep_blackholed_after_connect_max_time(net, rules):
    """The PEP answers the handshake, then the path dies: --max-time still holds."""
    build()
    rules("-s", PEP_IP, "-p", "tcp", "--sport", str(net.conv.address[1]),
          "--tcp-flags", "SYN", "NONE", "-j", "DROP")  # everything but the SYN-ACK
    proc, took = _curl(net, net.http.url("/1m.bin"), net.conv.address,
                       "--connect-timeout", "2", "--max-time", "3")
    assert proc.returncode == 28, (proc.returncode, proc.stderr)
    assert took < 4.5, took


@pytest.mark.parametrize("syn_write", ["1", "0"])
def test_pep_host_unreachable_is_immediate(net, rules, syn_write):
    """curl fails at once: couldn't connect (7), or with the SYN held for its
    request (PEP_SYN_WRITE, the default) on its read (56)."""
    build()
    rules("-d", PEP_IP, "-p", "tcp", "-j", "REJECT", "--reject-with", "icmp-host-unreachable")
    with net.hosts["cli"].enter():
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            pepsock.create_connection(net.echo.address, timeout=5, pep=net.conv.address)
        assert time.monotonic() - start < 2.0
    assert "EHOSTUNREACH" in str(info.value) or info.value.errno == 113
    proc, took = _curl(net, net.http.url("/1m.bin"), net.conv.address,
                       "--connect-timeout", "3", "--max-time", "5", PEP_SYN_WRITE=syn_write)
    assert proc.returncode == (7 if syn_write == "0" else 56), (proc.returncode, proc.stderr)
    assert took < 2.5


# ---------------------------------------------------------------------------
# A middlebox that drops SYNs carrying data: 0-RTT falls back


def test_syn_data_rule_spares_plain_syns_and_0rtt_works_without_it(net, rules):
    """Control: without the rule the header rides in the SYN; with it, plain SYNs pass."""
    before = len(net.conv.seen)
    with net.hosts["cli"].enter():
        with pepsock.create_connection(net.echo.address, timeout=5, pep=net.conv.address) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
    assert net.conv.seen[before].syn_data
    rules(*SYN_DATA_RULE, "-d", PEP_IP, "-j", "DROP")
    with net.hosts["cli"].enter():
        start = time.monotonic()
        s = socket.create_connection(net.echo.address, timeout=5)  # plain SYN, no data
        s.close()
    assert time.monotonic() - start < 0.5
    assert _drops(net) == 0


def test_syn_data_dropped_python_client_falls_back(net, rules):
    rules(*SYN_DATA_RULE, "-d", PEP_IP, "-j", "DROP")
    before = len(net.conv.seen)
    payload = os.urandom(200_000)
    with net.hosts["cli"].enter():
        start = time.monotonic()
        with pepsock.create_connection(net.echo.address, timeout=8, pep=net.conv.address) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        took = time.monotonic() - start
    assert bytes(got) == payload
    assert _drops(net) >= 1, "the rule never matched a SYN with data"
    seen = net.conv.seen[before]
    assert seen.connect is not None and not seen.syn_data  # the header came after the handshake
    assert took < 6, took  # one SYN retransmission (~1 s RTO), not a hang


def test_syn_data_dropped_curl_under_libpep_falls_back(net, rules):
    build()
    rules(*SYN_DATA_RULE, "-d", PEP_IP, "-j", "DROP")
    before = len(net.conv.seen)
    proc, took = _curl(net, net.http.url("/1m.bin"), net.conv.address, "--max-time", "15")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"200 {1 << 20}"
    assert _drops(net) >= 1, "the rule never matched a SYN with data"
    assert net.conv.seen[before].connect is not None
    assert not net.conv.seen[before].syn_data
    assert took < 10


def test_syn_data_dropped_through_the_relay_curl_falls_back(net, rules):
    """The same middlebox in front of the real relay: the header arrives after
    the handshake, the relay still serves, curl fetches 1 MiB intact."""
    from relay_helpers import Relay
    build()
    # --no-cookie: the relay would take the SYN's data; only the middlebox stops it.
    relay = Relay("--listen", f"{PEP_IP}:0", "--allow-client", "192.0.2.0/24", "--no-cookie",
                  "--allow-dest", f"{PEP_IP}/32", "--stats", "127.0.0.1:0",
                  prefix=net.hosts["pep"].cmd())
    try:
        rules(*SYN_DATA_RULE, "-d", PEP_IP, "-j", "DROP")
        proc, took = _curl(net, net.http.url("/1m.bin"), relay.addr, "--max-time", "15")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"200 {1 << 20}"
        assert _drops(net) >= 1
        with net.hosts["pep"].enter():
            m = relay.metrics()
        assert m["pep_relay_tunnels_total"] == 1 and m["pep_relay_syn_data_total"] == 0
        assert took < 10
    finally:
        relay.stop()
