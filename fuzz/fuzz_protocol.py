"""Coverage-guided fuzzing of pepsock.protocol (the Python RFC 8803 parser).

    python fuzz/fuzz_protocol.py fuzz/corpus -max_total_time=600     # atheris, by hand
    python fuzz/fuzz_protocol.py --replay fuzz/corpus                 # every corpus file once

With atheris installed (pip install atheris) this is a libFuzzer-driven,
coverage-guided run over pepsock/protocol.py; without it, `check()` is still
driven by hypothesis in tests/test_reliability_fuzz.py (no coverage feedback).

Input format (shared with fuzz_tlv.c): byte 0 picks how the incremental
reader is fed (value % 9: 0/1 one byte at a time, 2-7 that many, 8 all at
once), the rest is the byte stream.

Invariants checked on every input (any other exception is a finding):
  * decode() returns (message, rest) with rest the bytes after Total Length,
    or raises ProtocolError with a code of 0, 1 (never anything else);
  * MessageReader fed in chunks reaches the same verdict and code as soon as
    the bytes prove it, keeps every byte after the message in `rest`, and
    eof() inside a message is code 1 (or 0 decided by the first byte);
  * a decoded message: check_request() gives a Connect/Info or code 1/2,
    check_reply() gives None or a ConvertError (an OSError with an errno),
    and encode() of it is at most 1020 bytes and decodes to the same message;
  * with PEPSOCK_FUZZ_CLIB set to a shared build of preload/tlv.c (the test
    builds one), the C parser must reach the same verdict and code.
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

try:
    import atheris
except ImportError:  # hypothesis drives check() instead (tests/test_reliability_fuzz.py)
    atheris = None

if atheris is not None and __name__ == "__main__" and "--replay" not in sys.argv:
    # Coverage feedback from the codec only (not asyncio, ssl, ...).
    with atheris.instrument_imports(include=["pepsock.protocol"]):
        from pepsock import protocol as p
else:
    from pepsock import protocol as p


class Finding(AssertionError):
    pass


def _expect(cond, what):
    if not cond:
        raise Finding(what)


_clib = None


def c_codec():
    """The C parser (a shared build of preload/tlv.c), if PEPSOCK_FUZZ_CLIB names one."""
    global _clib
    path = os.environ.get("PEPSOCK_FUZZ_CLIB")
    if _clib is None and path:
        _clib = ctypes.CDLL(path)
        _clib.pep_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_int)]
        _clib.pep_check_request.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    return _clib


def c_verdict(data: bytes):
    """(decode_code or None, request_code or None) from the C parser."""
    lib = c_codec()
    msg = ctypes.create_string_buffer(4096)
    code = ctypes.c_int(-1)
    if lib.pep_decode(data, len(data), msg, ctypes.byref(code)) != 0:
        return code.value, None
    rc = lib.pep_check_request(msg, ctypes.byref(code))
    return None, (code.value if rc != 0 else None)


def split(data: bytes):
    if not data:
        return 1, b""
    mode = data[0] % 9
    return (1 if mode == 0 else len(data) if mode == 8 else mode), data[1:]


def check(raw: bytes) -> str:
    """Run every invariant on one input; returns a short verdict label."""
    chunk, data = split(raw)

    # One-shot decode.
    try:
        msg, rest = p.decode(data)
        code = None
    except p.ProtocolError as exc:
        msg, rest, code = None, None, exc.code
        _expect(code in (0, 1), f"decode rejected with code {code}")
    if msg is not None:
        total = data[1] * 4
        _expect(rest == data[total:], "decode lost or reordered bytes after the message")

    # Incremental reader, fed in chunks.
    reader = p.MessageReader()
    rcode = None
    fed = 0
    try:
        while fed < len(data) and not reader.done:
            _expect(reader.needed() > 0, "reader asks for 0 bytes before it is done")
            reader.feed(data[fed:fed + chunk])
            fed += chunk
        if fed < len(data):
            reader.feed(data[fed:])
    except p.ProtocolError as exc:
        rcode = exc.code
    if msg is not None:
        _expect(rcode is None and reader.message == msg, "reader and decode disagree on a message")
        _expect(reader.rest == rest, "reader lost bytes after the message")
    elif rcode is not None:
        _expect(rcode == code, f"reader code {rcode} != decode code {code}")
    else:
        _expect(not reader.done, "reader accepted what decode rejected")
        try:
            reader.eof()
            raise Finding("eof() inside a message did not raise")
        except p.ProtocolError as exc:
            _expect(exc.code == code, f"eof code {exc.code} != decode code {code}")

    # What each side makes of a well-formed message.
    req_code = None
    if msg is not None:
        try:
            target = p.check_request(msg)
            _expect(isinstance(target, (p.Connect, p.Info)), "check_request returned junk")
        except p.ProtocolError as exc:
            req_code = exc.code
            _expect(req_code in (1, 2), f"check_request code {req_code}")
        try:
            p.check_reply(msg)
        except p.ConvertError as exc:
            _expect(isinstance(exc, OSError) and exc.errno, "ConvertError without an errno")
            _expect(exc.code == msg.error.code, "ConvertError code differs from the TLV")
        again = msg.encode()
        _expect(len(again) <= p.MAX_MESSAGE_SIZE, "re-encoded message too long")
        _expect(p.decode(again) == (msg, b""), "encode/decode round trip changed the message")

    # The C parser must agree.
    if c_codec() is not None:
        c_code, c_req = c_verdict(data)
        _expect(c_code == code, f"C decode code {c_code} != Python {code}")
        if msg is not None:
            _expect(c_req == req_code, f"C request code {c_req} != Python {req_code}")

    if msg is None:
        return f"reject{code}"
    return "accept" if req_code is None else f"accept-req{req_code}"


def replay(paths) -> dict:
    counts: dict[str, int] = {}
    for root in paths:
        root = pathlib.Path(root)
        for f in sorted(root.iterdir() if root.is_dir() else [root]):
            label = check(f.read_bytes())
            counts[label] = counts.get(label, 0) + 1
    return counts


def _one_input(raw: bytes) -> None:
    check(raw)


def main(argv):
    if len(argv) > 1 and argv[1] == "--replay":
        print(replay(argv[2:]))
        return 0
    if atheris is None:
        print("atheris is not installed (pip install atheris); use --replay or the hypothesis "
              "tests in tests/test_reliability_fuzz.py", file=sys.stderr)
        return 2
    atheris.Setup(argv, _one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
