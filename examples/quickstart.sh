#!/usr/bin/env bash
# From a fresh Debian 12 / Ubuntu 24.04 machine to the demo's output, in one command (as root):
#
#     bash examples/quickstart.sh
#
# Installs the Debian packages it needs (a C compiler for libpep.so and the
# testbed's delay line, python3-venv, iproute2), makes a venv with the system
# Python (/usr/bin/python3; PEP 668 forbids pip installing into it directly),
# installs pepsock into it and runs examples/demo.py. Rerunning it skips what is
# already there. PEPSOCK_VENV picks the venv's folder (default: .venv here).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "quickstart: run as root (apt-get, and the demo's network namespaces)" >&2
    exit 2
fi

PACKAGES="build-essential python3 python3-venv iproute2 procps ca-certificates"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "quickstart: apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

VENV="${PEPSOCK_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "quickstart: venv in $VENV (/usr/bin/python3 $(/usr/bin/python3 -c 'import platform; print(platform.python_version())'))"
    /usr/bin/python3 -m venv "$VENV"
fi
echo "quickstart: pip install '.[demo]' (builds libpep.so)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ".[demo]"
"$VENV/bin/pep" --version

"$VENV/bin/python" examples/demo.py
echo "quickstart: done; the pep command is $VENV/bin/pep (or: . $VENV/bin/activate)"
