"""pepsock.pepstate (the shared PEP state files), route.settings and PEP_LOG; no network."""
import os
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from pepsock import pepstate, route
from pepsock.policy import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda k: k not in ("down_until", "rtt_us", "tfo", "cookie"))     # unknown keys: any value
values = st.text("abcdefghijklmnopqrstuvwxyz0123456789.:-", max_size=20)
known = st.fixed_dictionaries({}, optional={
    "down_until": st.integers(0, 10**18 - 1).map(str),
    "rtt_us": st.integers(0, 10**18 - 1).map(str),
    "tfo": st.sampled_from(["nocookie", "cookie"]), "reason": values,
    "cookie": st.binary(min_size=1, max_size=64).map(bytes.hex)})


@given(st.dictionaries(keys, values, max_size=8), known)
def test_format_and_parse_round_trip(fields, known_fields):
    fields = {**fields, **known_fields}
    assert pepstate.parse(pepstate.format_fields(fields)) == fields


@given(st.text(max_size=80))
def test_parse_never_raises(text):
    assert isinstance(pepstate.parse(text), dict)


@pytest.mark.parametrize("line,fields", [
    ("tfo=cookie junk rtt_us=5", {"tfo": "cookie", "rtt_us": "5"}),   # no '=': that word only
    ("=x down_until=7", {"down_until": "7"}),                         # no key
    ("down_until=+7 rtt_us=1_0 cookie=abc tfo=Cookie x=1", {"x": "1"}),  # values off grammar
    ("cookie=" + "ab" * 65 + " cookie=ab", {"cookie": "ab"}),        # 65 bytes: skipped
    ("cookie=ab cookie=zz", {"cookie": "ab"}),                        # a bad later word keeps it
    ("a=\u00e9 b=1\tc=2\rd=3", {"b": "1", "c": "2\rd=3"}),           # only blank/tab split
    ("a=1\nb=2", {"a": "1"}), ("a=1\0b=2", {"a": "1"}),              # the first line, a C string
])
def test_malformed_words_are_skipped_and_the_rest_kept(line, fields):
    assert pepstate.parse(line) == fields


def test_file_names_are_canonical():
    assert pepstate.file_name("::ffff:192.0.2.1", 5124) == "pep-192.0.2.1-5124"
    assert pepstate.file_name("2001:DB8:0:0::1", 80) == "pep-2001:db8::1-80"


def test_update_keeps_unknown_keys_and_removes_fields(tmp_path):
    d = str(tmp_path)
    (tmp_path / "pep-192.0.2.1-5124").write_text("future=thing tfo=cookie\n")
    pepstate.update(d, "pep-192.0.2.1-5124", down_until=123, tfo=None)
    assert (tmp_path / "pep-192.0.2.1-5124").read_text() == "future=thing down_until=123\n"
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]


def test_untrusted_files_are_ignored(tmp_path):
    d = str(tmp_path)
    (tmp_path / "pep-big").write_text("cookie=" + "a" * 5000)
    (tmp_path / "pep-junk").write_text("no equals sign here")
    assert pepstate.load(d, "pep-big") == {} and pepstate.load(d, "pep-junk") == {}


def test_down_until():
    assert pepstate.down_until({"down_until": "100"}, now=50) == 100
    assert pepstate.down_until({"down_until": "100"}, now=150) is None
    assert pepstate.down_until({"down_until": "x"}) is None


def test_state_directory_rules(tmp_path):
    mine = tmp_path / "mine"
    assert pepstate.state_dir({"PEP_STATE_DIR": str(mine)}) == str(mine)
    assert (mine.stat().st_mode & 0o777) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert pepstate.state_dir({"PEP_STATE_DIR": str(loose)}) is None
    assert pepstate.state_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == str(tmp_path / "pepsock")


def test_settings_parse_and_reject():
    conf = route.parse_settings({"PEP_PROXY": "192.0.2.1:5124, [2001:db8::1]:5124",
                                 "PEP_FALLBACK": "fail", "PEP_CONNECT_TIMEOUT": "0.6",
                                 "PEP_REPLY_TIMEOUT": "2", "PEP_CONFIRM": "192.0.2.0/24:443",
                                 "PEP_COOKIE": "00ff", "PEP_TFO_MODE": "cookie",
                                 "PEP_STATE_DIR": "/nonexistent/x/y"})
    assert conf.peps == (("192.0.2.1", 5124), ("2001:db8::1", 5124))
    assert (conf.fallback, conf.connect_timeout, conf.reply_timeout) == ("fail", 0.6, 2.0)
    assert conf.cookie == b"\x00\xff" and conf.tfo_mode == "cookie"
    for key, bad in (("PEP_FALLBACK", "maybe"), ("PEP_CONNECT_TIMEOUT", "-1"),
                     ("PEP_REPLY_TIMEOUT", "nan"), ("PEP_COOKIE", "xyz"),
                     ("PEP_TFO_MODE", "always"), ("PEP_PROXY", "192.0.2.1:5124,oops"),
                     ("PEP_CONFIRM", "not a rule!")):
        with pytest.raises(ConfigError, match=key):
            route.parse_settings({key: bad})


def test_pep_log_routes_the_python_client_through_logging(tmp_path):
    """PEP_LOG=info:/file: the hold-down line lands in the file (a refused PEP)."""
    log = tmp_path / "pep.log"
    code = ("import os, socket, pepsock\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
            "os.environ['PEP_PROXY'] = f'127.0.0.1:{port}'\n"
            "l = socket.create_server(('127.0.0.1', 0))\n"
            "c = pepsock.create_connection(l.getsockname(), timeout=5)\n"
            "print(type(c).__name__)\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "PEP_LOG": f"info:{log}",
           "PEP_STATE_DIR": str(tmp_path / "state"), "PEP_NO_PROXY": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "socket"          # fell back to a direct connection
    text = log.read_text()
    assert "refused (ECONNREFUSED); held down for 30 s" in text
    assert "no usable PEP" in text and "connecting directly" in text
    assert out.stderr == ""                        # to the file, not stderr


@pytest.mark.parametrize("bad,pep_log", [
    ({"PEP_FALLBACK": "fail "}, None), ({"PEP_REPLY_TIMEOUT": "1e3"}, None),
    ({"PEP_COOKIE": "aa bb"}, "off"), ({"PEP_TFO_MODE": "Cookie"}, "debug"),
    ({"PEP_LOG": "loud"}, None), ({"PEP_PROXY": "192.0.2.1"}, None),
])
def test_bad_value_one_line_and_runs_unproxied(tmp_path, bad, pep_log):
    """As libpep.so: a value off the grammar prints one line naming it (even under
    PEP_LOG=off) and the process's connections go direct; the PEP (a listener
    here) sees nothing."""
    code = ("import socket, pepsock\n"
            "pep = socket.create_server(('127.0.0.1', 0)); pep.settimeout(0.5)\n"
            "import os; os.environ.setdefault('PEP_PROXY', '127.0.0.1:%d' % pep.getsockname()[1])\n"
            "dest = socket.create_server(('127.0.0.1', 0))\n"
            "for _ in range(3):\n"
            "    c = pepsock.create_connection(dest.getsockname(), timeout=5)\n"
            "    print(type(c).__name__); c.close()\n"
            "try:\n"
            "    pep.accept(); print('PEP used')\n"
            "except socket.timeout:\n"
            "    pass\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "PEP_STATE_DIR": str(tmp_path),
           "PEP_NO_PROXY": "", **bad}
    if pep_log:
        env["PEP_LOG"] = pep_log
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["socket"] * 3, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line]
    assert len(lines) == 1 and lines[0].endswith("; running unproxied"), out.stderr
    assert list(bad)[0] in lines[0]


def test_settings_with_explicit_env_still_raise():
    with pytest.raises(ConfigError, match="PEP_FALLBACK.*blanks"):
        route.settings({"PEP_FALLBACK": " fail"})
