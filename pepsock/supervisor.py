"""The seccomp supervisor of `pep run`: TCP connects of programs libpep.so
cannot enter (static, Go) go through the PEP.

Two halves in one process (docs/run.md has the picture):

* the **notification handler**: the program's connect() stops in the kernel
  (pepsock/seccomp.py's filter).  The handler reads the sockaddr from the
  program's memory, and for a destination PEP_PROXY/PEP_NO_PROXY send to the
  PEP, takes the program's own socket (pidfd_getfd: the same open file, so
  its flags, options and epoll registrations stay), connects it to the
  local helper on loopback, remembers helper-side peer -> destination, and
  answers the connect with what that connect returned (0, or EINPROGRESS
  for a non-blocking socket).  Everything else runs as if unwatched
  (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
* the **local helper**: accepts those connections and, in pool threads,
  opens the PEP connection with `pepsock.create_connection` (header in the
  SYN; PEP selection, failover and cookies are the client's) and relays
  both ways: through the client's socket methods until the PEP's reply is
  in, then splice(), one blocking thread a direction.

Notifications and accepts are handled in the main thread's poll() loop, so
a connect() waits only for the steps above, never for a PEP.

Lifetime: the supervisor is no child of the program (a double fork), so the
program never sees it in wait(); it runs until the kernel says no task uses
the filter any more (POLLHUP on the listener: the program and every process
it forked are gone) and its relays are done.  It ignores the terminal's and
systemd's stop signals: the program decides when it ends, and its children
(a daemon that double-forked) keep their connections.
"""
from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import ipaddress
import os
import resource
import select
import signal
import socket
import struct
import threading
import time

from . import route as _route
from . import seccomp, tfo
from .client import PepSocket, create_connection
from .policy import ConfigError, ProxyConfig, normalize_ip
from .protocol import ConvertError

#: struct tcp_info's tcpi_state values (include/net/tcp_states.h).
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_CLOSE = 1, 2, 7
SPLICE_F_MOVE = 1
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
CHUNK = 1 << 16
#: Proxied connections open at once (each holds two pool threads while open,
#: and FDS_PER_RELAY fds: fewer if RLIMIT_NOFILE's hard limit is low); past
#: it, new ones are reset, with one log line.
MAX_RELAYS = 1024
#: Steered connects whose caller a signal took away before the answer,
#: remembered for the call that restarts them (a program that never retries
#: leaves one behind; past this many the memory is dropped).
MAX_UNANSWERED = 4096
#: Destinations whose verdict (PEP or direct) is remembered at once.
MAX_DECISIONS = 4096
#: How long the PEP connection may take to open (the client's own per-PEP
#: timeouts apply inside this bound).
OPEN_TIMEOUT = 30.0
#: After the program is gone, relays get this long to drain before the supervisor quits.
DRAIN_TIMEOUT = 30.0
LEVELS = {"off": 0, "error": 1, "warn": 2, "info": 3, "debug": 4}


# ----------------------------------------------------------------------- logging

class Log:
    """PEP_LOG levels and file, as libpep.so reads them; the default goes to the
    program's stderr, held only while the program (pep run's pid) lives, so a
    reader of that pipe sees its end when the program ends."""

    def __init__(self, spec: str | None, stderr_fd: int | None):
        level, _, path = (spec or "error").partition(":")
        self.level = LEVELS.get(level.strip().lower(), 1)
        self.path = path or None
        self.fd = stderr_fd

    def drop_stderr(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __call__(self, level: str, text: str) -> None:
        if LEVELS[level] > self.level:
            return
        line = f"pep-supervisor[{os.getpid()}] {level}: {text}\n".encode(errors="replace")
        try:
            if self.path:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            elif self.fd is not None:
                os.write(self.fd, line)
        except OSError:
            pass


# ----------------------------------------------------------------------- addresses

def parse_sockaddr(raw: bytes, length: int):
    """(family, ip, port) of a sockaddr_in/sockaddr_in6, or None for anything else."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET and length >= 16 and len(raw) >= 8:
        port = struct.unpack_from("!H", raw, 2)[0]
        return family, ipaddress.IPv4Address(raw[4:8]), port
    if family == socket.AF_INET6 and length >= 28 and len(raw) >= 24:
        port = struct.unpack_from("!H", raw, 2)[0]
        return family, ipaddress.IPv6Address(raw[8:24]), port
    return None


def carriable(ip, port: int) -> bool:
    """Can a Connect TLV name it? (Same rule as libpep.so: not port 0,
    unspecified, multicast or limited broadcast.)"""
    ip = normalize_ip(ip)
    return bool(port) and not ip.is_unspecified and not ip.is_multicast \
        and ip != ipaddress.IPv4Address("255.255.255.255")


def _pep_addresses(config: ProxyConfig) -> set:
    """Every (ip, port) the configured PEP(s) resolve to: connects to them go direct."""
    peps = config.pep
    if peps is None:
        return set()
    if isinstance(peps, tuple) and len(peps) == 2 and isinstance(peps[1], int):
        peps = [peps]
    out = set()
    for host, port in peps:
        try:
            for info in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
                out.add((normalize_ip(info[4][0]), port))
        except OSError:
            pass
    return out


#: fds one relay holds: two sockets and a pipe (two fds) a direction.
FDS_PER_RELAY = 6


def _relays_that_fit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (the supervisor's own, not the
    program's); MAX_RELAYS, or fewer if their fds would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_RELAYS
    return max(1, min(MAX_RELAYS, (soft - 64) // FDS_PER_RELAY))


# ----------------------------------------------------------------------- relaying

class Relay:
    """One proxied connection: the program's loopback connection and the PEP's.

    Runs in pool threads on blocking sockets (ours, not the program's: its
    socket's flags are untouched): `serve` opens the PEP connection, starts
    the upstream half in another thread and pumps downstream itself.  Until
    the PEP's reply is in, bytes go through the client's own send()/recv():
    it strips the reply, turns an Error TLV into an exception, and may replay
    what was sent before it (failover, cookies).  After that, splice().
    """

    def __init__(self, sup: "Supervisor", conn: socket.socket, dest, key):
        self.sup = sup
        self.conn = conn
        self.dest = dest
        self.key = key              # the program's end (ip, port) of the loopback connection
        self.pep: socket.socket | None = None
        self.failed = False

    def serve(self) -> None:
        """In a pool thread: the relay's whole life; it always ends in relay_done()."""
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the relay counted
            self.sup.log("error", f"{_fmt(self.dest)}: internal error: {exc!r}")
            self._abort()
        finally:
            for sock in (self.conn, self.pep):
                if sock is not None:
                    # The client's socket: a plain close (its detach() would wait for the reply).
                    socket.socket.close(sock)
            self.sup.relay_done(self)

    def _serve(self) -> None:
        t0 = time.monotonic()
        try:
            ip, port = self.dest
            pep = self.pep = create_connection((str(ip), port), timeout=OPEN_TIMEOUT)
        except OSError as exc:
            self.sup.log("error", f"{_fmt(self.dest)}: {exc}")
            return self._abort()
        pep.settimeout(None)
        self.conn.settimeout(None)
        # Options the program sets after connect() land on its loopback leg;
        # this leg gets what a relay wants: no Nagle delay on bytes it
        # forwards as they come (Go sets TCP_NODELAY on every connection
        # anyway), and keepalive (kernel timers) so a vanished PEP ends it.
        pep.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pep.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self.sup.log.level >= LEVELS["debug"]:
            self.sup.log("debug", f"{_fmt(self.dest)}: via {getattr(pep, 'pep', 'direct')} "
                                  f"in {1000 * (time.monotonic() - t0):.1f} ms")
        try:
            upstream = self.sup.pool.submit(self._guard, self._upstream)
        except RuntimeError:            # the pool is shutting down: the program is gone
            return self._abort()
        self._guard(self._downstream)
        upstream.result()

    def _guard(self, half) -> None:
        try:
            half()
        except ConvertError as exc:
            self.sup.log("error", f"{_fmt(self.dest)}: the PEP said: {exc}")
            self._abort()
        except TimeoutError as exc:
            self.sup.log("error", f"{_fmt(self.dest)}: {exc}")
            self._abort()
        except OSError as exc:
            if not self.failed and not isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                self.sup.log("warn", f"{_fmt(self.dest)}: {exc}")
            self._abort()

    def _upstream(self) -> None:
        conn, pep = self.conn, self.pep
        while isinstance(pep, PepSocket) and not pep.reply_received:
            data = conn.recv(CHUNK)
            if not data:
                return self._eof(pep)
            pep.sendall(data)
        self._splice(conn, pep)

    def _downstream(self) -> None:
        conn, pep = self.conn, self.pep
        if isinstance(pep, PepSocket):
            # The reply, then the first bytes after it; within PEP_REPLY_TIMEOUT
            # (SO_RCVTIMEO: the socket stays blocking for the upstream thread).
            _set_rcvtimeo(pep, self.sup.reply_timeout)
            try:
                data = pep.recv(CHUNK)
            except BlockingIOError:
                if pep.reply_received:
                    data = None          # the reply came, the server is quiet: fine
                else:
                    raise TimeoutError(errno.ETIMEDOUT, f"no reply from the PEP within "
                                                        f"{self.sup.reply_timeout:g} s") from None
            _set_rcvtimeo(pep, 0)
            if data == b"":
                return self._eof(conn)
            if data:
                conn.sendall(data)
        self._splice(pep, conn)

    def _splice(self, src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        try:
            sfd, dfd = src.fileno(), dst.fileno()
            while True:
                n = os.splice(sfd, w, PIPE_SIZE, flags=SPLICE_F_MOVE)
                if not n:
                    return self._eof(dst)
                while n:
                    n -= os.splice(r, dfd, n, flags=SPLICE_F_MOVE)
        finally:
            os.close(r)
            os.close(w)

    def _eof(self, dst: socket.socket) -> None:
        if not self.failed:
            dst.shutdown(socket.SHUT_WR)

    def _abort(self) -> None:
        """Reset both sides (a reset, not a FIN: the program must not take a
        cut-short stream for a whole one).  The disconnect also wakes the other
        half out of its blocking call with ECONNRESET."""
        self.failed = True
        for sock in (self.conn, self.pep):
            if sock is not None:
                tfo.reset(sock)

    @staticmethod
    def reset(sock: socket.socket) -> None:
        """Close with an RST."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        socket.socket.close(sock)


def _set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _key(sockname) -> tuple[str, int]:
    """(ip text, port) of a loopback end as getsockname()/accept() give it;
    a v4-mapped address counts as the IPv4 address it carries."""
    ip = sockname[0]
    return (ip[7:] if ip.startswith("::ffff:") else ip), sockname[1]


def _fmt(dest) -> str:
    ip, port = dest
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# ----------------------------------------------------------------------- the supervisor

class Supervisor:
    """Built before the filter exists (so pep run can refuse if this fails);
    `run()` then takes the listener."""

    def __init__(self, program_pid: int, log: Log, env=None):
        self.listener = -1
        self.killable = True
        self.program_pid = program_pid
        self.log = log
        self.config = ProxyConfig.from_env(env)
        # the clients' grammar; a bad value is a ConfigError (pep run checked it already)
        self.reply_timeout = _route.parse_settings(env or os.environ).reply_timeout
        self.peps = _pep_addresses(self.config)
        self.handlers: dict[int, object] = {}  # fd -> what to call when it polls ready
        self.poller = select.poll()
        self.max_relays = _relays_that_fit()
        self.pool = concurrent.futures.ThreadPoolExecutor(2 * self.max_relays, "pep-relay")
        self.routes: dict[tuple, tuple] = {}   # helper-side peer (ip, port) -> destination
        self.peers: dict[tuple, tuple] = {}    # the same, for getpeername(), while relayed
        self.relays: set[Relay] = set()
        self.lock = threading.Lock()           # relays: pool threads remove themselves
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.helpers: dict[int, socket.socket] = {}
        self.helper_addr: dict[int, bytes] = {}
        self.watching = True
        self.said: set[str] = set()
        self.decisions: dict[tuple, bool] = {}  # (ip, port) -> goes to the PEP
        self.steered = None                    # the socket _steer() connected to the helper
        self.unanswered: set[tuple] = set()    # ...whose connect was interrupted before our answer
        self._open_helpers()

    # -- the local helper -------------------------------------------------------------
    def _open_helpers(self) -> None:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.bind(("127.0.0.1", 0))
        self.helpers[socket.AF_INET] = v4
        port4 = v4.getsockname()[1]
        self.helper_addr[socket.AF_INET] = _sockaddr_in(ipaddress.IPv4Address("127.0.0.1"), port4)
        v6 = None
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::1", 0))
            self.helpers[socket.AF_INET6] = v6
            self.helper_addr[socket.AF_INET6] = _sockaddr_in6(ipaddress.IPv6Address("::1"),
                                                              v6.getsockname()[1])
        except OSError:
            # No IPv6 loopback: dual-stack sockets reach the IPv4 helper v4-mapped.
            if v6 is not None:
                v6.close()
            self.helper_addr[socket.AF_INET6] = _sockaddr_in6(
                ipaddress.IPv6Address("::ffff:127.0.0.1"), port4)
        for family, sock in self.helpers.items():
            sock.listen(4096)
            _probe(sock, family)
            sock.setblocking(False)
            self._watch(sock.fileno(), lambda ev, sock=sock: self._accept(sock))

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, peer = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of fds or memory: the connection stays queued, and poll()
                # would wake us at once for it; give relays a moment to end.
                self._once("accept", f"accept: {exc}")
                time.sleep(0.05)
                return
            key = _key(peer)
            dest = self.routes.pop(key, None)
            if dest is None:
                conn.close()  # not a connection we steered here: nobody else uses our helper
                continue
            with self.lock:
                full = len(self.relays) >= self.max_relays
                if not full:
                    relay = Relay(self, conn, dest, key)
                    self.relays.add(relay)
            if full:
                self._once("full", f"more than {self.max_relays} connections at once: resetting "
                                   f"the newest")
                with self.lock:
                    self.peers.pop(key, None)
                Relay.reset(conn)
                continue
            self.pool.submit(relay.serve)

    def relay_done(self, relay: Relay) -> None:
        """From a pool thread: the relay is closed."""
        with self.lock:
            self.relays.discard(relay)
            self.peers.pop(relay.key, None)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    # -- notifications ----------------------------------------------------------------
    def _on_listener(self, revents: int) -> None:
        # Each RECV only after poll() says POLLIN: the ioctl would block.
        for _ in range(64):
            events = self.listener_poll.poll(0)
            revents = events[0][1] if events else 0
            if revents & select.POLLIN:
                note = seccomp.receive(self.listener)
                if note is not None:
                    self._handle(note)
                continue
            if revents & (select.POLLHUP | select.POLLERR):
                self._unwatch(self.listener)
                self.watching = False
            return

    def _handle(self, note: seccomp.Notification) -> None:
        listener = self.listener
        self.steered = None
        arch = seccomp.native_arch()
        try:
            if note.arch != arch[0]:
                err = None
            elif note.nr == arch[1]:
                err = self._steer(note)
            elif note.nr == arch[3]:
                err = self._peer_name(note)
            else:
                err = None
        except Exception as exc:  # noqa: BLE001 - never leave the program stuck in a syscall
            self.log("error", f"internal error, letting a syscall through: {exc!r}")
            err = None
        if err is None:
            seccomp.let_through(listener, note.id)
        elif not seccomp.respond(listener, note.id, error=err) and self.steered is not None:
            # A signal took the caller out of its connect after we steered the
            # socket: the restarted call (or the retry after EINTR) gets the answer.
            if len(self.unanswered) >= MAX_UNANSWERED:
                self.unanswered.clear()
            self.unanswered.add(self.steered)

    def _steer(self, note: seccomp.Notification) -> int | None:
        """None: let the connect through; else its result (0 or an errno)."""
        fd = note.args[0] & 0xFFFFFFFF
        addr_ptr, addrlen = note.args[1], note.args[2] & 0xFFFFFFFF
        if fd > 0x7FFFFFFF or not 2 <= addrlen <= 128:
            return None
        try:
            raw = seccomp.read_memory(note.pid, addr_ptr, min(addrlen, 28))
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self._once("ptrace", f"cannot read the memory of process {note.pid} "
                                     f"(ptrace permission); its connects go direct")
            return None
        if not seccomp.still_waiting(self.listener, note.id):
            return None      # the caller is gone: its pid may name another task by now
        target = parse_sockaddr(raw, addrlen)
        if target is None:
            return None
        family, ip, port = target
        ip = normalize_ip(ip)
        if not self._proxied(ip, port):
            return None
        sock = self._take(note.pid, fd)
        if sock is None:
            return None
        with sock:
            if not seccomp.still_waiting(self.listener, note.id):
                return None  # gone while we took it: that fd number may be another file now
            return self._connect_to_helper(sock, family, ip, port)

    def _proxied(self, ip, port: int) -> bool:
        """Does this destination go to the PEP?  Remembered per destination
        (the rules are fixed for the supervisor's life; bounded)."""
        verdict = self.decisions.get((ip, port))
        if verdict is None:
            # The supervisor sees addresses, not names: a name entry of
            # PEP_NO_PROXY never matches, except `localhost`, read as loopback
            # (as libpep.so reads it).
            name = "localhost" if ip.is_loopback else None
            verdict = carriable(ip, port) and (ip, port) not in self.peps \
                and self.config.pep_for(name, ip, port) is not None
            if len(self.decisions) >= MAX_DECISIONS:
                self.decisions.clear()
            self.decisions[(ip, port)] = verdict
        return verdict

    def _peer_name(self, note: seccomp.Notification) -> int | None:
        """getpeername() of a steered socket: the destination, as libpep.so
        answers it (v4-mapped on an AF_INET6 socket); anything else: None."""
        fd, addr_ptr, len_ptr = note.args[0] & 0xFFFFFFFF, note.args[1], note.args[2]
        if fd > 0x7FFFFFFF or not self.peers:
            return None
        sock = self._take(note.pid, fd)
        if sock is None:
            return None
        with sock:
            try:
                local, peer = sock.getsockname(), sock.getpeername()
            except OSError:
                return None
            with self.lock:
                dest = self.peers.get(_key(local))
            if dest is None or not self._to_helper(sock, peer):
                return None
            ip, port = dest
            if sock.family == socket.AF_INET6:
                v6 = ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")
                name = _sockaddr_in6(v6, port)
            else:
                name = _sockaddr_in(ip, port)
        try:
            given = struct.unpack("=I", seccomp.read_memory(note.pid, len_ptr, 4))[0]
        except (OSError, struct.error):
            return None                  # the kernel will say EFAULT
        if given > 0x7FFFFFFF:
            return None                  # EINVAL, the kernel's
        # The caller cannot leave before our answer (only a fatal signal takes
        # it out: WAIT_KILLABLE_RECV), so its buffers are still its own.
        if not seccomp.still_waiting(self.listener, note.id):
            return None
        try:
            seccomp.write_memory(note.pid, addr_ptr, name[:given])
            seccomp.write_memory(note.pid, len_ptr, struct.pack("=I", len(name)))
        except OSError:
            return None
        return 0

    def _take(self, tid: int, fd: int) -> socket.socket | None:
        """Our socket object on the program's open file; None if not a TCP socket."""
        try:
            pidfd = seccomp.pidfd_of_thread(tid)
            try:
                mine = seccomp.take_fd(pidfd, fd)
            finally:
                os.close(pidfd)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self._once("getfd", f"cannot take the sockets of process {tid} (ptrace "
                                    f"permission); its connects go direct")
            return None
        try:
            sock = socket.socket(fileno=mine)
        except OSError:
            os.close(mine)       # not a socket: the kernel will say ENOTSOCK
            return None
        if sock.type != socket.SOCK_STREAM or sock.proto not in (0, socket.IPPROTO_TCP) \
                or sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock.close()
            return None
        return sock

    def _connect_to_helper(self, sock: socket.socket, family: int, ip, port: int) -> int | None:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if state != TCP_CLOSE:
            return self._restarted(sock, state)
        if sock.family != family:
            # AF_INET6 socket given an AF_INET address or the reverse: the kernel's error.
            return None
        device = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
        if device:
            # Bound to an interface: loopback is out of its reach.  Direct.
            self._once(f"dev-{device!r}", f"a socket bound to {device.decode(errors='replace')} "
                                          f"(SO_BINDTODEVICE) cannot reach the helper: its "
                                          f"connections go direct")
            return None
        if sock.family == socket.AF_INET6 and ip.version == 4 and \
                sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            return None          # v4-mapped on a v6-only socket: the kernel's ENETUNREACH
        err = seccomp.raw_connect(sock.fileno(), self.helper_addr[sock.family])
        if err in (0, errno.EINPROGRESS):
            local = sock.getsockname()
            self.steered = _key(local)
            self.routes[self.steered] = (ip, port)
            if self.killable:
                with self.lock:
                    if len(self.peers) >= 4 * self.max_relays:
                        self.peers.clear()   # steered but never accepted: do not grow forever
                    self.peers[self.steered] = (ip, port)
            if self.log.level >= LEVELS["debug"]:
                self.log("debug", f"connect to {_fmt((ip, port))} steered to the helper")
        return err

    def _restarted(self, sock: socket.socket, state: int) -> int | None:
        """A connect we steered but could not answer (a signal interrupted the
        wait), called again: answer it now.  Any other connect on a socket that
        is not fresh is the kernel's to answer (EISCONN, EALREADY...)."""
        try:
            local = sock.getsockname()
        except OSError:
            return None
        key = _key(local)
        if key in self.unanswered:
            self.unanswered.discard(key)
        elif self.killable or not self._to_helper(sock):
            return None
        # else: before Linux 5.19 a signal can restart a connect whose answer the
        # kernel had already taken (respond() then said yes): a connect on a
        # socket steered to the helper is taken for such a restart.
        self.log("debug", "a steered connect, restarted after a signal: answered as done")
        if state == TCP_ESTABLISHED:
            return 0
        return errno.EINPROGRESS if state == TCP_SYN_SENT else None

    def _to_helper(self, sock: socket.socket, peer=None) -> bool:
        """Is this socket connected to our helper?"""
        try:
            peer = peer or sock.getpeername()
        except OSError:
            return False
        helper = self.helpers.get(sock.family) or self.helpers[socket.AF_INET]
        return peer[1] == helper.getsockname()[1]

    def _once(self, key: str, text: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.log("error", text)

    # -- the loop -------------------------------------------------------------------
    def _watch(self, fd: int, handler) -> None:
        self.handlers[fd] = handler
        self.poller.register(fd, select.POLLIN)

    def _unwatch(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        self.poller.unregister(fd)

    def _program_exited(self, pidfd: int) -> None:
        self._unwatch(pidfd)
        os.close(pidfd)
        self.log.drop_stderr()

    def _drain_wakeups(self, revents: int) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def run(self, listener: int, killable: bool) -> None:
        """Serve the listener until no task uses the filter and the relays are
        done (at most DRAIN_TIMEOUT after the last task is gone).  `killable`:
        the filter has WAIT_KILLABLE_RECV."""
        self.listener, self.killable = listener, killable
        self.listener_poll = select.poll()
        self.listener_poll.register(listener, select.POLLIN)
        self._watch(self.listener, self._on_listener)
        self._watch(self.wake_r, self._drain_wakeups)
        try:
            pidfd = os.pidfd_open(self.program_pid)
        except OSError:
            self.log.drop_stderr()
        else:
            self._watch(pidfd, lambda ev: self._program_exited(pidfd))
        deadline = None
        while True:
            if not self.watching:
                with self.lock:
                    idle = not self.relays
                if idle:
                    break
                if deadline is None:
                    deadline = time.monotonic() + DRAIN_TIMEOUT
                elif time.monotonic() > deadline:
                    break
            for fd, revents in self.poller.poll(None if self.watching else 1000):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(revents)
        with self.lock:
            left = list(self.relays)
        for relay in left:                  # still open DRAIN_TIMEOUT after the program ended
            relay._abort()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _probe(listener: socket.socket, family: int) -> None:
    """Connect to a helper once: steering a program there must work (loopback up)."""
    where = listener.getsockname()
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            probe.connect(where)
            listener.settimeout(2)
            listener.accept()[0].close()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot reach its helper on {where[0]}: "
                                 f"{exc.strerror or exc} (loopback down?)") from None


def _sockaddr_in(ip: ipaddress.IPv4Address, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)


def _sockaddr_in6(ip: ipaddress.IPv6Address, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + ip.packed + bytes(4)


# ----------------------------------------------------------------------- starting it

def spawn(program_pid: int) -> tuple[socket.socket, int]:
    """Start the supervisor, no child of ours (double fork); (channel, its pid).
    Fds 0-2 must be open (the channel must not land on them).

    Send the listener fd on the channel with `hand_over()`; if the channel
    closes without one, the supervisor exits.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    middle = os.fork()
    if middle == 0:
        try:
            ours.close()
            if os.fork() == 0:
                _child(theirs, program_pid)   # never returns
        finally:
            os._exit(0)
    theirs.close()
    os.waitpid(middle, 0)
    ours.settimeout(10)
    try:
        hello = ours.recv(4096).decode(errors="replace")
    except OSError:
        hello = ""
    word, _, rest = hello.partition(" ")
    if word != "pid":
        ours.close()
        raise OSError(errno.ECHILD, rest if word == "error" else "it did not start")
    ours.settimeout(None)
    return ours, int(rest)


def hand_over(channel: socket.socket, listener: int, killable: bool) -> None:
    """Pass the listener; `killable`: installed with WAIT_KILLABLE_RECV."""
    socket.send_fds(channel, [b"K" if killable else b"L"], [listener])


def _child(channel: socket.socket, program_pid: int) -> None:
    """The supervisor process: say "pid N" (or "error WHY") on the channel,
    take the listener, serve it; never returns."""
    code = 1
    log = None
    try:
        os.setsid()                       # off the program's terminal and process group
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                    signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE,
                    signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        seccomp.set_name("pep-supervisor")
        stderr = os.dup(2)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        _close_all_but(sorted({channel.fileno(), stderr}))
        threading.stack_size(512 << 10)   # up to 2 x MAX_RELAYS pool threads
        log = Log(os.environ.get("PEP_LOG"), stderr)
        try:
            sup = Supervisor(program_pid, log)
        except (ConfigError, OSError) as exc:
            channel.send(f"error {getattr(exc, 'strerror', None) or exc}".encode()[:4000])
            return
        channel.send(f"pid {os.getpid()}".encode())
        try:
            msg, fds, _, _ = socket.recv_fds(channel, 16, 1)
        except OSError:
            msg, fds = b"", []
        channel.close()
        if not fds:
            code = 0                      # pep run could not install the filter
            return
        sup.run(fds[0], killable=msg == b"K")
        code = 0
    except BaseException as exc:  # noqa: BLE001 - report and leave, never raise into pep run
        if log is not None:
            log("error", f"internal error: {exc!r}")
    finally:
        os._exit(code)


def _close_all_but(keep: list[int]) -> None:
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, max(1 << 20, os.sysconf("SC_OPEN_MAX")))
