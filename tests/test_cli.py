"""The `pep` command line: check, run/lib argument handling."""
import os
import subprocess
import sys

from converter import Converter


def pep(*args, host=None, env=None, **kw):
    """Run the pep command, inside `host`'s namespace when given; the run's
    PEP_STATE_DIR (conftest) unless `env` names one."""
    argv = [sys.executable, "-m", "pepsock.cli", *args]
    env = dict(os.environ if env is None else env)
    env.setdefault("PEP_STATE_DIR", os.environ["PEP_STATE_DIR"])
    return subprocess.run(host.cmd(*argv) if host else argv, capture_output=True, text=True,
                          timeout=30, env=env, **kw)


def check_against_converter(topology, name: str, tfo: int):
    """`pep check --pep` against a test converter in a fresh namespace."""
    host = topology.host(name, tfo=tfo)
    with host.enter():
        with Converter() as conv:
            return pep("check", "--pep", f"{conv.address[0]}:{conv.address[1]}", host=host)


def test_check_reports_the_machine_and_a_working_pep(topology):
    out = check_against_converter(topology, "chk", tfo=3)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "net.ipv4.tcp_fastopen=0x3" in out.stdout
    assert "answers RFC 8803" in out.stdout and "SupportedTCPExtensions" in out.stdout
    assert "cookie-less TFO PEP: the header rode in the SYN" in out.stdout


def test_check_without_client_bit_says_how_to_fix(topology):
    host = topology.host("chk0", tfo=0)
    out = pep("check", host=host, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert "sysctl -w net.ipv4.tcp_fastopen=1" in out.stdout


def test_check_unreachable_pep_fails(topology):
    host = topology.host("chk1", tfo=3)
    out = pep("check", "--pep", "127.0.0.1:9", host=host)
    assert out.returncode == 1 and "cannot reach the PEP at 127.0.0.1:9" in out.stdout


def test_bad_pep_argument_is_a_usage_error():
    out = pep("check", "--pep", "nonsense")
    assert out.returncode == 2 and "expected host:port" in out.stderr


def test_bad_pep_proxy_env_is_reported():
    out = pep("check", env={"PEP_PROXY": "1.2.3.4", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1 and "PEP_PROXY='1.2.3.4'" in out.stdout


def test_run_needs_a_command():
    out = pep("run", "--")
    assert out.returncode == 2 and "give a command" in out.stderr


def test_check_pep_without_tfo_still_reaches_it(topology):
    out = check_against_converter(topology, "chk2", tfo=0)
    assert "answers RFC 8803" in out.stdout, out.stdout + out.stderr
    assert "did not ride in the SYN" in out.stdout


def test_check_lists_every_pep_with_its_state_and_fails_on_an_error_reply(topology, tmp_path):
    from pepsock import pepstate
    host = topology.host("chk3", tfo=3)
    state = tmp_path / "state"
    with host.enter():
        with Converter() as good, Converter(error=(64, b"\x05")) as busy:
            pepstate.update(pepstate.state_dir({"PEP_STATE_DIR": str(state)}),
                            f"pep-127.0.0.1-{busy.address[1]}", down_until=2 ** 40,
                            reason="error64")
            env = {"PATH": "/usr/bin:/bin", "PEP_STATE_DIR": str(state),
                   "PEP_PROXY": f"{good.env_value},{busy.env_value}"}
            out = pep("check", host=host, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    good_line = next(ln for ln in lines if f"PEP 127.0.0.1:{good.address[1]}:" in ln)
    busy_line = next(ln for ln in lines if f"PEP 127.0.0.1:{busy.address[1]}:" in ln)
    assert ": up;" in good_line and "held down until" in busy_line and "(error64)" in busy_line
    assert f"FAIL  the PEP at 127.0.0.1:{busy.address[1]} answered Error 64 (RESOURCE_EXCEEDED)" \
        in out.stdout
    assert f"ok    127.0.0.1:{good.address[1]} is a cookie-less TFO PEP" in out.stdout


def test_check_reports_cookie_modes(topology, tmp_path):
    host = topology.host("chk4", tfo=3)
    env = {"PATH": "/usr/bin:/bin", "PEP_STATE_DIR": str(tmp_path / "state")}
    with host.enter():
        with Converter(cookie=b"cookie12", listener_no_cookie=False) as conv:
            first = pep("check", "--pep", conv.env_value, host=host, env=env)
            second = pep("check", "--pep", conv.env_value, host=host, env=env)
    assert first.returncode == 1
    assert "answered Error 3 (MISSING_COOKIE)" in first.stdout
    assert "Cookie TLV mode: stored the cookie" in first.stdout
    assert "the PEP requires TFO cookies" in first.stdout
    assert second.returncode == 0, second.stdout
    assert "TFO cookie (0-RTT once" in second.stdout
    assert "this client holds the PEP's cookie" in second.stdout
    assert "the PEP accepted the cookie this client sent" in second.stdout


def test_check_fails_on_a_value_off_the_grammar():
    """pep check reports the error itself (the clients would run unproxied)."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "PEP_PROXY": "192.0.2.1:5124", "PEP_FALLBACK": "fail "}
    out = pep("check", env=env)
    assert out.returncode == 1
    assert "FAIL  PEP_FALLBACK='fail ' has blanks around it" in out.stdout, out.stdout
    assert "running unproxied" not in out.stdout + out.stderr
