"""The `pep` command: check, relay, run, lib, eval, python.

Each subcommand's work lives in its own module; this file only parses the
command line and hands over.
"""
from __future__ import annotations

import argparse
import sys

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


def cmd_run(args) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        print("pep run: give a command to run, e.g. pep run --pep 192.0.2.1:5124 -- curl URL",
              file=sys.stderr)
        return 2
    from . import preload
    return preload.run(argv, pep=args.pep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pep", description="Reach TCP services through an RFC 8803 (0-RTT) PEP.")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="can this machine do 0-RTT; does the PEP answer?")
    p.add_argument("--pep", type=_pep_arg, metavar="HOST:PORT",
                   help="PEP to probe (default: $PEP_PROXY)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("lib", help="print the absolute path of libpep.so")
    p.set_defaults(func=cmd_lib)

    p = sub.add_parser("run", help="run a command with libpep.so preloaded")
    p.add_argument("--pep", type=_pep_arg, metavar="HOST:PORT",
                   help="PEP to use (default: $PEP_PROXY)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=cmd_run)

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
