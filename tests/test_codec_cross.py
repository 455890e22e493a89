"""One wire format, two implementations: preload/tlv.c against pepsock.protocol.

cffi loads the C codec (preload/libpeptlv.so, or the ASan/UBSan build named
by PEPTLV_LIB); hypothesis generates destinations, TCP options, arbitrary
bytes and mutations of valid messages. Both sides must produce the same
bytes, the same accept/reject decision and the same error code.
test_cross_under_sanitizers reruns this file against the ASan/UBSan build.
"""
import errno
import ipaddress
import os
import subprocess
import sys

import pytest

cffi = pytest.importorskip("cffi")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pepsock import protocol  # noqa: E402
import preload_helpers  # noqa: E402

CDEF = """
struct pep_opt { uint8_t kind; uint8_t len; const uint8_t *value; };
struct pep_msg {
    size_t total; uint32_t seen[8]; unsigned ntlv;
    int has_info, has_connect, has_error, has_supported, has_unknown;
    uint16_t port; uint8_t addr[16]; const uint8_t *opts; size_t optlen;
    uint8_t error_code; const uint8_t *error_value; size_t error_len;
    const uint8_t *supported; size_t nsupported;
    const uint8_t *cookie; size_t cookie_len;
};
struct pep_reader { uint16_t have; uint8_t buf[1020]; };
size_t pep_encode_connect(uint8_t *out, size_t cap, const uint8_t addr[16], uint16_t port,
                          const struct pep_opt *opts, size_t nopts);
size_t pep_encode_error(uint8_t *out, size_t cap, uint8_t code, const uint8_t *value, size_t len);
size_t pep_encode_success(uint8_t *out, size_t cap);
int pep_decode(const uint8_t *buf, size_t len, struct pep_msg *msg, int *code);
int pep_check_request(const struct pep_msg *msg, int *code);
void pep_reader_init(struct pep_reader *r);
size_t pep_reader_want(const struct pep_reader *r);
int pep_reader_feed(struct pep_reader *r, const uint8_t *data, size_t len, size_t *used,
                    struct pep_msg *msg, int *code);
int pep_reader_eof(const struct pep_reader *r);
int pep_errno_for(uint8_t code, const uint8_t *value, size_t len);
size_t pep_add_cookie(uint8_t *msg, size_t len, size_t cap, const uint8_t *cookie, size_t clen);
size_t pep_option_kinds(const struct pep_msg *msg, uint8_t *out, size_t cap);
"""
PEP_OK, PEP_REJECT, PEP_NEED_MORE = 0, -1, 1

ffi = cffi.FFI()
ffi.cdef(CDEF)
LIB_PATH = os.environ.get("PEPTLV_LIB") or preload_helpers.build("libpeptlv.so")
C = ffi.dlopen(LIB_PATH)
UNDER_SANITIZER = "PEPTLV_LIB" in os.environ
EXAMPLES = int(os.environ.get("PEPTLV_EXAMPLES", "300"))

fast = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- C wrappers

def c_connect(addr16: bytes, port: int, options) -> bytes | None:
    out = ffi.new("uint8_t[2048]")
    keep = [ffi.new("uint8_t[]", o.value or b"\0") for o in options]
    opts = ffi.new("struct pep_opt[]", max(1, len(options)))
    for i, o in enumerate(options):
        opts[i].kind = o.kind
        opts[i].len = len(o.value)
        opts[i].value = keep[i]
    n = C.pep_encode_connect(out, 2048, addr16, port, opts, len(options))
    return bytes(ffi.buffer(out, n)) if n else None


def _msg_view(m, buf_base, data: bytes) -> dict:
    """What the C decoder says, in comparable Python terms."""
    def sl(ptr, n):
        return data[ptr - buf_base: ptr - buf_base + n] if n else b""
    view = {"total": m.total, "types": sorted(t for t in range(256) if m.seen[t // 32] >> (t % 32) & 1)}
    if m.has_connect:
        view["connect"] = (bytes(m.addr), m.port, sl(int(ffi.cast("uintptr_t", m.opts)), m.optlen))
        kinds = ffi.new("uint8_t[256]")
        view["kinds"] = tuple(kinds[0:C.pep_option_kinds(m, kinds, 256)])
    if m.cookie != ffi.NULL:
        view["cookie"] = sl(int(ffi.cast("uintptr_t", m.cookie)), m.cookie_len)
    if m.has_error:
        view["error"] = (m.error_code, sl(int(ffi.cast("uintptr_t", m.error_value)), m.error_len))
    if m.has_supported:
        view["supported"] = tuple(sl(int(ffi.cast("uintptr_t", m.supported)), m.nsupported))
    return view


def c_decode(data: bytes):
    """('ok', view, request_code_or_None) or ('reject', code)."""
    buf = ffi.new("uint8_t[]", data or b"\0")
    m = ffi.new("struct pep_msg *")
    code = ffi.new("int *")
    rc = C.pep_decode(buf, len(data), m, code)
    if rc == PEP_REJECT:
        return ("reject", code[0])
    assert rc == PEP_OK
    base = int(ffi.cast("uintptr_t", buf))
    rq = None if C.pep_check_request(m, code) == PEP_OK else code[0]
    return ("ok", _msg_view(m, base, data), rq)


def py_decode(data: bytes):
    try:
        msg, rest = protocol.decode(data)
    except protocol.ProtocolError as exc:
        return ("reject", int(exc.code))
    view = {"total": len(data) - len(rest), "types": sorted(int(t.type) for t in msg.tlvs)}
    for t in msg.tlvs:
        if isinstance(t, protocol.Connect):
            addr = t.address
            packed = (b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed
            raw = data[4:view["total"]]
            # the raw options area of the Connect TLV, to compare with C's pointer
            off = 0
            while raw[off] != protocol.TLVType.CONNECT:
                off += raw[off + 1] * 4
            tlv = raw[off: off + raw[off + 1] * 4]
            view["connect"] = (packed, t.port, tlv[20:])
            view["kinds"] = tuple(o.kind for o in t.options)
            # and the options Python understood must re-encode to that area
            enc = b"".join(bytes((o.kind, len(o.value) + 2)) + o.value for o in t.options)
            assert tlv[20:].startswith(enc) and not any(tlv[20 + len(enc):])
        elif isinstance(t, protocol.Error):
            view["error"] = (t.code, t.value)
        elif isinstance(t, protocol.Cookie):
            view["cookie"] = t.data
        elif isinstance(t, protocol.SupportedTCPExtensions):
            view["supported"] = tuple(t.kinds)
    try:
        protocol.check_request(msg)
        rq = None
    except protocol.ProtocolError as exc:
        rq = int(exc.code)
    return ("ok", view, rq)


def c_reader(chunks):
    """Feed chunks to the C reader: ('ok', consumed) / ('reject', code) / ('more',)."""
    r = ffi.new("struct pep_reader *")
    C.pep_reader_init(r)
    m = ffi.new("struct pep_msg *")
    code = ffi.new("int *")
    used = ffi.new("size_t *")
    consumed = 0
    for chunk in chunks:
        buf = ffi.new("uint8_t[]", chunk or b"\0")
        rc = C.pep_reader_feed(r, buf, len(chunk), used, m, code)
        consumed += used[0]
        if rc == PEP_OK:
            return ("ok", consumed)
        if rc == PEP_REJECT:
            return ("reject", code[0])
        assert used[0] == len(chunk)
    return ("more", C.pep_reader_eof(r))


def py_reader(chunks):
    reader = protocol.MessageReader()
    fed = 0
    try:
        for chunk in chunks:
            fed += len(chunk)
            if reader.feed(chunk) is not None:
                return ("ok", fed - len(reader.rest))
    except protocol.ProtocolError as exc:
        return ("reject", int(exc.code))
    try:
        reader.eof()
    except protocol.ProtocolError as exc:
        return ("more", int(exc.code))
    raise AssertionError("eof without a message did not raise")


# ---------------------------------------------------------------- strategies

v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
special = st.sampled_from([ipaddress.ip_address(a) for a in (
    "0.0.0.0", "224.0.0.1", "239.255.255.255", "255.255.255.255", "::", "ff02::1",
    "::ffff:0.0.0.0", "::ffff:224.0.0.5", "::1", "::ffff:192.0.2.1", "2001:db8::1",
    "192.0.2.10", "127.0.0.1")])
addresses = st.one_of(v4, v6, special)
ports = st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 80, 443, 65535]))
tcp_options = st.lists(st.builds(lambda k, v: (k, v), st.integers(0, 255),
                                 st.binary(max_size=40)), max_size=6)
big_options = st.lists(st.builds(lambda k, v: (k, v), st.integers(2, 255),
                                 st.binary(min_size=200, max_size=253)), max_size=6)


def packed16(addr) -> bytes:
    return (b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed


def py_connect(addr, port, raw_opts):
    try:
        opts = tuple(protocol.TCPOption(k, v) for k, v in raw_opts)
        return protocol.connect_request(addr, port, opts)
    except ValueError:
        return None


class _Opt:
    def __init__(self, kind, value):
        self.kind, self.value = kind, value


def valid_messages():
    connect = st.builds(lambda a, p, o: py_connect(a, p, o), addresses, ports, tcp_options)
    err = st.builds(lambda c, v: protocol.error_reply(c, v), st.integers(0, 255),
                    st.binary(max_size=12))
    success = st.just(protocol.success_reply())
    tlvs = st.builds(lambda k, c: protocol.success_reply(
        (protocol.SupportedTCPExtensions(tuple(k)), protocol.Cookie(c))),
        st.lists(st.integers(1, 255), max_size=8), st.binary(max_size=16))
    return st.one_of(connect, err, success, tlvs, st.just(protocol.info_request())).filter(
        lambda m: m is not None)


@st.composite
def mutated(draw):
    data = bytearray(draw(valid_messages()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "length", "tlvlen"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "length" and len(data) > 1:
            data[1] = draw(st.integers(0, 255))
        elif op == "tlvlen" and len(data) > 5:
            data[5] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data += draw(st.binary(max_size=16))  # application bytes behind it
    return bytes(data)


# ---------------------------------------------------------------- the tests

def test_golden_vectors():
    addr = packed16(ipaddress.ip_address("192.0.2.10"))
    assert c_connect(addr, 443, []) == bytes.fromhex(
        "01062263 0A0501BB 00000000 00000000 0000FFFF C000020A".replace(" ", ""))
    out = ffi.new("uint8_t[16]")
    assert bytes(ffi.buffer(out, C.pep_encode_success(out, 16))) == bytes.fromhex("01012263")
    n = C.pep_encode_error(out, 16, 96, ffi.NULL, 0)
    assert bytes(ffi.buffer(out, n)) == bytes.fromhex("0102 2263 1E01 6000".replace(" ", ""))


@fast
@given(addresses, ports, st.one_of(tcp_options, big_options))
def test_connect_encoding_is_identical(addr, port, raw_opts):
    want = py_connect(addr, port, raw_opts)
    got = c_connect(packed16(addr), port, [_Opt(k, v) for k, v in raw_opts])
    assert got == want  # same bytes, or both refuse (None)


@fast
@given(addresses, ports, st.binary(min_size=1, max_size=1100))
def test_connect_with_cookie_encoding_is_identical(addr, port, cookie):
    """libpep's Connect + Cookie TLV (PEP_COOKIE, Error 3) is pepsock's, byte
    for byte, and decodes to the same cookie (padding included); both refuse
    a message past 1,020 bytes."""
    base = c_connect(packed16(addr), port, [])
    try:
        want = protocol.Message((protocol.Connect(addr, port), protocol.Cookie(cookie))).encode()
    except ValueError:
        want = None
    if base is None:
        assert py_connect(addr, port, []) is None
        return
    out = ffi.new("uint8_t[2048]")
    ffi.memmove(out, base, len(base))
    n = C.pep_add_cookie(out, len(base), 2048, cookie, len(cookie))
    got = bytes(ffi.buffer(out, n)) if n else None
    assert got == want
    if got is not None:
        msg, rest = protocol.decode(got)
        assert rest == b"" and msg.get(protocol.TLVType.COOKIE).data.rstrip(b"\0") == \
            cookie.rstrip(b"\0")


@fast
@given(st.integers(0, 255), st.binary(max_size=1100))
def test_error_reply_encoding_is_identical(code, value):
    try:
        want = protocol.error_reply(code, value)
    except ValueError:
        want = None
    out = ffi.new("uint8_t[2048]")
    buf = ffi.new("uint8_t[]", value or b"\0")
    n = C.pep_encode_error(out, 2048, code, buf, len(value))
    assert (bytes(ffi.buffer(out, n)) if n else None) == want


@fast
@given(st.integers(0, 255), st.binary(max_size=4))
def test_errno_table_is_identical(code, value):
    buf = ffi.new("uint8_t[]", value or b"\0")
    assert C.pep_errno_for(code, buf, len(value)) == protocol.errno_for(code, value)


def test_errno_table_values():
    """Spot checks against docs/protocol.md, so a shared mistake shows."""
    def e(code, value=b"\x00"):
        return C.pep_errno_for(code, ffi.new("uint8_t[]", value), len(value))
    assert e(96) == errno.ECONNREFUSED
    assert e(32) == errno.EACCES
    assert e(97, b"\x00") == errno.ENETUNREACH
    assert e(97, b"\x01") == errno.EHOSTUNREACH
    assert e(65) == errno.ENETUNREACH
    assert e(1) == errno.EPROTO and e(200) == errno.EPROTO


@fast
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_identically(data):
    assert c_decode(data) == py_decode(data)


@fast
@given(st.binary(min_size=4, max_size=300).map(
    lambda b: bytes([1, (len(b) + 4) // 4, 0x22, 0x63]) + b))
def test_arbitrary_tlvs_behind_a_good_header_decode_identically(data):
    assert c_decode(data) == py_decode(data)


TYPES = st.one_of(st.sampled_from([0, 1, 0x0A, 0x14, 0x15, 0x16, 0x1E]), st.integers(0, 255))


@st.composite
def tlv_soup(draw):
    """Messages assembled from TLVs with plausible or wrong lengths and bodies."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        t = draw(TYPES)
        if t == 0x0A and draw(st.booleans()):
            a = draw(addresses)
            body = draw(ports).to_bytes(2, "big") + packed16(a)
            body += draw(st.one_of(
                st.binary(max_size=12),
                st.lists(st.sampled_from([b"\x02\x04\x05\xb4", b"\x01", b"\x00", b"\x03\x03\x07",
                                          b"\x04\x02", b"\x08\x01", b"\x1e\x02"]),
                         max_size=4).map(b"".join)))
        elif t == 0x15:
            body = b"\0\0" + draw(st.lists(st.sampled_from([0, 0, 2, 3, 4, 30]), max_size=8).map(bytes))
        else:
            body = draw(st.binary(max_size=10))
        padded = body + b"\0" * (-(2 + len(body)) % 4)
        words = (2 + len(padded)) // 4
        words = draw(st.one_of(st.just(words), st.just(words), st.integers(0, words + 2)))
        out += bytes((t, words % 256)) + padded
    total = (4 + len(out)) // 4
    total = draw(st.one_of(st.just(total), st.just(total), st.integers(0, total + 2)))
    return bytes((1, total % 256, 0x22, 0x63)) + out + draw(st.binary(max_size=6))


@fast
@given(tlv_soup())
def test_tlv_soup_decodes_identically(data):
    assert c_decode(data) == py_decode(data)


@fast
@given(mutated())
def test_mutated_messages_decode_identically(data):
    assert c_decode(data) == py_decode(data)


@fast
@given(valid_messages())
def test_valid_messages_are_accepted_by_both(data):
    c, p = c_decode(data), py_decode(data)
    assert c == p
    assert c[0] == "ok"


@fast
@given(st.one_of(mutated(), valid_messages(), tlv_soup(), st.binary(max_size=40)), st.data())
def test_incremental_readers_agree_on_any_chunking(data, draw):
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks, prev = [], 0
    for c in cuts + [len(data)]:
        chunks.append(data[prev:c])
        prev = c
    assert c_reader(chunks) == py_reader(chunks)


@pytest.mark.skipif(UNDER_SANITIZER, reason="already the sanitizer run")
def test_cross_under_sanitizers():
    """This whole file again, against the codec built with ASan + UBSan."""
    lib = preload_helpers.build("libpeptlv-asan.so")
    env = dict(os.environ)
    env.update({
        "PEPTLV_LIB": lib,
        "PEPTLV_EXAMPLES": "150",
        "LD_PRELOAD": preload_helpers.asan_runtime(),
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    })
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
         os.path.join(here, "test_codec_cross.py")],
        env=env, capture_output=True, text=True, timeout=240, cwd=os.path.dirname(here))
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "passed" in proc.stdout and "ERROR: AddressSanitizer" not in tail, tail
