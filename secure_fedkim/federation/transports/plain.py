"""`plain`: hospitals send their model weights in clear; the server computes the sample-weighted mean."""

from __future__ import annotations

from flwr.app import ArrayRecord

from secure_fedkim.federation.transport_specs import PlainSpec
from secure_fedkim.federation.transports.base import Transport


class PlainTransport(Transport):
    spec = PlainSpec
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

    def report_evidence(self, run, out, findings):
        from secure_fedkim.report.collect import Finding  # the report's types, only when a report is built

        findings["secure_aggregation"] = [Finding("attention", "plain aggregation: the server received every hospital's update in the clear",
                                                  None, "plain aggregation")]
        out["authenticated_payloads"] = "none (the simulation's in-process messages)"
        out["description"] = "Each hospital's model update reached the server in the clear."
