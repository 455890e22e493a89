"""RFC 8803 (0-RTT TCP Convert Protocol) messages, sans-IO.

This module owns every byte of the protocol and every error code: the sync
client, the asyncio client and the relay only move bytes in and out of it.
No sockets here.  The rules, in the order they are checked, are written down
in docs/protocol.md; `preload/tlv.c` follows the same document and the two
are cross-tested.

    >>> connect_request("192.0.2.10", 443).hex()
    '010622630a0501bb00000000000000000000ffffc000020a'
    >>> reader = MessageReader()
    >>> reader.feed(bytes.fromhex("01012263") + b"app data")
    Message(tlvs=())
    >>> reader.rest
    b'app data'
"""
from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Union

from .policy import normalize_ip

VERSION = 1
MAGIC = 0x2263
HEADER_SIZE = 4
#: Total Length is 8 bits of 32-bit words.
MAX_MESSAGE_SIZE = 255 * 4

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class TLVType(IntEnum):
    INFO = 0x01
    CONNECT = 0x0A
    EXTENDED_TCP_HEADER = 0x14
    SUPPORTED_TCP_EXTENSIONS = 0x15
    COOKIE = 0x16
    ERROR = 0x1E


class ErrorCode(IntEnum):
    UNSUPPORTED_VERSION = 0
    MALFORMED_MESSAGE = 1
    UNSUPPORTED_MESSAGE = 2
    MISSING_COOKIE = 3
    NOT_AUTHORIZED = 32
    UNSUPPORTED_TCP_OPTION = 33
    RESOURCE_EXCEEDED = 64
    NETWORK_FAILURE = 65
    CONNECTION_RESET = 96
    DESTINATION_UNREACHABLE = 97


ERROR_TEXT = {
    ErrorCode.UNSUPPORTED_VERSION: "PEP: unsupported Convert version",
    ErrorCode.MALFORMED_MESSAGE: "PEP: malformed Convert message",
    ErrorCode.UNSUPPORTED_MESSAGE: "PEP: unsupported Convert message",
    ErrorCode.MISSING_COOKIE: "PEP: missing cookie",
    ErrorCode.NOT_AUTHORIZED: "PEP: not authorized",
    ErrorCode.UNSUPPORTED_TCP_OPTION: "PEP: unsupported TCP option",
    ErrorCode.RESOURCE_EXCEEDED: "PEP: resource exceeded",
    ErrorCode.NETWORK_FAILURE: "PEP: network failure",
    ErrorCode.CONNECTION_RESET: "PEP: connection refused by the destination",
    ErrorCode.DESTINATION_UNREACHABLE: "PEP: destination unreachable",
}

_ERRNO = {
    ErrorCode.UNSUPPORTED_VERSION: errno.EPROTO,
    ErrorCode.MALFORMED_MESSAGE: errno.EPROTO,
    ErrorCode.UNSUPPORTED_MESSAGE: errno.EPROTO,
    ErrorCode.MISSING_COOKIE: errno.EPROTO,
    ErrorCode.NOT_AUTHORIZED: errno.EACCES,
    ErrorCode.UNSUPPORTED_TCP_OPTION: errno.EOPNOTSUPP,
    ErrorCode.RESOURCE_EXCEEDED: errno.ENOBUFS,
    ErrorCode.NETWORK_FAILURE: errno.ENETUNREACH,
    ErrorCode.CONNECTION_RESET: errno.ECONNREFUSED,
}
#: ICMP destination-unreachable codes that name a network rather than a host.
_ICMP_NETWORK_CODES = frozenset({0, 6, 9, 11})


def errno_for(code: int, value: bytes = b"") -> int:
    """The errno a client reports for an Error TLV (docs/protocol.md's table)."""
    if code == ErrorCode.DESTINATION_UNREACHABLE:
        icmp_code = value[0] if value else 1
        return errno.ENETUNREACH if icmp_code in _ICMP_NETWORK_CODES else errno.EHOSTUNREACH
    return _ERRNO.get(code, errno.EPROTO)


def error_for_connect_failure(err: int) -> tuple[ErrorCode, bytes]:
    """What a PEP answers when its onward connect() failed with errno `err`."""
    if err in (errno.ECONNREFUSED, errno.ECONNRESET):
        return ErrorCode.CONNECTION_RESET, b""
    if err == errno.EHOSTUNREACH:
        return ErrorCode.DESTINATION_UNREACHABLE, b"\x01"
    if err == errno.ENETUNREACH:
        return ErrorCode.DESTINATION_UNREACHABLE, b"\x00"
    return ErrorCode.NETWORK_FAILURE, b""


# --------------------------------------------------------------------------
# Errors


class ProtocolError(ValueError):
    """A message that breaks the rules; `code` is the Error TLV a PEP answers with."""

    def __init__(self, code: ErrorCode, detail: str):
        super().__init__(f"{detail} (RFC 8803 error {int(code)}, {code.name})")
        self.code = code
        self.detail = detail


def _malformed(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_MESSAGE, detail)


class ConvertError(OSError):
    """The PEP answered with an Error TLV.

    An OSError with the mapped errno (docs/protocol.md), plus the RFC `code`
    and raw `value`.  Instances made by `convert_error()` are also the
    matching builtin subclass (ConnectionRefusedError for 96, ...), so code
    written for plain sockets catches them unchanged.
    """

    def __init__(self, code: int, value: bytes = b""):
        err = errno_for(code, value)
        try:
            text = ERROR_TEXT[ErrorCode(code)]
        except ValueError:
            text = f"PEP: unknown error code {code}"
        super().__init__(err, f"{os.strerror(err)} ({text}, RFC 8803 error {code})")
        self.code = code
        self.value = bytes(value)


class ConvertConnectionRefused(ConvertError, ConnectionRefusedError):
    pass


class ConvertPermissionError(ConvertError, PermissionError):
    pass


_ERROR_CLASSES = {
    errno.ECONNREFUSED: ConvertConnectionRefused,
    errno.EACCES: ConvertPermissionError,
}


def convert_error(code: int, value: bytes = b"") -> ConvertError:
    """The exception a client raises for an Error TLV."""
    return _ERROR_CLASSES.get(errno_for(code, value), ConvertError)(code, value)


# --------------------------------------------------------------------------
# TLVs: one small frozen dataclass each, `body()` gives the bytes after Type
# and Length (before padding), `_parse_body()` is its inverse.


@dataclass(frozen=True)
class TCPOption:
    kind: int
    value: bytes = b""

    def __post_init__(self):
        if not 2 <= self.kind <= 255:
            raise ValueError(f"TCP option kind {self.kind} cannot be carried (0-1 are EOL/NOP)")
        if len(self.value) > 253:
            raise ValueError("TCP option value longer than 253 bytes")


@dataclass(frozen=True)
class Info:
    type = TLVType.INFO

    def body(self) -> bytes:
        return b"\x00\x00"


@dataclass(frozen=True)
class Connect:
    address: IPAddress
    port: int
    options: tuple[TCPOption, ...] = ()
    type = TLVType.CONNECT

    def __post_init__(self):
        addr = self.address
        if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            addr = ipaddress.ip_address(addr)
        object.__setattr__(self, "address", _normalize(addr))
        object.__setattr__(self, "options", tuple(self.options))
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range 1-65535")
        problem = _address_problem(self.address)
        if problem:
            raise ValueError(f"cannot connect to {self.address}: {problem}")

    def body(self) -> bytes:
        addr = self.address
        if addr.version == 4:
            addr = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + addr.packed)
        opts = b"".join(bytes((o.kind, len(o.value) + 2)) + o.value for o in self.options)
        return self.port.to_bytes(2, "big") + addr.packed + opts


@dataclass(frozen=True)
class ExtendedTCPHeader:
    data: bytes = b""
    type = TLVType.EXTENDED_TCP_HEADER

    def body(self) -> bytes:
        return b"\x00\x00" + self.data


@dataclass(frozen=True)
class SupportedTCPExtensions:
    kinds: tuple[int, ...] = ()
    type = TLVType.SUPPORTED_TCP_EXTENSIONS

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if any(not 1 <= k <= 255 for k in self.kinds):
            raise ValueError("TCP option kinds are 1-255")

    def body(self) -> bytes:
        return b"\x00\x00" + bytes(self.kinds)


@dataclass(frozen=True)
class Cookie:
    data: bytes = b""
    type = TLVType.COOKIE

    def body(self) -> bytes:
        return b"\x00\x00" + self.data


@dataclass(frozen=True)
class Error:
    code: int
    value: bytes = b""
    type = TLVType.ERROR

    def __post_init__(self):
        if not 0 <= self.code <= 255:
            raise ValueError("error codes are 8 bits")

    def body(self) -> bytes:
        return bytes((self.code,)) + self.value


@dataclass(frozen=True)
class UnknownTLV:
    """A TLV type this codec does not know; kept so the receiver can decide."""

    tlv_type: int
    value: bytes = b""

    @property
    def type(self) -> int:
        return self.tlv_type

    def body(self) -> bytes:
        return self.value


TLV = Union[Info, Connect, ExtendedTCPHeader, SupportedTCPExtensions, Cookie, Error, UnknownTLV]


_normalize = normalize_ip


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _address_problem(addr: IPAddress) -> str | None:
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_multicast:
        return "multicast address"
    if addr == _BROADCAST:
        return "broadcast address"
    return None


def _parse_connect(body: bytes) -> Connect:
    if len(body) < 18:
        raise _malformed("Connect TLV shorter than 20 bytes")
    port = int.from_bytes(body[:2], "big")
    addr = _normalize(ipaddress.IPv6Address(body[2:18]))
    if port == 0:
        raise _malformed("Connect TLV with port 0")
    problem = _address_problem(addr)
    if problem:
        raise _malformed(f"Connect TLV to an {problem}")
    options = []
    raw, i = body[18:], 0
    while i < len(raw):
        kind = raw[i]
        if kind == 0:
            if any(raw[i:]) or len(raw) - i >= 4:
                raise _malformed("TCP option EOL inside a Connect TLV")
            break
        if kind == 1:
            raise _malformed("TCP option NOP inside a Connect TLV")
        if i + 1 >= len(raw) or raw[i + 1] < 2 or i + raw[i + 1] > len(raw):
            raise _malformed(f"TCP option {kind} with a bad length")
        options.append(TCPOption(kind, bytes(raw[i + 2:i + raw[i + 1]])))
        i += raw[i + 1]
    return Connect(addr, port, tuple(options))


def _parse_supported(body: bytes) -> SupportedTCPExtensions:
    kinds = bytes(body[2:]).rstrip(b"\x00")
    if 0 in kinds:
        raise _malformed("zero kind inside Supported TCP Extensions")
    return SupportedTCPExtensions(tuple(kinds))


def _parse_info(body: bytes) -> Info:
    if len(body) != 2:
        raise _malformed("Info TLV with Length other than 1")
    return Info()


_PARSERS = {
    TLVType.INFO: _parse_info,
    TLVType.CONNECT: _parse_connect,
    TLVType.EXTENDED_TCP_HEADER: lambda b: ExtendedTCPHeader(bytes(b[2:])),
    TLVType.SUPPORTED_TCP_EXTENSIONS: _parse_supported,
    TLVType.COOKIE: lambda b: Cookie(bytes(b[2:])),
    TLVType.ERROR: lambda b: Error(b[0], bytes(b[1:])),
}


# --------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Message:
    """One Convert message: the header and its TLVs, in order."""

    tlvs: tuple[TLV, ...] = field(default_factory=tuple)

    def get(self, tlv_type: int) -> TLV | None:
        for tlv in self.tlvs:
            if tlv.type == tlv_type:
                return tlv
        return None

    @property
    def connect(self) -> Connect | None:
        return self.get(TLVType.CONNECT)

    @property
    def error(self) -> Error | None:
        return self.get(TLVType.ERROR)

    def encode(self) -> bytes:
        parts = [b""]
        seen = set()
        for tlv in self.tlvs:
            if tlv.type in seen:
                raise ValueError(f"TLV type {int(tlv.type)} twice in one message")
            if not 1 <= tlv.type <= 255:
                raise ValueError("TLV type must be 1-255")
            seen.add(tlv.type)
            body = tlv.body()
            padded = body + b"\x00" * (-(2 + len(body)) % 4)
            words = (2 + len(padded)) // 4
            if words > 255:
                raise ValueError("TLV longer than 1020 bytes")
            parts.append(bytes((tlv.type, words)) + padded)
        payload = b"".join(parts)
        total = HEADER_SIZE + len(payload)
        if total > MAX_MESSAGE_SIZE:
            raise ValueError(f"Convert message of {total} bytes exceeds {MAX_MESSAGE_SIZE}")
        return bytes((VERSION, total // 4)) + MAGIC.to_bytes(2, "big") + payload


def _check_prefix(data: bytes) -> int | None:
    """Header checks that need only the bytes seen so far.

    Returns the Total Length in bytes once the header is complete, None
    while it is not; raises on the first rule broken.
    """
    if len(data) >= 1 and data[0] != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"Convert version {data[0]}")
    if len(data) >= 2 and data[1] == 0:
        raise _malformed("Convert Total Length 0")
    if len(data) >= 4:
        magic = int.from_bytes(data[2:4], "big")
        if magic != MAGIC:
            raise _malformed(f"bad Convert magic 0x{magic:04x}")
        return data[1] * 4
    return None


def _parse_tlvs(msg: bytes) -> Message:
    tlvs: list[TLV] = []
    seen: set[int] = set()
    off = HEADER_SIZE
    while off < len(msg):
        tlv_type, words = msg[off], msg[off + 1]
        if tlv_type == 0:
            raise _malformed("TLV type 0")
        if words == 0:
            raise _malformed(f"TLV {tlv_type} with Length 0")
        end = off + 4 * words
        if end > len(msg):
            raise _malformed(f"TLV {tlv_type} runs past the message")
        if tlv_type in seen:
            raise _malformed(f"TLV {tlv_type} twice")
        seen.add(tlv_type)
        body = msg[off + 2:end]
        parse = _PARSERS.get(tlv_type)
        tlvs.append(parse(body) if parse else UnknownTLV(tlv_type, bytes(body)))
        off = end
    return Message(tuple(tlvs))


def decode(data: bytes) -> tuple[Message, bytes]:
    """Parse one complete message at the start of `data`: (message, bytes after it).

    Raises ProtocolError if the message is broken or incomplete.
    """
    total = _check_prefix(data)
    if total is None or len(data) < total:
        raise _malformed(f"Convert message truncated at {len(data)} bytes")
    return _parse_tlvs(bytes(data[:total])), bytes(data[total:])


class MessageReader:
    """Incremental parser for one Convert message at the head of a byte stream.

    `feed()` any chunking (one byte at a time too); it returns the Message once
    complete, and from then on every byte that followed it is in `rest`
    (never lost, never reordered).  Broken input raises ProtocolError as soon
    as the bytes in hand prove it, without waiting for the rest.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.message: Message | None = None
        self.rest = b""

    @property
    def done(self) -> bool:
        return self.message is not None

    def feed(self, data: bytes) -> Message | None:
        if self.message is not None:
            self.rest += bytes(data)
            return self.message
        self._buf += data
        total = _check_prefix(self._buf)
        if total is None or len(self._buf) < total:
            return None
        self.message = _parse_tlvs(bytes(self._buf[:total]))
        self.rest = bytes(self._buf[total:])
        self._buf = bytearray()
        return self.message

    def needed(self) -> int:
        """A lower bound on the bytes still missing (0 once done)."""
        if self.message is not None:
            return 0
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        return self._buf[1] * 4 - len(self._buf)

    def eof(self) -> None:
        """The stream ended: fine after a message, malformed in the middle of one."""
        if self.message is None:
            raise _malformed(f"stream ended {len(self._buf)} bytes into a Convert message")


# --------------------------------------------------------------------------
# What each side sends, and what each side accepts


def connect_request(address, port: int, options=()) -> bytes:
    """A client's message: header + Connect TLV for address:port."""
    return Message((Connect(address, port, tuple(options)),)).encode()


def info_request() -> bytes:
    return Message((Info(),)).encode()


def success_reply(tlvs=()) -> bytes:
    return Message(tuple(tlvs)).encode()


def error_reply(code: int, value: bytes = b"") -> bytes:
    return Message((Error(int(code), value),)).encode()


def check_request(msg: Message) -> Connect | Info:
    """What a PEP makes of a well-formed message: the Connect (or Info) to serve."""
    for tlv in msg.tlvs:
        if isinstance(tlv, (UnknownTLV, Error)):
            raise ProtocolError(ErrorCode.UNSUPPORTED_MESSAGE,
                                f"TLV type {int(tlv.type)} is not valid in a request")
    connect = msg.connect
    if connect is not None:
        return connect
    info = msg.get(TLVType.INFO)
    if info is not None:
        return info
    raise _malformed("request without a Connect TLV")


def check_reply(msg: Message) -> None:
    """Raise the client-side ConvertError if the PEP's reply carries an Error TLV."""
    err = msg.error
    if err is not None:
        raise convert_error(err.code, err.value)
