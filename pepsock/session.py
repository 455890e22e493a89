"""The client side of RFC 8803 for one application connection, sans-IO.

In the style of h11: `ClientSession` does no I/O. It says what to dial and
which bytes go in the SYN (`Dial`), takes what the socket received and
returns the application's bytes once the PEP's reply is complete, knows
about EOF, and raises the same errors for every shell (client.PepSocket for
blocking and non-blocking sockets, and through it asyncio):

    ConvertError            the PEP answered with an Error TLV (docs/protocol.md)
    OSError(EPROTO)         the reply breaks RFC 8803
    ConnectionResetError    the PEP closed before its reply was complete
    TimeoutError(ETIMEDOUT) no complete reply within PEP_REPLY_TIMEOUT
    ConnectionRefusedError  no usable PEP left and PEP_FALLBACK=fail

It also owns the rules of docs/protocol.md "When a PEP fails": the PEP list
in order, hold-downs in the shared state (pepstate), the fallback, Error 3
(Missing Cookie) retry with the cookie cached per PEP, and TFO cookie-mode
learning. A retry is a new `Dial` whose payload replays the application
bytes sent before the reply (at most REPLAY_LIMIT of them).

    session = ClientSession(route, settings)
    dial = session.first_dial()          # connect dial.sockaddr, dial.payload in the SYN
    session.connected(dial, syn_data_attempted, syn_data_acked, handshake_seconds)
    session.sent(app_bytes)              # after each write before the reply
    out = session.receive(bytes_read)    # bytes for the app, or a Dial to retry on
"""
from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from dataclasses import dataclass

from . import pepstate, protocol
from .route import Destination, Pep, Route, Settings

log = logging.getLogger("pepsock")

#: Application bytes kept for replay until the reply is in; past this, a
#: failure of the attempt is final (the bytes cannot be sent again).
REPLAY_LIMIT = 64 * 1024
#: Connect timeout to a PEP whose RTT is unknown, and the clamp for known ones.
CONNECT_TIMEOUT_UNKNOWN = 3.0
CONNECT_TIMEOUT_MIN, CONNECT_TIMEOUT_MAX = 1.0, 5.0
#: Errors of an attempt to reach a PEP that mean "this PEP, not the destination".
PEP_UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                             errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ENETDOWN})
#: Error codes that say the PEP (not the destination) cannot serve now: fail over.
HOLD_DOWN_CODES = {protocol.ErrorCode.RESOURCE_EXCEEDED: "error64",
                   protocol.ErrorCode.NETWORK_FAILURE: "error65"}

_EMPTY = protocol.Message()


@functools.lru_cache(maxsize=512)
def request_bytes(dest: Destination, cookie: bytes | None) -> bytes:
    """The Convert message for dest (header + Connect [+ Cookie]); cached, it is pure."""
    tlvs = (protocol.Connect(dest.address, dest.port),)
    if cookie is not None:
        tlvs += (protocol.Cookie(cookie),)
    return protocol.Message(tlvs).encode()


def hold_down_seconds(value: bytes) -> int:
    """Error 64/65's Value as a delay: its first byte in seconds; 0 or absent is 30 s.

    The Value follows the code inside the TLV's first 32-bit word, so one byte
    is what a converter can send without it being mistaken for padding."""
    return value[0] if value and value[0] else pepstate.DEFAULT_HOLD_DOWN


def connect_timeout_for(conf: Settings, fields: dict) -> float:
    if conf.connect_timeout is not None:
        return conf.connect_timeout
    try:
        rtt = int(fields["rtt_us"]) / 1e6
    except (KeyError, ValueError):
        return CONNECT_TIMEOUT_UNKNOWN
    return min(max(4 * rtt, CONNECT_TIMEOUT_MIN), CONNECT_TIMEOUT_MAX)


@dataclass(slots=True)
class Dial:
    """One attempt: connect to `sockaddr` with `payload` first on the stream."""

    pep: Pep | None             # None: straight to the destination (PEP_FALLBACK=direct)
    family: int
    sockaddr: tuple
    payload: bytes              # Convert message + replayed application bytes
    no_cookie: bool             # set TCP_FASTOPEN_NO_COOKIE (data in the SYN without a TFO cookie)
    connect_timeout: float | None
    cookie: bytes | None = None  # the Cookie TLV value sent, if any

    @property
    def via_pep(self) -> bool:
        return self.pep is not None


#: Per process: when this process last wrote a PEP's RTT (an RTT is a hint for the
#: connect timeout; rewriting the file for every wobble of it costs more than a connect).
_rtt_written: dict[str, float] = {}
RTT_REWRITE_INTERVAL = 10.0


def learn(conf: Settings, dial: Dial, syn_data_attempted: bool, syn_data_acked: bool,
          handshake_seconds: float, fields: dict | None = None) -> None:
    """Record what a handshake with dial.pep showed: its TFO mode (PEP_TFO_MODE=auto: SYN
    data sent without a cookie and not acked means the PEP wants TFO cookies) and RTT
    (when unknown, or off by more than 2x and not rewritten by us in the last 10 s)."""
    name = dial.pep.state_name
    if fields is None:
        fields = pepstate.load(conf.state_dir, name)
    changes = {}
    if conf.tfo_mode == "auto" and syn_data_attempted and dial.no_cookie:
        learned = "nocookie" if syn_data_acked else "cookie"
        if fields.get("tfo") != learned:
            changes["tfo"] = learned
    rtt_us = max(1, int(handshake_seconds * 1e6))
    try:
        known = int(fields["rtt_us"])
    except (KeyError, ValueError):
        known = 0
    now = time.monotonic()
    if not known or (not known / 2 <= rtt_us <= known * 2
                     and now - _rtt_written.get(name, -1e9) > RTT_REWRITE_INTERVAL):
        changes["rtt_us"] = rtt_us
        _rtt_written[name] = now
    if changes:
        pepstate.update(conf.state_dir, name, **changes)


class ReplyParser:
    """The PEP's reply at the head of a byte stream: the errors every client raises."""

    __slots__ = ("_reader", "pep")

    def __init__(self, pep=None):
        self._reader = protocol.MessageReader()
        self.pep = pep

    def feed(self, data: bytes) -> tuple[protocol.Message | None, bytes]:
        """(the reply once complete, else None; the bytes after it)."""
        try:
            msg = self._reader.feed(data)
        except protocol.ProtocolError as exc:
            raise OSError(errno.EPROTO, f"bad reply from the PEP: {exc}") from None
        if msg is None:
            return None, b""
        rest, self._reader.rest = self._reader.rest, b""
        return msg, rest

    def eof(self) -> None:
        if not self._reader.done:
            raise ConnectionResetError(
                errno.ECONNRESET, f"the PEP at {self.pep} closed the connection before its "
                                  f"RFC 8803 reply")

    def needed(self) -> int:
        """How many bytes to read at least to progress the reply."""
        return max(self._reader.needed(), 4)


_fallback_said: set = set()


class ClientSession:
    """One application connection through a PEP (see the module text)."""

    def __init__(self, route: Route, conf: Settings):
        assert route.destination is not None and route.peps
        self.destination = route.destination
        self.conf = conf
        self._queue = list(route.peps)
        self.forced = route.forced          # pep=: that PEP's errors are the connection's
        self._last_error: OSError | None = None
        self._skipped: list[str] = []       # why PEPs were not used, for messages
        self._downs: list[tuple[str, int]] = []   # (PEP, down_until): one fallback line each
        self._cookie_retried: set = set()
        self._reader: ReplyParser | None = None     # the current attempt's reply
        self._unsent: bytearray | None = bytearray()  # app bytes before the reply (replay)
        self.dial: Dial | None = None
        self._fields: dict = {}              # the shared state of dial.pep when dialled
        self.message: protocol.Message | None = None
        self.error: OSError | None = None

    # -- choosing the attempt ----------------------------------------------------------

    @property
    def done(self) -> bool:
        """The reply is in (or there is none to wait for: direct)."""
        return self.message is not None

    def first_dial(self) -> Dial:
        return self._next_dial()

    def _next_dial(self) -> Dial:
        directory = self.conf.state_dir
        while self._queue:
            pep = self._queue.pop(0)
            fields = pepstate.load(directory, pep.state_name)
            until = pepstate.down_until(fields)
            if until is not None and not self.forced:
                self._downs.append((pep.state_name, until))
                when = time.strftime("%H:%M:%S", time.localtime(until))
                self._skipped.append(f"{pep} held down until {when} ({fields.get('reason', '?')})")
                continue
            return self._dial_pep(pep, fields)
        return self._fallback()

    def _dial_pep(self, pep: Pep, fields: dict) -> Dial:
        self._fields = fields
        cookie_hex = fields.get("cookie")
        cookie = self.conf.cookie
        if cookie_hex:
            try:
                cookie = bytes.fromhex(cookie_hex)
            except ValueError:
                pass
        mode = self.conf.tfo_mode
        no_cookie = mode == "nocookie" or (mode == "auto" and fields.get("tfo") != "cookie")
        self._reader = ReplyParser(pep)
        self.message = None
        replay = bytes(self._unsent or b"")
        # The connect timeout says when to try the next PEP: with none to try (pep=, or
        # the last PEP under PEP_FALLBACK=fail) only the application's timeout counts,
        # so a lost SYN (retransmitted after 1 s) does not fail the connection.
        last = self.forced or (not self._queue and self.conf.fallback == "fail")
        self.dial = Dial(pep, pep.family, pep.sockaddr,
                         request_bytes(self.destination, cookie) + replay, no_cookie,
                         None if last else connect_timeout_for(self.conf, fields), cookie)
        return self.dial

    def _fallback(self) -> Dial:
        why = "; ".join(self._skipped) or "no PEP"
        if self.forced and self._last_error is not None:
            raise self.fail(self._last_error)
        if self.conf.fallback == "fail":
            raise self.fail(ConnectionRefusedError(
                errno.ECONNREFUSED, f"no usable PEP for {self.destination} ({why}); "
                                    f"PEP_FALLBACK=fail"))
        key = tuple(sorted(self._downs))
        if key not in _fallback_said:
            if len(_fallback_said) > 1024:
                _fallback_said.clear()
            _fallback_said.add(key)
            log.warning("pepsock: no usable PEP (%s); connecting directly to %s",
                        why, self.destination)
        dest = self.destination
        family = socket.AF_INET if dest.address.version == 4 else socket.AF_INET6
        self.message = _EMPTY                 # no reply to wait for
        replay = bytes(self._unsent or b"")
        self._unsent = None
        self.dial = Dial(None, family, dest.sockaddr, replay, False, None)
        return self.dial

    def _hold(self, pep: Pep, seconds: int, reason: str, what: str) -> None:
        until = int(time.time()) + seconds
        pepstate.update(self.conf.state_dir, pep.state_name, down_until=until, reason=reason)
        self._downs.append((pep.state_name, until))
        self._skipped.append(f"{pep} {what}")
        log.warning("pepsock: PEP %s %s; held down for %d s", pep, what, seconds)

    # -- the attempt's handshake -------------------------------------------------------

    def connect_failed(self, exc: OSError, *, timed_out: bool = False) -> Dial:
        """The handshake with dial.pep failed: the next Dial, or raise `exc` (or the fallback's)."""
        pep = self.dial.pep if self.dial else None
        if pep is None or not (timed_out or exc.errno in PEP_UNREACHABLE):
            raise self.fail(exc)
        self._last_error = exc
        if timed_out:
            self._hold(pep, pepstate.DEFAULT_HOLD_DOWN, "timeout",
                       f"did not answer within {self.dial.connect_timeout:g} s")
        else:
            self._hold(pep, pepstate.DEFAULT_HOLD_DOWN, "refused",
                       f"refused ({errno.errorcode.get(exc.errno, exc.errno)})")
        return self._next_dial()

    def connected(self, dial: Dial, syn_data_attempted: bool, syn_data_acked: bool,
                  handshake_seconds: float) -> None:
        """Learn from a completed handshake: TFO cookie mode and RTT (shared state)."""
        if dial.pep is not None:
            learn(self.conf, dial, syn_data_attempted, syn_data_acked, handshake_seconds,
                  self._fields if dial is self.dial else None)

    # -- bytes -------------------------------------------------------------------------

    def sent(self, data) -> None:
        """The application wrote `data` (before the reply: kept for a replay)."""
        unsent = self._unsent
        if unsent is not None and self.message is None:
            if len(unsent) + len(data) > REPLAY_LIMIT:
                self._unsent = None
            else:
                unsent += data

    def receive(self, data: bytes):
        """Bytes read from the socket -> application bytes (b"" while the reply is
        incomplete), or a Dial when the attempt is to be retried elsewhere."""
        if self.message is not None:
            return data
        if self.error is not None:
            raise self.error
        try:
            msg, rest = self._reader.feed(data)
        except OSError as exc:
            raise self.fail(exc) from None
        if msg is None:
            return b""
        err = msg.error
        if err is None:
            self.message = msg
            self._unsent = None
            return rest
        retry = self._after_error(err)
        if retry is not None:
            return retry
        raise self.fail(protocol.convert_error(err.code, err.value))

    def _after_error(self, err: protocol.Error) -> Dial | None:
        pep = self.dial.pep
        directory = self.conf.state_dir
        if self._unsent is None:
            return None  # too much was sent to replay it
        if err.code == protocol.ErrorCode.MISSING_COOKIE:
            if pep in self._cookie_retried or len(err.value) < 2 or err.value[0] != 0:
                return None
            self._cookie_retried.add(pep)
            cookie = err.value[1:]
            pepstate.update(directory, pep.state_name, cookie=cookie.hex())
            log.info("pepsock: PEP %s asked for a cookie (Error 3); retrying with it", pep)
            fields = dict(pepstate.load(directory, pep.state_name))
            fields["cookie"] = cookie.hex()   # even without a usable state directory
            return self._dial_pep(pep, fields)
        reason = HOLD_DOWN_CODES.get(err.code)
        if reason is not None:
            self._last_error = protocol.convert_error(err.code, err.value)
            name = protocol.ErrorCode(err.code).name.replace("_", " ").title()
            self._hold(pep, hold_down_seconds(err.value), reason,
                       f"answered Error {err.code} ({name})")
            return self._next_dial()
        if err.code == protocol.ErrorCode.NOT_AUTHORIZED and self.dial.cookie is not None \
                and self.dial.cookie != self.conf.cookie:
            # A cached cookie the PEP no longer takes: forget it (the next Error 3 brings one).
            pepstate.update(directory, pep.state_name, cookie=None)
        return None

    def eof(self) -> None:
        """The stream ended: fine after the reply, ECONNRESET before it."""
        if self.message is None:
            try:
                self._reader.eof()
            except OSError as exc:
                raise self.fail(exc) from None

    def reply_timed_out(self, seconds: float) -> OSError:
        return self.fail(TimeoutError(
            errno.ETIMEDOUT, f"no RFC 8803 reply from the PEP at {self.dial.pep} within "
                             f"{seconds:g} s"))

    def needed(self) -> int:
        """How many bytes to read at least to progress the reply."""
        return self._reader.needed()

    def fail(self, exc: OSError) -> OSError:
        """Make `exc` the connection's lasting error (the first one wins) and return it."""
        if self.error is None:
            self.error = exc
        return self.error
