"""TLS test servers and certificates (made with the openssl command, per test).

`TLSEchoServer` notes when each connection's first byte (the ClientHello)
arrives, so tests can compare it with when the converter sent its reply.
"""
from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time

import pytest

from converter import HTTPServer


def make_cert(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 / ::1: (cert path, key path)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"needs the openssl command to make a test certificate: {r.stderr[-200:]!r}")
    return str(cert), str(key)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


class TLSEchoServer:
    """Per line: echoes it upper-cased; the line b"UNWRAP\\n" answers b"OK\\n", shuts
    TLS down and goes on echoing in clear."""

    def __init__(self, cert: str, key: str, host: str = "127.0.0.1"):
        self.ctx = server_context(cert, key)
        self.listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                                             else socket.AF_INET)
        self.address = self.listener.getsockname()[:2]
        self.hello_at: list[float] = []     # time.monotonic() of each ClientHello's arrival
        self.errors: list[BaseException] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket):
        conn.settimeout(10)
        try:
            if conn.recv(1, socket.MSG_PEEK):
                self.hello_at.append(time.monotonic())
            tls = self.ctx.wrap_socket(conn, server_side=True)
            f = tls.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    break
                if line == b"UNWRAP\n":
                    tls.sendall(b"OK\n")
                    plain = tls.unwrap()
                    while data := plain.recv(100):
                        plain.sendall(data)
                    plain.close()
                    return
                tls.sendall(line.upper())
            tls.close()
        except (OSError, ValueError) as exc:
            self.errors.append(exc)
            conn.close()

    def close(self):
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HTTPSServer(HTTPServer):
    """converter.HTTPServer over TLS; also counts the TCP connections it accepted
    and, with peek_hello, notes when each one's ClientHello came in (hello_at)."""

    def __init__(self, root: str, cert: str, key: str, host: str = "127.0.0.1",
                 peek_hello: bool = False):
        super().__init__(root, host)
        ctx = server_context(cert, key)
        httpd = self.httpd
        self.connections = 0
        self.hello_at: list[float] = []
        plain_get_request = httpd.get_request

        def get_request():
            conn, addr = plain_get_request()
            self.connections += 1
            conn.settimeout(10)
            if peek_hello and conn.recv(1, socket.MSG_PEEK):
                self.hello_at.append(time.monotonic())
            return ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

        httpd.get_request = get_request

    def url(self, path: str = "/") -> str:
        return "https" + super().url(path)[4:]


class CountingHTTPServer(HTTPServer):
    def __init__(self, root: str, host: str = "127.0.0.1"):
        super().__init__(root, host)
        self.connections = 0
        plain_get_request = self.httpd.get_request

        def get_request():
            self.connections += 1
            return plain_get_request()

        self.httpd.get_request = get_request
