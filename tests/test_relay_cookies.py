"""RFC 8803 Cookie TLV on the relay (`--cookie-secret`) and `pep cookie` tokens:
the codec's properties (pepsock/relay/cookies.py), then a real relay on
loopback: Error 3 with a cookie, the retry with it, wrong cookies, tokens,
expiry, rotation, and the refusal counters."""
import ipaddress
import os
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pepsock.protocol import Connect, Cookie, ErrorCode, Message, decode, error_reply
from pepsock.relay import cookies as C
from relay_helpers import ROOT, Relay, Server, convert_open, echo, read_reply, recv_all

pytestmark = pytest.mark.timeout(60)

ALLOW_LO = ("--allow-dest", "127.0.0.0/8")
SECRET = b"k" * 32
OTHER = b"o" * 32

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(2**96, 2**128 - 1))  # not IPv4-mapped
idents = st.from_regex(C.ID_RE, fullmatch=True)
expiries = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------ codec properties

@given(ident=idents, expires=expiries)
def test_token_round_trips_and_is_aligned(ident, expires):
    token = C.make_token(SECRET, ident, expires)
    assert len(token) % 4 == 0 and len(token) <= C.MAX_VALUE
    parsed = C.parse_token(token)
    assert parsed is not None and parsed[:2] == (ident, expires)
    jar = C.Cookies([SECRET], clock=lambda: 0)
    verdict, who = jar.check(token, "192.0.2.1")
    assert verdict is C.Verdict.OK
    assert who == f"token {ident}"


@given(ident=idents, expires=st.integers(1, 2**32 - 1), now=expiries)
def test_token_expires_at_its_time(ident, expires, now):
    token = C.make_token(SECRET, ident, expires)
    verdict, _ = C.Cookies([SECRET], clock=lambda: now).check(token, "198.51.100.9")
    assert verdict is (C.Verdict.OK if now < expires else C.Verdict.EXPIRED)


@given(ip=st.one_of(ipv4, ipv6), other=st.one_of(ipv4, ipv6))
def test_address_cookie_binds_ipv4_address_or_ipv6_slash64(ip, other):
    jar = C.Cookies([SECRET])
    cookie = jar.cookie_for(ip)
    assert len(cookie) == C.ADDRESS_COOKIE_SIZE and len(cookie) % 4 == 0
    assert jar.check(cookie, ip)[0] is C.Verdict.OK
    same_binding = (ip.version == other.version == 4 and ip == other) or \
        (ip.version == other.version == 6 and ip.packed[:8] == other.packed[:8])
    assert (jar.check(cookie, other)[0] is C.Verdict.OK) == same_binding


@given(ip=ipv6, suffix=st.integers(0, 2**64 - 1))
def test_ipv6_cookie_holds_for_the_whole_slash64(ip, suffix):
    jar = C.Cookies([SECRET])
    sibling = ipaddress.IPv6Address(ip.packed[:8] + suffix.to_bytes(8, "big"))
    assert jar.check(jar.cookie_for(ip), sibling)[0] is C.Verdict.OK


def test_ipv4_mapped_client_is_its_ipv4_address():
    jar = C.Cookies([SECRET])
    assert jar.check(jar.cookie_for("192.0.2.5"), "::ffff:192.0.2.5")[0] is C.Verdict.OK


@given(ident=idents, expires=expiries, data=st.data())
def test_any_changed_byte_is_bad(ident, expires, data):
    jar = C.Cookies([SECRET], clock=lambda: 0)
    value = data.draw(st.sampled_from([C.make_token(SECRET, ident, expires),
                                       jar.cookie_for("192.0.2.1")]))
    i = data.draw(st.integers(0, len(value) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = value[:i] + bytes((value[i] ^ flip,)) + value[i + 1:]
    assert jar.check(tampered, "192.0.2.1")[0] is C.Verdict.BAD


@given(value=st.binary(max_size=200), ip=st.one_of(ipv4, ipv6))
def test_arbitrary_bytes_never_raise_and_are_bad(value, ip):
    verdict, _ = C.Cookies([SECRET, OTHER]).check(value, ip)
    assert verdict is C.Verdict.BAD       # a forgery of 120+ MAC bits never comes up


@given(ident=idents, pad=st.integers(0, 3), extra=st.integers(1, 255))
def test_up_to_three_zero_bytes_of_padding_only(ident, pad, extra):
    jar = C.Cookies([SECRET])
    token = C.make_token(SECRET, ident)
    assert jar.check(token + b"\x00" * pad, "192.0.2.1")[0] is C.Verdict.OK
    assert jar.check(token + b"\x00" * 4, "192.0.2.1")[0] is C.Verdict.BAD
    assert jar.check(token + bytes((extra,)), "192.0.2.1")[0] is C.Verdict.BAD


@given(ident=idents, ip=ipv4)
def test_rotation_accepts_the_retiring_secret_and_mints_from_the_first(ident, ip):
    old = C.Cookies([OTHER])
    rotating = C.Cookies([SECRET, OTHER])
    new = C.Cookies([SECRET])
    for value in (old.cookie_for(ip), C.make_token(OTHER, ident)):
        assert rotating.check(value, ip)[0] is C.Verdict.OK
        assert new.check(value, ip)[0] is C.Verdict.BAD
    assert rotating.cookie_for(ip) == new.cookie_for(ip)


@settings(max_examples=50)
@given(ip=st.one_of(ipv4, ipv6), ident=idents)
def test_cookie_values_travel_in_the_protocols_tlvs(ip, ident):
    """Error 3 (value = 0 + cookie) and the Cookie TLV carry both kinds
    through pepsock.protocol's codec unchanged (no padding needed)."""
    for value in (C.Cookies([SECRET]).cookie_for(ip), C.make_token(SECRET, ident)):
        msg, _ = decode(error_reply(ErrorCode.MISSING_COOKIE, b"\x00" + value))
        assert msg.error.value == b"\x00" + value
        req = Message((Connect("192.0.2.1", 80), Cookie(value))).encode()
        msg, _ = decode(req)
        assert msg.get(Cookie.type).data == value


def test_secret_files(tmp_path):
    good = tmp_path / "s"
    good.write_bytes(b"# current first\n" + b"a" * 20 + b"\n\n" + b"b" * 16 + b"\n")
    assert C.load_secrets([good]) == [b"a" * 20, b"b" * 16]
    short = tmp_path / "short"
    short.write_bytes(b"tooshort\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"# nothing\n")
    for path, why in ((short, "at least 16"), (empty, "no secret"),
                      (tmp_path / "absent", "No such file")):
        with pytest.raises(C.SecretError, match=why):
            C.load_secrets([path])
    with pytest.raises(C.SecretError, match="at most"):
        C.load_secrets([good, good, good])


# ------------------------------------------------------------------ the relay

def _request(dest, cookie: bytes | None):
    tlvs = (Connect(dest[0], dest[1]),) + ((Cookie(cookie),) if cookie is not None else ())
    return Message(tlvs).encode()


def _ask(relay, dest, cookie=None, early=b""):
    s = convert_open(relay.addr, dest, early, header=_request(dest, cookie))
    msg, rest = read_reply(s)
    return s, msg, rest


@pytest.fixture
def secrets(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.write_bytes(SECRET + b"\n")
    old.write_bytes(OTHER + b"\n")
    return new, old


def _pep_cookie(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pepsock.cli", "cookie", *args],
                          capture_output=True, text=True, env=env, timeout=30)


def test_cookie_lifecycle_against_the_relay(secrets):
    new, old = secrets
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--stats",
                                    "127.0.0.1:0", "--cookie-secret", str(new),
                                    "--cookie-secret", str(old)) as relay:
        # 1. No Cookie TLV: Error 3, value = one zero byte + this address's cookie.
        s, msg, _ = _ask(relay, srv.addr, early=b"lost")
        s.close()
        assert msg.error.code == ErrorCode.MISSING_COOKIE
        assert msg.error.value[:1] == b"\x00"
        cookie = msg.error.value[1:]
        assert cookie == C.Cookies([SECRET]).cookie_for("127.0.0.1")
        # 2. The retry with it is served.
        s, msg, rest = _ask(relay, srv.addr, cookie, early=b"hello")
        assert msg.error is None
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, rest) == b"hello"
        s.close()
        # 3. A cookie for another address, or under an unknown secret: Error 32.
        for wrong in (C.Cookies([SECRET]).cookie_for("192.0.2.1"),
                      C.Cookies([b"x" * 32]).cookie_for("127.0.0.1"), b"\x01" * 200):
            s, msg, _ = _ask(relay, srv.addr, wrong)
            s.close()
            assert msg.error.code == ErrorCode.NOT_AUTHORIZED
        # 4. Rotation: a cookie and a token under the retiring secret still work.
        for value in (C.Cookies([OTHER]).cookie_for("127.0.0.1"), C.make_token(OTHER, "old")):
            s, msg, _ = _ask(relay, srv.addr, value)
            s.close()
            assert msg.error is None
        # 5. A `pep cookie` token from the CLI; an expired one.
        p = _pep_cookie("--secret", str(new), "--id", "laptop", "--expires", "1")
        assert p.returncode == 0, p.stderr
        s, msg, _ = _ask(relay, srv.addr, bytes.fromhex(p.stdout.strip()))
        s.close()
        assert msg.error is None
        s, msg, _ = _ask(relay, srv.addr, C.make_token(SECRET, "gone", expires=1000))
        s.close()
        assert msg.error.code == ErrorCode.NOT_AUTHORIZED
        m = relay.metrics()
        relay.wait_log("outcome=error 32 (token gone expired)")
    assert m['pep_relay_cookie_refusals_total{reason="missing"}'] == 1
    assert m['pep_relay_cookie_refusals_total{reason="bad"}'] == 3
    assert m['pep_relay_cookie_refusals_total{reason="expired"}'] == 1
    assert m['pep_relay_errors_total{code="3",name="missing_cookie"}'] == 1
    # The destination saw exactly the connections that were accepted.
    assert len(srv.conns) == 4


def test_info_needs_no_cookie(secrets):
    from pepsock.protocol import info_request
    with Relay("--listen", "127.0.0.1:0", "--cookie-secret", str(secrets[0])) as relay:
        s = convert_open(relay.addr, ("192.0.2.1", 80), header=info_request())
        msg, _ = read_reply(s)
        s.close()
    assert msg.error is None


def test_relay_refuses_unusable_secret_files(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"abc\n")
    for path in (short, tmp_path / "absent"):
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.run([sys.executable, "-m", "pepsock.relay", "--cookie-secret", str(path)],
                           capture_output=True, text=True, env=env, timeout=30)
        assert p.returncode == 2 and "--cookie-secret" in p.stderr


def test_pep_cookie_cli_errors(secrets, tmp_path):
    assert _pep_cookie("--secret", str(secrets[0]), "--id", "no spaces").returncode == 2
    assert _pep_cookie("--secret", str(secrets[0]), "--id", "a", "--expires", "-1").returncode == 2
    p = _pep_cookie("--secret", str(tmp_path / "absent"), "--id", "a")
    assert p.returncode == 2 and "No such file" in p.stderr
    p = _pep_cookie("--secret", str(secrets[0]), "--id", "forever")
    token = bytes.fromhex(p.stdout.strip())
    assert C.parse_token(token)[:2] == ("forever", 0)


def test_tfo_key_files(tmp_path):
    f = tmp_path / "k"
    f.write_text("00112233-44556677-8899aabb-ccddeeff\n")
    assert C.load_tfo_key(f) == bytes.fromhex("00112233445566778899aabbccddeeff")
    f.write_text("00" * 16 + ",\n" + "11" * 16)
    assert C.load_tfo_key(f) == b"\x00" * 16 + b"\x11" * 16
    for text, why in (("00" * 15, "15 bytes"), ("zz" * 16, "not hex"), ("00" * 48, "48 bytes")):
        f.write_text(text)
        with pytest.raises(C.SecretError, match=why):
            C.load_tfo_key(f)


@pytest.mark.parametrize("client,dest,syn_data,fits", [
    (socket.AF_INET, socket.AF_INET, 24, True),       # bare Connect, v4 -> v4: 60 <= 64
    (socket.AF_INET, socket.AF_INET, 19, False),
    (socket.AF_INET, socket.AF_INET6, 24, False),     # v4 client, v6 SYN (80 bytes) waits
    (socket.AF_INET, socket.AF_INET6, 40, True),
    (socket.AF_INET6, socket.AF_INET, 0, True),
])
def test_onward_syn_never_larger_than_the_clients(client, dest, syn_data, fits):
    from pepsock.relay.routability import onward_syn_fits
    assert onward_syn_fits(client, dest, syn_data) is fits


def test_cookies_with_workers(secrets):
    """Every worker holds the same secrets: an Error 3 cookie from one is
    accepted by whichever worker gets the retry."""
    with Server(echo) as srv, Relay("--listen", "127.0.0.1:0", *ALLOW_LO, "--workers", "2",
                                    "--cookie-secret", str(secrets[0])) as relay:
        s, msg, _ = _ask(relay, srv.addr)
        s.close()
        cookie = msg.error.value[1:]
        for i in range(6):
            s, msg, rest = _ask(relay, srv.addr, cookie, early=b"w%d" % i)
            assert msg.error is None
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s, rest) == b"w%d" % i
            s.close()
