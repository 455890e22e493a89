"""pepsock.policy.embedded_ipv4: every IPv4 address an IPv6 destination may
reach through translation or tunnelling (issue 16).  Property tests build the
IPv6 forms from the RFCs' layouts and check the IPv4 comes back."""
import ipaddress

import pytest
from hypothesis import given, strategies as st

from pepsock.policy import NAT64_LENGTHS, embedded_ipv4, rfc6052_ipv4

v4s = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
suffix = st.integers(0, 2**128 - 1)


def rfc6052_embed(prefix: ipaddress.IPv6Network, v4: ipaddress.IPv4Address, junk: int):
    """RFC 6052 2.2's table: the IPv4 bytes after the prefix, bits 64-71 zero,
    then suffix bytes (`junk`)."""
    out = bytearray(prefix.network_address.packed)
    n = prefix.prefixlen // 8
    v = list(v4.packed)
    pos = n
    for byte in v:
        if pos == 8:
            out[8] = 0
            pos += 1
        out[pos] = byte
        pos += 1
    tail = junk.to_bytes(16, "big")
    for i in range(pos, 16):
        out[i] = tail[i]
    if pos <= 8:
        out[8] = 0
    return ipaddress.IPv6Address(bytes(out))


@given(v4s, suffix)
def test_nat64_well_known(v4, junk):
    a = rfc6052_embed(ipaddress.IPv6Network("64:ff9b::/96"), v4, junk)
    assert embedded_ipv4(a) == [v4]


@given(v4s, suffix)
def test_nat64_local_use_48(v4, junk):
    a = rfc6052_embed(ipaddress.IPv6Network("64:ff9b:1::/48"), v4, junk)
    assert embedded_ipv4(a) == [v4]


@given(st.sampled_from(NAT64_LENGTHS), st.integers(0, 2**32 - 1), v4s, suffix)
def test_configured_nat64_prefix_every_length(length, top, v4, junk):
    # a prefix under 2001:db8::/32 (documentation), random bits up to its length
    bits = (0x20010DB8 << 96 | top << 64) >> (128 - length) << (128 - length)
    prefix = ipaddress.IPv6Network((bits, length))
    a = rfc6052_embed(prefix, v4, junk)
    assert rfc6052_ipv4(a, length) == v4
    assert v4 in embedded_ipv4(a, [prefix])


@given(v4s, st.integers(0, 2**80 - 1))
def test_6to4(v4, low):
    a = ipaddress.IPv6Address(0x2002 << 112 | int(v4) << 80 | low)
    assert embedded_ipv4(a) == [v4]


@given(v4s, v4s, st.integers(0, 2**32 - 1))
def test_teredo_server_and_obfuscated_client(server, client, mid):
    a = ipaddress.IPv6Address(0x20010000 << 96 | int(server) << 64 | mid << 32
                              | (int(client) ^ 0xFFFFFFFF))
    assert embedded_ipv4(a) == list(dict.fromkeys([server, client]))


@given(v4s)
def test_mapped_and_siit_translated(v4):
    assert embedded_ipv4(ipaddress.IPv6Address(0xFFFF << 32 | int(v4))) == [v4]
    assert embedded_ipv4(ipaddress.IPv6Address(0xFFFF << 48 | int(v4))) == [v4]


@given(suffix)
def test_anything_else_embeds_nothing_and_never_raises(x):
    a = ipaddress.IPv6Address(x)
    got = embedded_ipv4(a)
    assert all(isinstance(v, ipaddress.IPv4Address) for v in got)
    special = [ipaddress.IPv6Network(n) for n in (
        "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::ffff:0:0/96",
        "::ffff:0:0:0/96")]
    if not any(a in n for n in special):
        assert got == []


def test_rfc6052_examples():
    # RFC 6052 section 2.4, 192.0.2.33 under 2001:db8::/32.../96
    for text, length in (("2001:db8:c000:221::", 32), ("2001:db8:1c0:2:21::", 40),
                         ("2001:db8:122:c000:2:2100::", 48), ("2001:db8:122:3c0:0:221::", 56),
                         ("2001:db8:122:344:c0:2:2100:0", 64), ("2001:db8:122:344::192.0.2.33", 96)):
        assert rfc6052_ipv4(ipaddress.IPv6Address(text), length) == \
            ipaddress.IPv4Address("192.0.2.33")
    with pytest.raises(ValueError):
        rfc6052_ipv4(ipaddress.IPv6Address("2001:db8::"), 72)


def test_ipv4_input_embeds_nothing():
    assert embedded_ipv4(ipaddress.IPv4Address("10.0.0.1")) == []
