"""Process-level behaviour: drain on SIGTERM/SIGINT, --workers, --stats,
python -m entry point."""
import os
import re
import signal
import socket
import time

import pytest

from relay_helpers import (
    Relay, Server, convert_open, echo, read_reply, recv_all, recv_exact,
)

pytestmark = pytest.mark.timeout(60)

ALLOW_LO = ("--allow-dest", "127.0.0.0/8")


def _echo_roundtrip(s, data: bytes, rest: bytes = b"") -> bytes:
    s.sendall(data)
    return recv_exact(s, len(data), rest)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_lets_open_tunnels_finish_and_refuses_new_ones(sig):
    with Server(echo) as srv:
        r = Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--drain-timeout", "20")
        try:
            s = convert_open(r.addr, srv.addr)
            _, rest = read_reply(s)
            r.signal(sig)
            r.wait_log("draining 1 tunnels")
            # New clients are refused: the listener is gone.
            with pytest.raises(OSError):
                c = socket.create_connection(r.addr, timeout=2)
                c.sendall(b"x")
                if not c.recv(1):
                    raise ConnectionResetError
            # The open tunnel still works both ways, then ends normally.
            assert _echo_roundtrip(s, b"still here", rest) == b"still here"
            assert r.proc.poll() is None
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b""
            s.close()
            assert r.proc.wait(timeout=10) == 0
        finally:
            r.kill()
    assert "outcome=ok" in r.log


def test_drain_timeout_resets_what_is_left():
    with Server(echo) as srv:
        r = Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--drain-timeout", "0.5")
        try:
            s = convert_open(r.addr, srv.addr)
            read_reply(s)
            t0 = time.monotonic()
            r.signal(signal.SIGTERM)
            s.settimeout(10)
            with pytest.raises(ConnectionResetError):
                s.recv(10)
            assert 0.3 < time.monotonic() - t0 < 5
            assert r.proc.wait(timeout=10) == 0
        finally:
            r.kill()
    assert "drain timeout" in r.log


def test_workers_share_one_port_and_stats_sum_them():
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--workers", "2",
                                    "--stats", "127.0.0.1:0") as r:
        n = 40
        for i in range(n):
            s = convert_open(r.addr, srv.addr, early=b"%d" % i)
            _, rest = read_reply(s)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, rest) == b"%d" % i
            s.close()
        r.wait_log("outcome=ok")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m = r.metrics()
            if m["pep_relay_tunnels_established_total"] >= n:
                break
            time.sleep(0.2)
        assert m["pep_relay_workers"] == 2
        assert m["pep_relay_tunnels_established_total"] == n
        assert m['pep_relay_bytes_total{direction="up"}'] == sum(len(b"%d" % i)
                                                                for i in range(n))
        pids = set(re.findall(r"pep-relay\[(\d+)\] INFO tunnel", r.log))
        # SO_REUSEPORT spreads connections by 4-tuple hash: 40 land on both.
        assert len(pids) == 2, pids
        # Both workers are children of the process we started.
        assert str(r.proc.pid) not in pids
    assert r.proc.returncode == 0


def test_workers_drain_on_sigterm():
    with Server(echo) as srv:
        r = Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--workers", "2",
                  "--drain-timeout", "20")
        try:
            s = convert_open(r.addr, srv.addr)
            _, rest = read_reply(s)
            r.signal(signal.SIGTERM)
            r.wait_log("draining 1 tunnels")
            assert _echo_roundtrip(s, b"abc", rest) == b"abc"
            s.close()
            assert r.proc.wait(timeout=15) == 0
        finally:
            r.kill()


def test_stats_endpoint_prometheus_text():
    import urllib.request
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO,
                                    "--stats", "127.0.0.1:0") as r:
        s = convert_open(r.addr, srv.addr, early=b"hello")
        _, rest = read_reply(s)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, rest) == b"hello"
        s.close()
        r.wait_log("outcome=ok")
        host, port = r.stats
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    assert "# TYPE pep_relay_tunnels_open gauge" in text
    assert "# TYPE pep_relay_setup_seconds histogram" in text
    m = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
         for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert m["pep_relay_tunnels_total"] == 1
    assert m["pep_relay_tunnels_open"] == 0
    assert m['pep_relay_bytes_total{direction="up"}'] == 5
    assert m['pep_relay_bytes_total{direction="down"}'] == 5
    assert m["pep_relay_setup_seconds_count"] == 1
    assert m['pep_relay_setup_seconds_bucket{le="+Inf"}'] == 1
    assert 0 < m["pep_relay_setup_seconds_sum"] < 5


def test_main_function_is_importable():
    from pepsock.relay.cli import build_parser, main, parse_config
    assert callable(main)
    cfg = parse_config(["--listen", "127.0.0.1:0", "--listen", "[::1]:1080",
                        "--client-rcvbuf", "4m", "--allow-dest", "10.0.0.0/8:443",
                        "--deny-dest", "10.1.0.0/16"])
    assert cfg.listen == [("127.0.0.1", 0), ("::1", 1080)]
    assert cfg.client.rcvbuf == 4 << 20
    assert [a for a, _ in cfg.dest_rules] == [True, False]
    assert "--drain-timeout" in build_parser().format_help()


def test_raises_nofile_limit():
    with Relay("--listen", "127.0.0.1:0", "--max-tunnels", "5000") as r:
        with open(f"/proc/{r.proc.pid}/limits") as f:
            line = [ln for ln in f if ln.startswith("Max open files")][0]
        soft = int(line.split()[3])
        assert soft >= min(5000 * 2, _hard_limit())


def _hard_limit():
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_out_of_fds_for_pipes_falls_back_to_copying():
    """With no fd left for a pipe, a tunnel copies through user space instead
    of waiting: every byte still arrives, both ways, and the half-close too."""
    import shutil
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    args = ("--listen", "127.0.0.1:0", *ALLOW_LO, "--stats", "127.0.0.1:0", "--pipe-pool", "0")
    with Relay(*args) as probe:
        base = len(os.listdir(f"/proc/{probe.proc.pid}/fd"))
    limit = base + 2           # room for one tunnel's two sockets, none for a pipe
    data = os.urandom(1 << 20)
    with Server(echo) as srv, Relay(*args, prefix=["prlimit", f"--nofile={limit}:{limit}"]) as r:
        s = convert_open(r.addr, srv.addr, early=b"early")
        _, rest = read_reply(s)
        import threading
        t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        t.start()
        got = recv_all(s, rest)
        t.join(10)
        s.close()
        r.wait_log("outcome=ok")
        m = r.metrics()
    assert got == b"early" + data
    assert m["pep_relay_pipes"] == 0
    assert m['pep_relay_bytes_total{direction="up"}'] == len(data) + 5


def test_accept_out_of_fds_does_not_spin_and_recovers():
    import shutil
    from test_relay_tunnel import _cpu
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    args = ("--listen", "127.0.0.1:0", *ALLOW_LO, "--header-timeout", "1")
    with Relay(*args) as probe:
        base = len(os.listdir(f"/proc/{probe.proc.pid}/fd"))
    limit = base + 2
    with Server(echo) as srv, Relay(*args, prefix=["prlimit", f"--nofile={limit}:{limit}"]) as r:
        # Silent clients: each holds an fd in the relay until its header timeout.
        idle = [socket.create_connection(r.addr, timeout=5) for _ in range(8)]
        time.sleep(0.3)
        cpu0 = _cpu(r.proc.pid)
        time.sleep(0.5)
        cpu1 = _cpu(r.proc.pid)
        assert cpu1 - cpu0 < 0.15, "relay spins on EMFILE"
        for s in idle:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            s = convert_open(r.addr, srv.addr, early=b"back", timeout=2)
            try:
                msg, rest = read_reply(s, 2)
                if msg.error is None:
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s, rest) == b"back"
                    break
            except OSError:
                pass
            finally:
                s.close()
            assert time.monotonic() < deadline, "relay never recovered"
            time.sleep(0.2)
        assert "pausing the listener" in r.log


def test_loop_skips_stale_events_of_a_reused_fd():
    """An fd closed while handling one event of a batch can be reused at once
    (accept(), socket()); the batch's event for the old socket must not reach
    the new owner (it once turned a fresh tunnel's connect into a reset)."""
    import select
    from pepsock.relay.config import Config
    from pepsock.relay.server import Loop
    loop = Loop(Config())
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls = []
    kept = []

    def on_c(ev):
        calls.append("c")
        c.recv(1)
        fd = a.fileno()
        loop.forget(fd)
        a.close()
        new, other = socket.socketpair()   # quiet: no events of its own
        kept.extend((new, other))
        assert new.fileno() == fd          # lowest free number: reused
        loop.register(fd, lambda ev: calls.append("new"), select.EPOLLIN)

    loop.register(c.fileno(), on_c, select.EPOLLIN)
    loop.register(a.fileno(), lambda ev: calls.append("a"), select.EPOLLIN)
    d.send(b"x")        # c ready first, then a: one batch, in that order
    b.send(b"x")
    loop.call_later(0.2, lambda: setattr(loop, "running", False))
    loop.run()
    loop.close()
    for s in (b, c, d, *kept):
        s.close()
    assert calls == ["c"]


def test_workers_ctrl_c_to_the_process_group_drains():
    """Ctrl-C hits master and workers at once: still one graceful drain."""
    with Server(echo) as srv:
        r = Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--workers", "2",
                  "--drain-timeout", "20", new_session=True)
        try:
            s = convert_open(r.addr, srv.addr)
            _, rest = read_reply(s)
            os.killpg(r.proc.pid, signal.SIGINT)
            r.wait_log("draining 1 tunnels")
            time.sleep(0.3)
            assert _echo_roundtrip(s, b"after ^C", rest) == b"after ^C"
            s.close()
            assert r.proc.wait(timeout=15) == 0
        finally:
            r.kill()
    assert "second signal" not in r.log
    assert "outcome=ok" in r.log


def test_workers_exit_when_the_master_is_killed():
    with Server(echo) as srv:
        r = Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--workers", "2")
        try:
            with open(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children") as f:
                kids = [int(p) for p in f.read().split()]
            assert len(kids) == 2
            r.proc.kill()
            r.proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_running(k) for k in kids):
                time.sleep(0.05)
            assert not any(_running(k) for k in kids), "workers outlived their master"
            # The port is free for a new relay.
            with Relay("--listen", f"127.0.0.1:{r.addr[1]}", *ALLOW_LO) as r2:
                s = convert_open(r2.addr, srv.addr)
                assert read_reply(s)[0].error is None
                s.close()
        finally:
            r.kill()
            for k in kids:
                if _running(k):
                    os.kill(k, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_log_file_and_levels(tmp_path):
    logf = tmp_path / "relay.log"
    with Server(echo) as srv:
        with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--log-file", str(logf)) as r:
            s = convert_open(r.addr, srv.addr, early=b"x")
            _, rest = read_reply(s)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, rest) == b"x"
            s.close()
            deadline = time.monotonic() + 5
            while "outcome=ok" not in logf.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "outcome=ok" in logf.read_text()
        assert "outcome=ok" not in r.log          # not on stderr
        with Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--log-level", "warning") as r:
            s = convert_open(r.addr, srv.addr, early=b"y")
            _, rest = read_reply(s)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, rest) == b"y"
            s.close()
            time.sleep(0.3)
        assert "INFO tunnel" not in r.log
