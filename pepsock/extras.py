"""Optional dependencies: which pip extra a command needs, said in one line.

`pip install pepsock` stays small (no dependencies: the client, libpep.so,
`pep relay` with --stats, `pep check`); `pep eval` needs the `eval` extra
(pyroute2 to change the wireless rate over netlink, matplotlib for the
report's figures, ~60 MB with numpy). Rather than a ModuleNotFoundError deep in
the testbed, the command stops before it starts and names the extra.
"""
from __future__ import annotations

import importlib.util

# extra name -> the modules it brings (import names, not distribution names)
EXTRAS = {
    "eval": ("pyroute2", "matplotlib"),
    "demo": ("pyroute2",),          # examples/demo.py: the shaping, without the report's figures
}

# arguments with which the command runs without its extra (help, cleanup)
_NEEDS_NOTHING = {"-h", "--help", "--cleanup"}


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    missing = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_extra(extra: str, argv=()) -> str | None:
    """None if the command can run; else one line naming what is missing and the fix."""
    if _NEEDS_NOTHING.intersection(argv):
        return None
    missing = missing_modules(extra)
    if not missing:
        return None
    return (f"needs {', '.join(missing)} (the '{extra}' extra): "
            f"pip install 'pepsock[{extra}]'")
