"""preload/config.c against pepsock/policy.py: the same PEP_NO_PROXY rules.

cffi loads config.c alone (preload/libpepcfg.so); hypothesis builds
PEP_NO_PROXY lists from addresses, CIDRs, names, ports and port ranges
(brackets and blanks included) and destinations; both sides must accept or
refuse the same lists and bypass the same destinations. One known
difference, on purpose: libpep sees addresses only, so a name entry never
matches, except `localhost`, which it reads as 127.0.0.0/8 and ::1.
"""
import ipaddress
import os
import subprocess
import sys

import pytest

cffi = pytest.importorskip("cffi")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pepsock import policy, route  # noqa: E402
import preload_helpers  # noqa: E402

ffi = cffi.FFI()
ffi.cdef("""
int pep_config_parse(void *cfg, const char *proxy, const char *noproxy, const char *log,
                     const char *disable, char *err, size_t errlen);
int pep_config_bypass(const void *cfg, const void *addrs, const uint8_t addr[16], uint16_t port);
int pep_config_parse_more(void *cfg, const char *reply, const char *connect, const char *fallback,
                          const char *tfo_mode, const char *cookie, char *err, size_t errlen);
int pep_config_parse_confirm(const char *confirm, char *err, size_t errlen);
long long pep_config_reply_timeout_ns(const void *cfg);
""")
# PEP_TEST_ASAN=1: the ASan/UBSan build (test_cross_tests_under_asan sets it in a child).
ASAN = os.environ.get("PEP_TEST_ASAN") == "1"
C = ffi.dlopen(preload_helpers.build("libpepcfg-asan.so" if ASAN else "libpepcfg.so"))
fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Cfg:
    def __init__(self, proxy="192.0.2.1:3128", noproxy=None, log=None, disable=None):
        self.buf = ffi.new("char[]", 16384)
        self.err = ffi.new("char[]", 400)
        enc = lambda s: ffi.NULL if s is None else s.encode()  # noqa: E731
        self.rc = C.pep_config_parse(self.buf, enc(proxy), enc(noproxy), enc(log), enc(disable),
                                     self.err, 400)
        self.enabled = ffi.cast("int *", self.buf)[0]
        self.message = ffi.string(self.err).decode()

    def bypass(self, addr, port) -> bool:
        a = ipaddress.ip_address(addr)
        packed = (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed
        return bool(C.pep_config_bypass(self.buf, ffi.NULL, packed, port))


def py_bypass(text):
    try:
        return policy.Bypass.parse(text)
    except ValueError:
        return None


v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
near = st.sampled_from([ipaddress.ip_address(a) for a in (
    "192.0.2.1", "192.0.2.200", "198.51.100.7", "127.0.0.1", "127.1.2.3", "10.1.2.3",
    "169.254.1.1", "::1", "fe80::1", "2001:db8::1", "2001:db8:ffff::1", "2001:db9::1",
    "::ffff:192.0.2.1", "::", "0.0.0.0")])
dests = st.one_of(v4, v6, near)
ports = st.one_of(st.sampled_from([80, 443, 8080, 1000, 1500, 2000]), st.integers(1, 65535))


@st.composite
def entry(draw):
    kind = draw(st.sampled_from(["v4", "v4cidr", "v6", "v6cidr", "mapped", "name", "star",
                                 "garbage", "near"]))
    if kind == "v4":
        host = str(draw(v4))
    elif kind == "near":
        host = str(draw(near))
    elif kind == "v4cidr":
        host = f"{draw(v4)}/{draw(st.integers(0, 34))}"
    elif kind == "v6":
        host = str(draw(v6))
    elif kind == "v6cidr":
        host = f"{draw(st.sampled_from(['2001:db8::', 'fe80::', '::', '2001:db8:1::1']))}/" \
               f"{draw(st.integers(0, 130))}"
    elif kind == "mapped":
        host = f"::ffff:{draw(v4)}/{draw(st.integers(90, 128))}"
    elif kind == "name":
        host = draw(st.sampled_from(["example.com", ".example.com", "a-b_c.d.", "1.2.3",
                                     "bad name", "x/y", "under_score"]))
    elif kind == "star":
        return "*"
    else:
        return draw(st.text(alphabet="0123456789abcdef:./[]- *", max_size=14))
    port = draw(st.sampled_from(["", "", ":443", ":80", ":1000-2000", ":0", ":70000",
                                 ":2000-1000", ":", ":0443"]))
    if ":" in host and port and draw(st.booleans()):
        # an IPv6 address or CIDR with a port goes in brackets (both spellings)
        if "/" in host and draw(st.booleans()):
            addr, plen = host.split("/")
            return f"[{addr}]/{plen}{port}"
        return f"[{host}]{port}"
    return host + port


lists = st.lists(entry(), max_size=4).map(
    lambda es: ",".join((" " if i % 2 else "") + e for i, e in enumerate(es)))


@fast
@given(lists, st.lists(st.tuples(dests, ports), min_size=1, max_size=6))
def test_no_proxy_agrees_with_policy(text, probes):
    py = py_bypass(text)
    c = Cfg(noproxy=text)
    assert (c.rc == 0) == (py is not None), (text, c.message)
    if py is None:
        assert not c.enabled and "PEP_NO_PROXY" in c.message
        return
    for addr, port in probes:
        assert c.bypass(addr, port) == py.matches(address=addr, port=port), (text, addr, port)


@pytest.mark.parametrize("addr,port,expect", [
    ("127.0.0.1", 80, True), ("127.200.0.1", 1, True), ("::1", 443, True),
    ("169.254.9.9", 80, True), ("fe80::5", 80, True), ("::ffff:127.0.0.1", 80, True),
    ("192.0.2.1", 80, False), ("2001:db8::1", 80, False),
])
def test_default_no_proxy(addr, port, expect):
    c = Cfg(noproxy=None)
    assert c.rc == 0 and c.enabled
    assert c.bypass(addr, port) == expect
    assert py_bypass(None).matches(address=addr, port=port) == expect


def test_empty_no_proxy_bypasses_nothing_and_star_everything():
    assert not Cfg(noproxy="").bypass("127.0.0.1", 80)
    assert Cfg(noproxy="*").bypass("2001:db8::1", 1)


def test_localhost_entry_is_loopback_for_libpep():
    c = Cfg(noproxy="localhost:8080")
    assert c.bypass("127.0.0.1", 8080) and c.bypass("::1", 8080)
    assert not c.bypass("127.0.0.1", 80)


@pytest.mark.parametrize("proxy,ok", [
    ("192.0.2.1:3128", True), ("[2001:db8::1]:3128", True), ("pep.example:1", True),
    ("[::ffff:192.0.2.1]:80", True), ("192.0.2.1", False), ("192.0.2.1:0", False),
    ("192.0.2.1:65536", False), ("2001:db8::1:3128", False), ("[2001:db8::1]", False),
    ("[192.0.2.1]:80", False), (":80", False), ("host:port", False),
])
def test_pep_proxy_parsing_agrees(proxy, ok):
    c = Cfg(proxy=proxy)
    assert (c.rc == 0 and c.enabled == 1) == ok, c.message
    try:
        policy.parse_hostport(proxy)
        py_ok = True
    except ValueError:
        py_ok = False
    assert py_ok == ok
    if not ok:
        assert "PEP_PROXY" in c.message


@pytest.mark.parametrize("env,ok,enabled", [
    ({"log": "debug"}, True, 1), ({"log": "WARN:/tmp/x.log"}, True, 1), ({"log": "loud"}, False, 0),
    ({"log": "info:"}, False, 0), ({"disable": "1"}, True, 0), ({"disable": "0"}, True, 1),
    ({"disable": "yes"}, False, 0), ({"proxy": ""}, True, 0), ({"proxy": None}, True, 0),
])
def test_log_and_disable(env, ok, enabled):
    c = Cfg(**env)
    assert (c.rc == 0) == ok and c.enabled == enabled, c.message


# -- PEP_REPLY_TIMEOUT, PEP_CONNECT_TIMEOUT, PEP_FALLBACK, PEP_TFO_MODE, PEP_COOKIE -------

MORE = {"reply": "PEP_REPLY_TIMEOUT", "connect": "PEP_CONNECT_TIMEOUT",
        "fallback": "PEP_FALLBACK", "tfo_mode": "PEP_TFO_MODE", "cookie": "PEP_COOKIE"}


def c_accepts(key: str, value: str) -> bool:
    """pep_config_parse_more() with only `key` set."""
    buf, err = ffi.new("char[]", 16384), ffi.new("char[]", 400)
    args = {k: ffi.NULL for k in MORE}
    args[key] = value.encode()
    rc = C.pep_config_parse_more(buf, *args.values(), err, 400)
    assert rc == 0 or MORE[key] in ffi.string(err).decode()
    return rc == 0


def c_message(key: str, value: str) -> str:
    buf, err = ffi.new("char[]", 16384), ffi.new("char[]", 400)
    args = {k: ffi.NULL for k in MORE}
    args[key] = value.encode()
    C.pep_config_parse_more(buf, *args.values(), err, 400)
    return ffi.string(err).decode()


def py_message(key: str, value: str) -> str:
    try:
        route.parse_settings({"PEP_PROXY": "192.0.2.1:3128", MORE[key]: value})
    except policy.ConfigError as exc:
        return str(exc)
    return ""


def py_accepts(key: str, value: str) -> bool:
    try:
        route.parse_settings({"PEP_PROXY": "192.0.2.1:3128", MORE[key]: value})
    except policy.ConfigError as exc:
        assert MORE[key] in str(exc)
        return False
    return True


# The shared grammar (docs/protocol.md "Environment values"), drawn both ways:
# values it accepts (both clients must take them, with the same meaning) and
# near misses (both must refuse them, naming the variable).
decimal_seconds = st.builds(
    lambda whole, frac, zeros: "0" * zeros + str(whole) + (f".{frac}" if frac else ""),
    st.integers(0, 86400), st.one_of(st.none(), st.from_regex(r"[0-9]{1,12}", fullmatch=True)),
    st.integers(0, 2))
BLANKS = st.sampled_from([" ", "\t", "\n", "  ", "\r", "\v", "\f"])


def near_miss(valid, hex_digits=False):
    """A valid value spoiled the ways people write it: blanks around, case,
    signs, exponents, hex, underscores, Python/C-only syntax. (Upper case
    and "e0" are still hex digits: not misses for a cookie.)"""
    misses = [
        st.tuples(BLANKS, valid).map("".join), st.tuples(valid, BLANKS).map("".join),
        valid.map(lambda v: "+" + v), valid.map(lambda v: "-" + v),
        valid.map(lambda v: v + "_0"),
        valid.map(lambda v: v[:1] + "_" + v[1:]).filter(lambda v: len(v) > 2),
        valid.map(lambda v: "0x" + v), valid.map(lambda v: v + "."),
        valid.map(lambda v: "." + v)]
    if not hex_digits:
        misses += [valid.map(str.upper).filter(lambda v: v != v.lower()),
                   valid.map(lambda v: v + "e0")]
    return st.one_of(*misses)


seconds = st.one_of(
    decimal_seconds, near_miss(decimal_seconds),
    st.floats(0.001, 86400).map(str), st.integers(-5, 100000).map(str),
    st.sampled_from(["", "0", "-1", "0.0", "1s", "abc", ".", "nan", "inf", "-inf", "1e-400",
                     "1e3", ".5", "5.", "86400", "86400.0", "86400.000000000001", "86401",
                     "0.0000000001", "0." + "0" * 400 + "1", "1" * 30, "0x10", "1_0", "١"]))
word_values = st.sampled_from(["direct", "fail", "auto", "nocookie", "cookie"])
words = st.one_of(word_values, near_miss(word_values),
                  st.sampled_from(["", "none", "failx", "directs", "1", "Cookie", "FAIL"]))
hex_cookies = st.one_of(st.binary(min_size=1, max_size=64).map(bytes.hex),
                        st.binary(min_size=1, max_size=64).map(lambda b: b.hex().upper()))
cookies = st.one_of(hex_cookies, near_miss(hex_cookies, hex_digits=True),
                    st.binary(min_size=65, max_size=80).map(bytes.hex),
                    hex_cookies.map(lambda h: h[:2] + " " + h[2:]),
                    st.sampled_from(["", "a", "abc", "zz", "0g", "-1", "0x00", "aa bb"]))
confirms = st.one_of(st.sampled_from(["", "0", "1", "192.0.2.0/24", "192.0.2.1:443, ::1",
                                      "one", "01", "1,"]),
                     st.tuples(BLANKS, st.sampled_from(["1", "0", "192.0.2.1"])).map("".join),
                     st.tuples(st.sampled_from(["1", "0", "192.0.2.1"]), BLANKS).map("".join))


def c_seconds(value: str) -> int:
    """The nanoseconds config.c makes of PEP_REPLY_TIMEOUT=value."""
    buf, err = ffi.new("char[]", 16384), ffi.new("char[]", 400)
    assert C.pep_config_parse_more(buf, value.encode(), *[ffi.NULL] * 4, err, 400) == 0
    return C.pep_config_reply_timeout_ns(buf)


@fast
@given(st.one_of(st.tuples(st.sampled_from(["reply", "connect"]), seconds),
                 st.tuples(st.sampled_from(["fallback", "tfo_mode"]), words),
                 st.tuples(st.just("cookie"), cookies)))
def test_other_settings_agree_with_route(case):
    """Both clients accept and refuse the same values, each refusal names the
    variable (and says "blanks" when that is what is wrong); what they accept
    means the same."""
    key, value = case
    c_ok, py_ok = c_accepts(key, value), py_accepts(key, value)
    assert c_ok == py_ok, case
    if not c_ok and value != value.strip(" \t\n\r\v\f"):
        assert "blanks" in c_message(key, value) and "blanks" in py_message(key, value)
    if not c_ok and key == "cookie" and len(value) > 8:
        # a token: never echoed (its length is)
        assert value not in c_message(key, value) and value not in py_message(key, value)
        assert c_message(key, value) == py_message(key, value)
    if c_ok and value and key == "reply":
        py = route.parse_settings({MORE[key]: value}).reply_timeout
        assert abs(c_seconds(value) - py * 1e9) <= max(2, py * 1e9 * 1e-12), value


@fast
@given(decimal_seconds)
def test_seconds_in_the_grammar_mean_the_same(text):
    """Plain decimal within (0, 86400]: accepted by both (and the same value);
    past either bound: refused by both."""
    from decimal import Decimal
    inside = 0 < Decimal(text) <= 86400
    assert c_accepts("reply", text) == py_accepts("reply", text) == inside, text


@fast
@given(st.one_of(
    st.tuples(st.sampled_from(["reply", "connect"]),
              near_miss(decimal_seconds.filter(lambda t: float(t) > 0))),
    st.tuples(st.sampled_from(["fallback", "tfo_mode"]), near_miss(word_values)),
    st.tuples(st.just("cookie"), near_miss(hex_cookies, hex_digits=True))))
def test_near_misses_refused_by_both(case):
    key, value = case
    assert not c_accepts(key, value) and not py_accepts(key, value), case


@fast
@given(confirms)
def test_pep_confirm_agrees(value):
    err = ffi.new("char[]", 400)
    c_ok = C.pep_config_parse_confirm(value.encode(), err, 400) == 0
    try:
        route.parse_settings({"PEP_CONFIRM": value})
        py_ok = True
    except policy.ConfigError as exc:
        assert "PEP_CONFIRM" in str(exc)
        py_ok = False
    assert c_ok == py_ok, (value, ffi.string(err))
    if not c_ok:
        assert "PEP_CONFIRM" in ffi.string(err).decode()


@pytest.mark.parametrize("key,value", [
    ("reply", "1 "), ("reply", "1_0"), ("reply", "100000"), ("reply", "0x10"),
    ("fallback", "FAIL"), ("fallback", " fail"), ("tfo_mode", "Cookie"), ("tfo_mode", "auto "),
    ("fallback", "fail "), ("connect", "86400.5"), ("connect", "1e3"), ("connect", " 2"),
    ("cookie", "aa bb"), ("cookie", " aabb"), ("cookie", "aa" * 65), ("cookie", "AABB\n"),
])
def test_formerly_different_values_refused_by_both(key, value):
    """The values the clients used to disagree on (pepsock stripped blanks,
    ignored case, read Python float syntax and had no upper bounds; libpep
    read strtod's hex): both refuse them now, naming the variable."""
    assert not c_accepts(key, value) and not py_accepts(key, value)
    assert MORE[key] in c_message(key, value) and MORE[key] in py_message(key, value)


@pytest.mark.parametrize("key,value", [
    ("reply", "86400"), ("reply", "0.001"), ("connect", "007.50"), ("fallback", "fail"),
    ("tfo_mode", "nocookie"), ("cookie", "AbCd"), ("cookie", "00" * 64),
])
def test_documented_values_accepted_by_both(key, value):
    assert c_accepts(key, value) and py_accepts(key, value)


@pytest.mark.skipif(ASAN, reason="already the ASan run")
def test_cross_tests_under_asan():
    """This module and tests/test_pepstate_cross.py's parsers again, with
    config.c and state.c built with ASan + UBSan (halting on the first report)."""
    preload_helpers.build("libpepcfg-asan.so")
    preload_helpers.build("libpepstate-asan.so")
    env = dict(os.environ, PEP_TEST_ASAN="1", LD_PRELOAD=preload_helpers.asan_runtime(),
               ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    tests = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(tests, "test_preload_config.py"),
                        os.path.join(tests, "test_pepstate_cross.py"),
                        "-k", "not hold_down_and_cookie"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tests)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert " passed" in p.stdout and "ERROR: AddressSanitizer" not in p.stderr


@fast
@given(st.one_of(
    st.sampled_from(["off", "error", "warn", "info", "debug"]).flatmap(
        lambda w: st.sampled_from([w, w.upper(), w.title(), " " + w, w + " ", w + ":", w + "x"])),
    st.text("offerwaindbug \t", max_size=8)))   # no ":": a path would open a file
def test_pep_log_levels_agree(value):
    """PEP_LOG's level: the same verdict in both (case-insensitive, no blanks)."""
    c = Cfg(log=value)
    try:
        py_error = route.configure_logging(value)
    finally:
        route.configure_logging(None)
    assert (c.rc == 0) == (py_error is None), (value, c.message, py_error)
    if py_error:
        assert "PEP_LOG" in c.message and "PEP_LOG" in py_error
