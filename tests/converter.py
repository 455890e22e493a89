"""Test-only RFC 8803 converter and servers, shared by every suite.

Not the product (that is `pep relay`): a deliberately simple threaded
converter on a TFO listener (TCP_FASTOPEN + TCP_FASTOPEN_NO_COOKIE), parsing
with pepsock.protocol, that can misbehave on request (answer with an Error
TLV, split its reply into delayed segments, send raw bytes, reset), so client
tests do not depend on the relay being right. For each client connection it
records the destination and whether the header came in the SYN (TCP_INFO
tcpi_options & TCPI_OPT_SYN_DATA on the accepted socket).
"""
from __future__ import annotations

import contextlib
import functools
import os
import http.server
import socket
import threading
import time
from dataclasses import dataclass, field

from pepsock import protocol
from pepsock.tfo import TCP_FASTOPEN, TCP_FASTOPEN_NO_COOKIE, TCPI_OPT_SYN_DATA


# The stdlib's, taken at import: a test may pepsock.patch() this process, and
# the converter's own onward connections must not go through the converter.
_direct_connection = socket.create_connection


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

@dataclass
class Seen:
    connect: protocol.Connect | None = None
    syn_data: bool = False
    early_data: bytes = b""     # application bytes that came with the header
    peer: tuple = ()            # the client's address as the converter saw it
    error: str = ""
    cookie: bytes | None = None  # the request's Cookie TLV value (None: none)
    reply_sent_at: float = 0.0  # time.monotonic() when the success reply went out


@dataclass
class Converter:
    """A threaded test converter. Create it inside the namespace it must live in."""

    host: str = "127.0.0.1"
    port: int = 0
    error: tuple[int, bytes] | None = None      # answer with this Error TLV
    split: int = 0                              # reply in pieces of this many bytes
    split_delay: float = 0.05
    raw_reply: bytes | None = None              # answer with these bytes
    reply_tlvs: tuple = ()                      # extra TLVs in a success reply
    reset_after_error: bool = True             # RST (SO_LINGER 0) after an Error, else FIN
    reset_delay: float = 0.05                   # seconds between the Error TLV and the RST
    seen: list[Seen] = field(default_factory=list)
    silent: bool = False                        # read the request, never answer (for `hold` s)
    hold: float = 0.3                           # seconds a raw_reply/silent connection stays open
    # Added for the failover/cookie tests (RFC 8803 6.2.7, 6.2.8):
    cookie: bytes | None = None                 # require this Cookie TLV: none -> Error 3
                                                # carrying it (value 0 + cookie), wrong -> 32
    reply_delay: float = 0.0                    # hold the reply this long (inf: never reply)
    listener_no_cookie: bool = True             # False: the kernel wants TFO cookies

    def _cookie_refusal(self, got: bytes | None) -> bytes | None:
        """The Error reply a request with Cookie TLV value `got` earns, if any:
        none -> Error 3 carrying our cookie (value 0 + cookie), wrong -> 32. A
        Cookie TLV is padded to 32-bit words: compare without the padding."""
        if self.cookie is None:
            return None
        if got is None:
            return protocol.error_reply(protocol.ErrorCode.MISSING_COOKIE, b"\x00" + self.cookie)
        if got.rstrip(b"\0") != self.cookie.rstrip(b"\0"):
            return protocol.error_reply(protocol.ErrorCode.NOT_AUTHORIZED)
        return None

    def __post_init__(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 128)
        try:
            if self.listener_no_cookie:
                self.listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
        except OSError:
            pass
        self.listener.bind((self.host, self.port))
        self.listener.listen(128)
        self.address = self.listener.getsockname()[:2]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def env_value(self) -> str:
        h, p = self.address
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    def close(self):
        self._stop = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self):
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _reply(self, client: socket.socket, data: bytes):
        if not self.split:
            client.sendall(data)
            return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), self.split):
            client.sendall(data[i:i + self.split])
            time.sleep(self.split_delay)

    def _hold_reply(self):
        end = time.monotonic() + self.reply_delay
        while not self._stop and time.monotonic() < end:
            time.sleep(min(0.05, end - time.monotonic()))

    def _tunnel(self, client: socket.socket):
        seen = Seen()
        self.seen.append(seen)
        client.settimeout(10)
        try:
            seen.peer = client.getpeername()[:2]
            info = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
            seen.syn_data = bool(info[5] & TCPI_OPT_SYN_DATA)
            reader = protocol.MessageReader()
            while not reader.done:
                chunk = client.recv(4096)
                if not chunk:
                    reader.eof()
                reader.feed(chunk)
            seen.early_data = reader.rest
            target = protocol.check_request(reader.message)
        except (protocol.ProtocolError, OSError) as exc:
            seen.error = str(exc)
            code = getattr(exc, "code", protocol.ErrorCode.MALFORMED_MESSAGE)
            try:
                client.sendall(protocol.error_reply(code))
            except OSError:
                pass
            client.close()
            return
        # A cookie requirement and a forced Error apply to Info requests too (the
        # RFC's Missing Cookie and Resource Exceeded are about any Convert message).
        cookie_tlv = reader.message.get(protocol.TLVType.COOKIE)
        seen.cookie = None if cookie_tlv is None else cookie_tlv.data
        if isinstance(target, protocol.Info):
            try:
                refusal = self._cookie_refusal(seen.cookie)
                if refusal is not None:
                    client.sendall(refusal)
                elif self.error is not None:
                    client.sendall(protocol.error_reply(*self.error))
                else:
                    client.sendall(protocol.success_reply((protocol.SupportedTCPExtensions((2, 3, 4)),)))
            except OSError:
                pass
            client.close()
            return
        seen.connect = target
        try:
            if self.silent:
                time.sleep(self.hold)
                return
            refusal = self._cookie_refusal(seen.cookie)
            if refusal is not None:
                client.sendall(refusal)
                time.sleep(self.reset_delay)
                return
            if self.raw_reply is not None:
                self._reply(client, self.raw_reply)
                time.sleep(self.hold)
                return
            if self.error is not None:
                self._reply(client, protocol.error_reply(*self.error))
                if self.reset_after_error:
                    time.sleep(self.reset_delay)
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            try:
                server = _direct_connection((str(target.address), target.port), timeout=5)
            except OSError as exc:
                code, value = protocol.error_for_connect_failure(exc.errno or 0)
                self._hold_reply()      # reply_delay holds an Error reply too
                if self._stop:
                    return
                self._reply(client, protocol.error_reply(code, value))
                return
            with server:
                if reader.rest:
                    server.sendall(reader.rest)
                if not self.reply_delay:
                    self._reply(client, protocol.success_reply(self.reply_tlvs))
                    seen.reply_sent_at = time.monotonic()
                    pump_both(client, server)
                    return
                # A late reply: the client's bytes go on to the server meanwhile, the
                # server's wait behind the reply.
                client.settimeout(30)
                server.settimeout(30)
                upstream = threading.Thread(target=_pump, args=(client, server), daemon=True)
                upstream.start()
                self._hold_reply()
                if self._stop:
                    return
                self._reply(client, protocol.success_reply(self.reply_tlvs))
                seen.reply_sent_at = time.monotonic()
                _pump(server, client)
                upstream.join(30)
        except OSError as exc:
            seen.error = str(exc)
        finally:
            client.close()


def _pump(src: socket.socket, dst: socket.socket):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
    except OSError:
        return


def pump_both(a: socket.socket, b: socket.socket):
    a.settimeout(30)
    b.settimeout(30)
    t = threading.Thread(target=_pump, args=(b, a), daemon=True)
    t.start()
    _pump(a, b)
    t.join(30)


# --------------------------------------------------------------------------
# Servers


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class _V4Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class HTTPServer:
    """A threaded static HTTP server on (host, random port) serving `root`."""

    def __init__(self, root: str, host: str = "127.0.0.1"):
        cls = _V6Server if ":" in host else _V4Server
        cls.request_queue_size = 256
        handler = functools.partial(_QuietHandler, directory=root)
        self.httpd = cls((host, 0), handler)
        self.address = self.httpd.server_address[:2]
        self._t = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                   daemon=True)
        self._t.start()

    def url(self, path: str = "/") -> str:
        return f"http://{url_host(self.address[0])}:{self.address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dead_port() -> int:
    """A loopback port nobody listens on (bound, then released): connecting is
    refused (RST)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class EchoServer:
    """Echoes bytes; optionally writes a greeting first (server-speaks-first)."""

    def __init__(self, host: str = "127.0.0.1", greeting: bytes = b""):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.address = self.listener.getsockname()[:2]
        self.greeting = greeting
        self.peers: list = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.settimeout(20)
            try:
                if self.greeting:
                    conn.sendall(self.greeting)
                _pump(conn, conn)
            except OSError:
                pass

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()




def converter_in(ns, **kw) -> Converter:
    """A test converter in namespace ns (kw: Converter's, e.g. host="::1")."""
    with ns.enter():
        return Converter(**kw)


@contextlib.contextmanager
def web_namespace(prefix: str, root):
    """A namespace of a Topology of its own (prefix), TFO on (3), HTTP servers
    on 127.0.0.1 and ::1 (host.http[4], host.http[6]) serving directory root
    (host.root), in which 1m.bin holds host.payload (1 MiB, random); all of it
    removed after. The caller checks for root first."""
    from pepsock.testbed.netns import Topology
    topo = Topology(prefix=prefix)
    try:
        host = topo.host("lo", tfo=3)
        host.root, host.payload = root, os.urandom(1 << 20)
        (root / "1m.bin").write_bytes(host.payload)
        with host.enter():
            host.http = {4: HTTPServer(str(root), "127.0.0.1"), 6: HTTPServer(str(root), "::1")}
        yield host
        for server in host.http.values():
            server.close()
    finally:
        topo.cleanup()
