"""pepsock.patch(): unmodified Python programs on the PEP, TLS included.

(This module is `patching`, so that it does not shadow the function.)

One call redirects, under the PEP_PROXY / PEP_NO_PROXY rules read at each
connection:

* `socket.create_connection` (http.client, urllib, httpx/httpcore sync, most
  sync clients) to `pepsock.create_connection`;
* `urllib3.util.connection.create_connection` (requests, urllib3), which does
  not use the stdlib's;
* asyncio's `loop.create_connection` on the selector event loops, hence
  `asyncio.open_connection`, anyio (httpx async) and everything built on it,
  to a PepSocket under asyncio's own transport (pepsock/aiosock.py);
* aiohttp's `TCPConnector`, whose sockets are made by aiohappyeyeballs: its
  public `socket_factory` defaults to `aiosock.aiohttp_socket_factory`;
* `ssl.SSLContext.wrap_socket` of a PepSocket, to the TLS that does not wait
  for the PEP's reply (pepsock/tls.py), via `SSLContext.sslsocket_class`.

urllib3 and aiohttp are patched when they are imported (or at once if they
already are). `unpatch()` restores everything. Both are idempotent and
thread-safe. uvloop loops are not patched (their transports read the
descriptor themselves).
"""
from __future__ import annotations

import asyncio
import importlib.abc
import socket
import ssl
import sys
import threading
import warnings

from . import aiosock, client, tls
from . import route as _route

_lock = threading.RLock()
_saved: dict[tuple[object, str], object] = {}   # (owner, attribute) -> original
_finder: "_AfterImport | None" = None
_inside = threading.local()     # set while pepsock itself calls socket.create_connection


def is_patched() -> bool:
    return bool(_saved)


_MISSING = object()   # the attribute was inherited, not set on the class itself


def _replace(owner, name: str, value) -> None:
    if (owner, name) not in _saved:
        _saved[(owner, name)] = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) \
            else getattr(owner, name)
    setattr(owner, name, value)


# -- sync ---------------------------------------------------------------------------------

_stdlib_create_connection = socket.create_connection


def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None,
                      *, all_errors: bool = False):
    """socket.create_connection under the patch."""
    if getattr(_inside, "active", False):   # pepsock going direct: the real thing
        return _stdlib_create_connection(address, timeout, source_address,
                                         all_errors=all_errors)
    _inside.active = True
    try:
        return client.create_connection(address, timeout, source_address,
                                        all_errors=all_errors)
    finally:
        _inside.active = False


def _patch_urllib3(module) -> None:
    original = module.create_connection

    def urllib3_create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                                  source_address=None, socket_options=None):
        """urllib3's create_connection under the patch: the route planned once; direct
        routes are urllib3's own, PEP routes get urllib3's socket options before connect."""
        host, port = address
        if host.startswith("["):
            host = host.strip("[]")
        conf = _route.settings()
        route = _route.plan_sync(host, int(port), conf)
        if route.direct is not None:
            return original(address, timeout, source_address, socket_options)
        _inside.active = True       # a fallback to direct is the stdlib's connection
        try:
            return client.connect_route(route, conf, timeout, source_address,
                                        socket_options=socket_options or ())
        finally:
            _inside.active = False

    urllib3_create_connection.__wrapped__ = original
    _replace(module, "create_connection", urllib3_create_connection)


# -- asyncio ------------------------------------------------------------------------------

_base_create_connection = asyncio.base_events.BaseEventLoop.create_connection
_NOT_WITH_SOCK = ("family", "proto", "flags", "happy_eyeballs_delay", "interleave", "all_errors")


async def _loop_create_connection(self, protocol_factory, host=None, port=None, *, ssl=None,
                                  sock=None, local_addr=None, server_hostname=None, **kwargs):
    """BaseEventLoop.create_connection under the patch: host:port through the PEP
    become a PepSocket given to the real create_connection (sock=...)."""
    pep_sock = None
    if sock is None and host is not None and port is not None and aiosock.strips_in_transport(self):
        pep_sock = await aiosock.dial(host, int(port), local_addr=local_addr)
    if pep_sock is None:
        return await _base_create_connection(self, protocol_factory, host, port, ssl=ssl,
                                             sock=sock, local_addr=local_addr,
                                             server_hostname=server_hostname, **kwargs)
    for key in _NOT_WITH_SOCK:
        kwargs.pop(key, None)
    if ssl and server_hostname is None:
        server_hostname = host
    try:
        return await _base_create_connection(self, protocol_factory, ssl=ssl, sock=pep_sock,
                                             server_hostname=server_hostname, **kwargs)
    except BaseException:
        pep_sock.close()
        raise


def _patch_aiohttp(module) -> None:
    import inspect
    connector = module.TCPConnector
    original = connector.__init__
    if "socket_factory" not in inspect.signature(original).parameters:
        warnings.warn("pepsock.patch(): this aiohttp has no TCPConnector(socket_factory=) "
                      "(aiohttp >= 3.12 has): its connections stay direct", RuntimeWarning)
        return

    def __init__(self, *args, **kwargs):
        if kwargs.get("socket_factory") is None:
            kwargs["socket_factory"] = aiosock.aiohttp_socket_factory
        original(self, *args, **kwargs)

    __init__.__wrapped__ = original
    _replace(connector, "__init__", __init__)


# -- patching modules as they are imported -------------------------------------------------

_LATE = {"urllib3.util.connection": _patch_urllib3, "aiohttp.connector": _patch_aiohttp}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after one of the _LATE modules is executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in _LATE:
            return None
        for finder in sys.meta_path:   # whoever would have found it (path, editable, ...)
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader, _LATE[name])
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch_module):
        self._loader, self._patch_module = loader, patch_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            if _saved:   # still patched
                self._patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


# -- the switch -----------------------------------------------------------------------------

def patch() -> None:
    """Put new connections of this process on the PEP (see the module docstring)."""
    global _finder
    with _lock:
        if _saved:
            return
        _replace(socket, "create_connection", create_connection)
        _replace(asyncio.base_events.BaseEventLoop, "create_connection", _loop_create_connection)
        _replace(ssl.SSLContext, "sslsocket_class", tls.PepAwareSSLSocket)
        for name, patch_module in _LATE.items():
            if name in sys.modules:
                patch_module(sys.modules[name])
        _finder = _AfterImport()
        sys.meta_path.insert(0, _finder)


def unpatch() -> None:
    """Undo patch(): connections made from now on are the stdlib's again."""
    global _finder
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass
            _finder = None
        for (owner, name), value in reversed(list(_saved.items())):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        _saved.clear()
