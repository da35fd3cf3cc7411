"""A transport added from this file alone (issue #26), touching no project file: its config checks, its
hospital's reply, its aggregation and its report evidence, registered with `register_transport`; a run with it
completes, reports and verifies.

The toy: hospitals send their weights as float16 (half the bytes, in the clear), the server averages them in
float32. Registered when this module is imported: Flower's simulation workers unpickle `ToyTransport` by
reference, so they import this module, and register it, before they parse a run config that names it.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from secure_fedkim.config import ConfigError, parse_config
from secure_fedkim.deploy.policy import AggregationCaps
from secure_fedkim.federation.transport_specs import SPECS, TransportSpec
from secure_fedkim.federation.transports import TRANSPORTS, Transport, register_transport, unregister_transport


class ToySpec(TransportSpec):
    name = "toy"

    @classmethod
    def check(cls, fed):
        if fed.min_clients < 3:
            raise ValueError(f"min_clients: the toy transport averages at least 3 hospitals, not {fed.min_clients}")


class ToyTransport(Transport):
    spec = ToySpec
    server_sees = "each hospital's model update in clear, rounded to float16"
    report_mode = "plain"  # the report's JSON Schema (a static file) knows plain, ckks and secagg+
    title = "toy half-precision aggregation"
    update_form = "float16 weights"
    summary_sentence = "The server saw every hospital's update in the clear, in half precision (toy transport)."

    def reply(self, model_state, num_examples, config, home, client):
        return {"toy": ArrayRecord({k: v.half() for k, v in model_state.items()})}

    def aggregate(self, strategy, server_round, contributions):
        from secure_fedkim.federation.aggregation import flatten_state, weighted_mean

        strategy.round_stats["toy-replies"] = len(contributions)
        return weighted_mean(
            [flatten_state(content.array_records["toy"].to_torch_state_dict()) for _, _, content in contributions],
            [w for _, w, _ in contributions],
        )

    def report_evidence(self, run, out, findings):
        from secure_fedkim.report.collect import Finding

        replies = [(run.record(r) or {}).get("toy-replies") for r in range(1, run.rounds_run + 1)]
        findings["secure_aggregation"] = [Finding("attention", f"toy aggregation: the server received every hospital's "
                                                  f"update in the clear ({replies} per round)", None, "toy aggregation")]
        out["authenticated_payloads"] = "none (the simulation's in-process messages)"
        out["description"] = "Each hospital's model update reached the server in the clear, as float16."


register_transport(ToyTransport)


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_transport(ToyTransport)  # again: registering the same class twice does nothing
    yield
    unregister_transport("toy")


FEDERATION = {"clients": ["cleveland", "hungary", "switzerland", "va_long_beach"], "min_clients": 3, "aggregation": "toy"}
TOY = """
run: {name: toy, seed: 2, rounds: 2}
federation: {clients: [cleveland, hungary, switzerland, va_long_beach], min_clients: 3, aggregation: toy}
tasks:
  max_test_records: 60
  train:
    - {name: heart_disease, partition: natural}
client: {local_epochs: 1, batch_size: 32, token_dim: 16, num_tokens: 2}
baseline: {single_hospital: false}
"""


def config(**federation):
    return {"federation": {**FEDERATION, **federation}, "tasks": {"train": [{"name": "heart_disease", "partition": "natural"}]}}


def test_the_registry_knows_the_toy_and_its_config_checks():
    assert TRANSPORTS["toy"] is ToyTransport and SPECS["toy"] is ToySpec
    assert parse_config(config()).federation.aggregation == "toy"
    with pytest.raises(ConfigError, match=r"^<config>: federation\.min_clients: the toy transport averages at least 3 hospitals, not 2$"):
        parse_config(config(min_clients=2))
    with pytest.raises(ConfigError, match=r"federation\.aggregation: unknown transport 'tyo'; registered: he, plain, secagg, toy$"):
        parse_config(config(aggregation="tyo"))
    assert AggregationCaps(allowed_modes=["toy"]).allowed_modes == ["toy"]  # a hospital's policy may allow it
    with pytest.raises(ValueError, match="unknown transport 'tyo'"):
        AggregationCaps(allowed_modes=["he", "tyo"])


def test_an_incomplete_transport_is_refused_when_it_is_made_or_registered():
    with pytest.raises(TypeError, match="must say update_form, summary_sentence"):
        class Wordless(Transport):
            name = "wordless"
            server_sees, report_mode, title = "x", "plain", "x"

    with pytest.raises(TypeError, match=r"reply and aggregate .* or protocol_app and run_rounds .*; it overrides only \['aggregate'\]"):
        class HalfProtocol(ToyTransport):
            reply = Transport.reply

    class NoEvidence(Transport, abstract=True):  # an intermediate base: not checked, not registrable
        pass

    class Evidenceless(NoEvidence):
        name = "evidenceless"
        server_sees = report_mode = title = update_form = summary_sentence = "x"
        reply, aggregate = ToyTransport.reply, ToyTransport.aggregate

    with pytest.raises(TypeError, match=r"abstract: \['report_evidence'\]"):
        register_transport(Evidenceless)

    class Impostor(ToyTransport):
        pass

    with pytest.raises(ValueError, match="transport 'toy' is already registered"):
        register_transport(Impostor)
    assert TRANSPORTS["toy"] is ToyTransport


def test_a_run_with_the_toy_transport_completes_reports_and_verifies(tmp_path, issuer_key):
    from secure_fedkim.cli import main
    from secure_fedkim.report import verify_report, write_report
    from secure_fedkim.report.sign import KEY_ENV, public_key_path

    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(TOY)
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aggregation"] == {"mode": "toy"}
    last = json.loads((out / "metrics" / "round_002.json").read_text())
    assert last["toy-replies"] == 4 and set(last["clients"]) == set(FEDERATION["clients"])
    assert np.isfinite(last["client_model_test"]["heart_disease"]["auroc"])

    paths = write_report(out)
    report = json.loads(Path(paths.json).read_text())
    agg = report["aggregation"]
    assert agg["mode"] == "plain" and agg["description"].endswith("as float16.")
    assert "[4, 4] per round" in json.dumps(report)  # the toy's own evidence, read from the run directory
    assert verify_report(paths.json, public_key=public_key_path(Path(os.environ[KEY_ENV]))) == []
