"""pepsock.protocol: golden vectors, every validation rule, property tests."""
import errno
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from pepsock import protocol as p
from pepsock.protocol import ErrorCode as E

GOLDEN_CONNECT = bytes.fromhex("01062263 0A0501BB 00000000 00000000 0000FFFF C000020A")


def test_golden_vectors():
    assert p.connect_request("192.0.2.10", 443) == GOLDEN_CONNECT
    assert p.success_reply() == bytes.fromhex("01012263")
    assert p.error_reply(96) == bytes.fromhex("01022263 1E016000")


def test_golden_decodes_back():
    msg, rest = p.decode(GOLDEN_CONNECT + b"GET /")
    assert msg.connect == p.Connect(ipaddress.ip_address("192.0.2.10"), 443)
    assert rest == b"GET /"


def test_ipv6_connect_layout():
    raw = p.connect_request("2001:db8::1", 80, [p.TCPOption(30, b"\x01\x02")])
    assert raw[4:8] == bytes.fromhex("0A06 0050")
    assert raw[8:24] == ipaddress.IPv6Address("2001:db8::1").packed
    assert raw[24:28] == bytes.fromhex("1E040102")  # kind 30, len 4, value
    assert len(raw) % 4 == 0 and raw[1] * 4 == len(raw)


def _msg(*tlvs: bytes, version=1, magic=b"\x22\x63", total=None) -> bytes:
    body = b"".join(tlvs)
    words = (4 + len(body)) // 4 if total is None else total
    return bytes((version, words)) + magic + body


CONNECT_BODY = bytes.fromhex("0A05 01BB") + ipaddress.IPv6Address("::ffff:192.0.2.1").packed


@pytest.mark.parametrize("data, code, why", [
    (b"\x02", E.UNSUPPORTED_VERSION, "version"),
    (_msg(version=0), E.UNSUPPORTED_VERSION, "version 0"),
    (b"\x01\x00", E.MALFORMED_MESSAGE, "Total Length 0"),
    (_msg(magic=b"\x22\x64"), E.MALFORMED_MESSAGE, "magic"),
    (_msg(total=3), E.MALFORMED_MESSAGE, "Total Length past the data"),
    (_msg(b"\x00\x01\x00\x00"), E.MALFORMED_MESSAGE, "type 0"),
    (_msg(b"\x0A\x00\x00\x00"), E.MALFORMED_MESSAGE, "TLV Length 0"),
    (_msg(b"\x16\x03\x00\x00"), E.MALFORMED_MESSAGE, "TLV overruns the message"),
    (_msg(b"\x01\x01\x00\x00", b"\x01\x01\x00\x00"), E.MALFORMED_MESSAGE, "duplicate TLV"),
    (_msg(b"\x01\x02" + bytes(6)), E.MALFORMED_MESSAGE, "Info with Length 2"),
    (_msg(bytes.fromhex("0A04") + bytes(14)), E.MALFORMED_MESSAGE, "short Connect"),
    (_msg(CONNECT_BODY[:2] + b"\x00\x00" + CONNECT_BODY[4:]), E.MALFORMED_MESSAGE, "port 0"),
    (_msg(CONNECT_BODY[:4] + bytes(16)), E.MALFORMED_MESSAGE, "unspecified ::"),
    (_msg(CONNECT_BODY[:4] + ipaddress.IPv6Address("::ffff:0.0.0.0").packed),
     E.MALFORMED_MESSAGE, "unspecified 0.0.0.0"),
    (_msg(CONNECT_BODY[:4] + ipaddress.IPv6Address("::ffff:224.0.0.1").packed),
     E.MALFORMED_MESSAGE, "IPv4 multicast"),
    (_msg(CONNECT_BODY[:4] + ipaddress.IPv6Address("ff02::1").packed),
     E.MALFORMED_MESSAGE, "IPv6 multicast"),
    (_msg(CONNECT_BODY[:4] + ipaddress.IPv6Address("::ffff:255.255.255.255").packed),
     E.MALFORMED_MESSAGE, "broadcast"),
    (_msg(b"\x0A\x06" + CONNECT_BODY[2:] + b"\x01\x00\x00\x00"), E.MALFORMED_MESSAGE, "NOP option"),
    (_msg(b"\x0A\x06" + CONNECT_BODY[2:] + b"\x1E\x01\x00\x00"), E.MALFORMED_MESSAGE, "option len 1"),
    (_msg(b"\x0A\x06" + CONNECT_BODY[2:] + b"\x1E\x05\x00\x00"), E.MALFORMED_MESSAGE,
     "option past the TLV"),
    (_msg(b"\x0A\x06" + CONNECT_BODY[2:] + b"\x00\x00\x01\x00"), E.MALFORMED_MESSAGE,
     "EOL then bytes"),
    (_msg(b"\x15\x02\x00\x00\x00\x1E\x00\x00"), E.MALFORMED_MESSAGE, "zero kind before a kind"),
])
def test_every_rule_has_its_code(data, code, why):
    with pytest.raises(p.ProtocolError) as info:
        p.decode(data)
    assert info.value.code == code, why


def test_version_is_decided_on_the_first_byte():
    with pytest.raises(p.ProtocolError) as info:
        p.MessageReader().feed(b"\x07")
    assert info.value.code == E.UNSUPPORTED_VERSION


def test_padding_after_options_is_accepted():
    msg, _ = p.decode(_msg(b"\x0A\x06" + CONNECT_BODY[2:] + b"\x02\x02\x00\x00"))
    assert msg.connect.options == (p.TCPOption(2, b""),)


def test_unknown_tlv_is_kept_and_refused_in_a_request():
    msg, _ = p.decode(_msg(CONNECT_BODY, b"\x63\x01\xAB\xCD"))
    assert msg.tlvs[1] == p.UnknownTLV(0x63, b"\xAB\xCD")
    with pytest.raises(p.ProtocolError) as info:
        p.check_request(msg)
    assert info.value.code == E.UNSUPPORTED_MESSAGE


def test_request_checks():
    assert isinstance(p.check_request(p.decode(p.info_request())[0]), p.Info)
    with pytest.raises(p.ProtocolError) as info:
        p.check_request(p.decode(p.success_reply())[0])
    assert info.value.code == E.MALFORMED_MESSAGE
    with pytest.raises(p.ProtocolError) as info:
        p.check_request(p.decode(p.error_reply(96))[0])
    assert info.value.code == E.UNSUPPORTED_MESSAGE


def test_reader_eof_mid_message_is_malformed():
    reader = p.MessageReader()
    assert reader.feed(GOLDEN_CONNECT[:10]) is None
    with pytest.raises(p.ProtocolError):
        reader.eof()


@pytest.mark.parametrize("code, value, err, cls", [
    (0, b"", errno.EPROTO, OSError),
    (1, b"", errno.EPROTO, OSError),
    (2, b"", errno.EPROTO, OSError),
    (3, b"", errno.EPROTO, OSError),
    (32, b"", errno.EACCES, PermissionError),
    (33, b"", errno.EOPNOTSUPP, OSError),
    (64, b"", errno.ENOBUFS, OSError),
    (65, b"", errno.ENETUNREACH, OSError),
    (96, b"", errno.ECONNREFUSED, ConnectionRefusedError),
    (97, b"\x00", errno.ENETUNREACH, OSError),
    (97, b"\x01", errno.EHOSTUNREACH, OSError),
    (97, b"\x03", errno.EHOSTUNREACH, OSError),
    (97, b"\x06", errno.ENETUNREACH, OSError),
    (97, b"\x0D", errno.EHOSTUNREACH, OSError),
    (200, b"", errno.EPROTO, OSError),
])
def test_error_mapping(code, value, err, cls):
    msg, _ = p.decode(p.error_reply(code, value))
    with pytest.raises(p.ConvertError) as info:
        p.check_reply(msg)
    exc = info.value
    assert exc.errno == err and isinstance(exc, cls) and exc.code == code
    assert f"RFC 8803 error {code}" in str(exc)


@pytest.mark.parametrize("err, code, value", [
    (errno.ECONNREFUSED, 96, b""),
    (errno.EHOSTUNREACH, 97, b"\x01"),
    (errno.ENETUNREACH, 97, b"\x00"),
    (errno.ETIMEDOUT, 65, b""),
])
def test_connect_failure_round_trips_to_the_same_errno(err, code, value):
    assert p.error_for_connect_failure(err) == (code, value)
    assert p.errno_for(code, value) == (errno.ECONNREFUSED if err == errno.ECONNREFUSED
                                        else err if err != errno.ETIMEDOUT else errno.ENETUNREACH)


def test_encoder_refuses_what_cannot_be_sent():
    with pytest.raises(ValueError):
        p.Connect(ipaddress.ip_address("224.0.0.1"), 80)
    with pytest.raises(ValueError):
        p.Connect(ipaddress.ip_address("192.0.2.1"), 0)
    with pytest.raises(ValueError):
        p.TCPOption(1)
    with pytest.raises(ValueError):
        p.Message((p.Cookie(bytes(1100)),)).encode()
    with pytest.raises(ValueError):
        p.Message((p.Info(), p.Info())).encode()


# -- property tests --------------------------------------------------------------

def _usable(addr) -> bool:
    addr = p._normalize(addr)
    return p._address_problem(addr) is None


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(_usable)
options = st.lists(st.builds(p.TCPOption, st.integers(2, 255), st.binary(max_size=20)), max_size=4)
connects = st.builds(p.Connect, addresses, st.integers(1, 65535), options.map(tuple))
tlvs = st.one_of(
    st.just(p.Info()),
    connects,
    st.builds(p.ExtendedTCPHeader, st.binary(max_size=60)),
    st.builds(p.SupportedTCPExtensions, st.lists(st.integers(1, 255), max_size=20).map(tuple)),
    st.builds(p.Cookie, st.binary(max_size=60)),
    st.builds(p.Error, st.integers(0, 255), st.binary(max_size=20)),
    st.builds(p.UnknownTLV, st.integers(1, 255).filter(lambda t: t not in set(p.TLVType)),
              st.binary(max_size=30)),
)
messages = st.lists(tlvs, max_size=5, unique_by=lambda t: int(t.type)).map(
    lambda ts: p.Message(tuple(ts)))


@given(messages)
def test_round_trip_every_tlv(msg):
    raw = msg.encode()
    decoded, rest = p.decode(raw)
    assert rest == b""
    assert decoded.encode() == raw  # padding may show in raw values, bytes are the truth
    assert [t.type for t in decoded.tlvs] == [t.type for t in msg.tlvs]
    for a, b in zip(msg.tlvs, decoded.tlvs):
        if isinstance(a, (p.Connect, p.SupportedTCPExtensions, p.Info)):
            assert a == b


def _chunks(data: bytes, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in points + [len(data)]:
        yield data[start:point]
        start = point


@given(messages, st.binary(max_size=50), st.lists(st.integers(0, 2000), max_size=10))
def test_any_chunking_gives_the_message_and_keeps_what_follows(msg, after, cuts):
    raw = msg.encode()
    reader = p.MessageReader()
    got = None
    for chunk in _chunks(raw + after, cuts):
        got = reader.feed(chunk) or got
    assert got is not None and got.encode() == raw
    assert reader.rest == after


@given(messages, st.binary(max_size=20))
def test_one_byte_at_a_time(msg, after):
    reader = p.MessageReader()
    for b in msg.encode() + after:
        reader.feed(bytes([b]))
    assert reader.done and reader.rest == after


@settings(max_examples=500)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_any_bytes_any_chunking_give_a_message_or_a_protocol_error(data, cuts):
    reader = p.MessageReader()
    try:
        for chunk in _chunks(data, cuts):
            reader.feed(chunk)
        reader.eof()
    except p.ProtocolError as exc:
        assert exc.code in (E.UNSUPPORTED_VERSION, E.MALFORMED_MESSAGE)
        # The incremental reader and the one-shot decoder agree on the verdict.
        with pytest.raises(p.ProtocolError) as again:
            p.decode(data)
        assert again.value.code == exc.code
        return
    msg, rest = p.decode(data)
    assert msg == reader.message and rest == reader.rest


@given(messages.filter(lambda m: m.tlvs), st.data())
def test_mutated_messages_never_raise_anything_else(msg, data):
    raw = bytearray(msg.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    try:
        p.decode(bytes(raw))
    except p.ProtocolError:
        pass
