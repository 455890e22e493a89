"""RFC 8803 Cookie TLV values (section 6.2.7), relay side: what `--cookie-secret`
hands out in Error 3 and accepts in a Connect, and the tokens `pep cookie`
prints.  No I/O beyond reading the secret files; no sockets.

Two kinds of value, told apart by their first byte, both ending in a MAC
(HMAC-SHA256, truncated) under a secret only the relays hold:

* address cookie (16 bytes): ``0x01 | MAC(secret, client address)[:15]``.
  What Error 3 carries.  Bound to the client's IPv4 address, or to the /64 of
  an IPv6 client (privacy addresses change inside the /64 the network
  assigned; a /64 is what one host or one customer gets).  A client that
  received one has proved it receives packets at that address.
* token (24-56 bytes): ``0x02 | expires (4, unix seconds, 0 = never) |
  id length (1) | id (1-32 bytes) | zero padding to a 4-byte boundary |
  MAC(secret, all before)[:16]``.  Accepted from any address until it expires:
  authorization for clients whose address changes (`pep cookie`, PEP_COOKIE).
  The id names the holder in the relay's log; it is not a secret.

Both lengths are multiples of 4, so neither the Cookie TLV nor the Error TLV
that carries one needs padding; up to 3 trailing zero bytes (a sender's
padding) are ignored.  Every MAC under every configured secret is computed
and compared with hmac.compare_digest, whichever matches, so the time taken
says nothing about which byte or which secret was wrong.  Values longer than
MAX_VALUE are refused before any MAC is computed.

Rotation: `--cookie-secret` may be given more than once (or a file may hold
several lines); new cookies come from the first secret, all are accepted.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import re
import struct
import time

from ..policy import normalize_ip
from ..protocol import ErrorCode
from . import stats as S

ADDRESS_COOKIE, TOKEN = 0x01, 0x02
ADDRESS_MAC = 15
TOKEN_MAC = 16
ADDRESS_COOKIE_SIZE = 1 + ADDRESS_MAC
MAX_ID = 32
#: Longest Cookie TLV value considered at all (the longest token, 56 bytes,
#: plus padding); anything longer is refused unread.
MAX_VALUE = 64
MIN_SECRET = 16
MAX_SECRETS = 4
ID_RE = re.compile(r"[A-Za-z0-9._@+-]{1,32}")
_DOMAIN = b"pepsock cookie v1\x00"
_TOKEN_HEAD = struct.Struct("!BIB")


class Verdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    BAD = "bad"
    EXPIRED = "expired"


class SecretError(ValueError):
    """A secret file that cannot be used (message says why and what to do)."""


def load_secrets(paths) -> list[bytes]:
    """Every secret in `paths`, in order: one per non-empty line that does not
    start with '#', at least MIN_SECRET bytes, used as given (whitespace
    around it stripped)."""
    secrets = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 16)
        except OSError as e:
            raise SecretError(f"{path}: {e.strerror}") from None
        found = [ln.strip() for ln in text.splitlines()]
        found = [ln for ln in found if ln and not ln.startswith(b"#")]
        if not found:
            raise SecretError(f"{path}: no secret in it (generate one: "
                              f"head -c 32 /dev/urandom | base64 > {path})")
        for line in found:
            if len(line) < MIN_SECRET:
                raise SecretError(f"{path}: a secret of {len(line)} bytes; use at least "
                                  f"{MIN_SECRET} (head -c 32 /dev/urandom | base64)")
        secrets += found
    if len(secrets) > MAX_SECRETS:
        raise SecretError(f"{len(secrets)} cookie secrets; at most {MAX_SECRETS} (the current "
                          "one and those being retired)")
    return secrets


def _binding(ip) -> bytes:
    """What an address cookie is bound to: the IPv4 address, or an IPv6 /64."""
    addr = normalize_ip(ip)
    if addr.version == 4:
        return b"\x04" + addr.packed
    return b"\x06" + addr.packed[:8]


def _mac(secret: bytes, data: bytes, size: int) -> bytes:
    return hmac.new(secret, _DOMAIN + data, hashlib.sha256).digest()[:size]


def address_cookie(secret: bytes, ip) -> bytes:
    return bytes((ADDRESS_COOKIE,)) + _mac(secret, bytes((ADDRESS_COOKIE,)) + _binding(ip),
                                           ADDRESS_MAC)


def make_token(secret: bytes, ident: str, expires: int = 0) -> bytes:
    """A token for `ident` that relays sharing `secret` accept from any address
    until `expires` (unix seconds; 0: no expiry)."""
    if not ID_RE.fullmatch(ident):
        raise ValueError(f"token id {ident!r}: 1-{MAX_ID} characters of A-Z a-z 0-9 . _ @ + -")
    if not 0 <= expires < 1 << 32:
        raise ValueError("expiry out of range")
    raw = ident.encode()
    body = _TOKEN_HEAD.pack(TOKEN, expires, len(raw)) + raw
    body += b"\x00" * (-len(body) % 4)
    return body + _mac(secret, body, TOKEN_MAC)


def _strip_padding(value: bytes, size: int) -> bytes | None:
    """value[:size] if what follows is at most 3 zero bytes, else None."""
    if len(value) < size or len(value) - size > 3 or any(value[size:]):
        return None
    return value[:size]


def parse_token(value: bytes) -> tuple[str, int, bytes, bytes] | None:
    """(id, expires, signed part, MAC) of a well-formed token, else None.
    Says nothing about the MAC."""
    if len(value) < _TOKEN_HEAD.size or value[0] != TOKEN:
        return None
    _, expires, n = _TOKEN_HEAD.unpack_from(value)
    if not 1 <= n <= MAX_ID:
        return None
    signed = _TOKEN_HEAD.size + n
    signed += -signed % 4
    token = _strip_padding(value, signed + TOKEN_MAC)
    if token is None or any(token[_TOKEN_HEAD.size + n:signed]):
        return None
    try:
        ident = token[_TOKEN_HEAD.size:_TOKEN_HEAD.size + n].decode()
    except UnicodeDecodeError:
        return None
    if not ID_RE.fullmatch(ident):
        return None
    return ident, expires, token[:signed], token[signed:]


class Cookies:
    """The relay's cookie policy: mint for an address, judge a Cookie TLV value."""

    def __init__(self, secrets: list[bytes], clock=time.time):
        if not secrets:
            raise ValueError("at least one secret")
        self.secrets = list(secrets)
        self.clock = clock

    def cookie_for(self, ip) -> bytes:
        """The address cookie Error 3 carries (from the first, current secret)."""
        return address_cookie(self.secrets[0], ip)

    def _any_mac(self, data: bytes, mac: bytes) -> bool:
        ok = False
        for secret in self.secrets:     # all of them, always: constant in which one matched
            ok |= hmac.compare_digest(_mac(secret, data, len(mac)), mac)
        return ok

    def check(self, value: bytes | None, ip) -> tuple[Verdict, str]:
        """(verdict, who) for a Connect's Cookie TLV value (None: no Cookie TLV)
        from client address `ip`; `who` is "address" or "token NAME" when OK."""
        if value is None:
            return Verdict.MISSING, ""
        if len(value) > MAX_VALUE or not value:
            return Verdict.BAD, ""
        if value[0] == ADDRESS_COOKIE:
            cookie = _strip_padding(value, ADDRESS_COOKIE_SIZE)
            if cookie is None:
                return Verdict.BAD, ""
            signed = bytes((ADDRESS_COOKIE,)) + _binding(ip)
            return (Verdict.OK, "address") if self._any_mac(signed, cookie[1:]) \
                else (Verdict.BAD, "")
        parsed = parse_token(value)
        if parsed is None:
            return Verdict.BAD, ""
        ident, expires, signed, mac = parsed
        if not self._any_mac(signed, mac):
            return Verdict.BAD, ""
        if expires and self.clock() >= expires:
            return Verdict.EXPIRED, f"token {ident}"
        return Verdict.OK, f"token {ident}"


    def judge(self, value: bytes | None, ip, counters) -> tuple[tuple | None, str]:
        """A Connect's Cookie TLV value as both relay engines answer it:
        (None, who) if accepted, else ((Error code, Value, why), "") to fail
        the tunnel with, counted in `counters` (stats.Stats.v).  No Cookie
        TLV: Error 3 carrying this address's cookie; a wrong one or an
        expired token: Error 32.  who == "address" means the address once
        received our Error 3: proof of its routability, as a TFO cookie is
        (a token is authorization, not that proof)."""
        verdict, who = self.check(value, ip)
        if verdict is Verdict.OK:
            return None, who
        if verdict is Verdict.MISSING:
            counters[S.COOKIE_MISSING] += 1
            return (ErrorCode.MISSING_COOKIE, b"\x00" + self.cookie_for(ip), "no Cookie TLV"), ""
        if verdict is Verdict.EXPIRED:
            counters[S.TOKEN_EXPIRED] += 1
            return (ErrorCode.NOT_AUTHORIZED, b"", f"{who} expired"), ""
        counters[S.COOKIE_BAD] += 1
        return (ErrorCode.NOT_AUTHORIZED, b"", "Cookie TLV not valid for this client"), ""


#: TCP_FASTOPEN_KEY (include/uapi/linux/tcp.h): 16 bytes set the primary key,
#: 32 the primary and a backup that is still accepted (Linux >= 5.3).
TCP_FASTOPEN_KEY = 33
TFO_KEY_SIZE = 16


def load_tfo_key(path) -> bytes:
    """--tfo-key FILE: 32 hex digits (primary key) or 64 (primary, then backup),
    the raw key bytes in order; whitespace, '-' and ',' between them are ignored.
    (Not the word format of the net.ipv4.tcp_fastopen_key sysctl, whose words
    are byte-swapped on little-endian hosts.)"""
    try:
        with open(path) as f:
            text = f.read(4096)
    except OSError as e:
        raise SecretError(f"{path}: {e.strerror}") from None
    digits = re.sub(r"[\s,-]", "", text)
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        raise SecretError(f"{path}: not hex digits") from None
    if len(key) not in (TFO_KEY_SIZE, 2 * TFO_KEY_SIZE):
        raise SecretError(f"{path}: {len(key)} bytes; want 16 (primary) or 32 (primary + "
                          f"backup): head -c 32 /dev/urandom | xxd -p -c 64 > {path}")
    return key
