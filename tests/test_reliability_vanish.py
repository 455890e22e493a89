"""A client that vanishes without a FIN or a reset (a phone that leaves
coverage: the very client a PEP near a radio link serves).  Its idle tunnel
must not hold the relay's fds forever: with TCP keepalive on the relay's
sockets, the kernel's keepalive settings (set here, inside the relay's
namespace only, to 1 s / 1 s / 2 probes) bound how long a dead peer is kept.
"""
from __future__ import annotations

import time

import pytest

from conftest import require_root, require_tool
from pepsock.testbed.netns import Topology
from relay_helpers import Relay, Server, convert_open, echo, read_reply, recv_exact
from reliability_helpers import relay_metrics, wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.root]


@pytest.fixture
def lab():
    require_root()
    require_tool("iptables")
    topo = Topology(prefix="rb")
    try:
        cli = topo.host("vcli", tfo=3)
        rel = topo.host("vrel", tfo=3)
        topo.link(cli, ["192.0.2.1/24"], rel, ["192.0.2.2/24"])
        for key, value in (("tcp_keepalive_time", 1), ("tcp_keepalive_intvl", 1),
                           ("tcp_keepalive_probes", 2)):
            rel.sysctl(f"net.ipv4.{key}", value)
        with rel.enter():
            srv = Server(echo, host="127.0.0.1")
        relay = Relay("--listen", "192.0.2.2:0", "--allow-client", "192.0.2.0/24",
                      "--allow-dest", "127.0.0.0/8", "--stats", "127.0.0.1:0",
                      prefix=rel.cmd())
        yield topo, cli, rel, relay, srv
        relay.stop()
        srv.close()
    finally:
        topo.cleanup()


def test_vanished_client_does_not_hold_its_tunnel_forever(lab):
    topo, cli, rel, relay, srv = lab
    with cli.enter():
        s = convert_open(relay.addr, srv.addr)
        msg, rest = read_reply(s)
        assert msg.error is None
        s.sendall(b"ping")
        assert recv_exact(s, 4, rest) == b"ping"
    assert relay_metrics(relay, rel)["pep_relay_tunnels_open"] == 1
    time.sleep(0.3)  # every byte acknowledged: the tunnel is idle, not retransmitting
    # The client's host goes silent: no FIN, no RST, nothing answers.
    cli.run("iptables", "-w", "5", "-A", "INPUT", "-j", "DROP")
    cli.run("iptables", "-w", "5", "-A", "OUTPUT", "-j", "DROP")
    t0 = time.monotonic()
    gone = wait_until(lambda: relay_metrics(relay, rel)["pep_relay_tunnels_open"] == 0, 15, 0.25)
    took = time.monotonic() - t0
    s.close()
    assert gone, f"the relay still holds the dead client's tunnel after 15 s:\n{relay.log[-1500:]}"
    assert took < 10, took
