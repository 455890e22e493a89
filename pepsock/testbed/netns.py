"""Network namespaces as test hosts, joined by veth links.

A `Host` is one named namespace; `link()` joins two of them with a veth pair
and addresses both ends.  Everything created is registered so `cleanup()`
(or leaving the `Topology` context) removes it even after an error or Ctrl-C.
Needs root; `have_netns()` tells callers (and tests) whether that is so.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field


def have_netns() -> tuple[bool, str]:
    """(usable, reason): whether this process may create network namespaces."""
    if os.geteuid() != 0:
        return False, "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return False, "needs iproute2's `ip` command"
    return True, ""


def _run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def delete_namespace(name: str) -> None:
    """Kill whatever still runs inside a namespace, then drop it (and its veths)."""
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "del", name], check=False)


@dataclass
class Host:
    """One network namespace."""

    name: str
    addresses: list[str] = field(default_factory=list)

    def cmd(self, *argv: str) -> list[str]:
        """argv prefixed so it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return _run(self.cmd(*argv), check=check, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kw)

    def sysctl(self, key: str, value) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def enter(self):
        """Context manager: move the calling thread into this namespace (setns)."""
        return _Entered(self.name)


CLONE_NEWNET = 0x40000000
_libc = None


def _setns(fd: int) -> None:
    """setns(2) for a network namespace (os.setns only exists from Python 3.12)."""
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Entered:
    """setns() the current thread into a namespace and back; for in-process sockets."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
        except BaseException:
            os.close(home)   # __exit__ will not run: do not leak the descriptor
            raise
        self._home = home
        return self

    def __exit__(self, *exc):
        try:
            _setns(self._home)
        finally:
            os.close(self._home)


class Topology:
    """A set of hosts and links that is torn down as a whole.

    `prefix` keeps concurrent users apart: every namespace name starts with it
    and a short random tag, so two test runs never collide.
    """

    _ifcount = itertools.count()

    def __init__(self, prefix: str = "pep"):
        self.tag = f"{prefix}{uuid.uuid4().hex[:6]}"
        self.hosts: dict[str, Host] = {}

    def host(self, role: str, *, forwarding: bool = False, tfo: int | None = 3) -> Host:
        name = f"{self.tag}-{role}"
        _run(["ip", "netns", "add", name])
        h = Host(name)
        self.hosts[role] = h
        h.run("ip", "link", "set", "lo", "up")
        if forwarding:
            h.sysctl("net.ipv4.ip_forward", 1)
            h.sysctl("net.ipv6.conf.all.forwarding", 1)
        if tfo is not None:
            h.sysctl("net.ipv4.tcp_fastopen", tfo)
        return h

    def link(self, a: Host, a_addrs: list[str], b: Host, b_addrs: list[str],
             *, offloads: bool = True) -> tuple[str, str]:
        """veth between a and b; addresses in CIDR form ("192.0.2.1/24").
        Returns the interface names (in a, in b)."""
        n = next(self._ifcount)
        ia, ib = f"v{n}a{os.getpid() % 10000}", f"v{n}b{os.getpid() % 10000}"
        _run(["ip", "link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib,
              "netns", b.name])
        for host, ifname, addrs in ((a, ia, a_addrs), (b, ib, b_addrs)):
            for addr in addrs:
                args = ["ip", "addr", "add", addr, "dev", ifname]
                if ":" in addr:
                    args.append("nodad")
                host.run(*args)
                host.addresses.append(addr.split("/")[0])
            host.run("ip", "link", "set", ifname, "up")
            if not offloads and shutil.which("ethtool"):
                host.run("ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
                         check=False)
        return ia, ib

    def route(self, host: Host, dest: str, via: str) -> None:
        host.run("ip", "-6" if ":" in dest else "-4", "route", "add", dest, "via", via)

    def cleanup(self) -> None:
        for h in self.hosts.values():
            delete_namespace(h.name)
        self.hosts.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
