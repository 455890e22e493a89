"""The RFC 8803 Wireshark/tshark dissector (a Lua plugin) that ships in the package.

`pep dissector` prints `path()`: use it as
`tshark -X lua_script:$(pep dissector) -r capture.pcap -Y convert`,
or copy the file into Wireshark's personal Lua plugins folder.
"""
from __future__ import annotations

import os

FILENAME = "rfc8803.lua"


def path() -> str:
    """Absolute path of the installed rfc8803.lua."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), FILENAME)
