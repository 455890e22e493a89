"""httpx transports and httpcore network backends that connect through the PEP.

httpcore's `ConnectionPool(network_backend=...)` is its public hook for how
connections are made; httpx's transports do not pass one on, so
`PepHTTPTransport` / `AsyncPepHTTPTransport` are httpx transports built on such
a pool (the request/response mapping httpx's own transport does, written here
against public APIs). Use them where patching the whole process is not wanted:

    httpx.Client(transport=pepsock.httpx_transport.PepHTTPTransport(pep=("198.51.100.1", 5124)))

Without pep=, PEP_PROXY / PEP_NO_PROXY decide per connection. TLS starts before
the PEP's reply (pepsock.tls, pepsock.aiosock). The async pieces run on
asyncio's selector loops. Needs httpx and httpcore (imported here).
"""
from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import time

import httpcore
import httpx

from . import aiosock, client, tls


@contextlib.contextmanager
def _mapped(timeout_exc, error_exc):
    try:
        yield
    except TimeoutError as exc:      # socket.timeout is TimeoutError
        raise timeout_exc(exc) from exc
    except OSError as exc:
        raise error_exc(exc) from exc


def _readable(sock) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# -- httpcore: sync ------------------------------------------------------------------------

class _Stream(httpcore.NetworkStream):
    def __init__(self, sock: socket.socket):
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> "_Stream":
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            try:
                self._sock.settimeout(timeout)
                return _Stream(tls.wrap_tls(self._sock, ssl_context,
                                            server_hostname=server_hostname))
            except BaseException:
                self.close()
                raise

    def get_extra_info(self, info: str):
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock._sslobj   # the SSLObject-like httpcore asks ALPN of
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _readable(self._sock)
        return None


class PepNetworkBackend(httpcore.NetworkBackend):
    """httpcore backend: TCP through the PEP (pepsock.create_connection)."""

    def __init__(self, pep=None):
        self._pep = pep

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options=None) -> _Stream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            sock = client.create_connection((host, port), timeout,
                                            (local_address, 0) if local_address else None,
                                            pep=self._pep)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BaseException:
                sock.close()
                raise
        return _Stream(sock)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return httpcore.SyncBackend().connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# -- httpcore: asyncio -----------------------------------------------------------------------

class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            return await asyncio.wait_for(self._reader.read(max_bytes), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._writer.write(buffer)
            await asyncio.wait_for(self._writer.drain(), timeout)

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> "_AsyncStream":
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            try:
                await asyncio.wait_for(self._writer.start_tls(
                    ssl_context, server_hostname=server_hostname), timeout)
            except BaseException:
                self._writer.transport.abort()
                raise
        return self

    def get_extra_info(self, info: str):
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "is_readable":   # an idle keep-alive connection the server closed
            return self._reader.at_eof() or _readable(self._writer.get_extra_info("socket"))
        return None


class AsyncPepNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore backend for asyncio: a PepSocket under asyncio's own transport."""

    def __init__(self, pep=None):
        self._pep = pep

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> _AsyncStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            sock = await asyncio.wait_for(aiosock.dial(
                host, port, pep=self._pep,
                local_addr=(local_address, 0) if local_address else None), timeout)
            if sock is None:   # the rules say direct
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None),
                    timeout)
            else:
                reader, writer = await asyncio.open_connection(sock=sock)
            for option in socket_options or ():
                writer.get_extra_info("socket").setsockopt(*option)
        return _AsyncStream(reader, writer)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        return _AsyncStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# -- httpx transports ------------------------------------------------------------------------

_EXCEPTIONS = [(getattr(httpcore, name), getattr(httpx, name)) for name in (
    "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
    "ConnectError", "ReadError", "WriteError", "NetworkError", "ProxyError",
    "UnsupportedProtocol", "LocalProtocolError", "RemoteProtocolError", "ProtocolError")]


@contextlib.contextmanager
def _httpx_errors():
    try:
        yield
    except Exception as exc:   # noqa: BLE001 - httpcore's own become httpx's, others pass
        for core, ours in _EXCEPTIONS:
            if isinstance(exc, core):
                raise ours(str(exc)) from exc
        raise


def _core_request(request: httpx.Request) -> httpcore.Request:
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                         port=request.url.port, target=request.url.raw_path),
        headers=request.headers.raw, content=request.stream, extensions=request.extensions)


def _pool_options(verify, cert, trust_env, http1, http2, limits, retries, local_address,
                  socket_options) -> dict:
    return dict(ssl_context=httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry, http1=http1, http2=http2,
                retries=retries, local_address=local_address, socket_options=socket_options)


class _Body(httpx.SyncByteStream):
    def __init__(self, stream):
        self._stream = stream

    def __iter__(self):
        with _httpx_errors():
            yield from self._stream

    def close(self):
        self._stream.close()


class PepHTTPTransport(httpx.BaseTransport):
    """httpx.HTTPTransport's options (no proxy, no uds), connections through the PEP."""

    def __init__(self, *, pep=None, verify=True, cert=None, trust_env: bool = True,
                 http1: bool = True, http2: bool = False, limits=httpx.Limits(max_connections=100,
                 max_keepalive_connections=20), retries: int = 0, local_address=None,
                 socket_options=None):
        self._pool = httpcore.ConnectionPool(
            network_backend=PepNetworkBackend(pep),
            **_pool_options(verify, cert, trust_env, http1, http2, limits, retries,
                            local_address, socket_options))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors():
            resp = self._pool.handle_request(_core_request(request))
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              stream=_Body(resp.stream), extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, stream):
        self._stream = stream

    async def __aiter__(self):
        with _httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self):
        await self._stream.aclose()


class AsyncPepHTTPTransport(httpx.AsyncBaseTransport):
    """httpx.AsyncHTTPTransport's options (no proxy, no uds), through the PEP (asyncio)."""

    def __init__(self, *, pep=None, verify=True, cert=None, trust_env: bool = True,
                 http1: bool = True, http2: bool = False, limits=httpx.Limits(max_connections=100,
                 max_keepalive_connections=20), retries: int = 0, local_address=None,
                 socket_options=None):
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=AsyncPepNetworkBackend(pep),
            **_pool_options(verify, cert, trust_env, http1, http2, limits, retries,
                            local_address, socket_options))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors():
            resp = await self._pool.handle_async_request(_core_request(request))
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              stream=_AsyncBody(resp.stream), extensions=resp.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
