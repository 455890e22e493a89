"""Hostile input, part 1: fuzzing both RFC 8803 parsers (issue 6).

* libFuzzer + ASan + UBSan on preload/tlv.c (fuzz/fuzz_tlv.c), ~20 s here;
  the long run by hand is in fuzz/README.md.
* atheris (coverage-guided) on pepsock/protocol.py with the C parser as a
  differential oracle, ~10 s here; skipped if atheris is not installed.
* hypothesis (no coverage feedback) on the same invariants, always.
* the committed corpus replayed through both parsers: same verdicts.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from reliability_helpers import FUZZ, ROOT, build_fuzzer, build_tlv_shared, libfuzzer_stats

sys.path.insert(0, str(FUZZ))
import fuzz_protocol  # noqa: E402

CORPUS = FUZZ / "corpus"
LIBFUZZER_SECONDS = int(os.environ.get("PEPSOCK_FUZZ_SECONDS", "20"))
ATHERIS_SECONDS = int(os.environ.get("PEPSOCK_ATHERIS_SECONDS", "10"))


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    path = build_tlv_shared(tmp_path_factory.mktemp("clib"))
    if path is None:
        pytest.skip("needs a C compiler to build preload/tlv.c")
    return path


@pytest.fixture
def with_c_oracle(clib, monkeypatch):
    monkeypatch.setenv("PEPSOCK_FUZZ_CLIB", str(clib))
    fuzz_protocol._clib = None
    yield
    fuzz_protocol._clib = None


def test_corpus_is_committed_and_covers_every_verdict():
    files = list(CORPUS.iterdir())
    assert len(files) >= 100
    counts = fuzz_protocol.replay([CORPUS])
    # accepted, rejected as version 0, malformed 1, and requests refused 1/2
    assert {"accept", "reject0", "reject1", "accept-req1", "accept-req2"} <= set(counts), counts


def test_corpus_replay_python_and_c_agree(with_c_oracle):
    counts = fuzz_protocol.replay([CORPUS])
    assert sum(counts.values()) == len(list(CORPUS.iterdir()))


def test_libfuzzer_c_parser_under_asan_ubsan(tmp_path):
    binary, why = build_fuzzer(tmp_path)
    if binary is None:
        pytest.skip(why)
    work = tmp_path / "corpus"
    work.mkdir()
    proc = subprocess.run(
        [str(binary), f"-max_total_time={LIBFUZZER_SECONDS}", "-max_len=1100", "-timeout=5",
         "-rss_limit_mb=1024", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
         str(work), str(CORPUS)],
        capture_output=True, text=True, timeout=LIBFUZZER_SECONDS + 60, cwd=tmp_path)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-",
                                                                        "timeout-", "oom-"))]
    assert proc.returncode == 0 and not crashes, (
        f"libFuzzer found a failing input {crashes} (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    stats = libfuzzer_stats(proc.stderr)
    runs = stats.get("number_of_executed_units", 0)
    print(f"libFuzzer: {runs} inputs in {LIBFUZZER_SECONDS} s, "
          f"{stats.get('new_units_added')} new units, corpus {len(list(work.iterdir()))}")
    assert runs > 100_000


def test_atheris_python_parser_with_c_oracle(tmp_path, clib):
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris not installed (pip install atheris); hypothesis covers the "
                    "Python parser without coverage feedback")
    work = tmp_path / "corpus"
    work.mkdir()
    env = dict(os.environ, PEPSOCK_FUZZ_CLIB=str(clib), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_protocol.py"), str(work), str(CORPUS),
         f"-max_total_time={ATHERIS_SECONDS}", "-max_len=1100", "-print_final_stats=1",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=ATHERIS_SECONDS + 60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"atheris found a failing input:\n{proc.stderr[-4000:]}"
    runs = libfuzzer_stats(proc.stderr).get("number_of_executed_units", 0)
    print(f"atheris: {runs} inputs in {ATHERIS_SECONDS} s")
    assert runs > 5_000


def _mode():
    return st.integers(0, 255).map(lambda b: bytes((b,)))


def _valid_messages():
    from pepsock import protocol as p
    addrs = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
        lambda a: not (a.is_multicast or a.is_unspecified or str(a) == "255.255.255.255"
                      or (a.version == 6 and a.ipv4_mapped is not None)))
    opts = st.lists(st.builds(p.TCPOption, st.integers(2, 255), st.binary(max_size=20)),
                    max_size=4)
    connect = st.builds(p.Connect, addrs, st.integers(1, 65535), opts)
    others = st.sampled_from([p.Info(), p.Cookie(b"c00kie"), p.Error(96), p.Error(97, b"\x01"),
                              p.ExtendedTCPHeader(b"\x00" * 6), p.SupportedTCPExtensions((2, 4)),
                              p.UnknownTLV(0x42, b"\x00\x00")])
    return st.tuples(connect, st.lists(others, max_size=3, unique_by=lambda t: int(t.type))) \
        .map(lambda t: p.Message((t[0],) + tuple(t[1])).encode())


_settings = settings(max_examples=int(os.environ.get("PEPSOCK_HYPOTHESIS_EXAMPLES", "1500")),
                     deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(raw=st.binary(max_size=1100))
def test_hypothesis_arbitrary_bytes(raw):
    fuzz_protocol.check(raw)


@_settings
@given(mode=_mode(), msg=_valid_messages(), flips=st.lists(
    st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 1100), tail=st.binary(max_size=40))
def test_hypothesis_mutated_valid_messages(mode, msg, flips, cut, tail):
    data = bytearray(msg)
    for pos, val in flips:
        if data:
            data[pos % len(data)] = val
    fuzz_protocol.check(mode + bytes(data[:cut]) + tail)
