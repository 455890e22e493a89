"""Helpers for the libpep.so tests: build the library, its environment, C test programs.

The test converter and servers live in converter.py (shared by every suite).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import threading

from converter import (  # noqa: F401  (re-exported: the suites import them from here)
    Converter, EchoServer, HTTPServer, Seen, pump_both, url_host)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = os.path.join(REPO, "preload")

_build_lock = threading.Lock()


def build(target: str = "libpep.so") -> str:
    """make -C preload <target> (once per process); the absolute path of the result."""
    with _build_lock:
        built = build.__dict__.setdefault("done", {})
        if target not in built:
            proc = subprocess.run(["make", "-s", "-C", PRELOAD, target], capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"make {target} failed:\n{proc.stdout}\n{proc.stderr}")
            built[target] = os.path.join(PRELOAD, target)
        return built[target]


def asan_runtime() -> str:
    """Path of libasan for LD_PRELOAD in front of an ASan-built library."""
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    return os.path.realpath(out)


def preload_env(pep=None, lib: str | None = None, no_proxy: str | None = "", log: str | None = None,
                **extra) -> dict:
    """Environment for a program under libpep.so with PEP_PROXY=pep.

    no_proxy="" (the default here) bypasses nothing, so loopback goes via the PEP.
    PEP_STATE_DIR is a fresh directory of the test's own unless given (hold-downs
    and cookies learned in one test must not leak into another).
    """
    env = dict(os.environ)
    for k in ("PEP_PROXY", "PEP_NO_PROXY", "PEP_LOG", "PEP_DISABLE", "http_proxy", "https_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "PEP_STATE_DIR",
              "PEP_FALLBACK", "PEP_CONNECT_TIMEOUT", "PEP_REPLY_TIMEOUT", "PEP_CONFIRM",
              "PEP_COOKIE", "PEP_TFO_MODE", "PEP_SYN_WRITE"):
        env.pop(k, None)
    env["PEP_STATE_DIR"] = tempfile.mkdtemp(prefix="pepstate-")
    env["LD_PRELOAD"] = lib or build()
    if pep is not None:
        host, port = pep[0], pep[1]
        env["PEP_PROXY"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if no_proxy is not None:
        env["PEP_NO_PROXY"] = no_proxy
    if log is not None:
        env["PEP_LOG"] = log
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_payload(directory: str, name: str = "1m.bin", size: int = 1 << 20) -> bytes:
    data = os.urandom(size)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    return data


def compile_c(src: str, out: str, *flags: str) -> str:
    """Compile a small C test program; returns the binary path."""
    c = out + ".c"
    with open(c, "w") as f:
        f.write(src)
    proc = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", out, c, *flags, "-lpthread"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"gcc failed:\n{proc.stderr}")
    return out


# -- the client/router/PEP namespaces of the failover suites -----------------------------

def client_router_pep(topo, pep_addrs: list[str]):
    """cli 192.0.2.1 -- 192.0.2.254 rt 198.51.100.254 -- pep (pep_addrs, each
    /24 in 198.51.100.0/24), routed both ways through rt (forwarding); TFO
    fully on in all three. Returns (cli, rt, pep)."""
    cli = topo.host("cli", tfo=3)
    rt = topo.host("rt", forwarding=True, tfo=3)
    pep = topo.host("pep", tfo=3)
    topo.link(cli, ["192.0.2.1/24"], rt, ["192.0.2.254/24"])
    topo.link(rt, ["198.51.100.254/24"], pep, [f"{a}/24" for a in pep_addrs])
    topo.route(cli, "198.51.100.0/24", "192.0.2.254")
    topo.route(pep, "192.0.2.0/24", "198.51.100.254")
    return cli, rt, pep


def forward_rules(rt):
    """For a fixture: yields add(*rule), which inserts an iptables FORWARD rule
    in the router namespace rt; the chain is flushed after."""
    def add(*rule):
        rt.run("iptables", "-w", "5", "-I", "FORWARD", *rule)

    yield add
    rt.run("iptables", "-w", "5", "-F", "FORWARD", check=False)


def run(ns, argv, env, timeout=30, **kw):
    """argv in namespace ns; the preload applies to argv only, not to `ip netns exec`."""
    ours = {k: env[k] for k in env if k == "LD_PRELOAD" or k.startswith("PEP_")}
    rest = {k: v for k, v in env.items() if k not in ours}
    argv = ["env", *(f"{k}={v}" for k, v in ours.items()), *argv]
    return ns.run(*argv, check=False, env=rest, timeout=timeout, **kw)


def pyrun(ns, code, env, timeout=30):
    """Python code (dedented) in namespace ns under the preload of env."""
    return run(ns, [sys.executable, "-c", textwrap.dedent(code)], env, timeout)
