"""One hospital's node: the ClientApp of the Message-API transports, for any run config.

`app` trains one round (`secure_fedkim.federation.node.hospital_round`) and replies in the transport the round's
config names (`secure_fedkim.federation.transports.transport_for`): weights for `plain`, a signed CKKS
ciphertext only for `he`. SecAgg+ has its own ClientApp (`transports.secagg.secagg_app`), which calls the same
`hospital_round`. Both run unchanged in Flower's simulation or on a SuperNode.

The hospital's round itself lives in `secure_fedkim.federation.node` (below the transports, which call it);
its names are re-exported here for the code that has always imported them from this module.
"""

from __future__ import annotations

from secure_fedkim.federation.node import (
    RoundResult,
    client_name,
    hospital_dp,
    hospital_round,
    message_app,
    planned_dp_steps,
    state_dir,
    with_target,
)
from secure_fedkim.federation.transports import transport_for

__all__ = ["RoundResult", "app", "client_name", "hospital_dp", "hospital_round", "planned_dp_steps", "state_dir",
           "with_target"]

app = message_app(transport_for)
