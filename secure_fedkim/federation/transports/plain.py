"""`plain`: hospitals send their model weights in clear; the server computes the sample-weighted mean."""

from __future__ import annotations

from flwr.app import ArrayRecord

from secure_fedkim.federation.transports.base import Transport


class PlainTransport(Transport):
    name = "plain"
    server_sees = "each hospital's model update in clear"
    report_mode = "plain"
    title = "plain (unencrypted) aggregation"
    update_form = "plaintext weights"
    summary_sentence = "The server saw every hospital's update in the clear (no secure aggregation)."

    def reply(self, model_state, num_examples, config, home, client):
        return {"arrays": ArrayRecord(model_state)}

    def aggregate(self, strategy, server_round, contributions):
        from secure_fedkim.federation.aggregation import flatten_state, weighted_mean

        return weighted_mean(
            [flatten_state(content.array_records["arrays"].to_torch_state_dict()) for _, _, content in contributions],
            [w for _, w, _ in contributions],
        )
