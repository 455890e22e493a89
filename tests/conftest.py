"""Shared fixtures: root/namespace gating, the --run-slow switch, and the
client suites' clean PEP_* environment, TFO namespace and echo server."""
import os
import shutil

import pytest

from pepsock.testbed.netns import Topology, have_netns


@pytest.fixture(scope="session", autouse=True)
def private_pep_state(tmp_path_factory):
    """PEP_STATE_DIR for the whole run (tests may set their own): what the clients
    learn about PEPs (hold-downs, cookies) never reaches the user's real state or
    another test run's."""
    if "PEP_STATE_DIR" not in os.environ:
        os.environ["PEP_STATE_DIR"] = str(tmp_path_factory.mktemp("pepstate"))
    yield


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run long soaks and load tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_root():
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs `{name}` (apt-get install it; .ci/run does)")
    return path


@pytest.fixture
def topology(request):
    """A fresh set of namespaces, removed after the test whatever happens."""
    require_root()
    topo = Topology(prefix="t")
    yield topo
    topo.cleanup()


@pytest.fixture
def pep_state(tmp_path, monkeypatch):
    """No PEP_* settings from outside; a PEP_STATE_DIR of the test's own,
    returned (not created: the client creates it)."""
    for key in list(os.environ):
        if key.startswith("PEP_"):
            monkeypatch.delenv(key)
    state = tmp_path / "pepstate"
    monkeypatch.setenv("PEP_STATE_DIR", str(state))
    return state


@pytest.fixture
def ns(topology):
    """Run the test inside a fresh namespace with TFO fully on
    (net.ipv4.tcp_fastopen=3 set there, never on the host), on its loopback."""
    host = topology.host("tfo", tfo=3)
    with host.enter():
        yield host


@pytest.fixture
def echo(ns):
    """An echo server on the namespace's loopback."""
    from converter import EchoServer
    with EchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def lib():
    """preload/libpep.so of this checkout, built once (the libpep.so suites)."""
    import preload_helpers
    return preload_helpers.build()


@pytest.fixture(scope="module")
def lo(tmp_path_factory):
    """One namespace with TFO on (3), an HTTP server on 127.0.0.1 and ::1."""
    require_root()
    from converter import web_namespace
    with web_namespace("pl", tmp_path_factory.mktemp("www")) as host:
        yield host
