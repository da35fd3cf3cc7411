"""The transports, by the name `federation.aggregation` gives them (one module each, like Opacus's accountants).

Adding a transport: a module with a `Transport` subclass (and, for config checks, its `TransportSpec` in
`secure_fedkim.federation.transport_specs`), registered with `register_transport`: a built-in one on the line
below, a plug-in one wherever it is defined.
"""

from __future__ import annotations

from secure_fedkim.federation.transports.base import (
    TRANSPORTS,
    Transport,
    register_transport,
    transport_for,
    unregister_transport,
)
from secure_fedkim.federation.transports.he import CKKSTransport
from secure_fedkim.federation.transports.plain import PlainTransport
from secure_fedkim.federation.transports.secagg import SecAggTransport

for _transport in (PlainTransport, CKKSTransport, SecAggTransport):
    register_transport(_transport)

__all__ = ["TRANSPORTS", "CKKSTransport", "PlainTransport", "SecAggTransport", "Transport", "register_transport",
           "transport_for", "unregister_transport"]
