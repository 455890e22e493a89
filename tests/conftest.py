"""Shared fixtures: root/namespace gating and the --run-slow switch."""
import shutil

import pytest

from pepsock.testbed.netns import Topology, have_netns


@pytest.fixture(scope="session", autouse=True)
def private_pep_state(tmp_path_factory):
    """PEP_STATE_DIR for the whole run (tests may set their own): what the clients
    learn about PEPs (hold-downs, cookies) never reaches the user's real state or
    another test run's."""
    import os
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
