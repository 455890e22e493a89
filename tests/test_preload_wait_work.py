"""libpep.so's work at the program's waits (preload/conn.c, tick): what it
looks at while connections are in their PEP handshake or await the reply.

    ns cli 192.0.2.1 -- 192.0.2.254 ns rt (ip route blackhole 203.0.113.0/24)

A PEP at 203.0.113.9 never answers: the client's SYNs are forwarded to rt and
dropped there (no iptables). A PEP on the client's loopback that listens and
never replies holds a connection in the reply's wait.
"""
from __future__ import annotations

import socket

import pytest

from conftest import require_root
from pepsock.testbed.netns import Topology
import preload_helpers as ph

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

BLACKHOLE_NET, SILENT_PEP = "203.0.113.0/24", ("203.0.113.9", 5124)
DEST = ("198.51.100.3", 80)  # never reached: every connection goes to the PEP
SLICE_S = 0.010  # PEP_SLICE_NS


@pytest.fixture(scope="module")
def net():
    require_root()
    topo = Topology(prefix="pw")
    try:
        cli = topo.host("cli", tfo=3)
        rt = topo.host("rt", forwarding=True, tfo=3)
        topo.link(cli, ["192.0.2.1/24"], rt, ["192.0.2.254/24"])
        topo.route(cli, BLACKHOLE_NET, "192.0.2.254")
        rt.run("ip", "route", "add", "blackhole", BLACKHOLE_NET)
        yield topo
    finally:
        topo.cleanup()


def env_for(pep, tmp_path, build="libpep.so", extra_preload="", **extra):
    """The environment for one PEP; a state directory of the test's own;
    build="libpep-asan.so": the ASan/UBSan library (after libasan)."""
    lib = ph.build(build)
    if "asan" in build:
        lib = f"{ph.asan_runtime()} {lib}"
        extra = {"ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0:halt_on_error=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1", **extra}
    if extra_preload:
        lib = f"{lib} {extra_preload}"
    env = ph.preload_env(pep, lib, **extra)
    env["PEP_STATE_DIR"] = str(tmp_path / "state")
    return env


def _state(tmp_path, addr) -> dict:
    path = tmp_path / "state" / f"pep-{addr[0]}-{addr[1]}"
    if not path.exists():
        return {}
    return dict(w.split("=", 1) for w in path.read_text().split())


def _clean(stderr: str) -> None:
    assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr


# ---------------------------------------------------------------------------
# An fd closed behind libpep's back and reused by a pipe

CLOSED_BEHIND_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* argv: dest-ip dest-port connected(0|1) waits wait-ms. A non-blocking
 * connect through libpep and a first write; with connected=1, a wait for
 * POLLOUT and one that sees the handshake done (the reply's deadline runs,
 * the reply outstanding). Then the
 * socket is closed behind libpep's back, a pipe takes its number, and the
 * program waits on the pipe `waits` times; the pipe must still carry a
 * byte. Prints "reused <fd>" and "pipe ok". */
int main(int argc, char **argv)
{
    if (argc != 6)
        return 64;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0 || errno != EINPROGRESS) {
        perror("connect");
        return 2;
    }
    if (write(s, "GET / HTTP/1.0\r\n\r\n", 18) < 0 && errno != EAGAIN) {
        perror("write");
        return 2;
    }
    if (atoi(argv[3])) {
        struct pollfd w = {s, POLLOUT, 0};
        if (poll(&w, 1, 5000) != 1 || !(w.revents & POLLOUT)) {
            fprintf(stderr, "no handshake\n");
            return 2;
        }
        usleep(20000); /* past a slice: the next wait looks at the handshake */
        struct pollfd r = {s, POLLIN, 0};
        poll(&r, 1, 0);
    }
    syscall(SYS_close, s); /* libpep does not see this close */
    int p[2];
    if (pipe(p) < 0 || p[0] != s) {
        fprintf(stderr, "fd %d not reused by the pipe\n", s);
        return 3;
    }
    printf("reused %d\n", s);
    int i, n = atoi(argv[4]);
    for (i = 0; i < n; i++) {
        struct pollfd r = {p[0], POLLIN, 0};
        if (poll(&r, 1, atoi(argv[5])) != 0) {
            fprintf(stderr, "the empty pipe polled ready\n");
            return 4;
        }
    }
    char c = 0;
    if (write(p[1], "y", 1) != 1 || read(p[0], &c, 1) != 1 || c != 'y') {
        perror("pipe");
        return 5;
    }
    printf("pipe ok\n");
    return 0;
}
"""


@pytest.mark.parametrize("build", ["libpep.so", "libpep-asan.so"])
def test_fd_closed_behind_libpeps_back_in_the_handshake_is_left_alone(net, tmp_path, build):
    """The program's socket, in its handshake with a PEP that never answers,
    is closed with a raw syscall and its number goes to a pipe. The waits on
    the pipe, across PEP_CONNECT_TIMEOUT, must not take it for a refused or
    late PEP: no hold-down, no failover line, the pipe works. (Before: the
    first wait read TCP_INFO's failure on the pipe as a refusal, held the
    PEP down and tried the next attempt and the fallback on the pipe.)"""
    exe = ph.compile_c(CLOSED_BEHIND_C, str(tmp_path / "closed"))
    env = env_for(SILENT_PEP, tmp_path, build, log="debug", PEP_CONNECT_TIMEOUT="0.3")
    p = ph.run(net.hosts["cli"], [exe, *map(str, DEST), "0", "8", "100"], env)
    _clean(p.stderr)
    assert p.returncode == 0 and "pipe ok" in p.stdout, p.stdout + p.stderr
    fd = int(p.stdout.split()[1])
    assert f"fd {fd}: SYN sent" in p.stderr, p.stderr  # it did go to the PEP
    assert "down_until" not in _state(tmp_path, SILENT_PEP), _state(tmp_path, SILENT_PEP)
    for said in ("handshake with the PEP failed", "refused", "did not answer",
                 "no PEP usable", "using"):
        assert said not in p.stderr, p.stderr
    assert f"fd {fd}: not the socket libpep connected any more" in p.stderr, p.stderr


@pytest.mark.parametrize("build", ["libpep.so", "libpep-asan.so"])
def test_fd_closed_behind_libpeps_back_awaiting_the_reply_is_left_alone(net, tmp_path, build):
    """The same once the handshake is done and the reply is outstanding (a
    PEP that listens and never replies): past PEP_REPLY_TIMEOUT the waits on
    the pipe must not fail it as a connection (no line naming the PEP, no
    disconnect of the fd). (Before: "did not answer within", and
    SO_LINGER/connect(AF_UNSPEC) on the reused fd.)"""
    exe = ph.compile_c(CLOSED_BEHIND_C, str(tmp_path / "closed"))
    cli = net.hosts["cli"]
    with cli.enter():
        silent = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        env = env_for(silent.getsockname(), tmp_path, build, log="debug",
                      PEP_REPLY_TIMEOUT="0.3")
        p = ph.run(cli, [exe, *map(str, DEST), "1", "8", "100"], env)
    finally:
        silent.close()
    _clean(p.stderr)
    assert p.returncode == 0 and "pipe ok" in p.stdout, p.stdout + p.stderr
    fd = int(p.stdout.split()[1])
    assert "did not answer" not in p.stderr and "timed out" not in p.stderr, p.stderr
    assert f"fd {fd}: not the socket libpep connected any more" in p.stderr, p.stderr


# ---------------------------------------------------------------------------
# What a wait costs with many connections in their handshake

# An LD_PRELOAD library after libpep.so: libpep's real getsockopt (its
# dlsym(RTLD_NEXT)) is this one, which counts TCP_INFO and goes on to libc's.
COUNT_TCP_INFO_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static long calls;

long count_tcp_info_calls(void)
{
    return __atomic_load_n(&calls, __ATOMIC_RELAXED);
}

int getsockopt(int fd, int level, int name, void *v, socklen_t *len)
{
    static int (*real)(int, int, int, void *, socklen_t *);
    if (!real)
        real = (int (*)(int, int, int, void *, socklen_t *))dlsym(RTLD_NEXT, "getsockopt");
    if (level == IPPROTO_TCP && name == TCP_INFO)
        __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    return real(fd, level, name, v, len);
}
"""

IN_FLIGHT_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* argv: dest-ip dest-port n waits wait-ms. n non-blocking connects through
 * libpep, each with a first write; then `waits` polls of wait-ms on a pipe.
 * Prints "<TCP_INFO calls during the waits> <ns the waits took>". */
int main(int argc, char **argv)
{
    if (argc != 6)
        return 64;
    long (*calls)(void) = (long (*)(void))dlsym(RTLD_DEFAULT, "count_tcp_info_calls");
    if (!calls) {
        fprintf(stderr, "the counting library is not loaded\n");
        return 2;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int i, n = atoi(argv[3]), waits = atoi(argv[4]), ms = atoi(argv[5]);
    for (i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) == 0 || errno != EINPROGRESS) {
            perror("connect");
            return 2;
        }
        if (write(s, "GET / HTTP/1.0\r\n\r\n", 18) < 0 && errno != EAGAIN) {
            perror("write");
            return 2;
        }
    }
    int p[2];
    if (pipe(p) < 0)
        return 2;
    long before = calls();
    long long start = now_ns();
    for (i = 0; i < waits; i++) {
        struct pollfd r = {p[0], POLLIN, 0};
        if (poll(&r, 1, ms) != 0)
            return 3;
    }
    printf("%ld %lld\n", calls() - before, now_ns() - start);
    return 0;
}
"""

N_CONNS, WAITS = 300, 200


@pytest.mark.parametrize("tfo_mode,wait_ms", [("nocookie", 0), ("cookie", 0), ("nocookie", 2)])
def test_waits_probe_each_handshake_at_most_once_a_slice(net, tmp_path, tfo_mode, wait_ms):
    """300 connections in their handshake with a PEP that never answers
    (header in the SYN, reply awaited; or, PEP_TFO_MODE=cookie with no
    cookie, the header waiting for the handshake), then 200 polls on a pipe:
    libpep asks the kernel (TCP_INFO) about each connection at most once per
    10 ms slice of those waits, not once per wait (before: 300 x 200 =
    60,000 calls; 120,000 with the header pending). Each is still asked at
    the first wait, and again every slice (the 2 ms waits)."""
    counter = ph.compile_c(COUNT_TCP_INFO_C, str(tmp_path / "count.so"), "-shared", "-fPIC",
                           "-ldl")
    exe = ph.compile_c(IN_FLIGHT_C, str(tmp_path / "inflight"), "-ldl")
    env = env_for(SILENT_PEP, tmp_path, extra_preload=counter, PEP_CONNECT_TIMEOUT="30",
                  PEP_TFO_MODE=tfo_mode)
    p = ph.run(net.hosts["cli"], [exe, *map(str, DEST), str(N_CONNS), str(WAITS),
                                  str(wait_ms)], env)
    assert p.returncode == 0, p.stdout + p.stderr
    calls, took_ns = map(int, p.stdout.split())
    slices = took_ns / 1e9 / SLICE_S
    print(f"{tfo_mode}, {WAITS} waits of {wait_ms} ms over {N_CONNS} connections in their "
          f"handshake: {calls} TCP_INFO ({calls / WAITS:.1f} a wait) in {took_ns / 1e6:.0f} ms")
    assert N_CONNS <= calls <= N_CONNS * (slices + 2), (calls, took_ns)
    if wait_ms:  # asked again as the slices pass: 200 x 2 ms are 40 slices at least
        assert calls >= N_CONNS * 5, (calls, took_ns)
