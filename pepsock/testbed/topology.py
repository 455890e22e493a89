"""The evaluation testbed: five namespaces in a row.

    client --[wireless]-- wrouter -- pep -- drouter --[wired]-- server
    192.0.2.10      192.0.2.1|.129   .130|198.51.100.2   .1|203.0.113.1   203.0.113.10

* wrouter: delay line (one-way D_w each way, so R1 = client-PEP RTT = 2 D_w) and
  the bottleneck towards the client (downlink), its rate changed on a schedule:
  either in user space, inside the delay line (`qdisc` fifo, codel or fq_codel:
  see linkq.c), or the kernel's TBF + bfifo on wrouter's egress (`qdisc`
  "kernel", the reference).  Optionally the uplink too (`uplink_mbit`), and
  random loss in either direction (`loss_down`, `loss_up`, seeded).
* drouter: delay line (R2 = PEP-server RTT = 2 D_d) and TBF + bfifo at the wired
  rate on its egress towards the PEP.
* every namespace: congestion control pinned, TFO on (3), no metrics saved (the cache keeps TFO cookies),
  TSO/GSO/GRO off on every veth.  IPv6 (2001:db8::/32) is configured alongside.

The delay lines sit in the forwarding path by policy routing: traffic that
arrives on the left veth is routed into TUN "dla", the delay line writes it to
TUN "dlb" after D, and the kernel forwards it on from there (and back).
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
from dataclasses import dataclass

from .delayline import DelayLine
from .netns import Host, Topology, delete_namespace
from .shaping import QDISCS, LineShaper, Shaper

ADDR = {
    "client": "192.0.2.10", "wr_c": "192.0.2.1", "wr_p": "192.0.2.129", "pep_w": "192.0.2.130",
    "pep_d": "198.51.100.2", "dr_p": "198.51.100.1", "dr_s": "203.0.113.1", "server": "203.0.113.10",
}
ADDR6 = {
    "client": "2001:db8:1::10", "wr_c": "2001:db8:1::1", "wr_p": "2001:db8:2::1", "pep_w": "2001:db8:2::2",
    "pep_d": "2001:db8:3::2", "dr_p": "2001:db8:3::1", "dr_s": "2001:db8:4::1", "server": "2001:db8:4::10",
}


@dataclass
class Settings:
    r1_ms: float = 10.0             # client-PEP RTT (wireless side)
    r2_ms: float = 40.0             # PEP-server RTT (wired side)
    wireless_mbit: float = 10.0     # starting rate of the bottleneck (then the schedule)
    wired_mbit: float = 100.0
    queue_bytes: int = 93_750       # bottleneck bfifo: 1 BDP of the wireless hop (75 Mbit/s x R1 10 ms);
                                    # 10 ms at 75 Mbit/s, 75 ms at 10 Mbit/s ("small buffers")
    wired_queue_bytes: int = 1_000_000
    cc: str = "cubic"
    tfo: int = 3
    delay_impl: str = "c"           # "c" or "py"
    qdisc: str = "kernel"           # bottleneck: "kernel" (TBF + bfifo) or in the delay line:
                                    # "fifo" (drop-tail, queue_bytes), "codel", "fq_codel"
    uplink_mbit: float | None = None   # shape the uplink (client -> PEP) too, same qdisc
    uplink_queue_bytes: int | None = None  # its FIFO limit (default: queue_bytes)
    loss_down: float = 0.0          # random loss on the wireless hop, PEP -> client (0..1)
    loss_up: float = 0.0            # and client -> PEP
    seed: int = 1                   # of the loss
    pep_client_cc: str | None = None   # the relay's congestion control towards the client
    pep_server_cc: str | None = None   # and towards the server (default: cc for both)
    tcp_buf_max: int | None = None  # raise net.ipv4.tcp_rmem/wmem max in every namespace (long paths)


class Testbed:
    """Builds the chain; `close()` (or the context manager) removes everything."""

    __test__ = False   # not a pytest class

    def __init__(self, settings: Settings | None = None, prefix: str = "ev"):
        self.s = settings or Settings()
        self.topo = Topology(prefix=prefix)
        self.delaylines: list[DelayLine] = []
        self.shapers: list[Shaper] = []
        self._closed = False
        atexit.register(self.close)
        self._mark()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------
    def _build(self) -> None:
        s, t = self.s, self.topo
        self.notes: list[str] = []
        if s.delay_impl == "c":
            from .delayline import build
            try:
                build()
            except Exception as e:   # no compiler, or the source was not installed
                self.notes.append(f"C delay line unavailable ({e}); using the Python one")
                s.delay_impl = "py"
        cc_as_default = self._check_cc(s.cc)
        self.client = t.host("client", tfo=s.tfo)
        self.wrouter = t.host("wrouter", forwarding=True, tfo=s.tfo)
        self.pep = t.host("pep", forwarding=True, tfo=s.tfo)
        self.drouter = t.host("drouter", forwarding=True, tfo=s.tfo)
        self.server = t.host("server", tfo=s.tfo)
        for h in self.hosts():
            if cc_as_default:
                h.sysctl("net.ipv4.tcp_congestion_control", s.cc)
            h.sysctl("net.ipv4.tcp_no_metrics_save", 1)
            if s.tcp_buf_max:
                h.sysctl("net.ipv4.tcp_rmem", f"4096 131072 {s.tcp_buf_max}")
                h.sysctl("net.ipv4.tcp_wmem", f"4096 16384 {s.tcp_buf_max}")
            h.sysctl("net.ipv4.conf.all.rp_filter", 0)
            h.sysctl("net.ipv4.conf.default.rp_filter", 0)
            h.sysctl("net.ipv6.conf.all.accept_dad", 0)
            h.sysctl("net.ipv6.conf.default.accept_dad", 0)
        A, A6 = ADDR, ADDR6

        def l(a, ka, b, kb, p4, p6):
            return t.link(a, [f"{A[ka]}/{p4}", f"{A6[ka]}/64"], b, [f"{A[kb]}/{p4}", f"{A6[kb]}/64"],
                          offloads=False)

        self.if_c_wr, self.if_wr_c = l(self.client, "client", self.wrouter, "wr_c", 25, 64)
        self.if_wr_p, self.if_p_wr = l(self.wrouter, "wr_p", self.pep, "pep_w", 25, 64)
        self.if_p_dr, self.if_dr_p = l(self.pep, "pep_d", self.drouter, "dr_p", 24, 64)
        self.if_dr_s, self.if_s_dr = l(self.drouter, "dr_s", self.server, "server", 24, 64)

        # Routes (v4 and v6).
        for fam, a in (("-4", A), ("-6", A6)):
            def rt(h, dest, via):
                h.run("ip", fam, "route", "add", dest, "via", via)
            rt(self.client, "default", a["wr_c"])
            rt(self.wrouter, "default", a["pep_w"])
            rt(self.pep, "default", a["dr_p"])
            rt(self.drouter, "default", a["pep_d"])
            rt(self.server, "default", a["dr_s"])
        self.pep.run("ip", "-4", "route", "add", "192.0.2.0/25", "via", A["wr_p"])
        self.pep.run("ip", "-6", "route", "add", "2001:db8:1::/64", "via", A6["wr_p"])

        # Delay lines: wireless link in wrouter, wired link in drouter.
        self._delay(self.wrouter, self.if_wr_c, self.if_wr_p, s.r1_ms)
        self._delay(self.drouter, self.if_dr_p, self.if_dr_s, s.r2_ms)

        # Shaping: the wireless downlink (bottleneck), maybe its uplink, and the wired downlink.
        if s.qdisc not in QDISCS:
            raise ValueError(f"qdisc {s.qdisc!r}: choose from {', '.join(QDISCS)}")
        if s.delay_impl != "c" and (s.qdisc != "kernel" or s.uplink_mbit or s.loss_down or s.loss_up):
            raise RuntimeError("a user-space bottleneck, uplink shaping and loss need the C delay line")
        self.wline, self.dline = self.delaylines[0], self.delaylines[1]
        self.qdisc = None
        self.bottleneck = self.wired = None
        self.uplink = None
        if s.loss_down and s.qdisc == "kernel":      # the loss lives in the line, the queue in tc
            LineShaper(self.wline, "ba", float("inf"), 0, "fifo", s.loss_down, s.seed)
        self.use_qdisc(s.qdisc, s.wireless_mbit * 1e6)
        if s.uplink_mbit or s.loss_up:
            self.uplink = LineShaper(self.wline, "ab", (s.uplink_mbit or float("inf")) * 1e6,
                                     s.uplink_queue_bytes or s.queue_bytes,
                                     "fifo" if s.qdisc == "kernel" else s.qdisc, s.loss_up, s.seed + 1)
        self.shapers = [self.bottleneck, self.wired]

    def use_qdisc(self, kind: str, rate_bps: float | None = None) -> None:
        """Switch the downlink bottleneck to `kind` (between runs; what is queued is dropped)."""
        if kind not in QDISCS:
            raise ValueError(f"qdisc {kind!r}: choose from {', '.join(QDISCS)}")
        if kind == self.qdisc:
            return
        rate = rate_bps or self.bottleneck.rate_bps
        s = self.s
        # The wired downlink (server -> PEP) gets the same kind of queue: through the PEP it
        # carries the server leg's bursts, and a 1 MB FIFO there would add its delay to the
        # interactive flow, whatever the bottleneck does (the thesis ran FQ-CoDel everywhere).
        if kind == "kernel":
            if self.s.delay_impl == "c":
                self.dline.set("ba", rate="inf", qdisc="fifo", limit=0)
            self.wired = Shaper(self.drouter, self.if_dr_p, s.wired_mbit * 1e6, s.wired_queue_bytes)
        else:
            if isinstance(self.wired, Shaper):
                self.wired.close()
                self.drouter.run("tc", "qdisc", "del", "dev", self.if_dr_p, "root", check=False)
            if isinstance(self.wired, LineShaper):
                self.wired.set_qdisc(kind)
            else:
                self.wired = LineShaper(self.dline, "ba", s.wired_mbit * 1e6, s.wired_queue_bytes, kind)
        if kind == "kernel":
            if self.s.delay_impl == "c":
                self.wline.set("ba", rate="inf", qdisc="fifo", limit=0)
            self.bottleneck = Shaper(self.wrouter, self.if_wr_c, rate, s.queue_bytes)
        else:
            if isinstance(self.bottleneck, Shaper):
                self.bottleneck.close()
                self.wrouter.run("tc", "qdisc", "del", "dev", self.if_wr_c, "root", check=False)
            if isinstance(self.bottleneck, LineShaper):
                self.bottleneck.set_qdisc(kind)
            else:
                self.bottleneck = LineShaper(self.wline, "ba", rate, s.queue_bytes, kind, s.loss_down, s.seed)
        if self.uplink is not None:
            self.uplink.set_qdisc("fifo" if kind == "kernel" else kind)
        self.qdisc = kind
        if getattr(self, "shapers", None):
            self.shapers[:] = [self.bottleneck, self.wired]

    def _check_cc(self, cc: str) -> bool:
        """Whether `cc` can be every namespace's default.

        A namespace may only default to an algorithm in the host-wide allowed
        list (reno and bbr here), and the host is not ours to change. Where it
        is not allowed, the namespaces keep their default and every experiment
        socket pins `cc` itself with TCP_CONGESTION (agents, and the relay's
        --client-cc/--server-cc), which root may do for any available one.
        """
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            if cc not in f.read().split():
                raise RuntimeError(f"congestion control {cc} is not available in this kernel")
        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
            if cc in f.read().split():
                return True
        self.notes.append(f"{cc} is not in the host's allowed list: namespaces keep their "
                          f"default and each experiment socket sets {cc} with TCP_CONGESTION")
        return False

    RUN_DIR = "/run/pepsock-testbed"

    def _mark(self) -> None:
        """Note which process owns this tag, so `stale_testbeds()` can tell leftovers
        (owner killed with SIGKILL) from testbeds in use."""
        try:
            os.makedirs(self.RUN_DIR, exist_ok=True)
            with open(os.path.join(self.RUN_DIR, self.topo.tag), "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError:
            pass

    def _unmark(self) -> None:
        try:
            os.unlink(os.path.join(self.RUN_DIR, self.topo.tag))
        except OSError:
            pass

    def _delay(self, router: Host, left_if: str, right_if: str, rtt_ms: float) -> None:
        one_way_us = int(rtt_ms * 1000 / 2)
        dl = DelayLine(router, "dla", "dlb", one_way_us, one_way_us, impl=self.s.delay_impl)
        self.delaylines.append(dl)
        for tun in ("dla", "dlb"):
            router.run("ip", "link", "set", tun, "up", "txqueuelen", "10000")
            router.sysctl(f"net.ipv4.conf.{tun}.rp_filter", 0)
        for fam in ("-4", "-6"):
            router.run("ip", fam, "route", "add", "default", "dev", "dla", "table", "100")
            router.run("ip", fam, "route", "add", "default", "dev", "dlb", "table", "101")
            router.run("ip", fam, "rule", "add", "iif", left_if, "lookup", "100", "pref", "100")
            router.run("ip", fam, "rule", "add", "iif", right_if, "lookup", "101", "pref", "101")

    # -- use ------------------------------------------------------------------------
    def hosts(self) -> list[Host]:
        return list(self.topo.hosts.values())

    def reset(self, wireless_mbit: float | None = None) -> None:
        """Between runs: back to the starting rate.

        The TCP metrics cache is NOT flushed: every namespace has tcp_no_metrics_save=1,
        so the kernel saves no RTT, ssthresh or cwnd in it, and what it does hold are the
        TFO cookies.  `ip tcp_metrics flush` would throw away the client's cookie for the
        PEP (and the relay's for the server), so the next connection's SYN would carry a
        cookie request and no data: the first byte at 2R1+2R2 instead of R1+2R2, one
        more R1 on every transfer (551 ms on the satellite hop), which no deployed
        client that talks to its PEP pays."""
        self.bottleneck.set_rate((wireless_mbit or self.s.wireless_mbit) * 1e6)
        self.bottleneck.changes.clear()

    def close(self) -> dict:
        # _closed is set only once everything is gone: if a second Ctrl-C or a SIGTERM
        # interrupts this, the atexit call runs it again (every step is idempotent)
        if self._closed:
            return {}
        stats = {}
        for sh in self.shapers:
            sh.close()
        for i, dl in enumerate(self.delaylines):
            try:
                stats[f"delayline{i}"] = dl.stop()
            except Exception:
                pass
        self.topo.cleanup()
        self._unmark()
        self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        return stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def install_signal_handlers() -> dict:
    """SIGTERM/SIGHUP behave like Ctrl-C (KeyboardInterrupt), so `finally` blocks tear down.
    Returns the previous handlers, for `restore_signal_handlers`."""
    def raise_kbi(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, raise_kbi)
        except (ValueError, OSError):
            pass
    return old


def restore_signal_handlers(old: dict) -> None:
    for sig, h in old.items():
        try:
            signal.signal(sig, h)
        except (ValueError, OSError, TypeError):
            pass


def _owners() -> dict[str, int]:
    """tag -> owner pid for every marked testbed."""
    out = {}
    try:
        names = os.listdir(Testbed.RUN_DIR)
    except OSError:
        return out
    for tag in names:
        try:
            with open(os.path.join(Testbed.RUN_DIR, tag)) as f:
                out[tag] = int(f.readline())
        except (OSError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def stale_testbeds() -> list[str]:
    """Tags of testbeds whose owning process is gone (it was killed with SIGKILL)."""
    return [tag for tag, pid in _owners().items() if not _alive(pid)]


def remove_stale() -> list[str]:
    """Tear down every stale testbed: kill what runs inside, delete its namespaces."""
    removed = []
    for tag in stale_testbeds():
        for name in leftover_namespaces(tag + "-"):
            delete_namespace(name)
        try:
            os.unlink(os.path.join(Testbed.RUN_DIR, tag))
        except OSError:
            pass
        removed.append(tag)
    return removed


def leftover_namespaces(prefix: str = "ev") -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [l.split()[0] for l in out.splitlines() if l.startswith(prefix)]


def ping_rtt_ms(src: Host, dst: str, count: int = 5, interval: float = 0.2) -> float:
    """Median RTT of `count` pings (ms), sent by the agents' ICMP echo (the image has no ping)."""
    from . import procs
    p = procs.agent(src, "ping", dst, "--count", count, "--interval", interval)
    rtts = sorted(procs.result(p, count * (interval + 2) + 10)["rtts_ms"])
    if not rtts:
        raise RuntimeError(f"ping {dst} from {src.name} failed")
    return rtts[len(rtts) // 2]


if __name__ == "__main__":
    with Testbed() as tb:
        print("rtt client->server", ping_rtt_ms(tb.client, ADDR["server"]))
        print("rtt client->pep", ping_rtt_ms(tb.client, ADDR["pep_w"]))
        print("rtt pep->server", ping_rtt_ms(tb.pep, ADDR["server"]))
        print("rtt6 client->server", ping_rtt_ms(tb.client, ADDR6["server"]))
