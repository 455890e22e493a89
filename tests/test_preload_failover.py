"""libpep.so when a PEP fails (issue 10): the bounded wait for the reply,
several PEPs, failover on the program's own fd, fallback.

    ns cli 192.0.2.1 -- 192.0.2.254 ns rt 198.51.100.254 -- ns pep
                               (iptables here)     198.51.100.1, .2 (converters)
                                                   198.51.100.3 (HTTP, echo)

The client can reach the server directly too (for PEP_FALLBACK=direct).
iptables rules and tcp_fastopen=3 are set only inside these namespaces.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from conftest import require_root, require_tool
from pepsock.testbed.netns import Topology
import preload_helpers as ph

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

PEP1, PEP2, SRV = "198.51.100.1", "198.51.100.2", "198.51.100.3"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    require_root()
    topo = Topology(prefix="pf")
    try:
        cli = topo.host("cli", tfo=3)
        rt = topo.host("rt", forwarding=True, tfo=3)
        pep = topo.host("pep", tfo=3)
        topo.link(cli, ["192.0.2.1/24"], rt, ["192.0.2.254/24"])
        topo.link(rt, ["198.51.100.254/24"], pep, [f"{PEP1}/24", f"{PEP2}/24", f"{SRV}/24"])
        topo.route(cli, "198.51.100.0/24", "192.0.2.254")
        topo.route(pep, "192.0.2.0/24", "198.51.100.254")
        root = tmp_path_factory.mktemp("www")
        topo.payload = ph.make_payload(str(root), "1m.bin", 1 << 20)
        with pep.enter():
            topo.http = ph.HTTPServer(str(root), host=SRV)
            topo.echo = ph.EchoServer(host=SRV)
        yield topo
        topo.http.close()
        topo.echo.close()
    finally:
        topo.cleanup()


@pytest.fixture
def rules(net):
    """iptables rules in the router namespace, flushed after the test."""
    rt = net.hosts["rt"]
    require_tool("iptables")

    def add(*rule):
        rt.run("iptables", "-w", "5", "-I", "FORWARD", *rule)

    yield add
    rt.run("iptables", "-w", "5", "-F", "FORWARD", check=False)


def converter(net, host=PEP1, **kw) -> ph.Converter:
    with net.hosts["pep"].enter():
        return ph.Converter(host=host, **kw)


def run(net, argv, env, timeout=60):
    """argv in the client namespace; the preload applies to argv only."""
    ours = {k: env[k] for k in env if k == "LD_PRELOAD" or k.startswith("PEP_")}
    rest = {k: v for k, v in env.items() if k not in ours}
    argv = ["env", *(f"{k}={v}" for k, v in ours.items()), *argv]
    start = time.monotonic()
    p = net.hosts["cli"].run(*argv, check=False, env=rest, timeout=timeout)
    return p, time.monotonic() - start


def pyrun(net, code, env, timeout=60):
    return run(net, [sys.executable, "-c", textwrap.dedent(code)], env, timeout)


def env_for(peps, tmp_path, **extra):
    """PEP_PROXY for a list of (host, port); a state directory of the test's own."""
    env = ph.preload_env(None, ph.build(), **extra)
    env["PEP_PROXY"] = ",".join(f"{h}:{p}" for h, p in peps)
    env["PEP_STATE_DIR"] = str(tmp_path / "state")
    return env


# ---------------------------------------------------------------------------
# A bounded wait for the PEP's reply

def test_silent_pep_blocking_read_times_out(net, tmp_path):
    """The PEP completes the handshake, takes the header and never answers:
    the program's read fails with ETIMEDOUT after PEP_REPLY_TIMEOUT, and one
    line at the default level names the PEP."""
    with converter(net, silent=True, hold=15) as conv:
        p, took = pyrun(net, f"""
            import socket, time
            s = socket.create_connection(("{SRV}", {net.echo.address[1]}))
            s.sendall(b"hello")
            t = time.monotonic()
            try:
                s.recv(10)
                print("data")
            except TimeoutError:
                print("ETIMEDOUT", round(time.monotonic() - t, 2))
            """, env_for([conv.address], tmp_path, PEP_REPLY_TIMEOUT="1"))
        words = p.stdout.split()
        assert words[0] == "ETIMEDOUT", p.stdout + p.stderr
        assert 0.7 < float(words[1]) < 2.5, words
        assert f"PEP {PEP1}:{conv.address[1]} did not answer within 1.0 s" in p.stderr
        assert p.stderr.count("did not answer") == 1
        assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_stalled_reply_wakes_an_epoll_client(net, tmp_path):
    """A reply announcing 1,020 bytes, then nothing: a non-blocking program
    waiting in epoll for EPOLLIN is woken at PEP_REPLY_TIMEOUT and its read
    says ETIMEDOUT (it would wait forever otherwise)."""
    stall = bytes([1, 255, 0x22, 0x63, 0x01, 0x01, 0, 0])
    with converter(net, raw_reply=stall, hold=15) as conv:
        p, took = pyrun(net, f"""
            import errno, select, socket, time
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("{SRV}", {net.echo.address[1]}))
            except BlockingIOError:
                pass
            ep = select.epoll()
            ep.register(s.fileno(), select.EPOLLIN)
            t = time.monotonic()
            while time.monotonic() - t < 8:
                ep.poll(8)  # the first 8 bytes of the reply wake it once: EAGAIN
                try:
                    s.recv(10)
                    print("data")
                    break
                except BlockingIOError:
                    continue
                except OSError as e:
                    print(errno.errorcode[e.errno], round(time.monotonic() - t, 2))
                    break
            """, env_for([conv.address], tmp_path, PEP_REPLY_TIMEOUT="1.5"))
        words = p.stdout.split()
        assert words[0] == "ETIMEDOUT", p.stdout + p.stderr
        assert 1.2 < float(words[1]) < 3.5, words


def test_bad_reply_timeout_value_runs_unproxied(net, tmp_path):
    p, _ = pyrun(net, "print('ok')", env_for([(PEP1, 9)], tmp_path, PEP_REPLY_TIMEOUT="soon"))
    assert p.stdout.strip() == "ok"
    assert 'PEP_REPLY_TIMEOUT="soon" is not a number of seconds' in p.stderr
