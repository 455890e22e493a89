"""What the delay-line benchmarks (bench_ttfb.py, bench_tls_handshake.py) share:
their options, the environment of their subprocesses, and the run itself: the
evaluation testbed (pepsock/testbed/topology.py) with a server (the script's own
--serve) in the server namespace and `pep relay` in the PEP namespace, both
stopped however the run ends.

Each script is its own driver, server and client: run() starts this file's
testbed and the script again with --serve / --client in the namespaces.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import select
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def answer_one_request(conn, answer: bytes, timeout: float) -> None:
    """The benchmarks' HTTP server, one connection: read the request's head,
    send `answer`, close; a client that leaves early is no error."""
    with conn:
        conn.settimeout(timeout)
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            conn.sendall(answer)
        except OSError:
            pass


def parser(description: str, r1: float = 40.0, r2: float = 80.0) -> argparse.ArgumentParser:
    """--reps/--r1/--r2, and the hidden options of the --serve/--client roles."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--r1", type=float, default=r1, help="client-PEP RTT, ms")
    ap.add_argument("--r2", type=float, default=r2, help="PEP-server RTT, ms")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--pep", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    return ap


def dispatch(args, serve, client, run) -> int:
    """One script, three roles: --serve, --client, else the driver."""
    if args.serve:
        serve(args)
        return 0
    if args.client:
        client(args)
        return 0
    return run(args)


def env(extra=None) -> dict:
    """This checkout first on PYTHONPATH, plus `extra`."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra or {})
    return e


def libpep():
    """(path of libpep.so or None, why not)."""
    from pepsock.preload import library_path
    try:
        return library_path(), ""
    except Exception as exc:   # noqa: BLE001 - reported, the rows are skipped
        return None, str(exc)


def _wait_line(proc, text: str, what: str, timeout: float) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if text not in line:
        raise RuntimeError(f"{what} did not start: {line!r}")


@contextlib.contextmanager
def testbed(args, prefix: str, script: str, pep_port: int, serve_args=()):
    """The testbed at --r1/--r2 (50 Mbit/s wireless hop) with `script --serve
    *serve_args` running in the server namespace (it prints 'ready') and the
    relay listening on the PEP's address: yields (testbed, pep "host:port",
    a temporary directory)."""
    from pepsock.testbed.topology import ADDR, Settings, Testbed
    tmp = tempfile.mkdtemp(prefix=f"pepsock-{prefix}-")
    pep_addr = f"{ADDR['pep_w']}:{pep_port}"
    procs = []
    with Testbed(Settings(r1_ms=args.r1, r2_ms=args.r2, wireless_mbit=50.0), prefix=prefix) as tb:
        relay_log = open(os.path.join(tmp, "relay.log"), "w")
        try:
            srv = tb.server.popen(sys.executable, script, "--serve", *serve_args,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env())
            procs.append(srv)
            relay = tb.pep.popen(sys.executable, "-m", "pepsock.cli", "relay", "--listen",
                                 pep_addr, stdout=subprocess.PIPE, stderr=relay_log, text=True,
                                 env=env())
            procs.append(relay)
            _wait_line(srv, "ready", "server", 10)
            _wait_line(relay, "listening on", "relay", 30)   # its logs go to relay.log
            yield tb, pep_addr, tmp
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            relay_log.close()
