"""Hostile input from the PEP's side (issue 6): a PEP (or something posing as
one) answers a program under libpep.so with garbage, truncated, oversized or
Length-0 replies, resets or silence.  The program gets data when the reply is
valid, otherwise a clear errno, within its own timeout; never a hang, never a
crash; the ASan + UBSan build of libpep.so reports nothing.

Each case runs a C probe (tests/reliability_probe_client.c) with a blocking
and with a non-blocking socket, against a scripted PEP in a namespace.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from conftest import require_root
from pepsock import protocol
from pepsock.testbed.netns import Topology

pytestmark = [pytest.mark.timeout(120), pytest.mark.root]

OK = protocol.success_reply()
HDR = bytes((1, 1, 0x22, 0x63))


def _send(data, then="fin", split=0):
    def act(conn):
        if split:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(data), split):
                conn.sendall(data[i:i + split])
                time.sleep(0.01)
        else:
            conn.sendall(data)
        if then == "rst":
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        elif then == "hold":
            time.sleep(5)
        else:  # a clean FIN: read what the client sent so close() does not reset
            conn.shutdown(socket.SHUT_WR)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
    return act


CASES = {
    # name: (PEP behaviour, expected probe outcome prefix)
    "valid": (_send(OK + b"DATA"), "ok DATA"),
    "valid_split_1_byte": (_send(OK + b"DATA", split=1), "ok DATA"),
    "valid_with_extra_tlvs": (_send(protocol.success_reply([
        protocol.ExtendedTCPHeader(b"\0" * 18), protocol.SupportedTCPExtensions((2, 4, 8)),
        protocol.UnknownTLV(0x77, b"\0\0zz")]) + b"DATA"), "ok DATA"),
    "valid_max_size_reply": (_send(bytes((1, 255, 0x22, 0x63, 0x14, 254)) + bytes(1014)
                                   + b"DATA"), "ok DATA"),
    "garbage_http": (_send(b"HTTP/1.1 200 OK\r\n\r\n"), "err EPROTO"),
    "garbage_64k": (_send(bytes((2,)) + os.urandom(65535)), "err EPROTO"),
    "version_2": (_send(bytes((2, 1, 0x22, 0x63)) + b"DATA"), "err EPROTO"),
    "total_length_0": (_send(bytes((1, 0, 0x22, 0x63))), "err EPROTO"),
    "bad_magic": (_send(bytes((1, 1, 0x63, 0x22)) + b"DATA"), "err EPROTO"),
    "length0_tlv": (_send(bytes((1, 2, 0x22, 0x63, 0x14, 0, 0, 0)) + b"DATA"), "err EPROTO"),
    "length0_tlv_hold": (_send(bytes((1, 2, 0x22, 0x63, 0x14, 0, 0, 0)), then="hold"),
                         "err EPROTO"),
    "tlv_past_end": (_send(bytes((1, 2, 0x22, 0x63, 0x14, 2, 0, 0))), "err EPROTO"),
    "duplicate_tlv": (_send(bytes((1, 3, 0x22, 0x63, 0x14, 1, 0, 0, 0x14, 1, 0, 0))),
                      "err EPROTO"),
    "truncated_then_fin": (_send(bytes((1, 6, 0x22, 0x63, 0x14, 5)) + bytes(6)), "err ECONNRESET"),
    "truncated_then_silence": (_send(bytes((1, 6, 0x22, 0x63)), then="hold"), "err "),
    "silence": (_send(b"", then="hold"), "err "),
    "reset_at_once": (_send(b"", then="rst"), "err ECONNRESET"),
    "fin_at_once": (_send(b""), "err ECONNRESET"),
    "error_96": (_send(protocol.error_reply(96)), "err ECONNREFUSED"),
    "error_96_then_rst": (_send(protocol.error_reply(96), then="rst"), "err ECONNREFUSED"),
    "error_97_no_icmp": (_send(bytes((1, 2, 0x22, 0x63, 0x1E, 1, 97, 0))), "err ENETUNREACH"),
    "error_unknown_code": (_send(protocol.error_reply(200, b"xyz")), "err EPROTO"),
    "error_max_size": (_send(bytes((1, 255, 0x22, 0x63, 0x1E, 254, 32)) + bytes(1013)),
                       "err EACCES"),
    # Error 64 is about the PEP: with no other PEP and PEP_FALLBACK=fail (set
    # for libpep.so below) the connection is refused (the shared rule)
    "error_after_valid_tlv": (_send(protocol.Message((
        protocol.Cookie(b"c"), protocol.Error(64))).encode()), "err ENOBUFS"),
}
C_EXPECTED = {"error_after_valid_tlv": "err ECONNREFUSED"}


class ScriptedPEP:
    """Reads the client's Convert request, then does `act(conn)`."""

    def __init__(self, act, host="127.0.0.1"):
        self.act = act
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, 23, 64)   # TCP_FASTOPEN
        self.sock.setsockopt(socket.IPPROTO_TCP, 34, 1)    # TCP_FASTOPEN_NO_COOKIE
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.addr = self.sock.getsockname()
        self.requests = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        conn.settimeout(6)
        try:
            reader = protocol.MessageReader()
            while not reader.done:
                chunk = conn.recv(2048)
                if not chunk:
                    return
                reader.feed(chunk)
            self.requests.append(reader.message)
            self.act(conn)
        except (OSError, protocol.ProtocolError):
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_root()
    from preload_helpers import asan_runtime, build, compile_c
    out = tmp_path_factory.mktemp("probe")
    src = open(os.path.join(os.path.dirname(__file__), "reliability_probe_client.c")).read()
    probe = compile_c(src, str(out / "probe"))
    libs = {"plain": build("libpep.so")}
    try:
        libs["asan"] = f"{asan_runtime()} {build('libpep-asan.so')}"
    except Exception as exc:  # noqa: BLE001
        libs["asan"] = None
        print(f"no ASan build: {exc}")
    topo = Topology(prefix="rb")
    try:
        host = topo.host("hp", tfo=3)
        yield host, probe, libs
    finally:
        topo.cleanup()


@pytest.mark.parametrize("mode", ["block", "nonblock"])
@pytest.mark.parametrize("build", ["plain", "asan"])
def test_hostile_pep_replies(lab, build, mode):
    host, probe, libs = lab
    if libs[build] is None:
        pytest.skip("libpep-asan.so did not build")
    from preload_helpers import preload_env
    failures = []
    for name, (act, expected) in CASES.items():
        with host.enter():
            pep = ScriptedPEP(act)
        try:
            env = preload_env(pep=pep.addr, lib=libs[build], no_proxy="", PEP_FALLBACK="fail",
                              ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:"
                                           "halt_on_error=1:abort_on_error=0",
                              UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
            t0 = time.monotonic()
            p = subprocess.run(host.cmd(probe, "192.0.2.80", "80", mode), capture_output=True,
                               text=True, env=env, timeout=15)
            took = time.monotonic() - t0
        finally:
            pep.close()
        out = p.stdout.strip()
        expected = C_EXPECTED.get(name, expected)
        sanitizer = "Sanitizer" in p.stderr or "runtime error" in p.stderr
        if not out.startswith(expected) or sanitizer or took > 5 or not pep.requests:
            failures.append((name, out, took, p.returncode, p.stderr[-800:]))
    assert not failures, "\n".join(map(repr, failures))


_ERRNAMES = {getattr(__import__("errno"), n): n for n in (
    "EPROTO", "ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "ENOBUFS",
    "EOPNOTSUPP", "EAGAIN", "ETIMEDOUT", "EPIPE")}


def _python_probe(pep_addr) -> str:
    import pepsock
    try:
        s = pepsock.create_connection(("192.0.2.80", 80), timeout=3, pep=pep_addr)
        with s:
            s.sendall(b"hello")
            got = b""
            while True:
                chunk = s.recv(70000)
                if not chunk:
                    break
                got += chunk
        return "ok " + got[:64].decode("latin-1")
    except TimeoutError:
        return "err ETIMEDOUT"
    except OSError as exc:
        return f"err {_ERRNAMES.get(exc.errno, exc.errno)}"


async def _asyncio_probe(pep_addr) -> str:
    import asyncio
    import pepsock.aio
    try:
        reader, writer = await asyncio.wait_for(
            pepsock.aio.open_connection("192.0.2.80", 80, pep=pep_addr), 3)
        writer.write(b"hello")
        got = await asyncio.wait_for(reader.read(), 3)
        writer.close()
        return "ok " + got[:64].decode("latin-1")
    except asyncio.TimeoutError:
        return "err ETIMEDOUT"
    except OSError as exc:
        return f"err {_ERRNAMES.get(exc.errno, exc.errno)}"


#: The PEP closing before its reply is complete: ECONNRESET in both clients.
CLOSED_EARLY = ("truncated_then_fin", "fin_at_once")


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_hostile_pep_replies_python_client(lab, api):
    """The same scripted PEPs against pepsock.create_connection / open_connection."""
    import asyncio
    host, _, _ = lab
    failures = []
    for name, (act, expected) in CASES.items():
        with host.enter():
            pep = ScriptedPEP(act)
            t0 = time.monotonic()
            try:
                out = (_python_probe(pep.addr) if api == "sync"
                       else asyncio.run(_asyncio_probe(pep.addr)))
            finally:
                pep.close()
            took = time.monotonic() - t0
        if not out.startswith(expected) or took > 5:
            failures.append((name, out, round(took, 2)))
    assert not failures, "\n".join(map(repr, failures))


def test_pep_closing_before_reply_same_errno_in_both_clients(lab):
    host, probe, libs = lab
    from preload_helpers import preload_env
    for name in CLOSED_EARLY:
        with host.enter():
            pep = ScriptedPEP(CASES[name][0])
            try:
                py = _python_probe(pep.addr)
            finally:
                pep.close()
            pep = ScriptedPEP(CASES[name][0])
        try:
            c = subprocess.run(host.cmd(probe, "192.0.2.80", "80", "block"), capture_output=True,
                               text=True, timeout=15,
                               env=preload_env(pep=pep.addr, lib=libs["plain"], no_proxy="")
                               ).stdout.strip()
        finally:
            pep.close()
        assert py.split()[:2] == c.split()[:2], (name, py, c)
