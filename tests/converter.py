"""A small RFC 8803 converter for the tests: threads, a TFO listener, knobs.

Not the product (that is `pep relay`): this one is deliberately simple and can
misbehave on request (answer with an error, split its reply, send garbage), so
client tests do not depend on the relay being right.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from pepsock import protocol, tfo


@dataclass
class Seen:
    """What the converter observed of one client connection."""

    connect: protocol.Connect | None = None
    syn_data: bool = False  # the header arrived in the SYN
    early_data: bytes = b""  # bytes that came behind the header in the first read


@dataclass
class Converter:
    host: str = "127.0.0.1"
    #: Reply with this Error TLV (code, value) instead of connecting onward.
    error: tuple[int, bytes] | None = None
    #: Send the reply in pieces of this many bytes, `split_delay` apart.
    split: int = 0
    split_delay: float = 0.02
    #: Extra TLVs in a success reply (to test parsers skipping them).
    reply_tlvs: tuple = ()
    #: Raw bytes to answer with instead of a valid reply.
    raw_reply: bytes | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.IPPROTO_TCP, tfo.TCP_FASTOPEN, 64)
        tfo.allow_data_without_cookie(self.listener)
        self.listener.bind((self.host, 0))
        self.listener.listen(64)
        self.address = self.listener.getsockname()[:2]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

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

    def _send_reply(self, client: socket.socket, reply: bytes):
        if not self.split:
            client.sendall(reply)
            return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(reply), self.split):
            client.sendall(reply[i:i + self.split])
            time.sleep(self.split_delay)

    def _tunnel(self, client: socket.socket):
        seen = Seen()
        self.seen.append(seen)
        client.settimeout(10)
        with client:
            reader = protocol.MessageReader()
            try:
                while not reader.done:
                    chunk = client.recv(2048)
                    if not chunk:
                        return
                    reader.feed(chunk)
                seen.syn_data = tfo.syn_data_acked(client)
                seen.early_data = reader.rest
                target = protocol.check_request(reader.message)
            except protocol.ProtocolError as exc:
                client.sendall(protocol.error_reply(exc.code))
                return
            if isinstance(target, protocol.Info):
                client.sendall(protocol.success_reply((protocol.SupportedTCPExtensions((2, 3, 4)),)))
                return
            seen.connect = target
            if self.raw_reply is not None:
                self._send_reply(client, self.raw_reply)
                time.sleep(0.2)
                return
            if self.error is not None:
                self._send_reply(client, protocol.error_reply(*self.error))
                return
            try:
                server = socket.create_connection((str(target.address), target.port), timeout=5)
            except OSError as exc:
                code, value = protocol.error_for_connect_failure(exc.errno or 0)
                client.sendall(protocol.error_reply(code, value))
                return
            with server:
                self._send_reply(client, protocol.success_reply(self.reply_tlvs))
                if reader.rest:
                    server.sendall(reader.rest)
                _pump_both(client, server)


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


def _pump_both(a: socket.socket, b: socket.socket):
    a.settimeout(30)
    b.settimeout(30)
    t = threading.Thread(target=_pump, args=(b, a), daemon=True)
    t.start()
    _pump(a, b)
    t.join(30)


class EchoServer:
    """Echoes every byte back; half-closes when the client does."""

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.address = self.listener.getsockname()[:2]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=_pump, args=(conn, conn), daemon=True).start()

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
