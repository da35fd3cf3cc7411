"""The hospital's one ClientApp, the same in Flower's simulation (`secure_fedkim.drivers.run`) and on a SuperNode
(`secure_fedkim.drivers.deploy_app:client`).

`app` hands a message of a transport's own protocol (SecAgg+'s legacy workflow) to that transport's ClientApp
(`Transport.protocol_app`) and every Message-API message to `federation.node.message_app(transport_for)`, which
trains one round (`hospital_round`) and replies in the transport the round's config names: weights for `plain`,
a signed CKKS ciphertext only for `he`.

Heavy modules (torch, the data stack) are imported per message, not here: every SecAgg+ protocol stage starts a
fresh ClientApp process on a SuperNode, and only the training stage needs them. The hospital's round lives in
`secure_fedkim.federation.node`; its names are re-exported here, on first use, for the code that has always
imported them from this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from secure_fedkim.federation.node import (
        RoundResult,
        client_name,
        hospital_dp,
        hospital_round,
        planned_dp_steps,
        state_dir,
        with_target,
    )

# names of secure_fedkim.federation.node this module re-exports, loaded on first access (`__getattr__`, PEP 562)
_NODE_NAMES = ("RoundResult", "client_name", "hospital_dp", "hospital_round", "planned_dp_steps", "state_dir",
               "with_target")

__all__ = ["HospitalClientApp", "RoundResult", "app", "client_name", "hospital_dp", "hospital_round", "planned_dp_steps",
           "state_dir", "with_target"]


class HospitalClientApp(ClientApp):
    """Routes each message to the ClientApp of the transport that speaks its protocol."""

    def __call__(self, message: Message, context: Context) -> Message:
        from secure_fedkim.federation.transports import TRANSPORTS, transport_for

        for transport in TRANSPORTS.values():
            own = transport.protocol_app(message)
            if own is not None:
                return own(message, context)
        from secure_fedkim.federation.node import message_app

        return message_app(transport_for)(message, context)

    def __reduce__(self):
        # A simulation pickles its ClientApp to worker processes: they get the transports registered here (a
        # toy one registered by a test too) before they parse a run config that names one.
        from secure_fedkim.federation.transports import TRANSPORTS

        return _app_knowing, (tuple(TRANSPORTS.values()),)


def _app_knowing(transports: tuple) -> HospitalClientApp:
    """`app`, once each of `transports` is registered under its name in this process (unpickling a class by
    reference has imported its module, which may have registered it already)."""
    from secure_fedkim.federation.transports import TRANSPORTS, register_transport

    for transport in transports:
        if TRANSPORTS.get(transport.name) is not transport:
            register_transport(transport, replace=True)
    return app


app = HospitalClientApp()


def __getattr__(name: str):
    if name in _NODE_NAMES:
        from secure_fedkim.federation import node

        return getattr(node, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
