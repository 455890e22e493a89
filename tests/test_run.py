"""`pep run`: it becomes the program (pid, signals, exit status), through
libpep.so for dynamic programs and the seccomp supervisor for static and Go
ones, and says so when neither can serve a program.

Programs: /bin/sh (dynamic), tests/run_client.c built with gcc -static, and
tests/run_goget.go built with the Go toolchain (CGO_ENABLED=0, stdlib only,
GOPROXY=off) when one is installed.  The transfer tests run in a network
namespace (TFO on) against the test converter (tests/converter.py), which
records whether each header came in the SYN, and against `pep relay`.
"""
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from conftest import require_root
from converter import Converter, EchoServer, HTTPServer, converter_in, web_namespace
from pepsock import elf, run, seccomp, supervisor
from relay_helpers import Relay

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 30
PAYLOAD_SIZE = 1 << 20


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PEP_") and k not in ("LD_PRELOAD", "http_proxy", "HTTP_PROXY")}
    env["PYTHONPATH"] = REPO
    env["PEP_NO_PROXY"] = ""          # loopback goes via the PEP too
    # A state directory of this environment's own: the default one is the
    # machine's (/tmp/pepsock-<uid>), where earlier runs left tfo=cookie for
    # converters on the same ports, so a first SYN went without the header.
    env["PEP_STATE_DIR"] = tempfile.mkdtemp(prefix="pepstate-")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pep_run_argv(*args) -> list[str]:
    return [sys.executable, "-m", "pepsock.cli", "run", *args]


def popen(argv, host=None, env=None, **kw) -> subprocess.Popen:
    argv = host.cmd(*argv) if host is not None else argv
    return subprocess.Popen(argv, env=env or base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen, timeout=TIMEOUT):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"timed out; stdout={out[-500:]!r} stderr={err[-2000:]!r}")
    return p.returncode, out, err


def supervisors(marker: str) -> list[int]:
    """pids of pep-supervisor processes started with PEP_TEST_MARK=marker."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "pep-supervisor":
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"PEP_TEST_MARK={marker}".encode() in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(pid))
        except OSError:
            continue
    return found


def wait_gone(marker: str, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = supervisors(marker)
        if not left:
            return []
        time.sleep(0.05)
    return supervisors(marker)


# ------------------------------------------------------------------ the programs

@pytest.fixture(scope="module")
def static_client(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bin") / "run_client")
    proc = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", out,
                           os.path.join(HERE, "run_client.c")], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"gcc -static failed (no static libc?): {proc.stderr[-300:]}")
    return out


def _go_build(tmp_path_factory, cgo: bool) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs the Go toolchain (apt-get install golang-go; .ci/run does)")
    work = tmp_path_factory.mktemp("go")
    out = str(work / "goget")
    # The build cache is a temp dir shared between runs (a cold net/http build
    # takes a while on a loaded machine); no network: GOPROXY=off, stdlib only.
    env = dict(os.environ, GOCACHE=os.path.join(tempfile.gettempdir(), "pepsock-go-cache"),
               GOPATH=str(work / "gopath"), GOFLAGS="-mod=mod", GOPROXY="off",
               CGO_ENABLED="1" if cgo else "0", HOME=str(work))
    proc = subprocess.run([go, "build", "-o", out, os.path.join(HERE, "run_goget.go")], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"go build failed:\n{proc.stderr}")
    return out


@pytest.fixture(scope="module")
def go_client(tmp_path_factory):
    """The Go client, static (CGO_ENABLED=0)."""
    return _go_build(tmp_path_factory, cgo=False)


@pytest.fixture(scope="module")
def go_cgo_client(tmp_path_factory):
    """The Go client linked dynamically (cgo): it has PT_INTERP, and still
    makes its own syscalls: libpep.so cannot serve it either."""
    return _go_build(tmp_path_factory, cgo=True)


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    """One namespace, TFO on (3), HTTP servers on 127.0.0.1 and ::1 serving a 1 MiB file."""
    require_root()
    with web_namespace("rn", tmp_path_factory.mktemp("www")) as host:
        yield host


def body(response: bytes) -> bytes:
    head, sep, rest = response.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
    return rest


# ------------------------------------------------------------------ which path

def test_examine_tells_dynamic_static_go_and_scripts(static_client, tmp_path):
    sh = elf.examine("sh")
    assert sh.info.dynamic and not sh.info.go and sh.info.machine == run.NATIVE_MACHINE
    st_ = elf.examine(static_client)
    assert not st_.info.dynamic and not st_.info.go
    script = tmp_path / "script"
    script.write_text(f"#!/usr/bin/env -S {static_client} -s\n")
    script.chmod(0o755)
    followed = elf.examine(str(script))
    assert followed.path == str(script) and followed.binary == static_client
    assert not followed.info.dynamic
    shell_script = tmp_path / "sh_script"
    shell_script.write_text("#!/bin/sh\necho hi\n")
    assert elf.examine(str(shell_script)).info.dynamic
    text = tmp_path / "text"
    text.write_text("echo hi\n")
    assert elf.examine(str(text)).info is None
    assert elf.examine("no-such-command-pepsock") is None


def test_examine_knows_a_go_program(go_client):
    info = elf.examine(go_client).info
    assert info.go and not info.dynamic


def test_shebang_splits_as_the_kernel_does():
    assert elf.shebang(b"#!/bin/sh\n") == ["/bin/sh"]
    assert elf.shebang(b"#! /usr/bin/env  python3 -u \nx") == ["/usr/bin/env", "python3 -u"]
    assert elf.shebang(b"#!\n") is None and elf.shebang(b"\x7fELF") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_inspect_random_bytes_only_raises_notelf(data):
    try:
        elf.inspect(data)
    except elf.NotElf:
        pass


_REAL_HEAD = open(shutil.which("sh") or "/bin/sh", "rb").read()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12),
       st.integers(16, len(_REAL_HEAD)))
def test_inspect_mutated_real_program_only_raises_notelf(flips, cut):
    data = bytearray(_REAL_HEAD[:cut])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    try:
        elf.inspect(bytes(data))
    except elf.NotElf:
        pass


def _program(machine="x86_64", interp="/lib64/ld-linux-x86-64.so.2", go=False):
    machine = run.NATIVE_MACHINE if machine == "native" else machine
    return elf.Program("/x/prog", "/x/prog", elf.ElfInfo(machine, interp, go))


@pytest.mark.parametrize("program,mode", [
    (_program("native"), run.PRELOAD),
    (_program("native", interp=None), run.SECCOMP),
    (_program("native", go=True), run.SECCOMP),
    (_program("native", interp="/lib/ld-musl-x86_64.so.1"), run.SECCOMP),
    (elf.Program("/x/prog", "/x/prog", None, "not an ELF executable or #! script"), run.SECCOMP),
    (_program("i386", interp=None), run.NONE),
    (_program("i386"), run.NONE),
])
def test_plan_picks_the_path(program, mode):
    chosen = run.plan(program, library="/lib/libpep.so", seccomp_why="")
    assert chosen.mode == mode, chosen


def test_plan_without_seccomp_names_both_reasons():
    chosen = run.plan(_program("native", interp=None), library="/lib/libpep.so",
                      seccomp_why="this kernel has no seccomp user notification")
    assert chosen.mode == run.NONE
    assert chosen.why == ("prog is statically linked, and this kernel has no seccomp user "
                          "notification")
    assert run.plan(_program("native"), run.SECCOMP, library="/l",
                    seccomp_why="no").mode == run.NONE
    assert run.plan(_program("native"), run.BOTH, library="/l", seccomp_why="").mode == run.SECCOMP
    no_lib = run.plan(_program("native"), library=None, library_why="libpep.so not found",
                      seccomp_why="")
    assert no_lib == run.Plan(run.SECCOMP, "libpep.so not found")


def test_set_id_program_run_by_a_user_is_refused(tmp_path, monkeypatch):
    prog = tmp_path / "suid"
    shutil.copy(shutil.which("true"), prog)
    prog.chmod(0o4755)
    program = elf.examine(str(prog))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for want in ("auto", run.PRELOAD, run.SECCOMP):
        chosen = run.plan(program, want, library="/l", seccomp_why="")
        assert chosen.mode == run.NONE and "set-user/group-ID" in chosen.why
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert run.plan(program, library="/l", seccomp_why="").mode == run.PRELOAD


def test_notify_filter_notifies_its_syscalls_of_its_arch_only():
    """Walk the classic BPF program by hand for (arch, nr) pairs."""
    code = seccomp.notify_filter(0xC000003E, (42, 52))
    ins = [struct.unpack_from("=HBBI", code, i) for i in range(0, len(code), 8)]

    def verdict(arch, nr):
        data = {seccomp.SECCOMP_DATA_ARCH: arch, seccomp.SECCOMP_DATA_NR: nr}
        pc, acc = 0, 0
        while True:
            op, jt, jf, k = ins[pc]
            if op == seccomp.BPF_LD_W_ABS:
                acc, pc = data[k], pc + 1
            elif op == seccomp.BPF_JEQ_K:
                pc += 1 + (jt if acc == k else jf)
            else:
                assert op == seccomp.BPF_RET_K
                return k

    assert verdict(0xC000003E, 42) == seccomp.SECCOMP_RET_USER_NOTIF
    assert verdict(0xC000003E, 52) == seccomp.SECCOMP_RET_USER_NOTIF
    assert verdict(0xC000003E, 41) == seccomp.SECCOMP_RET_ALLOW
    assert verdict(0xC000003E, 51) == seccomp.SECCOMP_RET_ALLOW
    assert verdict(0xC000003E, 42 | 0x40000000) == seccomp.SECCOMP_RET_ALLOW   # x32
    assert verdict(0x40000003, 42) == seccomp.SECCOMP_RET_ALLOW                # i386
    only_connect = seccomp.notify_filter(0xC000003E, (42,))
    ins = [struct.unpack_from("=HBBI", only_connect, i) for i in range(0, len(only_connect), 8)]
    assert verdict(0xC000003E, 42) == seccomp.SECCOMP_RET_USER_NOTIF
    assert verdict(0xC000003E, 52) == seccomp.SECCOMP_RET_ALLOW


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 200))
def test_parse_sockaddr_takes_any_bytes(raw, length):
    got = supervisor.parse_sockaddr(raw, length)
    assert got is None or got[0] in (socket.AF_INET, socket.AF_INET6)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535))
def test_parse_sockaddr_reads_what_the_kernel_gets(ip, port):
    raw = (supervisor._sockaddr_in if ip.version == 4 else supervisor._sockaddr_in6)(ip, port)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    assert supervisor.parse_sockaddr(raw, len(raw)) == (family, ip, port)
    assert supervisor.parse_sockaddr(raw, len(raw) - 1) is None     # too short for its family


@pytest.mark.parametrize("thread_pidfds", [True, False])
def test_pidfd_of_a_thread_reaches_its_fd_table(monkeypatch, thread_pidfds):
    """pidfd_getfd through the pidfd of a non-leader thread (PIDFD_THREAD, or
    its thread group on kernels before 6.9) gets the same open file."""
    monkeypatch.setattr(seccomp, "_pidfd_thread", thread_pidfds)
    a, b = socket.socketpair()
    tid, ready, done = [], threading.Event(), threading.Event()

    def worker():
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        ready.wait(10)
        pidfd = seccomp.pidfd_of_thread(tid[0])
        try:
            mine = socket.socket(fileno=seccomp.take_fd(pidfd, a.fileno()))
        finally:
            os.close(pidfd)
        with mine:
            mine.sendall(b"same file")
            assert b.recv(9) == b"same file"
    finally:
        done.set()
        t.join()
        a.close()
        b.close()


# ------------------------------------------------------------------ becoming the program

SH_SIGNALS = ('trap "echo HUP" HUP; trap "echo TERM; exit 7" TERM; echo "pid $$"; '
              'i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done')


def _default_signals() -> None:
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _signals_reach_it(argv, env=None):
    """pid line, HUP reported, TERM ends it with 7: the pid is pep run's."""
    # Default dispositions for the program: a shell started with SIGHUP ignored
    # (a test run under nohup) may not trap it, and pep run rightly passes the
    # caller's dispositions on.
    p = popen(argv, env=env, preexec_fn=_default_signals)
    try:
        line = p.stdout.readline()
        assert line.startswith("pid "), (line, p.stderr.read() if p.poll() is not None else "")
        assert int(line.split()[1]) == p.pid
        p.send_signal(signal.SIGHUP)
        assert p.stdout.readline().strip() == "HUP"
        p.send_signal(signal.SIGTERM)
        rc, out, err = finish(p)
        assert out.strip() == "TERM" and rc == 7, (rc, out, err)
        return err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_preload_path_is_the_program_and_gets_its_signals():
    _signals_reach_it(pep_run_argv("--pep", "192.0.2.1:9", "--", "sh", "-c", SH_SIGNALS))


def test_seccomp_path_is_the_program_and_gets_its_signals(static_client):
    mark = uuid.uuid4().hex
    err = _signals_reach_it(pep_run_argv("--pep", "192.0.2.1:9", "--", static_client, "-s"),
                            env=base_env(PEP_TEST_MARK=mark))
    assert err == ""
    assert wait_gone(mark) == [], "the supervisor outlived the program"


def test_go_program_is_the_program_and_gets_its_signals(go_client):
    _signals_reach_it(pep_run_argv("--pep", "192.0.2.1:9", "--", go_client, "-s"))


@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_exit_status_and_death_by_signal_pass_through(mode):
    argv = pep_run_argv("--pep", "192.0.2.1:9", "--mode", mode, "--")
    assert finish(popen(argv + ["sh", "-c", "exit 3"]))[0] == 3
    assert finish(popen(argv + ["sh", "-c", "kill -KILL $$"]))[0] == -signal.SIGKILL
    assert finish(popen(argv + ["sh", "-c", "kill -TERM $$"]))[0] == -signal.SIGTERM


@pytest.mark.parametrize("mode", ["preload", "seccomp"])
def test_closed_standard_fds_stay_closed(mode):
    """pep run started with stdin and stdout closed: the program gets them closed."""
    probe = "for fd in 0 1; do [ -e /proc/self/fd/$fd ] && echo open >&2 || echo closed >&2; done"
    inner = " ".join(pep_run_argv("--pep", "192.0.2.1:9", "--mode", mode, "--", "sh", "-c",
                                  f"'{probe}'"))
    rc, out, err = finish(popen(["sh", "-c", f"exec <&- >&-; exec {inner}"]))
    assert rc == 0 and err.split() == ["closed", "closed"], err


def test_command_not_found_and_not_executable(tmp_path):
    rc, _, err = finish(popen(pep_run_argv("--pep", "192.0.2.1:9", "--", "no-such-cmd-pepsock")))
    assert rc == 127 and "command not found" in err
    f = tmp_path / "f"
    f.write_text("x")
    rc, _, err = finish(popen(pep_run_argv("--pep", "192.0.2.1:9", "--", str(f))))
    assert rc == 126 and "ermission denied" in err


def test_without_a_pep_it_says_so_and_runs():
    rc, out, err = finish(popen(pep_run_argv("--", "sh", "-c", "echo ran"), env=base_env()))
    assert rc == 0 and out == "ran\n"
    assert err == "pep run: no PEP given (--pep or PEP_PROXY): running sh unproxied\n"


def test_refuses_when_no_path_can_serve_unless_allowed(static_client):
    """A seccomp supervisor inside another one cannot install its listener
    (EBUSY): the inner pep run says so in one line and refuses; with
    --allow-direct it runs the program unproxied."""
    inner = pep_run_argv("--pep", "192.0.2.1:9", "--", static_client, "-x")
    outer = pep_run_argv("--pep", "192.0.2.1:9", "--mode", "seccomp", "--")
    rc, out, err = finish(popen(outer + inner))
    assert rc == run.REFUSED and out == "", err
    assert err.count("\n") == 1 and "cannot put" in err and "already watches" in err \
        and "--allow-direct" in err, err
    inner.insert(inner.index("--"), "--allow-direct")
    rc, out, err = finish(popen(outer + inner))
    assert rc == 2 and "running it unproxied" in err, err   # run_client's usage error: it ran


def test_refuses_when_the_supervisor_cannot_start(topology, static_client):
    """No loopback (lo down) leaves the supervisor no helper address: pep run
    says so before installing anything, and --allow-direct still runs it."""
    host = topology.host("nolo", tfo=3)
    host.run("ip", "link", "set", "lo", "down")
    argv = pep_run_argv("--pep", "192.0.2.1:9", "--", static_client, "-x")
    rc, out, err = finish(popen(argv, host=host))
    assert rc == run.REFUSED and "the seccomp supervisor did not start" in err, err
    assert err.count("\n") == 1
    argv.insert(argv.index("--"), "--allow-direct")
    rc, out, err = finish(popen(argv, host=host))
    assert rc == 2 and "running it unproxied" in err, err


# ------------------------------------------------------------------ through the PEP

def _fetch_bytes(ns, conv_addr, argv_tail, env=None, mode="auto"):
    """pep run --pep conv_addr -- argv_tail, in ns: (status, stdout bytes, stderr text)."""
    host, port = conv_addr
    pep = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    p = subprocess.run(ns.cmd(*pep_run_argv("--pep", pep, "--mode", mode, "--", *argv_tail)),
                       env=env or base_env(), capture_output=True, timeout=TIMEOUT)
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


@pytest.mark.parametrize("flags,fam", [((), 4), (("-n",), 4), (("-6",), 6), (("-6", "-n"), 4)])
def test_static_client_through_the_converter(ns, static_client, flags, fam):
    """Bytes intact, the header in the SYN, the destination the program asked
    for; -n: the program's epoll registration made before connect() survives;
    -6 with an IPv4 destination: v4-mapped on an AF_INET6 socket."""
    http = ns.http[fam]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [static_client, *flags, http.address[0],
                                                       str(http.address[1]), "1m.bin"])
    assert rc == 0 and err == "", err
    assert body(out) == ns.payload
    assert len(conv.seen) == 1
    seen = conv.seen[0]
    assert seen.syn_data and str(seen.connect.address) == http.address[0] \
        and seen.connect.port == http.address[1]


def test_ipv4_socket_through_an_ipv6_pep(ns, static_client):
    """The connection to the PEP is the supervisor's: an AF_INET program
    socket reaches a PEP on ::1 (libpep.so cannot: ENETUNREACH)."""
    http = ns.http[4]
    with converter_in(ns, host="::1") as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [static_client, "127.0.0.1",
                                                       str(http.address[1]), "1m.bin"])
    assert rc == 0, err
    assert body(out) == ns.payload
    assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_static_client_bytes_are_intact(ns, static_client):
    http = ns.http[4]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [static_client, "-c", "3", "127.0.0.1",
                                                       str(http.address[1]), "1m.bin"])
    assert rc == 0, err
    assert body(out) == ns.payload
    assert len(conv.seen) == 3 and all(s.syn_data for s in conv.seen)


def test_go_client_through_the_converter(ns, go_client):
    http = ns.http[4]
    urls = [http.url("/1m.bin")] * 2 + [ns.http[6].url("/1m.bin")]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [go_client, *urls])
    assert rc == 0, err
    assert out == ns.payload
    assert len(conv.seen) == 3 and all(s.syn_data for s in conv.seen), conv.seen
    assert {str(s.connect.address) for s in conv.seen} == {"127.0.0.1", "::1"}


def test_dynamic_go_client_goes_to_the_supervisor(ns, go_cgo_client):
    info = elf.examine(go_cgo_client).info
    assert info.dynamic and info.go
    http = ns.http[4]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [go_cgo_client, http.url("/1m.bin")],
                                    env=base_env(PEP_LOG="info"))
    assert rc == 0, err
    assert "under the seccomp supervisor: goget is a Go program" in err, err
    assert out == ns.payload
    assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_static_and_go_clients_through_pep_relay(ns, static_client, go_client):
    http = ns.http[4]
    relay = Relay("--listen", "127.0.0.1:0", "--allow-dest", "127.0.0.0/8", prefix=ns.cmd())
    try:
        rc, out, err = _fetch_bytes(ns, relay.addr, [static_client, "127.0.0.1",
                                                     str(http.address[1]), "1m.bin"])
        assert rc == 0, err
        assert body(out) == ns.payload
        rc, out, err = _fetch_bytes(ns, relay.addr, [go_client, http.url("/1m.bin")])
        assert rc == 0, err
        assert out == ns.payload
    finally:
        relay.stop()


@pytest.mark.parametrize("flags", [(), ("-n",)])
def test_connects_interrupted_by_signals_are_answered_once(ns, static_client, flags):
    """A SIGALRM every 50 us (SA_RESTART, like Go's preemption signals)
    interrupts connects while the supervisor decides; the kernel restarts
    them, and a restarted connect the supervisor already steered is answered
    as done: every fetch works and the PEP sees each connection once."""
    http = ns.http[4]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [static_client, "-i", *flags, "-c", "20",
                                                       "127.0.0.1", str(http.address[1]), "1m.bin"])
    assert rc == 0, err
    assert body(out) == ns.payload
    assert len(conv.seen) == 20


def test_restarted_connects_before_linux_5_19(ns, static_client):
    """Without SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (kernels before 5.19) a
    signal can take the caller out of a connect the supervisor has steered,
    even after the kernel took its answer; the restarted call must still be
    answered as done.  pep run's steps, with the filter installed the old way."""
    http = ns.http[4]
    code = textwrap.dedent(f"""
        import os
        from pepsock import seccomp, supervisor
        channel, _ = supervisor.spawn(os.getpid())
        listener, killable = seccomp.install_connect_listener(wait_killable=False)
        assert not killable
        supervisor.hand_over(channel, listener, killable)
        os.close(listener)
        channel.close()
        client = {static_client!r}
        os.execv(client, [client, "-i", "-c", "100", "127.0.0.1", "{http.address[1]}", "1m.bin"])
    """)
    with converter_in(ns) as conv:
        p = subprocess.run(ns.cmd(sys.executable, "-c", code),
                           env=base_env(PEP_PROXY=conv.env_value, PEP_LOG="debug"),
                           capture_output=True, timeout=60)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, err[-2000:]
    assert body(p.stdout) == ns.payload
    assert len(conv.seen) == 100
    print(err.count("restarted after a signal"), "restarts answered")


#: A program: argv[2] connections at once to the echo server on 127.0.0.1 port
#: argv[1], each sends argv[3] random bytes, shuts down its sending side and
#: reads everything back; prints how many got their bytes back, of how many.
ECHO_BOTH_WAYS = textwrap.dedent("""
    import os, socket, sys, threading
    port, connections, size = map(int, sys.argv[1:4])
    ok = []
    def one():
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        data = os.urandom(size)
        def send():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        t.join()
        ok.append(got == data)
    threads = [threading.Thread(target=one) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sum(ok), len(ok))
""")


def test_upload_and_half_close_through_the_supervisor(ns):
    """Both directions and a half-close, with a program forced through the
    seccomp path: 4 MiB to an echo server, shutdown(SHUT_WR), read it all back."""
    with ns.enter():
        echo = EchoServer()
    with echo, converter_in(ns) as conv:
        host, port = conv.address
        p = subprocess.run(ns.cmd(*pep_run_argv("--pep", f"{host}:{port}", "--mode", "seccomp",
                                                "--", sys.executable, "-c", ECHO_BOTH_WAYS,
                                                str(echo.address[1]), "1", str(4 << 20))),
                           env=base_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "1"], p.stderr
    assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_mode_both_covers_a_script_running_static_and_dynamic_programs(ns, static_client,
                                                                       tmp_path):
    """sh (dynamic) runs curl (dynamic: libpep.so, whose connect to the PEP
    the supervisor lets through) and the static client (the supervisor)."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl")
    http = ns.http[4]
    script = (f"{curl} -sS -o {tmp_path / 'curl.out'} {http.url('/1m.bin')} && "
              f"{static_client} 127.0.0.1 {http.address[1]} 1m.bin")
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, ["sh", "-c", script], mode="both")
    assert rc == 0, err
    assert body(out) == ns.payload and (tmp_path / "curl.out").read_bytes() == ns.payload
    assert len(conv.seen) == 2 and all(s.syn_data for s in conv.seen)


def test_getpeername_names_the_destination(ns):
    """As under libpep.so, a steered socket's getpeername() is the destination
    (v4-mapped on an AF_INET6 socket); other sockets' are untouched."""
    code = textwrap.dedent("""
        import socket, sys
        port = int(sys.argv[1])
        s4 = socket.create_connection(("127.0.0.1", port), timeout=10)
        s6 = socket.socket(socket.AF_INET6)
        s6.settimeout(10)
        s6.connect(("::ffff:127.0.0.1", port))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.connect(("127.0.0.1", 9))
        for s in (s4, s6):
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        print(s4.getpeername(), s6.getpeername()[:2], u.getpeername(), s4.getsockname()[0])
    """)
    with ns.enter():
        echo = EchoServer()
    with echo, converter_in(ns) as conv:
        p = subprocess.run(ns.cmd(*pep_run_argv("--pep", conv.env_value, "--mode", "seccomp", "--",
                                                sys.executable, "-c", code, str(echo.address[1]))),
                           env=base_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    port = echo.address[1]
    assert p.stdout.strip() == (f"('127.0.0.1', {port}) ('::ffff:127.0.0.1', {port}) "
                                f"('127.0.0.1', 9) 127.0.0.1")
    assert len(conv.seen) == 2


@pytest.mark.parametrize("wrap", ["timeout", "sh"])
def test_wrapper_naming_a_static_program_gets_the_supervisor(ns, static_client, wrap):
    """auto: `timeout 30 STATIC ...` and `sh -c 'STATIC ...'` are dynamic
    programs whose command line names a static one: both paths, and the
    static client's connection goes through the PEP."""
    http = ns.http[4]
    args = [static_client, "127.0.0.1", str(http.address[1]), "1m.bin"]
    argv = ["timeout", "30", *args] if wrap == "timeout" else ["sh", "-c", " ".join(args)]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, argv)
    assert rc == 0, err
    assert body(out) == ns.payload
    assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_named_program_heuristic():
    path = os.environ["PATH"]
    assert run.named_program_libpep_cannot_serve(["-c", "echo hi | cat"], path, "/l", "") == ""
    assert run.named_program_libpep_cannot_serve(["x=1", "--flag", "-"], path, "/l", "") == ""


def test_what_the_supervisor_passes_through(ns, tmp_path):
    """UDP, unix sockets, a second connect on a connected socket, a socket
    bound to a device, a bad pointer and a bypassed destination get the
    kernel's own answers; only the TCP connect goes to the PEP."""
    code = textwrap.dedent(f"""
        import ctypes, errno, socket, sys
        out = []
        echo_port, closed_port = int(sys.argv[1]), int(sys.argv[2])
        # UDP: connect and send to a receiver in this process
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tx.connect(rx.getsockname())
        tx.send(b"udp"); out.append(rx.recv(10).decode())
        out.append(tx.getpeername() == rx.getsockname())
        # unix
        u = socket.socket(socket.AF_UNIX); u.bind({str(tmp_path / "u.sock")!r}); u.listen()
        c = socket.socket(socket.AF_UNIX); c.connect({str(tmp_path / "u.sock")!r})
        out.append("unix")
        # TCP through the PEP; then connect again on it (libc's connect: Python
        # itself takes EISCONN for success)
        libc = ctypes.CDLL(None, use_errno=True)
        t = socket.create_connection(("127.0.0.1", echo_port), timeout=10)
        t.sendall(b"tcp"); out.append(t.recv(10).decode())
        sin = (socket.AF_INET).to_bytes(2, sys.byteorder) + echo_port.to_bytes(2, "big") \
            + socket.inet_aton("127.0.0.1") + bytes(8)
        for _ in range(2):   # after a non-blocking connect: 0 (now SS_CONNECTED), then EISCONN
            rc = libc.connect(t.fileno(), sin, 16)
            out.append(errno.errorcode[ctypes.get_errno()] if rc else "0")
        # a socket bound to a device (lo here): direct, the kernel's answer
        d = socket.socket()
        d.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        out.append(errno.errorcode.get(d.connect_ex(("127.0.0.1", closed_port)), "0"))
        # a bad sockaddr pointer
        s = socket.socket()
        rc = libc.connect(s.fileno(), ctypes.c_void_p(8), 16)
        out.append(errno.errorcode[ctypes.get_errno()] if rc else "0")
        # a bypassed destination with nobody listening
        out.append(errno.errorcode[socket.socket().connect_ex(("127.0.0.2", closed_port))])
        print(*out)
    """)
    with ns.enter():
        echo = EchoServer()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        probe.close()
    argv = [sys.executable, "-c", code, str(echo.address[1]), str(closed)]
    with echo, converter_in(ns) as conv:
        p = subprocess.run(ns.cmd(*pep_run_argv("--pep", conv.env_value, "--mode", "seccomp", "--",
                                                *argv)),
                           env=base_env(PEP_NO_PROXY="127.0.0.2"), capture_output=True, text=True,
                           timeout=TIMEOUT)
        (tmp_path / "u.sock").unlink()
        plain = subprocess.run(ns.cmd(*argv), env=base_env(), capture_output=True, text=True,
                               timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["udp", "True", "unix", "tcp", "0", "EISCONN", "ECONNREFUSED",
                                "EFAULT", "ECONNREFUSED"]
    assert p.stdout == plain.stdout, plain.stderr
    assert [s.connect.port for s in conv.seen] == [echo.address[1]]


def test_failover_to_the_next_pep_address(topology, static_client, tmp_path):
    """The PEP is a name with two addresses, ::1 (sorted first, nothing
    listens) and 127.0.0.1 (the converter): the supervisor opens PEP
    connections with the Python client, which goes on to the next address.
    The name lives in /etc/netns/NS/hosts, which `ip netns exec` mounts over
    /etc/hosts for this namespace only."""
    host = topology.host("fo", tfo=3)
    payload = os.urandom(PAYLOAD_SIZE)
    (tmp_path / "1m.bin").write_bytes(payload)
    hosts_dir = f"/etc/netns/{host.name}"
    os.makedirs(hosts_dir)     # the namespace's name is ours alone
    try:
        with open(f"{hosts_dir}/hosts", "w") as f:
            f.write("::1 pep.test\n127.0.0.1 pep.test\n")
        with host.enter():
            http = HTTPServer(str(tmp_path), "127.0.0.1")
            conv = Converter(host="127.0.0.1")
        with http, conv:
            rc, out, err = _fetch_bytes(host, ("pep.test", conv.address[1]),
                                        [static_client, "127.0.0.1", str(http.address[1]),
                                         "1m.bin"])
    finally:
        shutil.rmtree(hosts_dir, ignore_errors=True)
        try:
            os.rmdir("/etc/netns")       # only if empty, i.e. we made it
        except OSError:
            pass
    assert rc == 0, err
    assert body(out) == payload
    assert len(conv.seen) == 1 and conv.seen[0].syn_data


def test_connections_past_the_limit_are_reset_with_a_log_line(ns):
    """RLIMIT_NOFILE 128 leaves the supervisor room for (128 - 64) // 6 = 10
    relays: of 14 connections held open at once, 10 work and 4 are reset."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("needs prlimit (util-linux)")
    code = textwrap.dedent("""
        import socket, sys
        port, ok, reset, socks = int(sys.argv[1]), 0, 0, []
        for _ in range(14):      # held open together; a reset may come as soon as connect()
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            except ConnectionResetError:
                reset += 1
        for s in socks:
            try:
                s.sendall(b"x")
                ok += s.recv(1) == b"x"
            except ConnectionResetError:
                reset += 1
        print(ok, reset)
    """)
    with ns.enter():
        echo = EchoServer()
    with echo, converter_in(ns) as conv:
        p = subprocess.run(ns.cmd(prlimit, "--nofile=128:128", *pep_run_argv(
            "--pep", conv.env_value, "--mode", "seccomp", "--", sys.executable, "-c", code,
            str(echo.address[1]))), env=base_env(), capture_output=True, text=True,
            timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["10", "4"]
    assert "more than 10 connections at once" in p.stderr


def test_many_connections_at_once(ns):
    """50 threads, each 200 kB up and back through an echo server at once."""
    with ns.enter():
        echo = EchoServer()
    with echo, converter_in(ns) as conv:
        p = subprocess.run(ns.cmd(*pep_run_argv("--pep", conv.env_value, "--mode", "seccomp", "--",
                                                sys.executable, "-c", ECHO_BOTH_WAYS,
                                                str(echo.address[1]), "50", "200000")),
                           env=base_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["50", "50"], p.stderr
    assert len(conv.seen) == 50 and all(s.syn_data for s in conv.seen)


@pytest.mark.parametrize("no_proxy", ["127.0.0.0/8", "localhost", "example.org,127.0.0.1:1-65535"])
def test_bypassed_destination_goes_direct(ns, static_client, no_proxy):
    """PEP_NO_PROXY as libpep.so reads it: addresses, ports, and `localhost`
    as loopback (the supervisor sees addresses, not names)."""
    http = ns.http[4]
    with converter_in(ns) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [static_client, "127.0.0.1",
                                                       str(http.address[1]), "1m.bin"],
                                    env=base_env(PEP_NO_PROXY=no_proxy))
    assert rc == 0, err
    assert body(out) == ns.payload and conv.seen == []


def test_pep_error_reaches_the_program_as_a_reset_and_a_log_line(ns, static_client):
    with converter_in(ns, error=(96, b"")) as conv:
        rc, out, err = _fetch_bytes(ns, conv.address, [static_client, "127.0.0.1", "9", "x"])
    assert rc == 1 and "run_client: read:" in err, err
    assert "127.0.0.1:9: the PEP said:" in err, err


def test_silent_pep_times_out_after_pep_reply_timeout(ns, static_client):
    """A PEP that accepts and never answers: the connection is reset after
    PEP_REPLY_TIMEOUT, with a log line; nothing waits forever."""
    with ns.enter():
        mute = socket.socket()
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
    with mute:
        t0 = time.monotonic()
        rc, out, err = _fetch_bytes(ns, mute.getsockname(), [static_client, "127.0.0.1", "9", "x"],
                                    env=base_env(PEP_REPLY_TIMEOUT="0.5"))
        took = time.monotonic() - t0
    assert rc == 1 and re.search(r"no RFC 8803 reply from the PEP at \S+ within 0\.5 s", err), err
    assert 0.4 < took < 10


def test_unreachable_pep_is_logged(ns, static_client):
    with ns.enter():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()
        s.close()
    rc, out, err = _fetch_bytes(ns, closed, [static_client, "127.0.0.1", "9", "x"])
    assert rc == 1 and re.search(r"127\.0\.0\.1:9: .*[Rr]efused", err), err


def test_forking_daemon_keeps_its_connections(ns, static_client, tmp_path):
    """Type=forking: pep run returns when the program's first process exits;
    the double-forked daemon still goes through the PEP, and the supervisor
    leaves once the daemon is gone."""
    http = ns.http[4]
    out = tmp_path / "daemon.out"
    mark = uuid.uuid4().hex
    with converter_in(ns) as conv:
        t0 = time.monotonic()
        rc, _, err = _fetch_bytes(ns, conv.address, [static_client, "-d", str(out), "127.0.0.1",
                                                     str(http.address[1]), "1m.bin"],
                                  env=base_env(PEP_TEST_MARK=mark))
        assert rc == 0 and time.monotonic() - t0 < 10, err
        deadline = time.monotonic() + 20
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists(), "the daemon never wrote its result"
        assert body(out.read_bytes()) == ns.payload
        assert len(conv.seen) == 1 and conv.seen[0].syn_data
    assert wait_gone(mark) == [], "the supervisor outlived the daemon"


def test_go_and_static_clients_across_client_pep_server_hosts(topology, static_client, go_client,
                                                             tmp_path):
    """Three namespaces; the client has no route to the server, so only the
    PEP (pep relay on the middle host) can reach it."""
    client = topology.host("cli", tfo=3)
    pep = topology.host("pep", forwarding=False, tfo=3)
    server = topology.host("srv", tfo=3)
    topology.link(client, ["192.0.2.2/24"], pep, ["192.0.2.1/24"])
    topology.link(pep, ["198.51.100.1/24"], server, ["198.51.100.2/24"])
    payload = os.urandom(PAYLOAD_SIZE)
    (tmp_path / "1m.bin").write_bytes(payload)
    with server.enter():
        http = HTTPServer(str(tmp_path), "198.51.100.2")
    relay = Relay("--listen", "192.0.2.1:0", prefix=pep.cmd())
    try:
        env = base_env(PEP_NO_PROXY="127.0.0.0/8")
        rc, out, err = _fetch_bytes(client, relay.addr, [static_client, "-n", "198.51.100.2",
                                                         str(http.address[1]), "1m.bin"], env)
        assert rc == 0, err
        assert body(out) == payload
        rc, out, err = _fetch_bytes(client, relay.addr, [go_client, http.url("/1m.bin")], env)
        assert rc == 0, err
        assert out == payload
        direct = subprocess.run(client.cmd(static_client, "198.51.100.2", str(http.address[1]),
                                           "1m.bin"), capture_output=True, timeout=TIMEOUT)
        assert direct.returncode == 1     # no route: only the PEP reaches the server
    finally:
        relay.stop()
        http.close()


def test_refuses_a_value_off_the_grammar():
    """Any PEP_* value the clients would refuse (docs/protocol.md "Environment
    values"): pep run says which in one line and does not start the program."""
    for bad in ({"PEP_FALLBACK": "FAIL"}, {"PEP_REPLY_TIMEOUT": "1e3"},
                {"PEP_COOKIE": " aabb"}):
        rc, out, err = finish(popen(pep_run_argv("--pep", "192.0.2.1:9", "--", "sh", "-c",
                                                 "echo ran"), env=base_env(**bad)))
        assert rc == 2 and out == "", err
        # the variable is named; a cookie's value is a secret and is not shown
        name = list(bad)[0]
        assert re.match(rf"pep run: {name}[= ]", err) and err.count("\n") == 1, err
