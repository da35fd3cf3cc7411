"""The transports, by the name `federation.aggregation` gives them (one module each, like Opacus's accountants).

Adding a transport: a module with a `Transport` subclass, and one line here.
"""

from __future__ import annotations

from secure_fedkim.federation.transports.base import Transport
from secure_fedkim.federation.transports.he import CKKSTransport
from secure_fedkim.federation.transports.plain import PlainTransport
from secure_fedkim.federation.transports.secagg import SecAggTransport

TRANSPORTS: dict[str, type[Transport]] = {t.name: t for t in (PlainTransport, CKKSTransport, SecAggTransport)}


def transport_for(cfg) -> Transport:
    """The transport the config's `federation.aggregation` names."""
    name = cfg.federation.aggregation
    if name not in TRANSPORTS:
        raise ValueError(f"federation.aggregation: unknown transport {name!r}; one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](cfg)


__all__ = ["TRANSPORTS", "CKKSTransport", "PlainTransport", "SecAggTransport", "Transport", "transport_for"]
