"""Property tests of pepsock.tls's record-at-a-time reads, in memory.

A server SSLObject over memory BIOs talks to the client engine through a fake
socket that hands out the server's bytes in arbitrary pieces (hypothesis draws
their sizes). Whatever the pieces: the handshake completes, the plaintext
comes back whole, and the engine never asks for a byte past the header of the
record after the one it is in (so no complete record waits undecrypted in a
buffer while the descriptor looks idle).
"""
import ssl

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pepsock.tls import _BioEngine
from tls_helpers import make_cert


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    cert, key = make_cert(tmp_path_factory.mktemp("cert"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


def record_ends(stream: bytes) -> list[int]:
    """Offsets where each TLS record of `stream` ends."""
    ends, at = [], 0
    while at + 5 <= len(stream):
        at += 5 + int.from_bytes(stream[at + 3:at + 5], "big")
        ends.append(at)
    return ends


class FakeRaw:
    """Stands for the PepSocket: send() feeds the server, recv() hands out its
    answer in the sizes drawn, running the server whenever it has nothing."""

    def __init__(self, server: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO, sizes):
        self.server, self.s_in, self.s_out = server, s_in, s_out
        self.sizes = list(sizes) or [1 << 16]
        self.stream = bytearray()     # everything the server sent
        self.given = 0                # how much of it the client has read
        self.asked: list[tuple[int, int]] = []   # (offset, n) of each recv
        self.handshaken = False

    def send(self, data) -> int:
        self.s_in.write(bytes(data))
        return len(data)

    def sendall(self, data) -> None:
        self.send(data)

    def gettimeout(self):
        return None   # blocking

    def _run_server(self):
        if not self.handshaken:
            try:
                self.server.do_handshake()
                self.handshaken = True
            except ssl.SSLWantReadError:
                pass
        if self.handshaken:
            try:
                while data := self.server.read(1 << 16):
                    self.server.write(data.upper())
            except ssl.SSLWantReadError:
                pass
        self.stream += self.s_out.read()

    def recv(self, n: int) -> bytes:
        if self.given == len(self.stream):
            self._run_server()
        assert self.given < len(self.stream), "the client waits for bytes the server never sends"
        self.asked.append((self.given, n))
        size = min(n, self.sizes[len(self.asked) % len(self.sizes)], len(self.stream) - self.given)
        piece = bytes(self.stream[self.given:self.given + size])
        self.given += size
        return piece


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=12),
       message=st.binary(min_size=1, max_size=40_000))
def test_any_split_never_reads_a_whole_record_ahead(contexts, sizes, message):
    server_ctx, client_ctx = contexts
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    raw = FakeRaw(server, s_in, s_out, sizes)
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    engine = _BioEngine(raw, client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost"),
                        c_in, c_out)
    engine.do_handshake()
    sent = 0
    while sent < len(message):
        sent += engine.write(message[sent:])
    got = b""
    while len(got) < len(message):
        got += engine.read(1 << 16)
    assert got == message.upper()
    ends = record_ends(bytes(raw.stream))
    for offset, n in raw.asked:
        end = next(e for e in ends if e > offset)
        assert offset + n <= end + 5, (offset, n, end)   # + the next record's header
