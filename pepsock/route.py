"""Where a connection goes: the settings and the route planner, no I/O.

`plan()` is a generator that the sync and the asyncio client drive alike
(python-socks' connectors share their protocol code the same way): it yields
a `Resolve` whenever it needs a name looked up, receives the getaddrinfo
list back (or the exception, thrown in), and returns a `Route`:

    1. no PEP configured, or the destination *name* is bypassed: direct;
    2. the destination resolved (first address), normalised once;
    3. the destination *address* bypassed (PEP_NO_PROXY): direct;
    4. the PEPs of PEP_PROXY (or pep=) resolved, in order; a destination that
       is one of them goes direct (never wrap a connection to the PEP itself).

Which of the PEPs are held down is decided when they are dialled
(session.ClientSession), from the shared state.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Generator, Mapping

from . import pepstate
from .policy import Bypass, ConfigError, normalize_ip, parse_hostport, parse_proxy_list

log = logging.getLogger("pepsock")

_ENV_KEYS = ("PEP_PROXY", "PEP_NO_PROXY", "PEP_FALLBACK", "PEP_CONNECT_TIMEOUT",
             "PEP_REPLY_TIMEOUT", "PEP_CONFIRM", "PEP_COOKIE", "PEP_TFO_MODE", "PEP_STATE_DIR",
             "XDG_RUNTIME_DIR", "PEP_LOG")
DEFAULT_REPLY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    """Everything the environment says about reaching PEPs (docs/protocol.md)."""

    peps: tuple[tuple[str, int], ...] = ()
    bypass: Bypass = field(default_factory=lambda: Bypass.parse(None))
    fallback: str = "direct"
    connect_timeout: float | None = None     # None: adapted to the RTT seen to each PEP
    reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    confirm: Bypass | None = None            # destinations whose connect waits for the reply
    cookie: bytes | None = None              # PEP_COOKIE
    tfo_mode: str = "auto"
    state_dir: str | None = None

    def confirms(self, dest: "Destination") -> bool:
        return self.confirm is not None and self.confirm.matches(address=dest.address,
                                                                 port=dest.port)


# The shared grammar of docs/protocol.md ("Environment values"), the same as
# preload/config.c's: exact lower-case words, plain decimal seconds, hex cookies;
# blanks around a value are an error, not trimmed.
_BLANKS = " \t\n\r\v\f"
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
MAX_SECONDS = 86400
MAX_COOKIE = 64
_SECONDS_TEXT = (f"a number of seconds (plain decimal as 2 or 0.5, more than 0, "
                 f"at most {MAX_SECONDS})")


def _bad(key: str, text: str, expected: str) -> ConfigError:
    if text != text.strip(_BLANKS):
        return ConfigError(f"{key}={text!r} has blanks around it (write {expected}, nothing else)")
    return ConfigError(f"{key}={text!r} is not {expected}")


def _seconds(env, key: str, default):
    text = env.get(key, "")
    if not text:
        return default
    # fullmatch on ASCII digits (str.isdigit would take other scripts' digits);
    # the bounds are decided on the exact decimal, as config.c does on the text.
    if not _DECIMAL.fullmatch(text) or not 0 < Decimal(text) <= MAX_SECONDS:
        raise _bad(key, text, _SECONDS_TEXT)
    return float(text)


def _word(env, key: str, choices: tuple[str, ...], expected: str) -> str:
    text = env.get(key, "")
    if not text:
        return choices[0]
    if text not in choices:
        raise _bad(key, text, expected)
    return text


def parse_settings(env: Mapping[str, str]) -> Settings:
    """The settings, or ConfigError naming the first variable that breaks the grammar."""
    fallback = _word(env, "PEP_FALLBACK", ("direct", "fail"), "direct or fail (lower case)")
    tfo_mode = _word(env, "PEP_TFO_MODE", ("auto", "nocookie", "cookie"),
                     "auto, nocookie or cookie (lower case)")
    confirm_text = env.get("PEP_CONFIRM", "")
    if confirm_text in ("", "0"):
        confirm = None
    elif confirm_text != confirm_text.strip(_BLANKS):
        raise _bad("PEP_CONFIRM", confirm_text,
                   "1 or a list of destinations in PEP_NO_PROXY syntax")
    elif confirm_text == "1":
        confirm = Bypass(everything=True)
    else:
        try:
            confirm = Bypass.parse(confirm_text)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("PEP_NO_PROXY", "PEP_CONFIRM")) from None
    cookie_text = env.get("PEP_COOKIE", "")
    if cookie_text and (not _HEX.fullmatch(cookie_text) or len(cookie_text) > 2 * MAX_COOKIE):
        # a token: its length is said, never its value (as config.c)
        raise ConfigError(
            f"PEP_COOKIE ({len(cookie_text)} characters, not shown) "
            + ("has blanks around it; write only" if cookie_text != cookie_text.strip(_BLANKS)
               else "is not")
            + f" an even number of hex digits (1 to {MAX_COOKIE} bytes)")
    return Settings(
        peps=parse_proxy_list(env.get("PEP_PROXY", "")),
        bypass=Bypass.parse(env.get("PEP_NO_PROXY")),
        fallback=fallback,
        connect_timeout=_seconds(env, "PEP_CONNECT_TIMEOUT", None),
        reply_timeout=_seconds(env, "PEP_REPLY_TIMEOUT", DEFAULT_REPLY_TIMEOUT),
        confirm=confirm,
        cookie=bytes.fromhex(cookie_text) if cookie_text else None,
        tfo_mode=tfo_mode,
        state_dir=pepstate.state_dir(env),
    )


_settings_cache: tuple[tuple, Settings] | None = None
# os.environ's own dict (bytes keys on POSIX) answers in a tenth of the time of
# os.environ.get, which decodes; this runs on every connection.
_environ_data = getattr(os.environ, "_data", None)
_ENV_KEYS_RAW = tuple(os.fsencode(k) for k in _ENV_KEYS)


def _env_snapshot() -> tuple:
    if isinstance(_environ_data, dict) and os.name == "posix":
        return tuple(map(_environ_data.get, _ENV_KEYS_RAW))
    return tuple(map(os.environ.get, _ENV_KEYS))


def settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default os.environ), parsed once per distinct value set.

    From os.environ, a value that breaks the grammar does what libpep.so does:
    one error line naming it (to stderr even under PEP_LOG=off), then every
    connection goes direct, unproxied, until the environment changes. With an
    explicit `env`, ConfigError is raised (as parse_settings does)."""
    global _settings_cache
    if env is not None:
        return parse_settings(env)
    key = _env_snapshot()
    cached = _settings_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    log_error = configure_logging(os.environ.get("PEP_LOG"))
    try:
        if log_error:
            raise ConfigError(log_error)
        result = parse_settings(os.environ)
    except ConfigError as exc:
        _say_unproxied(str(exc))
        result = Settings()
    _settings_cache = (key, result)
    return result


def _say_unproxied(message: str) -> None:
    line = f"pepsock: {message}; running unproxied"
    if log.isEnabledFor(logging.ERROR):
        log.error(line)
    else:               # PEP_LOG=off: like libpep, this one line still goes out
        sys.stderr.write(line + "\n")


_LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warn": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG}
_log_handler: logging.Handler | None = None


def configure_logging(value: str | None) -> str | None:
    """PEP_LOG=level[:path] for the Python client: the `pepsock` logger's level and,
    when PEP_LOG is set, a handler of its own (stderr, or the file).  Unset:
    logging is the application's (warnings reach stderr through logging's default).
    The level is case-insensitive, as in libpep.so. Returns the error for a value
    that does not parse (logging left as if unset), else None."""
    global _log_handler
    if _log_handler is not None:
        log.removeHandler(_log_handler)
        _log_handler = None
        log.setLevel(logging.NOTSET)
        log.propagate = True
    if not value:
        return None
    level_text, colon, path = value.partition(":")
    level = _LEVELS.get(level_text.lower())
    if level is None or (colon and not path) or len(os.fsencode(path)) >= 256:   # config.c's bound
        return (f"PEP_LOG={value!r} is not off, error, warn, info or debug "
                "(optionally followed by :/path/to/file)")
    log.setLevel(level)
    _log_handler = logging.FileHandler(path) if path else logging.StreamHandler()
    _log_handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_log_handler)
    log.propagate = False
    return None


# ----------------------------------------------------------------------------------
# Addresses


_canonical = normalize_ip


@functools.lru_cache(maxsize=1024)
def _literal(host: str):
    """The address if `host` is an IP literal (a scope suffix is not), else None."""
    if "%" in host:
        return None
    try:
        return _canonical(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class Destination:
    """The address the application asked for, normalised once."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @property
    def ip(self) -> str:
        return str(self.address)

    @property
    def sockaddr(self) -> tuple:
        """What getpeername() answers: (ip, port) or (ip, port, 0, 0)."""
        if self.address.version == 4:
            return (str(self.address), self.port)
        return (str(self.address), self.port, 0, 0)

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 \
            else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Pep:
    """One address of one PEP, ready to dial."""

    host: str             # as configured (a name or a literal)
    port: int
    family: int
    sockaddr: tuple
    address: ipaddress.IPv4Address | ipaddress.IPv6Address

    @functools.cached_property
    def state_name(self) -> str:
        """Its file in the shared state directory."""
        return f"pep-{self.address}-{self.port}"

    def __str__(self) -> str:
        text = f"[{self.address}]:{self.port}" if self.address.version == 6 \
            else f"{self.address}:{self.port}"
        return text if _literal(self.host) is not None else f"{self.host} ({text})"


@dataclass(frozen=True)
class Resolve:
    """The planner needs getaddrinfo(host, port, 0, SOCK_STREAM)."""

    host: str
    port: int
    what: str             # "destination" or "PEP", for the error text


@dataclass(frozen=True)
class Route:
    """direct: (host, port) to hand to a plain connect; else the PEPs to try, in order."""

    direct: tuple | None = None
    destination: Destination | None = None
    peps: tuple[Pep, ...] = ()
    forced: bool = False  # pep= given: no hold-down skipping, no fallback


def pep_from_addrinfo(host: str, port: int, info) -> Pep:
    family, _, _, _, sockaddr = info
    return Pep(host, port, family, sockaddr, _canonical(sockaddr[0]))


@functools.lru_cache(maxsize=64)
def _literal_pep(host: str, port: int) -> Pep | None:
    """The Pep for an IP-literal PEP_PROXY entry (no resolver needed), else None."""
    address = _literal(host)
    if address is None:
        return None
    if address.version == 4:
        return Pep(host, port, socket.AF_INET, (str(address), port), address)
    return Pep(host, port, socket.AF_INET6, (str(address), port, 0, 0), address)


def plan(host: str, port: int, conf: Settings, pep=None) -> Generator[Resolve, list, Route]:
    """The route to host:port (see the module text); pep= forces one PEP, no bypass."""
    if pep is not None:
        peps = (parse_hostport(pep, "pep") if isinstance(pep, str) else (pep[0], int(pep[1])),)
        bypass = None
    else:
        peps, bypass = conf.peps, conf.bypass
    if not peps:
        return Route(direct=(host, port))
    literal = _literal(host)
    if literal is None:
        if bypass is not None and bypass.matches(name=host, port=port):
            return Route(direct=(host, port))
        infos = yield Resolve(host, port, "destination")
        literal = _canonical(infos[0][4][0])
    dest = Destination(literal, port)
    if bypass is not None and bypass.matches(address=literal, port=port):
        return Route(direct=(dest.ip, port))
    candidates: list[Pep] = []
    failures: list[OSError] = []
    for pep_host, pep_port in peps:
        literal_pep = _literal_pep(pep_host, pep_port)
        if literal_pep is not None:
            if literal_pep.address == literal and pep_port == port:
                return Route(direct=(dest.ip, port))   # the PEP itself
            candidates.append(literal_pep)
            continue
        try:
            infos = yield Resolve(pep_host, pep_port, "PEP")
        except OSError as exc:
            log.warning("pepsock: %s", exc)
            failures.append(exc)
            continue
        for info in infos:
            candidate = pep_from_addrinfo(pep_host, pep_port, info)
            if candidate.address == literal and pep_port == port:
                return Route(direct=(dest.ip, port))   # the PEP itself
            candidates.append(candidate)
    if not candidates and failures:
        raise failures[0]
    return Route(destination=dest, peps=tuple(candidates), forced=pep is not None)


def resolve_sync(request: Resolve) -> list:
    try:
        return socket.getaddrinfo(request.host, request.port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise socket.gaierror(exc.errno, f"cannot resolve {request.what} {request.host!r}: "
                                         f"{exc.strerror}") from None


def plan_sync(host: str, port: int, conf: Settings, pep=None) -> Route:
    """Drive plan() with blocking getaddrinfo."""
    steps = plan(host, port, conf, pep)
    try:
        request = next(steps)
        while True:
            try:
                answer = resolve_sync(request)
            except OSError as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(answer)
    except StopIteration as done:
        return done.value


async def plan_async(host: str, port: int, conf: Settings, pep=None) -> Route:
    """Drive plan() with the event loop's resolver (a thread, as asyncio does)."""
    import asyncio
    loop = asyncio.get_running_loop()
    steps = plan(host, port, conf, pep)
    try:
        request = next(steps)
        while True:
            try:
                answer = await loop.run_in_executor(None, resolve_sync, request)
            except OSError as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(answer)
    except StopIteration as done:
        return done.value
