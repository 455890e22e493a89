"""pepsock.policy: PEP_PROXY / PEP_NO_PROXY parsing and matching."""
import ipaddress

import pytest
from hypothesis import given, strategies as st

from pepsock.policy import AddressRule, Bypass, ConfigError, ProxyConfig, parse_hostport


@pytest.mark.parametrize("text, want", [
    ("192.0.2.1:5124", ("192.0.2.1", 5124)),
    (" pep.example.net:1 ", ("pep.example.net", 1)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
])
def test_pep_proxy_parses(text, want):
    assert parse_hostport(text) == want


@pytest.mark.parametrize("text, says", [
    ("192.0.2.1", "host:port"),
    ("192.0.2.1:", "port must be"),
    ("192.0.2.1:70000", "port must be"),
    ("2001:db8::1:443", "brackets"),
    ("[2001:db8::1]", "[IPv6-address]:port"),
    ("[pep.example]:1", "not an IPv6 address"),
    (":80", "host:port"),
])
def test_pep_proxy_errors_name_the_problem(text, says):
    with pytest.raises(ConfigError) as info:
        parse_hostport(text)
    assert says in str(info.value) and "PEP_PROXY" in str(info.value)


def test_unset_no_proxy_bypasses_loopback_and_link_local_only():
    bypass = Bypass.parse(None)
    for addr in ("127.0.0.1", "127.9.9.9", "::1", "169.254.1.1", "fe80::1", "::ffff:127.0.0.1"):
        assert bypass.matches(address=addr), addr
    assert bypass.matches(name="localhost") and bypass.matches(name="LocalHost.")
    for addr in ("192.0.2.1", "2001:db8::1", "10.0.0.1"):
        assert not bypass.matches(address=addr), addr


def test_empty_no_proxy_bypasses_nothing():
    bypass = Bypass.parse("")
    assert not bypass.matches(address="127.0.0.1") and not bypass.matches(name="localhost")


def test_star_bypasses_everything():
    assert Bypass.parse(" * ").matches(address="192.0.2.1", port=1)


def test_curl_suffix_rules():
    bypass = Bypass.parse("example.com,.example.org")
    assert bypass.matches(name="example.com")
    assert bypass.matches(name="www.EXAMPLE.com.")
    assert not bypass.matches(name="badexample.com")
    assert bypass.matches(name="example.org") and bypass.matches(name="a.b.example.org")


def test_cidrs_and_ports():
    bypass = Bypass.parse("192.0.2.0/24:443, [2001:db8::/32]:80, 198.51.100.7, 2001:db8:1::/48,"
                          "[2001:db8:2::1]:22, example.net:8080")
    assert bypass.matches(address="192.0.2.9", port=443)
    assert not bypass.matches(address="192.0.2.9", port=80)
    assert bypass.matches(address="::ffff:192.0.2.9", port=443)  # v4-mapped counts as v4
    assert bypass.matches(address="2001:db8::5", port=80)
    assert not bypass.matches(address="2001:db8::5", port=81)
    assert bypass.matches(address="198.51.100.7", port=1)
    assert bypass.matches(address="2001:db8:1::9", port=5)
    assert bypass.matches(address="2001:db8:2::1", port=22)
    assert not bypass.matches(address="2001:db8:2::1", port=23)
    assert bypass.matches(name="example.net", port=8080)
    assert not bypass.matches(name="example.net", port=80)


@pytest.mark.parametrize("text", ["exa mple.com", "192.0.2.0/33", "example.com:0", "[::1", "a:b",
                                  "[2001:db8::1]x"])
def test_bad_no_proxy_entries_are_named(text):
    with pytest.raises(ConfigError) as info:
        Bypass.parse(text)
    assert "PEP_NO_PROXY" in str(info.value)


def test_address_rule_port_ranges():
    rule = AddressRule.parse("0.0.0.0/0:1000-2000", "--allow-dest")
    assert rule.matches("192.0.2.1", 1500) and not rule.matches("192.0.2.1", 999)
    assert not rule.matches("2001:db8::1", 1500)
    with pytest.raises(ConfigError):
        AddressRule.parse("192.0.2.0/24:2000-1000")


def test_proxy_config_from_env():
    cfg = ProxyConfig.from_env({"PEP_PROXY": "[2001:db8::9]:5124", "PEP_NO_PROXY": "example.com"})
    assert cfg.pep == ("2001:db8::9", 5124)
    assert cfg.pep_for("www.example.com", None, 443) is None
    assert cfg.pep_for(None, ipaddress.ip_address("127.0.0.1"), 80) == cfg.pep  # set list: no default
    assert ProxyConfig.from_env({}).pep is None


@given(st.text(max_size=60))
def test_any_string_parses_or_raises_config_error(text):
    try:
        Bypass.parse(text)
    except ConfigError:
        pass
    try:
        parse_hostport(text)
    except ConfigError:
        pass


@given(st.ip_addresses(), st.integers(0, 128), st.integers(1, 65535))
def test_an_address_matches_its_own_network(addr, prefix, port):
    prefix = min(prefix, addr.max_prefixlen)
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    text = f"[{net}]:{port}" if addr.version == 6 else f"{net}:{port}"
    bypass = Bypass.parse(text)
    if addr.version == 6 and addr.ipv4_mapped is not None and prefix < 96:
        return  # a v6 network wider than the mapped range: v4-mapped addresses match as v4
    assert bypass.matches(address=addr, port=port)
    assert not bypass.matches(address=addr, port=port % 65535 + 1)


def test_port_zero_only_for_listening():
    assert parse_hostport("127.0.0.1:0", "--listen", listening=True) == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:0", "--listen", listening=True) == ("::1", 0)
    with pytest.raises(ConfigError, match="port must be 1-65535"):
        parse_hostport("127.0.0.1:0")
