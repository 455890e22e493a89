"""pepsock: reach TCP services through an RFC 8803 (0-RTT TCP Convert) PEP.

    import pepsock
    sock = pepsock.create_connection(("example.org", 443), pep=("198.51.100.1", 5124))

Without pep=, PEP_PROXY and PEP_NO_PROXY choose (docs/protocol.md).
"""
from .aio import open_connection
from .client import PepSocket, create_connection
from .policy import ConfigError
from .protocol import ConvertError, ErrorCode, ProtocolError
from .patching import patch, unpatch
from .tls import create_tls_connection, wrap_tls

__all__ = ["create_connection", "open_connection", "PepSocket", "ConvertError", "ErrorCode",
           "ProtocolError", "ConfigError", "wrap_tls", "create_tls_connection", "patch", "unpatch"]
__version__ = "0.1.0"
