"""The `pep` command line: check, run/lib argument handling."""
import subprocess
import sys

import pytest

from converter import Converter


def pep(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pepsock.cli", *args], capture_output=True,
                          text=True, timeout=30, **kw)


def test_check_reports_the_machine_and_a_working_pep(topology):
    host = topology.host("chk", tfo=3)
    with host.enter():
        with Converter() as conv:
            out = subprocess.run(host.cmd(sys.executable, "-m", "pepsock.cli", "check", "--pep",
                                          f"{conv.address[0]}:{conv.address[1]}"),
                                 capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "net.ipv4.tcp_fastopen=0x3" in out.stdout
    assert "answers RFC 8803" in out.stdout and "SupportedTCPExtensions" in out.stdout
    assert "rode in the SYN" in out.stdout


def test_check_without_client_bit_says_how_to_fix(topology):
    host = topology.host("chk0", tfo=0)
    out = subprocess.run(host.cmd(sys.executable, "-m", "pepsock.cli", "check"),
                         capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert "sysctl -w net.ipv4.tcp_fastopen=1" in out.stdout


def test_check_unreachable_pep_fails(topology):
    host = topology.host("chk1", tfo=3)
    out = subprocess.run(host.cmd(sys.executable, "-m", "pepsock.cli", "check", "--pep",
                                  "127.0.0.1:9"), capture_output=True, text=True, timeout=30)
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
    host = topology.host("chk2", tfo=0)
    with host.enter():
        with Converter() as conv:
            out = subprocess.run(host.cmd(sys.executable, "-m", "pepsock.cli", "check", "--pep",
                                          f"{conv.address[0]}:{conv.address[1]}"),
                                 capture_output=True, text=True, timeout=30)
    assert "answers RFC 8803" in out.stdout, out.stdout + out.stderr
    assert "did not ride in the SYN" in out.stdout
