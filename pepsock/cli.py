"""The `pep` command: check, relay, run, lib, dissector, cookie, eval, python.

Each subcommand's work lives in its own module; this file only parses the
command line and hands over.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .policy import ConfigError, parse_hostport


def _pep_arg(text: str):
    try:
        return parse_hostport(text, "--pep")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_check(args) -> int:
    from . import check
    return check.main(pep=args.pep)


def cmd_lib(args) -> int:
    from . import preload
    print(preload.library_path())
    return 0


def cmd_dissector(args) -> int:
    from . import dissector
    print(dissector.path())
    return 0


def cmd_run(args) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        print("pep run: give a command to run, e.g. pep run --pep 192.0.2.1:5124 -- curl URL",
              file=sys.stderr)
        return 2
    from . import run
    return run.main(argv, pep=args.pep, mode=args.mode, allow_direct=args.allow_direct)


def cmd_cookie(args) -> int:
    import time

    from .relay.cookies import SecretError, load_secrets, make_token
    try:
        secret = load_secrets([args.secret])[0]
    except SecretError as exc:
        print(f"pep cookie: --secret {exc}", file=sys.stderr)
        return 2
    if args.expires is not None and not 0 < args.expires <= 36500:
        print("pep cookie: --expires takes 0 < DAYS <= 36500", file=sys.stderr)
        return 2
    expires = 0 if args.expires is None else int(time.time() + args.expires * 86400)
    try:
        token = make_token(secret, args.id, expires)
    except ValueError as exc:
        print(f"pep cookie: {exc}", file=sys.stderr)
        return 2
    print(token.hex())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pep", description="Reach TCP services through an RFC 8803 (0-RTT) PEP.")
    parser.add_argument("--version", action="version", version=f"pep {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="can this machine do 0-RTT; does the PEP answer?")
    p.add_argument("--pep", type=_pep_arg, metavar="HOST:PORT",
                   help="PEP to probe (default: $PEP_PROXY)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("lib", help="print the absolute path of libpep.so")
    p.set_defaults(func=cmd_lib)

    p = sub.add_parser("dissector", help="print the path of the RFC 8803 Wireshark/tshark dissector")
    p.set_defaults(func=cmd_dissector)

    p = sub.add_parser("run", help="run a command with its TCP connections on the PEP")
    p.add_argument("--pep", type=_pep_arg, metavar="HOST:PORT",
                   help="PEP to use (default: $PEP_PROXY)")
    p.add_argument("--mode", choices=("auto", "preload", "seccomp", "both"), default="auto",
                   help="libpep.so (preload), the seccomp supervisor (static and Go "
                        "programs), or both (a script that runs static or Go programs); "
                        "auto picks by the program (default)")
    p.add_argument("--allow-direct", action="store_true",
                   help="run a program neither path can serve unproxied instead of refusing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "cookie", help="print a Cookie TLV token that `pep relay --cookie-secret` accepts "
                       "from any address (clients: PEP_COOKIE=<hex>)")
    p.add_argument("--secret", required=True, metavar="FILE",
                   help="the relays' --cookie-secret file (its first secret signs)")
    p.add_argument("--id", required=True, metavar="NAME",
                   help="who holds it (1-32 of A-Z a-z 0-9 . _ @ + -), shown in the relay's log")
    p.add_argument("--expires", type=float, metavar="DAYS",
                   help="valid for this many days (default: until the secret is retired)")
    p.set_defaults(func=cmd_cookie)

    # relay, eval and python have their own option parsers; everything after the word is theirs.
    sub.add_parser("relay", help="run the splice-based RFC 8803 relay (the PEP)", add_help=False)
    sub.add_parser("eval", help="reproduce the thesis's evaluation in namespaces", add_help=False)
    sub.add_parser("python", help="run a Python program with pepsock.patch() applied",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["relay"]:
        from .relay.cli import main as relay_main
        return relay_main(argv[1:])
    if argv[:1] == ["eval"]:
        from .extras import missing_extra
        problem = missing_extra("eval", argv[1:])
        if problem:
            print(f"pep eval: {problem}", file=sys.stderr)
            return 2
        from .testbed.eval import main as eval_main
        return eval_main(argv[1:])
    if argv[:1] == ["python"]:
        from .pyrun import main as pyrun_main
        return pyrun_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `pep ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
