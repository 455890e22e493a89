"""Real programs under libpep.so through a real RFC 8803 converter.

Two settings, both in network namespaces (TFO sysctls are set there, never
on the host):
* "lo": one namespace, everything on its loopback (PEP_NO_PROXY="" so that
  loopback is not bypassed);
* "chain": client, PEP and server namespaces, IPv4 and IPv6 documentation
  addresses; the client has no route to the server, so only the PEP can
  reach it.
The converter is tests/preload_helpers.Converter (test-only, not `pep
relay`); it records whether each header came in the SYN (TCP_INFO).
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import require_root, require_tool
from pepsock.testbed.netns import Topology
import preload_helpers as ph
from converter import converter_in

TIMEOUT = 30

run, pyrun = ph.run, ph.pyrun


# ------------------------------------------------------------------ loopback

@pytest.mark.parametrize("fam", [4, 6])
def test_curl_fetches_1mib_with_header_in_syn(lo, lib, tmp_path, fam):
    curl = require_tool("curl")
    pep_host = "127.0.0.1" if fam == 4 else "::1"
    out = tmp_path / "out.bin"
    with converter_in(lo, host=pep_host) as conv:
        http = lo.http[fam]
        p = run(lo, [curl, "-sS", "--max-time", "20", "-o", str(out), "-w", "%{remote_port}",
                     http.url("/1m.bin")], ph.preload_env(conv.address, lib))
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == lo.payload
        assert p.stdout.strip() == str(http.address[1])  # the real destination's port
        assert len(conv.seen) == 1
        seen = conv.seen[0]
        assert seen.connect.port == http.address[1]
        assert str(seen.connect.address) == http.address[0]
        assert seen.syn_data, "the Convert header did not ride in the SYN"


@pytest.mark.parametrize("fam", [4, 6])
def test_wget_blocking_fetch(lo, lib, tmp_path, fam):
    wget = require_tool("wget")
    pep_host = "127.0.0.1" if fam == 4 else "::1"
    out = tmp_path / "w.bin"
    with converter_in(lo, host=pep_host) as conv:
        p = run(lo, [wget, "-q", "--tries=1", "--timeout=20", "--no-proxy", "-O", str(out),
                     lo.http[fam].url("/1m.bin")], ph.preload_env(conv.address, lib))
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == lo.payload
        assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_python_urllib(lo, lib):
    with converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import hashlib, urllib.request
            data = urllib.request.urlopen("{lo.http[4].url('/1m.bin')}", timeout=20).read()
            print(hashlib.sha256(data).hexdigest())
            """, ph.preload_env(conv.address, lib))
        assert p.returncode == 0, p.stderr
        import hashlib
        assert p.stdout.strip() == hashlib.sha256(lo.payload).hexdigest()
        assert len(conv.seen) == 1 and conv.seen[0].syn_data


@pytest.mark.parametrize("close", ["fin", "rst-now", "rst-later"])
def test_error_96_makes_curl_and_wget_say_connection_refused(lo, lib, close):
    """Whatever the PEP does after its Error TLV (FIN, RST at once, RST a bit
    later), curl and wget report "Connection refused"."""
    curl, wget = require_tool("curl"), require_tool("wget")
    kw = {"fin": {"reset_after_error": False}, "rst-now": {"reset_delay": 0},
          "rst-later": {"reset_delay": 0.05}}[close]
    with converter_in(lo, error=(96, b""), **kw) as conv:
        for _ in range(3):
            p = run(lo, [curl, "-sS", "--max-time", "10", lo.http[4].url("/1m.bin")],
                    ph.preload_env(conv.address, lib))
            assert p.returncode != 0
            assert "Connection refused" in p.stderr, p.stderr
        p = run(lo, [wget, "--tries=1", "--timeout=10", "-O", "/dev/null",
                     lo.http[4].url("/1m.bin")], ph.preload_env(conv.address, lib))
        assert p.returncode != 0
        assert "Connection refused" in p.stderr, p.stderr
        assert len(conv.seen) == 4


def test_getpeername_after_the_pep_refused_and_reset(lo, lib):
    """The PEP's Error TLV and its reset arrive between the program's connect
    and its getpeername (curl's order): getpeername still names the
    destination and the next read says why (it said ENOTCONN before, and
    curl "getpeername() failed")."""
    url = lo.http[4].url("/")
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    with converter_in(lo, error=(96, b""), reset_delay=0) as conv:
        p = pyrun(lo, f"""
            import select, socket, time
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("{host}", {port}))
            select.select([], [s], [], 5)
            time.sleep(0.3)                 # the Error TLV and the reset are in
            print(s.getpeername())
            s.setblocking(True)
            try:
                s.recv(10)
            except OSError as e:
                print(type(e).__name__)
            """, ph.preload_env(conv.address, lib))
        assert p.returncode == 0, p.stderr
        assert p.stdout.split("\n")[:2] == [f"('{host}', {port})", "ConnectionRefusedError"], \
            (p.stdout, p.stderr)
        assert len(conv.seen) == 1


@pytest.mark.parametrize("code,value,name", [
    (96, b"", "ConnectionRefusedError"),
    (32, b"", "PermissionError"),
    (97, b"\x01", "EHOSTUNREACH"),
    (97, b"\x00", "ENETUNREACH"),
    (1, b"", "EPROTO"),
    # Error 65 is about the PEP: the next one, or PEP_FALLBACK (here fail:
    # ECONNREFUSED, the shared rule; test_preload_failover.py has the rest)
    (65, b"", "ConnectionRefusedError"),
])
def test_error_codes_become_errno_and_reset(lo, lib, code, value, name):
    extra = {"PEP_FALLBACK": "fail"} if code in (64, 65) else {}
    with converter_in(lo, error=(code, value)) as conv:
        p = pyrun(lo, f"""
            import errno, socket
            s = socket.create_connection(("127.0.0.1", {lo.http[4].address[1]}), timeout=10)
            for attempt in (1, 2):
                try:
                    s.recv(100)
                    print("no error")
                except OSError as e:
                    print(type(e).__name__, errno.errorcode[e.errno])
            try:
                s.send(b"x")
                print("send ok")
            except OSError as e:
                print("send", errno.errorcode[e.errno])
            """, ph.preload_env(conv.address, lib, **extra))
        assert p.returncode == 0, p.stderr
        lines = p.stdout.split("\n")
        assert name in lines[0] and lines[0] == lines[1], p.stdout  # sticky
        assert lines[2].startswith("send E"), p.stdout
        assert len(conv.seen) == 1


def test_malformed_reply_is_eproto(lo, lib):
    with converter_in(lo, raw_reply=b"\x02\x01\x22\x63hello") as conv:
        p = pyrun(lo, f"""
            import errno, socket
            s = socket.create_connection(("127.0.0.1", {lo.http[4].address[1]}), timeout=10)
            try:
                print(s.recv(100))
            except OSError as e:
                print(errno.errorcode[e.errno])
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.strip() == "EPROTO", p.stdout + p.stderr
        assert len(conv.seen) == 1


@pytest.mark.parametrize("split", [1, 3])
def test_split_reply_with_extra_tlvs(lo, lib, tmp_path, split):
    curl = require_tool("curl")
    from pepsock import protocol
    tlvs = (protocol.SupportedTCPExtensions((2, 3, 4)), protocol.Cookie(b"abcdefgh"))
    out = tmp_path / "s.bin"
    with converter_in(lo, split=split, split_delay=0.01, reply_tlvs=tlvs) as conv:
        p = run(lo, [curl, "-sS", "--max-time", "20", "-o", str(out), lo.http[4].url("/1m.bin")],
                ph.preload_env(conv.address, lib))
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == lo.payload
        assert len(conv.seen) == 1


def test_nonblocking_read_finding_only_the_header_is_eagain(lo, lib):
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import select, socket, time
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", {echo.address[1]}))
            except BlockingIOError:
                pass
            select.select([], [s], [], 5)
            # The PEP's reply alone must not make the socket readable...
            r, _, _ = select.select([s], [], [], 0.3)
            print("readable" if r else "quiet")
            # ...and a read then finds nothing.
            try:
                print("got", s.recv(100))
            except BlockingIOError:
                print("EAGAIN")
            s.setblocking(True)
            s.settimeout(5)
            s.sendall(b"ping")
            print(s.recv(100))
            print(s.getpeername()[1] == {echo.address[1]})
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.split("\n")[:4] == ["quiet", "EAGAIN", "b'ping'", "True"], \
            p.stdout + p.stderr


def _echo(ns, **kw):
    with ns.enter():
        return ph.EchoServer(**kw)


def test_sendto_msg_fastopen_carries_app_bytes_in_the_syn(lo, lib):
    """The program's own TFO (curl --tcp-fastopen on old kernels, or sendto with
    MSG_FASTOPEN): header and its bytes in one SYN."""
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import socket
            s = socket.socket()
            s.settimeout(5)
            n = s.sendto(b"hello in the syn", socket.MSG_FASTOPEN, ("127.0.0.1", {echo.address[1]}))
            print(n)
            print(s.recv(100))
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.split("\n")[:2] == ["16", "b'hello in the syn'"], p.stdout + p.stderr
        assert conv.seen[0].syn_data
        assert conv.seen[0].early_data == b"hello in the syn"


def test_curl_tcp_fastopen_option(lo, lib, tmp_path):
    curl = require_tool("curl")
    out = tmp_path / "t.bin"
    with converter_in(lo) as conv:
        p = run(lo, [curl, "-sS", "--tcp-fastopen", "--max-time", "20", "-o", str(out),
                     lo.http[4].url("/1m.bin")], ph.preload_env(conv.address, lib))
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == lo.payload
        assert conv.seen and conv.seen[0].syn_data


def test_iperf3_through_the_pep(lo, lib):
    iperf3 = require_tool("iperf3")
    port = 5201 + os.getpid() % 1000
    server = lo.popen(iperf3, "-s", "-1", "-p", str(port), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    try:
        with converter_in(lo) as conv:
            import time
            time.sleep(0.3)
            p = run(lo, [iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J"],
                    ph.preload_env(conv.address, lib))
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr
            result = json.loads(p.stdout)
            assert result["end"]["sum_received"]["bytes"] > 1_000_000
            assert len(conv.seen) >= 2  # control and data connections
            assert all(s.connect.port == port and s.syn_data for s in conv.seen)
    finally:
        server.kill()
        server.wait(5)


def test_wrk_epoll_many_connections(lo, lib):
    wrk = require_tool("wrk")
    with converter_in(lo) as conv:
        p = run(lo, [wrk, "-t", "2", "-c", "24", "-d", "2s", "--timeout", "5s",
                     lo.http[4].url("/")], ph.preload_env(conv.address, lib), timeout=40)
        assert p.returncode == 0, p.stderr
        m = re.search(r"(\d+) requests in", p.stdout)
        assert m and int(m.group(1)) > 50, p.stdout
        assert "Socket errors" not in p.stdout, p.stdout
        assert len(conv.seen) >= 24
        assert all(s.syn_data for s in conv.seen)


def test_loopback_is_bypassed_by_default(lo, lib, tmp_path):
    curl = require_tool("curl")
    with converter_in(lo) as conv:
        env = ph.preload_env(conv.address, lib, no_proxy=None)
        p = run(lo, [curl, "-sS", "--max-time", "10", "-o", str(tmp_path / "x"),
                     lo.http[4].url("/1m.bin")], env)
        assert p.returncode == 0, p.stderr
        assert conv.seen == []


def test_no_proxy_entry_and_disable(lo, lib, tmp_path):
    curl = require_tool("curl")
    with converter_in(lo) as conv:
        port = lo.http[4].address[1]
        for env in (ph.preload_env(conv.address, lib, no_proxy=f"10.0.0.0/8, 127.0.0.1:{port}"),
                    ph.preload_env(conv.address, lib, PEP_DISABLE="1")):
            p = run(lo, [curl, "-sS", "--max-time", "10", "-o", str(tmp_path / "x"),
                         lo.http[4].url("/1m.bin")], env)
            assert p.returncode == 0, p.stderr
        assert conv.seen == []
        env = ph.preload_env(conv.address, lib, no_proxy=f"127.0.0.1:{port + 1}")
        p = run(lo, [curl, "-sS", "--max-time", "10", "-o", str(tmp_path / "x"),
                     lo.http[4].url("/1m.bin")], env)
        assert p.returncode == 0 and len(conv.seen) == 1


def test_bad_config_one_line_and_runs_unproxied(lo, lib, tmp_path):
    curl = require_tool("curl")
    with converter_in(lo) as conv:
        for bad in ({"PEP_PROXY": "127.0.0.1"}, {"PEP_NO_PROXY": "10.0.0.0/99"},
                    {"PEP_LOG": "loud"}, {"PEP_DISABLE": "yes"},
                    {"PEP_PROXY": "[::1]", "PEP_LOG": f"off:{tmp_path / 'never.log'}"}):
            env = ph.preload_env(conv.address, lib)
            env.update(bad)
            p = run(lo, [curl, "-sS", "--max-time", "10", "-o", str(tmp_path / "x"),
                         lo.http[4].url("/1m.bin")], env)
            assert p.returncode == 0, p.stderr
            lines = [line for line in p.stderr.splitlines() if line]
            assert len(lines) == 1 and "running unproxied" in lines[0], p.stderr
            assert list(bad)[0] in lines[0]
        assert conv.seen == []
        assert not (tmp_path / "never.log").exists()


@pytest.mark.parametrize("fallback", ["direct", "fail"])
def test_ipv6_socket_reaches_ipv4_pep_v4_mapped_unless_v6only(lo, lib, fallback):
    """An IPV6_V6ONLY socket cannot reach an IPv4-only PEP: no PEP usable for
    it, so PEP_FALLBACK decides (direct: connected, said once; fail:
    ECONNREFUSED)."""
    with _echo(lo, host="::1") as echo, converter_in(lo, host="127.0.0.1") as conv:
        p = pyrun(lo, f"""
            import errno, socket
            s = socket.socket(socket.AF_INET6)
            s.settimeout(5)
            s.connect(("::1", {echo.address[1]}))
            s.sendall(b"six")
            print(s.recv(10), s.getpeername()[:2])
            t = socket.socket(socket.AF_INET6)
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                t.connect(("::1", {echo.address[1]}))
                print("connected")
            except OSError as e:
                print(errno.errorcode[e.errno])
            """, ph.preload_env(conv.address, lib, PEP_FALLBACK=fallback))
        lines = p.stdout.split("\n")
        assert lines[0] == f"b'six' ('::1', {echo.address[1]})", p.stdout + p.stderr
        assert lines[1] == ("connected" if fallback == "direct" else "ECONNREFUSED"), p.stdout
        assert "IPV6_V6ONLY socket, but the PEP is IPv4 only" in p.stderr
        assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_program_that_forks(lo, lib):
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import os, socket
            s = socket.create_connection(("127.0.0.1", {echo.address[1]}), timeout=5)
            pid = os.fork()
            if pid == 0:
                s.sendall(b"from the child")
                print(s.recv(100), flush=True)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            # a fresh connection from the parent after the fork
            t = socket.create_connection(("127.0.0.1", {echo.address[1]}), timeout=5)
            t.sendall(b"parent")
            print(t.recv(100), status)
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.split("\n")[:2] == ["b'from the child'", "b'parent' 0"], \
            p.stdout + p.stderr
        assert len(conv.seen) == 2


THREADS_C = r"""
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static int port;
static void *worker(void *arg) {
    long id = (long)arg;
    for (int round = 0; round < 5; round++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {0};
        sa.sin_family = AF_INET; sa.sin_port = htons(port);
        inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return (void *)1; }
        char msg[32], buf[32];
        int n = snprintf(msg, sizeof msg, "t%ld r%d", id, round);
        if (write(fd, msg, n) != n) return (void *)1;
        int got = 0;
        while (got < n) { int r = read(fd, buf + got, sizeof buf - got); if (r <= 0) { perror("read"); return (void *)1; } got += r; }
        if (memcmp(buf, msg, n)) { fprintf(stderr, "mismatch\n"); return (void *)1; }
        close(fd);
    }
    return NULL;
}
int main(int argc, char **argv) {
    port = atoi(argv[1]);
    pthread_t t[8];
    for (long i = 0; i < 8; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    int bad = 0;
    for (int i = 0; i < 8; i++) { void *r; pthread_join(t[i], &r); bad |= r != NULL; }
    puts(bad ? "FAIL" : "OK");
    return bad;
}
"""


def test_program_with_threads(lo, lib, tmp_path):
    exe = ph.compile_c(THREADS_C, str(tmp_path / "threads"))
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = run(lo, [exe, str(echo.address[1])], ph.preload_env(conv.address, lib))
        assert p.returncode == 0 and p.stdout.strip() == "OK", p.stdout + p.stderr
        assert len(conv.seen) == 40


def test_dup2_and_close_range_keep_state(lo, lib):
    with _echo(lo, greeting=b"hello") as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import ctypes, os, socket
            libc = ctypes.CDLL(None, use_errno=True)
            s = socket.create_connection(("127.0.0.1", {echo.address[1]}), timeout=5)
            fd = s.detach()
            assert libc.dup2(fd, 100) == 100
            os.close(fd)
            d = socket.socket(fileno=100)
            d.settimeout(5)
            print(d.recv(5), d.getpeername()[1] == {echo.address[1]})
            d.detach()
            # close_range drops the state: a new direct socket on fd 100 is plain
            assert libc.close_range(90, 110, 0) == 0
            plain = socket.socket()
            assert libc.dup2(plain.fileno(), 100) == 100
            q = socket.socket(fileno=100)
            print(q.getsockname())
            """, ph.preload_env(conv.address, lib, PEP_LOG="error"))
        assert p.stdout.split("\n")[0] == "b'hello' True", p.stdout + p.stderr
        assert p.returncode == 0, p.stderr


def test_header_after_handshake_when_client_tfo_is_off(lib, tmp_path):
    """net.ipv4.tcp_fastopen=0 on the client: the SYN goes without data, the
    header follows the handshake unnoticed by curl (non-blocking) and wget
    (blocking), and PEP_LOG warns once."""
    require_root()
    curl, wget = require_tool("curl"), require_tool("wget")
    root = tmp_path / "www"
    root.mkdir()
    payload = ph.make_payload(str(root), size=200_000)
    with Topology(prefix="pl") as topo:
        ns = topo.host("notfo", tfo=0)
        with ns.enter():
            http = ph.HTTPServer(str(root))
            conv = ph.Converter()
        try:
            env = ph.preload_env(conv.address, lib, log="warn")
            p = run(ns, [curl, "-sS", "--max-time", "10", "-o", str(tmp_path / "c"),
                         http.url("/1m.bin")], env)
            assert p.returncode == 0, p.stderr
            assert (tmp_path / "c").read_bytes() == payload
            assert p.stderr.count("0-RTT lost") == 1, p.stderr
            p = run(ns, [wget, "-q", "--tries=1", "--timeout=10", "-O", str(tmp_path / "w"),
                         http.url("/1m.bin")], env)
            assert p.returncode == 0, p.stderr
            assert (tmp_path / "w").read_bytes() == payload
            assert len(conv.seen) == 2 and not any(s.syn_data for s in conv.seen)
        finally:
            conv.close()
            http.close()


# ------------------------------------------------------------------ three hosts

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    require_root()
    topo = Topology(prefix="pl")
    try:
        client = topo.host("c", tfo=3)
        pep = topo.host("p", tfo=3)
        server = topo.host("s", tfo=3)
        topo.link(client, ["192.0.2.1/24", "2001:db8:1::1/64"],
                  pep, ["192.0.2.2/24", "2001:db8:1::2/64"])
        topo.link(pep, ["198.51.100.2/24", "2001:db8:2::2/64"],
                  server, ["198.51.100.3/24", "2001:db8:2::3/64"])
        root = tmp_path_factory.mktemp("www3")
        payload = ph.make_payload(str(root))
        with server.enter():
            http = {4: ph.HTTPServer(str(root), "198.51.100.3"),
                    6: ph.HTTPServer(str(root), "2001:db8:2::3")}
        with pep.enter():
            conv = {4: ph.Converter(host="192.0.2.2"), 6: ph.Converter(host="2001:db8:1::2")}
        yield client, conv, http, payload
        for x in list(http.values()) + list(conv.values()):
            x.close()
    finally:
        topo.cleanup()


@pytest.mark.parametrize("fam", [4, 6])
def test_chain_curl_and_wget(chain, lib, tmp_path, fam):
    curl, wget = require_tool("curl"), require_tool("wget")
    client, conv, http, payload = chain
    before = len(conv[fam].seen)
    env = ph.preload_env(conv[fam].address, lib, no_proxy=None)  # defaults: nothing to bypass
    # Without the PEP the server is unreachable from the client.
    p = run(client, [curl, "-sS", "--max-time", "3", "-o", "/dev/null", http[fam].url("/1m.bin")],
            {k: v for k, v in env.items() if k != "LD_PRELOAD"})
    assert p.returncode != 0
    p = run(client, [curl, "-sS", "--max-time", "20", "-o", str(tmp_path / "c"), "-w",
                     "%{remote_ip} %{remote_port}", http[fam].url("/1m.bin")], env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [http[fam].address[0], str(http[fam].address[1])]
    assert (tmp_path / "c").read_bytes() == payload
    p = run(client, [wget, "-q", "--tries=1", "--timeout=20", "-O", str(tmp_path / "w"),
                     http[fam].url("/1m.bin")], env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "w").read_bytes() == payload
    new = conv[fam].seen[before:]
    assert len(new) == 2 and all(s.syn_data for s in new)
    assert all(str(s.connect.address) == http[fam].address[0] for s in new)


def test_chain_ipv6_pep_and_ipv4_destination(chain, lib):
    """An AF_INET6 socket reaches an IPv4 destination (v4-mapped) through an
    IPv6 PEP. An AF_INET socket cannot reach an IPv6-only PEP (libpep never
    swaps the program's socket): ENETUNREACH and one log line."""
    client, conv, http, payload = chain
    before = len(conv[6].seen)
    port = http[4].address[1]
    p = pyrun(client, f"""
        import errno, socket
        s = socket.socket(socket.AF_INET6)
        s.settimeout(10)
        s.connect(("::ffff:198.51.100.3", {port}))
        s.sendall(b"GET /1m.bin HTTP/1.0\\r\\n\\r\\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        print(data.split(b"\\r\\n", 1)[0].decode(), len(data) > (1 << 20), s.getpeername()[:2])
        t = socket.socket(socket.AF_INET)
        try:
            t.connect(("198.51.100.3", {port}))
        except OSError as e:
            print(errno.errorcode[e.errno])
        """, ph.preload_env(conv[6].address, lib, no_proxy=None))
    lines = p.stdout.split("\n")
    assert lines[0] == f"HTTP/1.1 200 OK True ('::ffff:198.51.100.3', {port})", p.stdout + p.stderr
    assert lines[1] == "ENETUNREACH", p.stdout + p.stderr
    assert "no IPv4 address" in p.stderr
    assert len(conv[6].seen) == before + 1 and conv[6].seen[before].syn_data


# ------------------------------------------------------------------ sanitizers

def test_asan_ubsan_build_under_real_programs(lo, tmp_path):
    """libpep-asan.so (ASan + UBSan) under Python's urllib (split reply), a
    Python client meeting Error 96, and the threaded C client: no sanitizer
    report, same results. (curl and wget hang in setlocale() with the ASan
    runtime preloaded, with or without libpep, so they are not used here.)"""
    lib = ph.build("libpep-asan.so")
    env_extra = {"ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0:halt_on_error=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    preload = f"{ph.asan_runtime()} {lib}"
    exe = ph.compile_c(THREADS_C, str(tmp_path / "threads"))
    reports = []
    with converter_in(lo, split=2, split_delay=0.01) as conv:
        env = ph.preload_env(conv.address, preload, **env_extra)
        p = pyrun(lo, f"""
            import hashlib, urllib.request
            data = urllib.request.urlopen("{lo.http[4].url('/1m.bin')}", timeout=20).read()
            print(hashlib.sha256(data).hexdigest())
            """, env)
        reports.append(p.stderr)
        import hashlib
        assert p.stdout.strip() == hashlib.sha256(lo.payload).hexdigest(), p.stderr[-3000:]
        assert len(conv.seen) == 1
    with converter_in(lo, error=(96, b"")) as conv:
        env = ph.preload_env(conv.address, preload, **env_extra)
        p = pyrun(lo, f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {lo.http[4].address[1]}), timeout=10)
            try:
                s.recv(10)
            except ConnectionRefusedError:
                print("refused")
            """, env)
        reports.append(p.stderr)
        assert p.stdout.strip() == "refused", p.stderr[-3000:]
    with _echo(lo) as echo, converter_in(lo) as conv:
        env = ph.preload_env(conv.address, preload, **env_extra)
        p = run(lo, [exe, str(echo.address[1])], env)
        reports.append(p.stderr)
        assert p.stdout.strip() == "OK", p.stderr[-3000:]
        assert len(conv.seen) == 40
    for text in reports:
        assert "AddressSanitizer" not in text and "runtime error" not in text, text


# ------------------------------------------------------------------ the real relay

def run_relay(lo, *options):
    """`pep relay` on loopback in the lo namespace, allowed 127.0.0.0/8, with
    extra options; yields its (host, port) and kills it after."""
    proc = lo.popen(sys.executable, "-m", "pepsock.relay", "--listen", "127.0.0.1:0",
                    "--allow-dest", "127.0.0.0/8", *options, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True, cwd=ph.REPO)
    try:
        import select
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            pytest.skip(f"pep relay did not start: {line!r}")
        host, _, port = line.split()[-1].rpartition(":")
        yield (host, int(port))
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def relay(lo):
    """`pep relay` (pepsock/relay, written independently of libpep) in the lo namespace."""
    yield from run_relay(lo)


def test_through_pep_relay(lo, lib, relay, tmp_path):
    curl, wget = require_tool("curl"), require_tool("wget")
    env = ph.preload_env(relay, lib)
    p = run(lo, [curl, "-sS", "--max-time", "20", "-o", str(tmp_path / "c"), "-w",
                 "%{remote_port}", lo.http[4].url("/1m.bin")], env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "c").read_bytes() == lo.payload
    assert p.stdout.strip() == str(lo.http[4].address[1])
    p = run(lo, [wget, "-q", "--tries=1", "--timeout=20", "-O", str(tmp_path / "w"),
                 lo.http[4].url("/1m.bin")], env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "w").read_bytes() == lo.payload
    # a closed port behind the relay: Error 96, curl says so
    with _echo(lo) as gone:
        port = gone.address[1]
    p = run(lo, [curl, "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"], env)
    assert p.returncode != 0 and "Connection refused" in p.stderr, p.stderr


# ------------------------------------------------------------------ reaching the PEP

@pytest.mark.parametrize("fallback", ["direct", "fail"])
def test_pep_not_listening(lo, lib, fallback):
    """The only PEP refuses: PEP_FALLBACK=direct connects straight to the
    destination (said once), fail refuses (ECONNREFUSED), for blocking and
    non-blocking connects."""
    with _echo(lo) as gone:
        dead = gone.address
    p = pyrun(lo, f"""
        import errno, socket
        for blocking in (True, False):
            s = socket.socket()
            s.setblocking(blocking)
            try:
                s.connect(("127.0.0.1", {lo.http[4].address[1]}))
                print("0")
            except BlockingIOError:
                import select
                select.select([], [s], [], 5)
                print(errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"))
            except OSError as e:
                print(errno.errorcode[e.errno])
        """, ph.preload_env(dead, lib, PEP_FALLBACK=fallback))
    want = "0" if fallback == "direct" else "ECONNREFUSED"
    assert p.stdout.split() == [want, want], p.stdout + p.stderr
    assert p.stderr.count("no PEP usable") == 1, p.stderr


def test_blocking_connect_honours_so_sndtimeo(chain, lib):
    """A PEP that never answers (no such host on the client's link): a
    blocking connect with SO_SNDTIMEO 0.3 s returns EINPROGRESS after about
    0.3 s, as the kernel's own connect() does."""
    client = chain[0]
    p = pyrun(client, """
        import errno, socket, struct, time
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 300000))
        t = time.monotonic()
        try:
            s.connect(("198.51.100.3", 80))
            print("connected")
        except OSError as e:
            print(errno.errorcode[e.errno], round(time.monotonic() - t, 1))
        """, ph.preload_env(("192.0.2.99", 3128), lib, no_proxy=None))
    words = p.stdout.split()
    assert words and words[0] == "EINPROGRESS", p.stdout + p.stderr
    assert 0.2 <= float(words[1]) <= 1.5


READPATHS_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
extern ssize_t __read_chk(int, void *, size_t, size_t);
extern ssize_t __recv_chk(int, void *, size_t, size_t, int);
extern ssize_t __recvfrom_chk(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);
/* Connect through the PEP to a server that greets with "hello", read the
 * greeting with one read path, print what came. */
int main(int argc, char **argv) {
    const char *how = argv[2];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[1]));
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
    if (!strcmp(how, "dupfd")) {           /* read through an F_DUPFD copy */
        int d = fcntl(fd, F_DUPFD_CLOEXEC, 300);
        close(fd);
        fd = d;
        how = "read";
    }
    char buf[64] = {0};
    ssize_t n = -1;
    struct iovec iov[2] = {{buf, 2}, {buf + 2, 30}};
    struct msghdr mh = {0};
    mh.msg_iov = iov;
    mh.msg_iovlen = 2;
    struct mmsghdr mm = {0};
    mm.msg_hdr = mh;
    while (n < 5) {                         /* until the whole greeting is in */
        ssize_t r;
        char *at = buf + (n < 0 ? 0 : n);
        size_t room = 32 - (n < 0 ? 0 : n);
        if (!strcmp(how, "read")) r = read(fd, at, room);
        else if (!strcmp(how, "read_chk")) r = __read_chk(fd, at, room, room);
        else if (!strcmp(how, "recv")) r = recv(fd, at, room, 0);
        else if (!strcmp(how, "recv_chk")) r = __recv_chk(fd, at, room, room, 0);
        else if (!strcmp(how, "recvfrom")) r = recvfrom(fd, at, room, 0, NULL, NULL);
        else if (!strcmp(how, "recvfrom_chk")) r = __recvfrom_chk(fd, at, room, room, 0, NULL, NULL);
        else if (!strcmp(how, "readv")) { iov[0].iov_base = at; iov[1].iov_base = at + 2; iov[1].iov_len = room - 2; r = readv(fd, iov, 2); }
        else if (!strcmp(how, "recvmsg")) { iov[0].iov_base = at; iov[1].iov_base = at + 2; iov[1].iov_len = room - 2; r = recvmsg(fd, &mh, 0); }
        else if (!strcmp(how, "recvmmsg")) { iov[0].iov_base = at; iov[1].iov_base = at + 2; iov[1].iov_len = room - 2; mm.msg_hdr = mh; r = recvmmsg(fd, &mm, 1, 0, NULL) == 1 ? (ssize_t)mm.msg_len : -1; }
        else if (!strcmp(how, "peek")) { r = recv(fd, at, room, MSG_PEEK); if (r >= 5) { n = r; break; } }
        else return 2;
        if (r <= 0) { perror("read path"); return 1; }
        n = (n < 0 ? 0 : n) + r;
    }
    printf("%.*s\n", (int)n, buf);
    return 0;
}
"""


def test_every_read_path_strips_the_reply(lo, lib, tmp_path):
    exe = ph.compile_c(READPATHS_C, str(tmp_path / "readpaths"))
    paths = ["read", "read_chk", "recv", "recv_chk", "recvfrom", "recvfrom_chk", "readv",
             "recvmsg", "recvmmsg", "peek", "dupfd"]
    with _echo(lo, greeting=b"hello") as echo, converter_in(lo, split=2, split_delay=0.005,
                                                         reply_tlvs=_tlvs()) as conv:
        for how in paths:
            p = run(lo, [exe, str(echo.address[1]), how], ph.preload_env(conv.address, lib))
            assert (p.returncode, p.stdout.strip()) == (0, "hello"), (how, p.stdout, p.stderr)
        assert len(conv.seen) == len(paths)


def _tlvs():
    from pepsock import protocol
    return (protocol.Cookie(b"12345678"),)


def test_error_on_a_write_first(lo, lib):
    """The SYN leaves at connect (PEP_SYN_WRITE=0: the socket has a timeout,
    so it is non-blocking, and its write would otherwise carry the SYN; see
    tests/test_preload_syn_write.py for that case)."""
    with converter_in(lo, error=(32, b"")) as conv:
        p = pyrun(lo, f"""
            import errno, socket, time
            s = socket.create_connection(("127.0.0.1", {lo.http[4].address[1]}), timeout=10)
            time.sleep(0.3)   # the Error TLV is in before the program writes
            try:
                s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                print("sent")
            except OSError as e:
                print(type(e).__name__, errno.errorcode[e.errno])
            """, ph.preload_env(conv.address, lib, PEP_SYN_WRITE=0))
        assert p.stdout.strip() == "PermissionError EACCES", p.stdout + p.stderr


@pytest.mark.parametrize("build", ["libpep.so", "libpep-asan.so"])
@pytest.mark.parametrize("raw,expect", [
    (b"\x01\xff\x22\x63" + b"\x00" * 10, "ECONNRESET"),        # truncated, then EOF
    (b"\x01\x03\x22\x63\x1e\x05\x60\x00" + b"\x00" * 4, "EPROTO"),  # TLV runs past the end
    (b"\x09\x01\x22\x63", "EPROTO"),                          # version 9
    (b"\x01\x01\x22\x64", "EPROTO"),                          # bad magic
    (b"\x01\x00\x22\x63", "EPROTO"),                          # Total Length 0
    (b"\x01\x02\x22\x63\x1e\x01\xc8\x00", "EPROTO"),          # unknown error code 200
    (b"\x01\x02\x22\x63\x1e\x01\x61\x00", "ENETUNREACH"),     # 97, ICMP net unreachable
    (b"\x01\x03\x22\x63\x42\x02\xde\xad\xbe\xef\x00\x00", "EOF"),  # unknown TLV: accepted
    (b"", "ECONNRESET"),                                      # closed without a reply
])
def test_hostile_replies(lo, raw, expect, build):
    lib = ph.build(build)
    preload = f"{ph.asan_runtime()} {lib}" if "asan" in build else lib
    with converter_in(lo, raw_reply=raw) as conv:
        p = pyrun(lo, f"""
            import errno, socket
            s = socket.create_connection(("127.0.0.1", {lo.http[4].address[1]}), timeout=10)
            try:
                data = s.recv(100)
                print("EOF" if data == b"" else data)
            except OSError as e:
                print(errno.errorcode[e.errno])
            """, ph.preload_env(conv.address, preload,
                                ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0"))
        assert p.stdout.strip() == expect, p.stdout + p.stderr[-2000:]
        assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr


REUSE_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
/* A proxied socket closed behind libpep's back (raw syscall), its fd number
 * reused by a pipe: reads on the pipe must be the pipe's bytes. */
int main(int argc, char **argv) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[1]));
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
    syscall(SYS_close, fd);
    int p[2];
    if (pipe(p)) return 1;
    if (p[0] != fd && dup2(p[0], fd) < 0) return 1;
    if (write(p[1], "pipe!", 5) != 5) return 1;
    char buf[16] = {0};
    ssize_t n = read(fd, buf, sizeof buf);
    printf("%zd %.*s\n", n, (int)(n > 0 ? n : 0), buf);
    return 0;
}
"""


def test_fd_closed_behind_our_back_and_reused(lo, lib, tmp_path):
    exe = ph.compile_c(REUSE_C, str(tmp_path / "reuse"))
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = run(lo, [exe, str(echo.address[1])], ph.preload_env(conv.address, lib))
        assert p.stdout.strip() == "5 pipe!", p.stdout + p.stderr


def test_python_asyncio_epoll_client(lo, lib):
    """asyncio (epoll, non-blocking connect, add_reader) with 20 connections at once."""
    with _echo(lo, greeting=b"hi:") as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import asyncio
            async def one(i):
                r, w = await asyncio.open_connection("127.0.0.1", {echo.address[1]})
                w.write(f"{{i}}".encode())
                data = await r.readexactly(3 + len(str(i)))
                w.close()
                return data == f"hi:{{i}}".encode()
            async def main():
                results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 20)
                print(sum(results))
            asyncio.run(main())
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.strip() == "20", p.stdout + p.stderr
        assert len(conv.seen) == 20 and all(s.syn_data for s in conv.seen)


def test_poll_after_error_and_immediate_reset_reports_ready(lo, lib):
    """Error TLV then RST, all in before the program polls its connecting
    socket: poll() says writable (not POLLERR|POLLHUP, which curl takes for a
    failed connect), SO_ERROR is 0, and the read gives ECONNREFUSED.
    (PEP_SYN_WRITE=0: the SYN leaves at connect, so all of it can be in
    before the poll; with the SYN held for a write, the read sends it.)"""
    with converter_in(lo, error=(96, b""), reset_delay=0) as conv:
        p = pyrun(lo, f"""
            import errno, select, socket, time
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", {lo.http[4].address[1]}))
            except BlockingIOError:
                pass
            time.sleep(0.3)
            po = select.poll()
            po.register(s, select.POLLOUT)
            (fd, ev), = po.poll(5000)
            print("ERR" if ev & (select.POLLERR | select.POLLHUP) else "OUT" if ev & select.POLLOUT else ev)
            print(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            try:
                s.recv(10)
            except OSError as e:
                print(errno.errorcode[e.errno])
            """, ph.preload_env(conv.address, lib, PEP_SYN_WRITE=0))
        assert p.stdout.split() == ["OUT", "0", "ECONNREFUSED"], p.stdout + p.stderr


def test_pep_run_and_pep_lib_commands(lo, lib, tmp_path):
    """The CLI end to end: `pep lib` names the library, `pep run --pep` runs
    curl under it (PEP_NO_PROXY="" so loopback goes via the PEP)."""
    curl = require_tool("curl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEP_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = ph.REPO
    env["PEP_STATE_DIR"] = str(tmp_path / "pepstate")  # not the machine's: this test's own
    p = subprocess.run([sys.executable, "-m", "pepsock.cli", "lib"], env=env, capture_output=True,
                       text=True, timeout=TIMEOUT, cwd=ph.REPO)
    assert p.returncode == 0 and os.path.isfile(p.stdout.strip()), p.stderr
    env["PEP_NO_PROXY"] = ""
    with converter_in(lo) as conv:
        p = run(lo, [sys.executable, "-m", "pepsock.cli", "run", "--pep", conv.env_value, "--",
                     curl, "-sS", "--max-time", "20", "-o", str(tmp_path / "c"),
                     lo.http[4].url("/1m.bin")], env)
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "c").read_bytes() == lo.payload
        assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_connection_to_the_pep_itself_goes_direct(lo, lib):
    """A program under libpep that talks RFC 8803 to the PEP on its own (the
    Python client, pep check...) is not wrapped a second time."""
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import socket
            from pepsock import protocol
            s = socket.create_connection({tuple(conv.address)!r}, timeout=5)
            s.sendall(protocol.connect_request("127.0.0.1", {echo.address[1]}) + b"ping")
            r = protocol.MessageReader()
            while not r.done:
                r.feed(s.recv(100))
            data = r.rest
            while len(data) < 4:
                data += s.recv(100)
            print(data)
            """, dict(ph.preload_env(conv.address, lib), PYTHONPATH=ph.REPO))
        assert p.stdout.strip() == "b'ping'", p.stdout + p.stderr
        assert len(conv.seen) == 1 and conv.seen[0].connect.port == echo.address[1]


def test_pep_by_name_and_log_file_keeps_no_fd(lo, lib, tmp_path):
    """PEP_PROXY=localhost:PORT (resolved once, through libc, while libpep's own
    hooks stay out of the way); PEP_LOG to a file: lines land there and the
    program's fd table holds nothing of libpep's."""
    log = tmp_path / "pep.log"
    with _echo(lo) as echo, converter_in(lo) as conv:
        code = f"""
            import os, socket
            before = sorted(os.listdir("/proc/self/fd"))
            s = socket.create_connection(("127.0.0.1", {echo.address[1]}), timeout=5)
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            s.close()
            print(sorted(os.listdir("/proc/self/fd")) == before)
            """
        env = ph.preload_env(None, lib, log=f"debug:{log}", PEP_PROXY=f"localhost:{conv.address[1]}")
        p = pyrun(lo, code, env)
        assert p.stdout.strip() == "True", p.stdout + p.stderr
        assert p.stderr == ""
        assert len(conv.seen) == 1 and conv.seen[0].connect.port == echo.address[1]
        text = log.read_text()
        assert "PEP localhost port" in text and "reply stripped" in text, text


def test_the_programs_own_socket_survives(lo, lib):
    """bind(), socket options, fd flags and an epoll registration made before
    connect() are all still there after it: libpep never swaps the socket."""
    with _echo(lo, greeting=b"hey") as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import fcntl, os, select, socket
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            bound = s.getsockname()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            s.setblocking(False)
            flags = fcntl.fcntl(s, fcntl.F_GETFL) | os.O_CLOEXEC
            ep = select.epoll()
            ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLET)
            fd = s.fileno()
            try:
                s.connect(("127.0.0.1", {echo.address[1]}))
            except BlockingIOError:
                pass
            events = ep.poll(5)
            data = b""
            while len(data) < 3:
                ep.poll(5)
                try:
                    data += s.recv(10)
                except BlockingIOError:
                    pass
            print(s.fileno() == fd, s.getsockname() == bound,
                  s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1,
                  s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1,
                  fcntl.fcntl(s, fcntl.F_GETFL) & os.O_NONBLOCK != 0,
                  bool(events), data, bound[1])
            """, ph.preload_env(conv.address, lib))
        words = p.stdout.split()
        assert words[:7] == ["True"] * 6 + ["b'hey'"], p.stdout + p.stderr
        assert conv.seen[0].peer == ("127.0.0.1", int(words[7]))


@pytest.fixture
def notfo(tmp_path):
    """A namespace with TFO off on the client side (net.ipv4.tcp_fastopen=0)."""
    require_root()
    with Topology(prefix="pl") as topo:
        yield topo.host("nt", tfo=0)


_WAIT_FOR_READ = {  # Python's select module: epoll_wait(), select(), poll()
    "epoll": "ep = select.epoll(); ep.register(s.fileno(), select.EPOLLIN); "
             "events = ep.poll(8)",
    "select": "events = select.select([s], [], [], 8)[0]",
    "poll": "po = select.poll(); po.register(s, select.POLLIN); events = po.poll(8000)",
}


@pytest.mark.parametrize("wait", sorted(_WAIT_FOR_READ))
def test_header_goes_out_while_the_program_waits_for_epollin_only(notfo, lib, wait):
    """TFO off, the first SYN to the PEP dropped (iptables), so the handshake
    completes a second later while the program is already blocked in
    epoll_wait (select, poll) for reading only (the server speaks first): the
    header still goes out, the greeting comes back (every wait is sliced)."""
    iptables = require_tool("iptables")
    with _echo(notfo, greeting=b"220 hello") as echo, converter_in(notfo) as conv:
        notfo.run(iptables, "-A", "INPUT", "-p", "tcp", "--syn", "--dport", str(conv.address[1]),
                  "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0", "-j", "DROP")
        p = pyrun(notfo, f"""
            import select, socket, time
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", {echo.address[1]}))
            except BlockingIOError:
                pass
            t = time.monotonic()
            {_WAIT_FOR_READ[wait]}
            data = s.recv(100) if events else b""
            print(data, round(time.monotonic() - t, 1))
            """, ph.preload_env(conv.address, lib))
        words = p.stdout.split(" ")
        assert words[0] + " " + words[1] == "b'220 hello'", p.stdout + p.stderr
        assert 0.5 < float(words[2]) < 4
        assert len(conv.seen) == 1 and not conv.seen[0].syn_data


WAIT_FOR_READ_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
/* Non-blocking connect, then wait for reading only (8 s) with argv[2]:
 * pselect, ppoll or epoll_pwait2. Prints what came and the seconds. */
int main(int argc, char **argv) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (connect(s, (void *)&a, sizeof a) && errno != EINPROGRESS) return 1;
    struct timespec t0, t1, ts = {8, 0};
    sigset_t mask;
    sigemptyset(&mask);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int n;
    if (!strcmp(argv[2], "pselect")) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(s, &r);
        n = pselect(s + 1, &r, NULL, NULL, &ts, &mask);
    } else if (!strcmp(argv[2], "ppoll")) {
        struct pollfd p = {s, POLLIN, 0};
        n = ppoll(&p, 1, &ts, &mask);
    } else {
        int ep = epoll_create1(0);
        struct epoll_event ev = {EPOLLIN, {.fd = s}};
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
        n = epoll_pwait2(ep, &ev, 1, &ts, &mask);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    char buf[64] = "";
    if (n > 0) {
        ssize_t r = recv(s, buf, sizeof buf - 1, 0);
        buf[r > 0 ? r : 0] = 0;
    }
    printf("%s|%.1f\n", buf, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
"""


@pytest.mark.parametrize("wait", ["pselect", "ppoll", "epoll_pwait2"])
def test_header_goes_out_while_a_c_program_waits_for_reading_only(notfo, lib, tmp_path, wait):
    """The same as above for the waits Python's select module does not have:
    every wait hook is sliced while a header is pending."""
    iptables = require_tool("iptables")
    exe = ph.compile_c(WAIT_FOR_READ_C, str(tmp_path / "waitc"))
    with _echo(notfo, greeting=b"220 hello") as echo, converter_in(notfo) as conv:
        notfo.run(iptables, "-A", "INPUT", "-p", "tcp", "--syn", "--dport", str(conv.address[1]),
                  "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0", "-j", "DROP")
        p = run(notfo, [exe, str(echo.address[1]), wait], ph.preload_env(conv.address, lib))
        got, took = p.stdout.strip().split("|")
        assert got == "220 hello", p.stdout + p.stderr
        assert 0.5 < float(took) < 4
        assert len(conv.seen) == 1 and not conv.seen[0].syn_data


def test_pending_header_flush_never_eats_the_connect_error(notfo, lib):
    """TFO off and the PEP not listening: the program's own SO_ERROR still
    says ECONNREFUSED after libpep's flush attempts in poll()."""
    with _echo(notfo) as gone:
        dead = gone.address
    p = pyrun(notfo, """
        import errno, select, socket
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", 9))
        except BlockingIOError:
            pass
        po = select.poll()
        po.register(s, select.POLLOUT)
        po.poll(2000)
        po.poll(100)
        print(errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"))
        """, ph.preload_env(dead, lib))
    assert p.stdout.strip() == "ECONNREFUSED", p.stdout + p.stderr


def test_disconnect_with_af_unspec_and_reconnect_the_same_socket(lo, lib):
    with _echo(lo, greeting=b"hi") as echo, converter_in(lo) as conv:
        p = pyrun(lo, f"""
            import ctypes, socket
            libc = ctypes.CDLL(None, use_errno=True)
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", {echo.address[1]}))
            first = s.recv(2)
            unspec = (ctypes.c_ubyte * 16)()   # sa_family 0 = AF_UNSPEC
            print(first, libc.connect(s.fileno(), unspec, 16))
            s.connect(("127.0.0.1", {echo.address[1]}))
            print(s.recv(2), s.getpeername()[1] == {echo.address[1]})
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.split("\n")[:2] == ["b'hi' 0", "b'hi' True"], p.stdout + p.stderr
        assert len(conv.seen) == 2


def test_blocking_read_waits_for_the_reply_and_honours_so_rcvtimeo(lo, lib):
    """A slow reply (1 byte every 0.4 s): a blocking recv with SO_RCVTIMEO
    0.2 s gives EAGAIN after about 0.2 s; without a timeout it waits, strips
    the reply and returns the server's bytes."""
    with _echo(lo, greeting=b"slow") as echo, converter_in(lo, split=1, split_delay=0.4) as conv:
        p = pyrun(lo, f"""
            import errno, socket, struct, time
            s = socket.socket()
            s.connect(("127.0.0.1", {echo.address[1]}))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
            t = time.monotonic()
            try:
                s.recv(10)
                print("data")
            except OSError as e:
                print(errno.errorcode[e.errno], round(time.monotonic() - t, 1))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
            data = b""
            while len(data) < 4:
                data += s.recv(10)
            print(data)
            """, ph.preload_env(conv.address, lib))
        lines = p.stdout.split("\n")
        assert lines[0].split()[0] == "EAGAIN", p.stdout + p.stderr
        assert 0.1 <= float(lines[0].split()[1]) <= 0.6
        assert lines[1] == "b'slow'", p.stdout + p.stderr


# ------------------------------------------------------------------ no fixed caps

MANY_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
/* N proxied connections open at once in one process, each to a listener of
 * our own (its accept()ed ends are plain sockets): every one carries a
 * distinct line both ways. Prints OK, the highest fd, the seconds taken. */
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    struct rlimit rl = {4 * n + 64, 4 * n + 64};
    if (setrlimit(RLIMIT_NOFILE, &rl)) { perror("setrlimit"); return 1; }
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    inet_pton(AF_INET, "127.0.0.2", &a.sin_addr);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) { perror("listen"); return 1; }
    socklen_t al = sizeof a;
    getsockname(l, (void *)&a, &al);
    int *c = calloc(n, sizeof *c), *s = calloc(n, sizeof *s), maxfd = 0, i;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < n; i++) {
        c[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (connect(c[i], (void *)&a, sizeof a) && errno != EINPROGRESS) {
            printf("connect %d: %s\n", i, strerror(errno)); return 1;
        }
        if (c[i] > maxfd) maxfd = c[i];
        if (i % 64 == 63 || i == n - 1) {   /* accept what is there, keep the backlogs short */
            int k;
            for (k = i - (i % 64); k <= i; k++) {
                s[k] = accept(l, NULL, NULL);
                if (s[k] < 0) { perror("accept"); return 1; }
                if (s[k] > maxfd) maxfd = s[k];
            }
        }
    }
    /* every connection is still open: a line each way on each */
    for (i = 0; i < n; i++) {
        char msg[32];
        int len = snprintf(msg, sizeof msg, "c%06d\n", i);
        struct pollfd p = {c[i], POLLOUT, 0};
        poll(&p, 1, 10000);
        if (send(c[i], msg, len, 0) != len) { printf("send %d: %s\n", i, strerror(errno)); return 1; }
    }
    for (i = 0; i < n; i++) {
        char buf[32];
        /* an echo on each accepted end, whichever client it belongs to */
        int got = 0, len = 8;
        while (got < len) {
            int r = read(s[i], buf + got, len - got);
            if (r <= 0) { printf("server read %d\n", i); return 1; }
            got += r;
        }
        if (write(s[i], buf, len) != len) return 1;
    }
    for (i = 0; i < n; i++) {
        char buf[32], want[32];
        snprintf(want, sizeof want, "c%06d\n", i);
        int got = 0;
        while (got < 8) {
            struct pollfd p = {c[i], POLLIN, 0};
            poll(&p, 1, 10000);
            int r = recv(c[i], buf + got, 8 - got, 0);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) { printf("client read %d: %s\n", i, r ? strerror(errno) : "EOF"); return 1; }
            got += r;
        }
        if (memcmp(buf, want, 8)) { printf("mixed up at %d: %.8s\n", i, buf); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("OK %d %.2f\n", maxfd, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
"""


@pytest.fixture
def big_relay(lo):
    """`pep relay` allowed enough tunnels for the many-connections test."""
    yield from run_relay(lo, "--max-tunnels", "8000", "--max-per-client", "0")


@pytest.mark.parametrize("build", ["libpep.so", "libpep-asan.so"])
def test_3000_concurrent_proxied_connections_in_one_process(lo, big_relay, tmp_path, build):
    """No fixed cap (issue 10): 3,000 proxied connections open at once in one
    process, fds far past 1,024 (its accepted ends too), every one carrying
    its own line both ways through the real relay; nothing logged. Also
    under ASan/UBSan."""
    exe = ph.compile_c(MANY_C, str(tmp_path / "many"))
    preload, extra = ph.build(build), {}
    if "asan" in build:
        preload = f"{ph.asan_runtime()} {preload}"
        extra = {"ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0:halt_on_error=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    p = run(lo, [exe, "3000"], ph.preload_env(big_relay, preload, log="warn", **extra),
            timeout=120)
    words = p.stdout.split()
    assert p.returncode == 0 and words[0] == "OK", p.stdout + p.stderr[-2000:]
    assert int(words[1]) > 6000
    assert p.stderr == ""
    print(f"3000 proxied connections, highest fd {words[1]}: {words[2]} s")


def test_repeated_log_lines_are_rate_limited(lo, lib):
    """100 connections a PEP answers with Error 96, at PEP_LOG=info: the
    per-connection line comes at most PEP_LOG_BURST (5) times per 10 s."""
    with converter_in(lo, error=(96, b"")) as conv:
        p = pyrun(lo, f"""
            import socket
            for i in range(100):
                s = socket.create_connection(("127.0.0.1", {lo.http[4].address[1]}), timeout=5)
                try:
                    s.recv(10)
                except ConnectionRefusedError:
                    pass
                s.close()
            print("done")
            """, ph.preload_env(conv.address, lib, log="info"))
    assert p.stdout.strip() == "done", p.stderr
    lines = [x for x in p.stderr.splitlines() if "PEP Error TLV code 96" in x]
    assert 1 <= len(lines) <= 5, p.stderr
    assert len(conv.seen) == 100


# ---------------------------------------------------------------- lean connect
# libpep asks the kernel as little as it can per connection (docs/preload.md,
# "Cost per connection"); each test below guards one thing it no longer asks.

def test_raw_tcp_socket_is_not_taken(lo, lib):
    """SO_TYPE is not asked: a SOCK_RAW socket of protocol IPPROTO_TCP has
    SO_PROTOCOL 6 too, but its TCP_INFO fails, so its connect() is the
    kernel's (it only sets the default destination)."""
    with converter_in(lo) as conv:
        p = pyrun(lo, """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
            print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL), s.connect_ex(("127.0.0.1", 9)),
                  s.getpeername())
            """, ph.preload_env(conv.address, lib))
        assert p.stdout.strip() == "6 0 ('127.0.0.1', 9)", p.stdout + p.stderr
        assert conv.seen == []


_SOCKOPTS = """
    import ctypes, socket, sys
    NO_COOKIE = 34
    mode = sys.argv[1]
    s = socket.socket()
    s.settimeout(5)
    if mode == "program-set":   # the program's own values, set before connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 3)
        s.setsockopt(socket.IPPROTO_TCP, NO_COOKIE, 1)
    s.connect(("127.0.0.1", PORT))
    if mode == "disconnect":    # the program lets the attempt go before its reply
        unspec = (ctypes.c_ubyte * 16)()
        ctypes.CDLL(None).connect(s.fileno(), unspec, 16)
    else:
        s.recv(2)
    print(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT),
          s.getsockopt(socket.IPPROTO_TCP, NO_COOKIE))
"""


@pytest.mark.parametrize("mode, tfo_mode, expect", [
    # libpep assumes the kernel's defaults (SO_RCVLOWAT 1, NO_COOKIE 0) on a
    # socket it sees first; once the program set either, it asks / sets as
    # before: its SO_RCVLOWAT comes back after the reply, and a cookie PEP
    # gets plain TFO whatever the program set
    ("program-set", "cookie", "3 0"),
    ("plain", "cookie", "1 0"),
    ("plain", "nocookie", "1 1"),
    # what libpep set on a socket it lets go while the program keeps it
    # (SO_RCVLOWAT 5 with the reply outstanding, NO_COOKIE 1) goes back
    ("disconnect", "nocookie", "1 0"),
])
def test_socket_options_libpep_assumes_at_their_defaults(lo, lib, mode, tfo_mode, expect):
    with _echo(lo, greeting=b"hi") as echo, converter_in(lo) as conv:
        p = run(lo, [sys.executable, "-c",
                     textwrap.dedent(_SOCKOPTS).replace("PORT", str(echo.address[1])), mode],
                ph.preload_env(conv.address, lib, PEP_TFO_MODE=tfo_mode))
        assert p.stdout.strip() == expect, p.stdout + p.stderr


REPLACED_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
/* A proxied socket, connected without waiting (its reply outstanding), then
 * replaced at its fd number before the program's first write: by dup2()
 * (libpep sees it) or by a raw close and a socketpair() that gets the same
 * number (libpep does not: the fd's st_dev/st_ino tell). The write and the
 * read on the fd are the socketpair's, untouched. */
int main(int argc, char **argv) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[1]));
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) && errno != EINPROGRESS) {
        perror("connect");
        return 1;
    }
    struct pollfd p = {fd, POLLOUT, 0};
    poll(&p, 1, 5000); /* handshake done, reply on its way */
    usleep(100000);
    int sv[2];
    if (!strcmp(argv[2], "raw-close")) {
        syscall(SYS_close, fd);
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || sv[0] != fd)
            return 2;
    } else {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || dup2(sv[0], fd) != fd)
            return 2;
    }
    char buf[16] = {0};
    ssize_t w = write(fd, "to-pair", 7);
    ssize_t r = read(sv[1], buf, sizeof buf);
    printf("%zd %zd %.*s", w, r, (int)(r > 0 ? r : 0), buf);
    if (write(sv[1], "back", 4) != 4)
        return 3;
    r = read(fd, buf, sizeof buf);
    printf(" %zd %.*s\n", r, (int)(r > 0 ? r : 0), buf);
    return 0;
}
"""


@pytest.mark.parametrize("syn_write", ["0", "1"])
@pytest.mark.parametrize("how", ["dup2", "raw-close"])
def test_fd_replaced_between_connect_and_first_write(lo, lib, tmp_path, how, syn_write):
    """The check libpep keeps on a connection's first write (is the fd still
    the socket it connected?): without it the write would try to read the
    PEP's reply from the socketpair (ENOTSOCK), or (PEP_SYN_WRITE, the SYN
    held for the first write) send a header into it. With the SYN held, the
    socket closed before any write never reached the PEP at all."""
    exe = ph.compile_c(REPLACED_C, str(tmp_path / "replaced"))
    with _echo(lo) as echo, converter_in(lo) as conv:
        p = run(lo, [exe, str(echo.address[1]), how],
                ph.preload_env(conv.address, lib, PEP_SYN_WRITE=syn_write))
        assert p.stdout.strip() == "7 7 to-pair 4 back", p.stdout + p.stderr
        assert len(conv.seen) == (1 if syn_write == "0" else 0)
