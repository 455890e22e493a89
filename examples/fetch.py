"""Fetch a URL's first bytes over plain HTTP through a PEP with the Python client.

    python examples/fetch.py 198.51.100.2 8080 / --pep 192.0.2.1:5124
    PEP_PROXY=192.0.2.1:5124 python examples/fetch.py example.org 80 /
"""
import argparse
import sys

import pepsock
from pepsock.policy import parse_hostport


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path", nargs="?", default="/")
    parser.add_argument("--pep", type=parse_hostport, help="HOST:PORT (default: $PEP_PROXY)")
    args = parser.parse_args()
    try:
        with pepsock.create_connection((args.host, args.port), timeout=10, pep=args.pep) as sock:
            sock.sendall(f"GET {args.path} HTTP/1.0\r\nHost: {args.host}\r\n\r\n".encode())
            print(sock.recv(4096).decode(errors="replace"))
    except OSError as exc:  # a ConvertError carries the PEP's RFC 8803 code
        print(f"fetch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
