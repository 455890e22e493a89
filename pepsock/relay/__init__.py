"""`pep relay`: the splice-based reference PEP (RFC 8803 Transport Converter).

    python -m pepsock.relay --listen 0.0.0.0:1080 --allow-client 198.51.100.0/24

Modules, one concern each:

* `config`    the Config dataclass: every option, its default and why.
* `admission` who may use the relay and where to: destination and client
              rules, the built-in deny list, the relay's own addresses, limits.
* `tunnel`    one client<->server pair: header, onward connect, splice data path.
* `routability` has a client shown it receives what we send (TFO cookie, its
              handshake); the host settings that defeat TFO cookies.
* `cookies`   RFC 8803 Cookie TLV values: address cookies, `pep cookie` tokens,
              secrets and rotation, the --tfo-key file.
* `server`    the epoll loop, listeners, timers, signals, workers, stats server.
* `stats`     counters and their Prometheus text (shared across workers).
* `cli`       argparse front end: `main(argv)`.

Every protocol byte goes through `pepsock.protocol`.
"""
from .cli import main

__all__ = ["main"]
