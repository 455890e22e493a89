"""libpep.so without a network: errno on pass-through, symbols, pepsock.preload.

These run on the host (no namespace, no root): nothing here is proxied.
"""
import os
import signal
import subprocess
import sys


import preload_helpers as ph
from pepsock import preload

ERRNO_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
/* Every call succeeds (or fails the way the kernel says); errno must be what
 * the kernel left, so a sentinel survives every successful call. */
#define CHECK(what, call) do { errno = 4242; long r_ = (long)(call); \
    printf("%s %ld %d\n", what, r_ < 0 ? -1L : 0L, errno); } while (0)
int main(int argc, char **argv) {
    int port = atoi(argv[1]);
    int p[2], sp[2];
    if (pipe(p) || socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) return 1;
    char b[8];
    struct sockaddr_in lo = {0}; lo.sin_family = AF_INET; lo.sin_port = htons(port);
    inet_pton(AF_INET, "127.0.0.1", &lo.sin_addr);
    struct sockaddr_in far = {0}; far.sin_family = AF_INET; far.sin_port = htons(53);
    inet_pton(AF_INET, "198.51.100.9", &far.sin_addr);
    int t = socket(AF_INET, SOCK_STREAM, 0);
    CHECK("connect-bypassed", connect(t, (struct sockaddr *)&lo, sizeof lo));
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK("connect-udp", connect(u, (struct sockaddr *)&far, sizeof far));
    CHECK("write-pipe", write(p[1], "x", 1));
    CHECK("read-pipe", read(p[0], b, 1));
    CHECK("send", send(sp[0], "y", 1, 0));
    CHECK("recv", recv(sp[1], b, 1, 0));
    CHECK("recv-eagain", recv(sp[1], b, 1, MSG_DONTWAIT));
    CHECK("read-ebadf", read(999, b, 1));
    int d; CHECK("dup", d = dup(t));
    CHECK("dup2", dup2(t, 50));
    CHECK("fcntl-dupfd", fcntl(t, F_DUPFD_CLOEXEC, 60));
    struct sockaddr_in pa; socklen_t pl = sizeof pa;
    CHECK("getpeername", getpeername(50, (struct sockaddr *)&pa, &pl));
    int e; socklen_t el = sizeof e;
    CHECK("so_error", getsockopt(t, SOL_SOCKET, SO_ERROR, &e, &el));
    struct pollfd pf = {sp[0], POLLOUT, 0};
    CHECK("poll", poll(&pf, 1, 0));
    CHECK("close", close(d));
    CHECK("close_range", close_range(50, 70, 0));
    CHECK("close-ebadf", close(50));
    int r = socket(AF_INET, SOCK_STREAM, 0);
    lo.sin_port = htons(1);
    CHECK("connect-refused", connect(r, (struct sockaddr *)&lo, sizeof lo));
    return 0;
}
"""


def test_pass_through_keeps_errno(tmp_path):
    exe = ph.compile_c(ERRNO_C, str(tmp_path / "errno"))
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = str(listener.getsockname()[1])
        plain = subprocess.run([exe, port], capture_output=True, text=True, timeout=20)
        env = ph.preload_env(("192.0.2.1", 3128), no_proxy=None)  # loopback bypassed
        hooked = subprocess.run([exe, port], capture_output=True, text=True, timeout=20, env=env)
    assert plain.returncode == 0 and hooked.returncode == 0, hooked.stderr
    assert "4242" in plain.stdout  # the sentinel survives success without the hooks
    assert hooked.stdout == plain.stdout
    assert hooked.stderr == ""
    assert "connect-refused -1 111" in hooked.stdout


def test_exports_and_build_flags():
    lib = ph.build()
    syms = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True,
                          timeout=20).stdout.split()
    for name in ("connect", "read", "recv", "recvmsg", "readv", "__read_chk", "__recv_chk",
                 "__recvfrom_chk", "sendto", "sendmsg", "write", "getpeername", "close", "dup",
                 "dup2", "dup3", "fcntl", "fcntl64", "close_range", "epoll_wait", "poll", "setsockopt"):
        assert name in syms, name
    # -fvisibility=hidden: nothing internal leaks out
    assert not any(s.startswith("pep_") for s in syms)


def test_library_path_points_at_a_real_file():
    ph.build()  # a source tree has it once built; an installed package ships it
    path = preload.library_path()
    assert os.path.isabs(path) and os.path.isfile(path)
    assert os.path.basename(path) == "libpep.so"


def test_run_sets_the_environment_and_appends_ld_preload(tmp_path, monkeypatch):
    other = ph.build("libpeptlv.so")
    monkeypatch.setenv("LD_PRELOAD", other)
    monkeypatch.delenv("PEP_PROXY", raising=False)
    out = tmp_path / "env.txt"
    rc = preload.run(["sh", "-c", f'echo "$LD_PRELOAD|$PEP_PROXY" > {out}'],
                     pep=("2001:db8::1", 3128))
    assert rc == 0
    ld, pep = out.read_text().strip().split("|")
    assert ld.split() == [other, preload.library_path()]
    assert pep == "[2001:db8::1]:3128"
    rc = preload.run(["sh", "-c", f'echo "$PEP_PROXY" > {out}'], pep="192.0.2.1:80")
    assert rc == 0 and out.read_text().strip() == "192.0.2.1:80"


def test_run_exit_status():
    assert preload.run(["sh", "-c", "exit 3"]) == 3
    assert preload.run(["sh", "-c", "kill -TERM $$"]) == 128 + signal.SIGTERM
    assert preload.run(["/nonexistent/command"]) == 127


def test_loaded_into_python_changes_nothing_without_pep():
    """PEP_PROXY unset: the library is inert (a Python HTTP fetch on loopback works)."""
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print('ok')"
    env = ph.preload_env(None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=20)
    assert p.stdout.strip() == "ok" and p.stderr == ""


def test_destination_no_connect_tlv_can_carry_goes_to_the_kernel():
    """0.0.0.0 (and port 0, multicast, broadcast) cannot be put in a Connect
    TLV: libpep leaves such a connect to the kernel, which for 0.0.0.0 means
    this host, instead of sending the PEP an empty header. Nothing is bypassed
    here, and the PEP's port is closed: going to it would be refused."""
    code = (
        "import socket\n"
        "srv = socket.socket(); srv.bind(('0.0.0.0', 0)); srv.listen()\n"
        "c = socket.socket(); c.connect(('0.0.0.0', srv.getsockname()[1]))\n"
        "s, _ = srv.accept(); c.sendall(b'hi'); print(s.recv(2).decode())\n")
    env = ph.preload_env(("127.0.0.1", 9), no_proxy="")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=20)
    assert p.stdout.strip() == "hi", p.stderr
