"""Pure parts of the relay's hardening (issue 16), without sockets: the
netlink route reply parser, the memory budget, token buckets, the client key
and the SYN deadline.  Property tests where there is a parser or an
invariant."""
import ipaddress
import socket
import struct

from hypothesis import given, strategies as st

from pepsock.policy import normalize_ip
from pepsock.relay.budget import Budget, Sizes
from pepsock.relay.clients import client_key
from pepsock.relay.onward import syn_deadline
from pepsock.relay.ratelimit import LogLimiter, TokenBuckets
from pepsock.relay.routes import NLMSG_ERROR, RTM_NEWROUTE, Routes, parse_reply, request

M = 1 << 20


def _nl(mtype, seq, body):
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body


@given(st.binary(max_size=512), st.integers(0, 2**32 - 1))
def test_parse_reply_never_raises_on_garbage(data, seq):
    got = parse_reply(data, seq)
    assert got is None or (isinstance(got, tuple) and len(got) == 2)


@given(st.integers(0, 255), st.integers(1, 2**32 - 1), st.binary(max_size=64))
def test_parse_reply_finds_the_route_type_behind_other_messages(rtype, seq, other):
    route = _nl(RTM_NEWROUTE, seq, struct.pack("=BBBBBBBBI", 2, 32, 0, 0, 254, 0, 0, rtype, 0))
    noise = _nl(RTM_NEWROUTE, seq ^ 1, other + b"\0" * (-len(other) % 4))
    assert parse_reply(noise + route, seq) == (rtype, 0)
    assert parse_reply(route[:-1], seq) is None           # truncated: not trusted


@given(st.integers(1, 4095), st.integers(1, 2**32 - 1))
def test_parse_reply_error_is_an_errno(err, seq):
    assert parse_reply(_nl(NLMSG_ERROR, seq, struct.pack("=i", -err) + b"\0" * 16), seq) == (0, err)


def test_route_lookup_against_this_kernel():
    r = Routes()
    assert r.route_of(ipaddress.ip_address("127.0.0.1")) == (2, 0)     # RTN_LOCAL
    assert r.route_of(ipaddress.ip_address("::1")) == (2, 0)
    assert len(request(ipaddress.ip_address("::1"), 7)) == 16 + 12 + 4 + 16


full = Sizes(8 * M, 8 * M, 4 * M, 4 * M, M)


@given(st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=300),
       st.integers(0, 128), st.integers(0, 1024))
def test_budget_never_overcommits_and_releases_to_zero(ops, per_client_mib, total_mib):
    b = Budget(full, per_client_mib * M, total_mib * M)
    held = []
    for client, release in ops:
        if release and held:
            key, sizes = held.pop(0)
            b.release(key, sizes)
            continue
        sizes = b.reserve(f"c{client}")
        if sizes is not None:
            held.append((f"c{client}", sizes))
        if b.total:
            assert b.committed <= b.total
        if b.per_client:
            assert all(v <= b.per_client for v in b.by_client.values())
    for key, sizes in held:
        b.release(key, sizes)
    assert b.committed == 0 and b.by_client == {}


def test_budget_first_tunnel_full_then_smaller_then_refused():
    b = Budget(full, 64 * M, 0)
    grants = []
    while (g := b.reserve("one")) is not None:
        grants.append(g)
    assert grants[0] is b.levels[0] and grants[1].cost < grants[0].cost
    assert sum(g.cost for g in grants) <= 64 * M and len(grants) > 400
    assert b.reserve("other") is b.levels[0]            # another client is unaffected


@given(st.floats(0.5, 1000), st.integers(1, 1000), st.lists(st.floats(0, 5), max_size=200))
def test_token_bucket_never_exceeds_burst_plus_rate(rate, burst, gaps):
    tb = TokenBuckets(rate, burst)
    now, allowed = 0.0, 0
    for g in gaps:
        now += g
        allowed += tb.allow("k", now)
    assert allowed <= burst + rate * now + 1e-6


def test_token_buckets_keep_at_most_max_keys():
    tb = TokenBuckets(1, 1, max_keys=100)
    for i in range(1000):
        tb.allow(i, 0.0)
    assert len(tb.buckets) == 100


def test_log_limiter_counts_what_it_drops():
    lim = LogLimiter(rate=1, burst=2, total_rate=100)
    allowed = sum(lim.allow("a", 0.0) for _ in range(10))
    assert allowed == 2
    line = lim.summary(10.0)
    assert "8 tunnel lines from 1 clients" in line and lim.summary(20.0) is None


@given(st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_client_key_is_the_prefix(x, n):
    ip = str(ipaddress.IPv6Address(x))
    key = client_key(ip, n)
    net = ipaddress.IPv6Network(key)
    assert net.prefixlen == n and ipaddress.IPv6Address(x) in net
    assert client_key("198.51.100.7", n) == "198.51.100.7"


def test_syn_deadline_linear_and_exponential():
    # linear (Linux 6.x, 4): SYNs at 0, 1, 2; the 4th would go at 3 s
    assert syn_deadline(2, 4) == 2.5
    # exponential: SYNs at 0, 1, 3; the 4th at 7 s
    assert syn_deadline(2, 0) == 5.0
    assert syn_deadline(5, 4) == 6.0            # 0..5 s, then 7 s


def test_verified_onward_socket_gets_user_timeout_back():
    """routability.set_unverified: 500 ms while the client is unverified (no
    SYN retransmission), then --user-timeout (issue 16), not the kernel's 0."""
    import socket

    from pepsock.relay import routability
    with socket.socket() as s:
        get = lambda: s.getsockopt(socket.IPPROTO_TCP, routability.TCP_USER_TIMEOUT)  # noqa: E731
        routability.set_unverified(s, True)
        assert get() == routability.UNVERIFIED_USER_TIMEOUT_MS
        routability.set_unverified(s, False, 120.0)
        assert get() == 120_000
        routability.set_unverified(s, False)
        assert get() == 0


def test_onward_syn_room_never_makes_a_larger_syn():
    """Onward TFO (RFC 8803 9.3): the relay's SYN, with a cookie option up to
    the slack longer and the early data put in it, is no larger than the
    client's SYN that carried `payload` bytes; a 24-byte Connect left out
    makes room for all early data in the same family."""
    import socket as so
    from pepsock.relay.routability import COOKIE_OPTION_SLACK, _IP_HEADER, onward_syn_room
    for cf in (so.AF_INET, so.AF_INET6):
        for df in (so.AF_INET, so.AF_INET6):
            for cookie in (True, False):
                for payload in (0, 1, 24, 25, 100, 1400):
                    room = onward_syn_room(cf, df, payload, cookie)
                    assert room >= 0
                    if room:
                        assert (_IP_HEADER[df] + COOKIE_OPTION_SLACK[cookie] + room
                                <= _IP_HEADER[cf] + payload)
    assert onward_syn_room(so.AF_INET, so.AF_INET, 24 + 100, False) >= 100
    assert onward_syn_room(so.AF_INET, so.AF_INET6, 24 + 100, True) == 24 + 100 - 20 - 8


# -- ConnectVerdicts: judge_connect remembered while its route answers hold --------

def _verdicts(*rules):
    from pepsock.policy import AddressRule
    from pepsock.relay.admission import Admission, ConnectVerdicts
    adm = Admission([(allow, AddressRule.parse(r)) for allow, r in rules], [], 100, 0)
    adm.listen_ports = {8443}
    return adm, ConnectVerdicts(adm)


def _raw(addr) -> bytes:
    a = ipaddress.ip_address(addr)
    return (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed


addresses = st.one_of(
    st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "192.0.2.7", "198.51.100.1", "10.1.2.3",
                     "169.254.169.254", "224.0.0.1", "2001:db8::1", "64:ff9b::7f00:1",
                     "::ffff:127.0.0.1", "0.0.0.0", "203.0.113.9"]),
    st.ip_addresses().map(str))


@given(addresses, st.sampled_from([80, 443, 8443]),
       st.sampled_from([("127.0.0.1", True), ("192.0.2.50", False), ("2001:db8::5", False),
                        ("127.0.0.1", False)]))
def test_connect_verdicts_say_what_judge_connect_says(dest, port, client):
    adm, verdicts = _verdicts((True, "127.0.0.0/8"), (False, "198.51.100.0/24"))
    ip, exempt = client
    now = __import__("time").monotonic()
    for _ in range(2):      # the first call judges, the second remembers
        refusal, family, packed, text = verdicts.judge(ip, exempt, _raw(dest), port, now)
        address = ipaddress.ip_address(text)
        assert address.packed == packed and family == (socket.AF_INET if address.version == 4
                                                       else socket.AF_INET6)
        assert normalize_ip(address) == normalize_ip(dest)
        assert refusal == adm.judge_connect(ip, exempt, address, port)


def test_connect_verdicts_last_no_longer_than_the_route_answers():
    """An entry ends when the first route answer it used ends: past it,
    the destination is judged anew (a route that changed counts as soon as
    the route cache says so, as without the verdict cache)."""
    import time
    adm, verdicts = _verdicts()
    now = time.monotonic()
    verdicts.judge("192.0.2.50", False, _raw("192.0.2.7"), 80, now)
    until = verdicts.cache[("192.0.2.50", _raw("192.0.2.7"), 80)][0]
    route_expiries = [adm.routes.cache[k][0] for k in
                      ((4, int(ipaddress.ip_address("192.0.2.7"))),
                       (4, int(ipaddress.ip_address("192.0.2.50"))))]
    assert until <= min(route_expiries) and until <= now + 1.0
    # Past it, a changed answer is taken: the route cache now says "local".
    for k in list(adm.routes.cache):
        adm.routes.cache[k] = (until + 10, (2, 0))       # RTN_LOCAL from now on
    refusal = verdicts.judge("192.0.2.50", False, _raw("192.0.2.7"), 80, until - 1e-6)[0]
    assert refusal is None or "this host" not in refusal[2]      # still the remembered one
    refusal = verdicts.judge("192.0.2.50", False, _raw("192.0.2.7"), 80, until + 1e-3)[0]
    assert refusal is not None and "host" in refusal[2], refusal


def test_connect_verdicts_hold_at_most_cache_max():
    import time
    adm, verdicts = _verdicts((True, "192.0.2.0/24"))
    verdicts.CACHE_MAX = 50
    now = time.monotonic()
    for port in range(1, 200):
        verdicts.judge("127.0.0.1", True, _raw("192.0.2.7"), port, now)
        assert len(verdicts.cache) <= 50
