"""What a tunnel may reach, handed to it as one explicit object.

A tunnel (and a Closer finishing an Error reply) needs the configuration,
the counters, the admission policy and budget, the Cookie TLV policy, the
pipe pool and four reactor calls; nothing else of the process.  The server
builds one TunnelContext per process and keeps it current (admission and
the unverified-clients flag are set once the listeners are bound).
"""
from __future__ import annotations

from typing import Callable

from .config import Config
from .pipes import PipePool
from .stats import Stats


class TunnelContext:
    __slots__ = ("cfg", "stats", "admission", "cookies", "clients_unverified", "pipes",
                 "register", "rebind", "forget", "call_later", "linger_timeout", "closers",
                 "tunnel_done")

    def __init__(self, cfg: Config, stats: Stats, pipes: PipePool, reactor,
                 tunnel_done: Callable, cookies=None, linger_timeout: float = 2.0):
        self.cfg = cfg
        self.stats = stats
        #: admission.Admission (with its .budget), set by the server.
        self.admission = None
        #: cookies.Cookies under --cookie-secret, else None.
        self.cookies = cookies
        #: May accepted clients be unverified (--no-cookie, or a host that
        #: waives TFO cookies)?  Then each tunnel checks (routability.py).
        self.clients_unverified = False
        self.pipes = pipes
        # The reactor calls a tunnel makes (reactor.Reactor).
        self.register = reactor.register
        self.rebind = reactor.rebind
        self.forget = reactor.forget
        self.call_later = reactor.call_later
        #: How long an Error reply's connection may linger for the client's FIN.
        self.linger_timeout = linger_timeout
        #: Error replies lingering now (tunnel.Closer; MAX_CLOSERS bounds them).
        self.closers = 0
        #: Called once when a tunnel ends: releases its admission and budget.
        self.tunnel_done = tunnel_done
